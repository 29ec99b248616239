"""Reading, checking and writing ONNX files with one-line errors that name the file."""
from __future__ import annotations

import math
import os

import numpy as np
import onnx


class ConversionError(Exception):
    """A bad input or a refused request; the message is one line naming the file, node or flag."""


from mfconvert.convert.files import check_outputs, write_bytes_atomic  # noqa: E402 (files.py raises ConversionError)


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def load_model(source: str | os.PathLike | onnx.ModelProto) -> tuple[onnx.ModelProto, str, int]:
    """(model, label for messages, size in bytes); a truncated or corrupt file is a ConversionError."""
    if isinstance(source, onnx.ModelProto):
        return source, "<model>", source.ByteSize()
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such file")
    try:
        model = onnx.load(path)
    except Exception as err:  # protobuf DecodeError, external-data errors, ...
        raise ConversionError(f"{path}: not a readable ONNX model ({_first_line(err)})") from None
    if not model.graph.node:
        raise ConversionError(f"{path}: not an ONNX model with a graph (empty or truncated file?)")
    return model, path, os.path.getsize(path)


def check_model(model: onnx.ModelProto, label: str) -> None:
    try:
        onnx.checker.check_model(model)
    except Exception as err:
        raise ConversionError(f"{label}: invalid ONNX model ({_first_line(err)})") from None
    check_initializers(model, label)


def check_initializers(model: onnx.ModelProto, label: str) -> None:
    """Each initializer holds as many values as its dims say (the checker does not look)."""
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            continue
        where = f"{label}: initializer '{init.name}' with dims {list(init.dims)}"
        if any(d < 0 for d in init.dims):
            raise ConversionError(f"{where}: negative dimension")
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type))
        except Exception:
            continue   # UNDEFINED or a type numpy has no dtype for: the checker's business
        if onnx.TensorProto.DataType.Name(init.data_type) in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2"):
            continue   # packed several values a byte
        if init.HasField("raw_data"):
            have, want = len(init.raw_data), math.prod(init.dims) * dtype.itemsize
            unit = "bytes of raw data"
        else:
            try:
                onnx.numpy_helper.to_array(init)
                continue
            except Exception as err:
                raise ConversionError(f"{where}: its data does not match ({_first_line(err)})") from None
        if have != want:
            raise ConversionError(f"{where}: needs {want} {unit}, has {have}")


def output_path_for(input_path: str) -> str:
    """MODEL.onnx → MODEL.mf.onnx beside it."""
    root, ext = os.path.splitext(input_path)
    return f"{root}.mf{ext or '.onnx'}"


def check_output_path(output: str, input_path: str | None, force: bool) -> None:
    """The model output's rules (convert/files.py): never the input, not a directory, replaced only
    with `force`, in a directory that exists and can be written."""
    check_outputs({"": output}, {"the input model": input_path}, force)


def save_model_atomic(model: onnx.ModelProto, output: str) -> int:
    """Write to a temporary file beside `output`, then rename: readers never see half a file."""
    return write_bytes_atomic(output, model.SerializeToString())   # a WriteError (OSError) names `output`
