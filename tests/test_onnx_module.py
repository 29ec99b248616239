"""OnnxModule executes ONNX graphs in PyTorch as ORT does, trains, and writes back."""
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from mfconvert.convert import ConvertConfig, convert_onnx
from mfconvert.convert.torch_entry import export_onnx
from mfconvert.nn.onnx_module import OnnxModule, UnsupportedOp
from mfconvert.runtime import session


class SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.pool = torch.nn.MaxPool2d(2)
        self.fc = torch.nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        h = self.pool(torch.relu(self.bn(self.conv(x))))
        return torch.nn.functional.softmax(self.fc(h.flatten(1)), -1)


def run_ort(model, feeds):
    return session(model.SerializeToString(), threads=1).run(None, feeds)


def test_minilm_executes_like_ort_and_gradients_reach_every_trainable_weight(minilm_onnx_path):
    from mfconvert.zoo.minilm import tokenizer
    model = onnx.load(minilm_onnx_path)
    feeds = tokenizer()(["Return the sum of the array elements.", "A short one."])
    module = OnnxModule(model)
    out = module(**feeds)[0]
    # Same float ops in another order: measured max |diff| ≈ 1.2e-7 on unit-norm embeddings.
    np.testing.assert_allclose(out.detach().numpy(), run_ort(model, feeds)[0], atol=2e-6)
    out.sum().backward()
    assert all(p.grad is not None for p in module.parameters())
    # The word-embedding table is frozen by default (Gather data): buffers, not parameters.
    assert sum(p.numel() for p in module.parameters()) < 12_000_000


def test_cnn_export_runs_and_shift_layers_write_back(tmp_path):
    torch.manual_seed(0)
    cnn = SmallCNN().eval()
    x = torch.randn(3, 1, 8, 8)
    path = tmp_path / "cnn.onnx"
    export_onnx(cnn, (x,), str(path), input_names=["x"])
    converted = convert_onnx(str(path), ConvertConfig(), allow_unchanged=False).model
    module = OnnxModule(converted).eval()
    with torch.no_grad():
        got = module(x=x)[0].numpy()
    # Shift layers run the bit-exact integer path in eval mode; the rest is float.
    np.testing.assert_allclose(got, run_ort(converted, {"x": x.numpy()})[0], atol=1e-6)
    # Training changes the shift layer's latent weights; to_onnx repacks them as codes.
    module.train()
    opt = torch.optim.SGD(module.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        module(x=x)[0][:, 0].sum().backward()
        opt.step()
    trained = module.to_onnx()
    onnx.checker.check_model(trained)
    before = {i.name: numpy_helper.to_array(i) for i in converted.graph.initializer}
    after = {i.name: numpy_helper.to_array(i) for i in trained.graph.initializer}
    changed = [n for n in before if not np.array_equal(before[n], after[n])]
    assert any(n.endswith(".codes") for n in changed)                # repacked shift weights
    assert any(not n.endswith((".codes", ".exponent")) for n in changed)  # float conv weights
    module.eval()
    with torch.no_grad():
        np.testing.assert_allclose(module(x=x)[0].numpy(), run_ort(trained, {"x": x.numpy()})[0], atol=1e-6)


def test_unsupported_op_is_an_error_naming_op_and_node():
    node = helper.make_node("RandomUniformLike", ["x"], ["y"], name="my_noise")   # random ops stay out
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    with pytest.raises(UnsupportedOp, match="node 'my_noise': op RandomUniformLike is not supported"):
        OnnxModule(helper.make_model(graph))


def test_arithmetic_constants_are_buffers_not_parameters():
    """One-element initializers (an epsilon, GELU's coefficients; tf2onnx/jax2tf keep them as
    initializers) and non-finite fills are the graph's arithmetic, not weights: never trained
    (magika's LayerNorm epsilon, trained below 0, turned a finetune into NaN). They still run and
    write back unchanged."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "eps"], ["a"]),
             helper.make_node("Max", ["a", "floor"], ["y"])]
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
             numpy_helper.from_array(np.full(3, -np.inf, np.float32), "floor")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    module = OnnxModule(model)
    assert list(module.params) == ["t_w"]
    x = rng.normal(size=(2, 4)).astype(np.float32)
    np.testing.assert_allclose(module(x=torch.from_numpy(x))[0].detach().numpy(), run_ort(model, {"x": x})[0], rtol=1e-6)
    written = {i.name: numpy_helper.to_array(i) for i in module.to_onnx().graph.initializer}
    assert written["eps"] == np.float32(1e-6) and np.all(written["floor"] == -np.inf)
