"""Every op of ours has all its faces and they agree (nn/registry.py): the C++ library registers
exactly the registry's ops, docs/ops.md specifies each, a registered pass emits each, and the
PyTorch layer round-trips the node and computes what the kernel computes."""
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import mfconvert.passes  # noqa: F401  (registers the passes)
from mfconvert import ort_ops
from mfconvert.nn import registry
from mfconvert.nn.onnx_module import OnnxModule
from mfconvert.passes.registry import PASSES

ROOT = Path(__file__).resolve().parents[1]
ENTRIES = list(registry.OPS.values())
EXAMPLES = [(e, x) for e in ENTRIES for x in e.examples()]


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _model(example: registry.Example) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(v.shape)) for n, v in example.feeds.items()]
    inits = [numpy_helper.from_array(v, n) for n, v in example.constants.items()]
    graph = helper.make_graph([example.node], "g", inputs,
                              [helper.make_tensor_value_info(example.node.output[0], TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid(ort_ops.DOMAIN, ort_ops.OPSET_VERSION)])


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def test_entries_name_their_faces():
    headings = {_slug(m.group(1)) for m in re.finditer(r"^##+ (.+)$", (ROOT / "docs/ops.md").read_text(), re.M)}
    for e in ENTRIES:
        assert e.domain == ort_ops.DOMAIN and registry.OPS[(e.domain, e.op)] is e
        assert e.spec in headings, f"{e.op}: docs/ops.md has no section #{e.spec}"
        assert e.passes and all(p in PASSES for p in e.passes), f"{e.op}: passes {e.passes} not all in {list(PASSES)}"
        assert isinstance(e.layer, type) and issubclass(e.layer, torch.nn.Module)
        assert e.flow_inputs >= 1 and e.examples(), f"{e.op}: no example node"


def test_library_registers_exactly_the_registry_ops():
    # The source's op list (kOps, one getter per op) has one op per entry ...
    source = (ROOT / "ort_ops/src/register_ops.cc").read_text()
    getters = re.findall(r"mfconvert::(\w+)CustomOp,", source.split("kOps[]", 1)[1].split("};", 1)[0])
    assert sorted(getters) == sorted(e.op for e in ENTRIES)
    # ... and the built library runs a node of each (an unregistered name fails the session).
    for e in ENTRIES:
        opts = ort.SessionOptions()
        opts.register_custom_ops_library(ort_ops.library_path())
        ort.InferenceSession(_model(e.examples()[0]).SerializeToString(), opts, providers=["CPUExecutionProvider"])
    bogus = _model(ENTRIES[0].examples()[0])
    bogus.graph.node[0].op_type = "NotAnOpOfOurs"
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(ort_ops.library_path())
    with pytest.raises(Exception, match="NotAnOpOfOurs"):
        ort.InferenceSession(bogus.SerializeToString(), opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("entry,example", EXAMPLES, ids=[x.node.name for _, x in EXAMPLES])
def test_layer_round_trips_and_matches_kernel(entry, example):
    model = _model(example)
    module = OnnxModule(model).eval()
    layer = next(iter(module.layers.values()))
    assert isinstance(layer, entry.layer)
    # from_onnx → to_onnx writes back the same initializers and adds none
    written = module.to_onnx()
    assert [n.name for n in written.graph.initializer] == list(example.constants)
    for init in written.graph.initializer:
        value = numpy_helper.to_array(init)
        assert value.dtype == example.constants[init.name].dtype
        np.testing.assert_array_equal(value, example.constants[init.name], err_msg=init.name)
    node = written.graph.node[0]
    assert list(node.input) == list(example.node.input) and _attrs(node) == _attrs(example.node)
    # the PyTorch face computes what the C++ kernel computes
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(ort_ops.library_path())
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    expected = session.run(None, example.feeds)[0]
    with torch.no_grad():
        got = module(**example.feeds)[0].numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=example.atol)
