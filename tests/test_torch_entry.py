"""mfconvert.convert (PyTorch entry) gives the same ONNX as exporting and running convert_onnx."""
import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import mfconvert
from mfconvert.convert import ConvertConfig, convert_onnx
from mfconvert.convert.torch_entry import export_onnx


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.norm = torch.nn.Linear(64, 128), torch.nn.Linear(128, 64), torch.nn.LayerNorm(64)

    def forward(self, x):
        return self.norm(x + self.fc2(torch.nn.functional.gelu(self.fc1(x))))


def fingerprint(model: onnx.ModelProto):
    inits = {i.name: numpy_helper.to_array(i).tobytes() for i in model.graph.initializer}
    return [(n.op_type, n.domain, [inits.get(t, t) for t in n.input]) for n in model.graph.node]


@pytest.mark.parametrize("dynamo", [False, True])
def test_module_and_its_export_convert_to_the_same_model(tmp_path, dynamo):
    torch.manual_seed(0)
    block = Block().eval()
    x = torch.randn(2, 9, 64)
    kw = dict(input_names=["x"], dynamic_axes={"x": {0: "batch", 1: "seq"}}, opset=18, dynamo=dynamo)
    via_torch = mfconvert.convert(block, (x,), **kw)
    path = tmp_path / "block.onnx"
    export_onnx(block, (x,), str(path), **kw)
    via_onnx = convert_onnx(str(path), ConvertConfig(), input_shapes={"x": [2, 9, 64]})
    assert fingerprint(via_torch.model) == fingerprint(via_onnx.model)
    assert [c.macs_removed for c in via_torch.report.changes] == [18 * 64 * 128, 18 * 128 * 64]
    # Converted models pass the checker and strict shape inference, inputs and outputs unchanged.
    onnx.checker.check_model(via_torch.model, full_check=True)
    onnx.shape_inference.infer_shapes(via_torch.model, strict_mode=True)
    original = onnx.load(path)
    assert via_torch.model.graph.input == original.graph.input
    assert via_torch.model.graph.output == original.graph.output
