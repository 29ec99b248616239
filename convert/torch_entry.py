"""convert: the PyTorch entry. Exports the module to ONNX, then runs the same passes as
convert_onnx, so a module and its ONNX export convert to the same model."""
from __future__ import annotations

import os
import tempfile
import warnings

import torch

from mfconvert.convert.config import ConvertConfig
from mfconvert.convert.onnx_entry import ConversionResult, convert_onnx


def export_onnx(module: torch.nn.Module, example_inputs: tuple, path: str, *, input_names=None,
                output_names=None, dynamic_axes=None, opset: int = 17, dynamo: bool = False) -> None:
    """torch.onnx.export with mfconvert's defaults (eval mode, constant folding, one file)."""
    module = module.eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)   # TorchScript exporter notice
        extra = {"external_data": False, "verbose": False} if dynamo else {}
        torch.onnx.export(module, tuple(example_inputs), path, input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes, opset_version=opset,
                          dynamo=dynamo, **extra)


def convert(module: torch.nn.Module, example_inputs, config: ConvertConfig | None = None,
            output: str | None = None, *, input_names=None, output_names=None, dynamic_axes=None,
            opset: int = 17, dynamo: bool = False, force: bool = False) -> ConversionResult:
    """Convert a PyTorch module: export it with `example_inputs`, then convert the ONNX.

    The report counts multiplications at the example inputs' shapes.
    """
    example_inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    names = list(input_names or [f"input_{i}" for i in range(len(example_inputs))])
    with tempfile.TemporaryDirectory(prefix="mfconvert-") as tmp:
        path = os.path.join(tmp, "exported.onnx")
        export_onnx(module, example_inputs, path, input_names=names, output_names=output_names,
                    dynamic_axes=dynamic_axes, opset=opset, dynamo=dynamo)
        shapes = {n: list(t.shape) for n, t in zip(names, example_inputs) if isinstance(t, torch.Tensor)}
        return convert_onnx(path, config, output=output, input_shapes=shapes, force=force)
