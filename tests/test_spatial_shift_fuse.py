"""The fusion step (passes/fuse_spatial_shift.py, the last step of convert/pipeline.py): a
SpatialShift, the 1×1 depthwise scale conv the spatial-shift pass leaves when a ReLU6 sits between
it and the pointwise conv, and that ReLU6 become one SpatialShift with scale, bias and
activation=Clip. Checked: the fused model against the unfused one in ONNX Runtime (ORT's Conv may
fuse the multiply-add: within 1e-5 relative of the output's range, measured 0 on these blocks),
the fused node's inputs and attributes against the conv's weights, what is left alone and why,
the pipeline running it last, and `finetune` training a fused model's scale and bias through the
torch layer (nn/spatial_shift.py) and exporting them."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from mfconvert.ort_ops import DOMAIN
from mfconvert.passes.fuse_spatial_shift import fuse_spatial_shifts
from mfconvert.runtime import session
from tests import numpy_reference as ref
from tests.test_spatial_shift_pass import Block, convert, export


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return session(model.SerializeToString(), threads=2).run(None, {"x": x})[0]


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


@pytest.mark.parametrize("stride", [1, 2])
def test_block_fuses_scale_conv_and_relu6(stride):
    block = Block(stride, True, seed=3 + stride)
    unfused = convert(export(block)).model
    assert "Conv" in ops(unfused) and ops(unfused).count("Clip") == 2   # the stem's ReLU6 and the block's
    fused, lines = fuse_spatial_shifts(unfused)
    assert lines and "1 SpatialShift" in lines[0] and "(1 with their Relu/Clip)" in lines[0]
    node = next(n for n in fused.graph.node if n.op_type == "SpatialShift")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["activation"] == b"Clip" and (attrs["clip_min"], attrs["clip_max"]) == (0.0, 6.0)
    inits = {i.name: numpy_helper.to_array(i) for i in fused.graph.initializer}
    old = {i.name: numpy_helper.to_array(i) for i in unfused.graph.initializer}
    scale_conv = next(n for n in unfused.graph.node if n.op_type == "Conv" and n.name.endswith(".scale"))
    assert np.array_equal(inits[node.input[2]], old[scale_conv.input[1]].reshape(-1))
    assert np.array_equal(inits[node.input[3]], old[scale_conv.input[2]])
    assert ops(fused).count("Conv") == ops(unfused).count("Conv") - 1 and ops(fused).count("Clip") == 1
    assert not any(n.name.endswith(".scale") for n in fused.graph.node) and old.keys() - inits.keys()
    onnx.checker.check_model(fused)
    x = np.random.default_rng(stride).normal(size=(4, 3, 9, 10)).astype(np.float32)
    want, got = run(unfused, x), run(fused, x)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    assert fuse_spatial_shifts(fused)[1] == []   # nothing left to fuse: the same model back
    # the report's counts (passes/cost.py): the tail's multiply and add per element are still counted
    from mfconvert.passes.cost import model_costs
    teacher = export(block)
    result = convert(teacher)
    n_out = 8 * -(-9 // stride) * -(-10 // stride)
    costs = [model_costs(teacher, m, {"x": [1, 3, 9, 10]}, result.report.changes)["after"] for m in (unfused, fused)]
    assert costs[1]["multiplications"] == costs[0]["multiplications"]
    assert costs[1]["additions"] == costs[0]["additions"] - n_out   # the conv's accumulation into zero is gone


def test_scale_folded_into_pointwise_conv_is_left_alone():
    """Without a ReLU6 between, the pass folds the scale into the 1×1 conv: nothing to fuse."""
    unfused = convert(export(Block(1, False, seed=1))).model
    fused, lines = fuse_spatial_shifts(unfused)
    assert fused is unfused and lines == []


def chain(conv_attrs=None, weight_shape=(4, 1, 1, 1), act="Clip", bounds=(0.0, 6.0), extra_reader=False,
          shift_out_is_output=False, bias=True):
    """X → SpatialShift → Conv(1×1 per channel) → act → Y, with variations that block the fusion."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.integers(-1, 2, size=(4, 2)).astype(np.int64), "off"),
             numpy_helper.from_array(rng.normal(size=weight_shape).astype(np.float32), "w")]
    conv_in = ["s", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.normal(size=weight_shape[0]).astype(np.float32), "b"))
        conv_in.append("b")
    nodes = [helper.make_node("SpatialShift", ["X", "off"], ["s"], name="shift", domain=DOMAIN),
             helper.make_node("Conv", conv_in, ["c"], name="scale", **(conv_attrs or dict(group=4, kernel_shape=[1, 1])))]
    outputs = ["Y"]
    if act == "Clip":
        inits += [numpy_helper.from_array(np.float32(bounds[0]), "lo"), numpy_helper.from_array(np.float32(bounds[1]), "hi")]
        nodes.append(helper.make_node("Clip", ["c", "lo", "hi"], ["Y"], name="act"))
    elif act == "Relu":
        nodes.append(helper.make_node("Relu", ["c"], ["Y"], name="act"))
    elif act == "Sigmoid":
        nodes.append(helper.make_node("Sigmoid", ["c"], ["Y"], name="act"))
    else:
        nodes[-1].output[0] = "Y"
    if extra_reader:
        nodes.append(helper.make_node("Neg", ["s"], ["Z"], name="other"))
        outputs.append("Z")
    if shift_out_is_output:
        outputs.append("s")
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 4, 5, 6])],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("kwargs, fused_ops", [
    ({}, ["SpatialShift"]),
    (dict(act="Relu"), ["SpatialShift"]),
    (dict(act=None), ["SpatialShift"]),
    (dict(act="Sigmoid"), ["SpatialShift", "Sigmoid"]),          # not a clamp: the affine alone
    (dict(bias=False), ["SpatialShift"]),
    (dict(bounds=(2.0, 1.0)), ["SpatialShift", "Clip"]),         # reversed bounds: ONNX's meaning differs, kept
    (dict(extra_reader=True), None),                             # the shift's output is read twice
    (dict(shift_out_is_output=True), None),                      # ... or is a graph output
    (dict(conv_attrs=dict(group=4, kernel_shape=[1, 1], pads=[1, 1, 1, 1])), None),   # padded
    (dict(conv_attrs=dict(group=4, kernel_shape=[1, 1], strides=[2, 2])), None),      # strided
    (dict(conv_attrs=dict(group=1, kernel_shape=[1, 1]), weight_shape=(4, 4, 1, 1)), None),   # mixes channels
])
def test_chain_variations(kwargs, fused_ops):
    model = chain(**kwargs)
    fused, lines = fuse_spatial_shifts(model)
    if fused_ops is None:
        assert fused is model and lines == []
        return
    assert ops(fused) == fused_ops
    x = np.random.default_rng(1).normal(size=(2, 4, 5, 6)).astype(np.float32) * 4
    outs = [o.name for o in model.graph.output]
    want = session(model.SerializeToString()).run(outs, {"X": x})
    got = session(fused.SerializeToString()).run(outs, {"X": x})
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * max(1.0, float(np.abs(b).max())))


def test_unnamed_chains_get_distinct_constants_and_subgraph_reads_block():
    """Two unnamed SpatialShift chains: each fused with constants of its own name; a shift output
    that an If branch reads from the outer scope is not fused away."""
    first = chain()
    second = chain()
    g = first.graph
    for n in g.node:
        n.name = ""
    extra = [helper.make_node("SpatialShift", ["Y", "off"], ["s2"], domain=DOMAIN),
             helper.make_node("Conv", ["s2", "w", "b"], ["Y2"], group=4, kernel_shape=[1, 1])]
    g.node.extend(extra)
    g.output.append(helper.make_tensor_value_info("Y2", TensorProto.FLOAT, None))
    fused, lines = fuse_spatial_shifts(first)
    shifts = [n for n in fused.graph.node if n.op_type == "SpatialShift"]
    assert len(shifts) == 2 and lines and "2 SpatialShift" in lines[0]
    names = [i for n in shifts for i in n.input[2:]]
    assert len(set(names)) == 4
    x = np.random.default_rng(2).normal(size=(2, 4, 5, 6)).astype(np.float32)
    want = session(first.SerializeToString()).run(["Y", "Y2"], {"X": x})
    got = session(fused.SerializeToString()).run(["Y", "Y2"], {"X": x})
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * max(1.0, float(np.abs(b).max())))
    # an If whose branch reads the shift's output: that tensor must stay
    branch = helper.make_graph([helper.make_node("Identity", ["s"], ["r"])], "then", [],
                               [helper.make_tensor_value_info("r", TensorProto.FLOAT, None)])
    second.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    second.graph.node.append(helper.make_node("If", ["cond"], ["Z"], then_branch=branch, else_branch=branch))
    second.graph.output.append(helper.make_tensor_value_info("Z", TensorProto.FLOAT, None))
    fused, lines = fuse_spatial_shifts(second)
    assert fused is second and lines == []


def test_fused_layer_is_the_reference_and_trains_scale_and_bias():
    """The torch layer with a tail: eval bit for bit with the NumPy reference (hostile values),
    gradients of scale and bias = Σ g·shifted and Σ g where the clamp passes, 0 where it clips."""
    from mfconvert.nn.spatial_shift import SpatialShift
    rng = np.random.default_rng(5)
    x = (rng.normal(size=(2, 4, 6, 7)) * 4).astype(np.float32)
    x.reshape(-1)[::11] = -0.0
    x.reshape(-1)[5] = np.inf
    offsets = rng.integers(-2, 3, size=(4, 2))
    scale = np.array([1.5, -0.5, 0.0, 2.0], np.float32)
    bias = np.array([0.25, -1.0, 0.0, 3.0], np.float32)
    layer = SpatialShift(4, offsets, (2, 1), "zeros", 1, scale=scale, bias=bias, activation="Clip", clip=(-1.0, 6.0))
    y = layer.eval()(torch.from_numpy(x))
    want = ref.spatial_shift(x, offsets, (2, 1), "zeros", 1, scale, bias, (-1.0, 6.0))
    assert np.array_equal(y.detach().numpy(), want, equal_nan=True)
    layer.train()
    xs = x.copy()
    xs[~np.isfinite(xs)] = 0.0
    g = rng.normal(size=want.shape).astype(np.float32)
    (layer(torch.from_numpy(xs)) * torch.from_numpy(g)).sum().backward()
    moved = ref.spatial_shift(xs, offsets, (2, 1), "zeros", 1)
    pre = moved * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)
    passes = (pre >= -1.0) & (pre <= 6.0)
    np.testing.assert_allclose(layer.scale.grad.numpy(), (g * moved * passes).sum((0, 2, 3)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.bias.grad.numpy(), (g * passes).sum((0, 2, 3)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="scale must have shape"):
        SpatialShift(4, scale=np.ones(3))
    with pytest.raises(ValueError, match="activation must be"):
        SpatialShift(4, activation="Sigmoid")
    with pytest.raises(ValueError, match="clip is only allowed"):
        SpatialShift(4, activation="Relu", clip=(0, 6))


def test_finetune_trains_a_fused_model():
    """calibrate.finetune (`mfconvert finetune`) on a fused model: the scale and bias change, the
    export carries them in the node's inputs and runs in ORT as the trained layers compute."""
    from mfconvert.calibrate.data import Examples
    from mfconvert.calibrate.finetune import FinetuneConfig, finetune
    from mfconvert.nn.onnx_module import OnnxModule

    block = Block(1, True, seed=12)
    teacher = export(block)
    student, _ = fuse_spatial_shifts(convert(teacher).model)
    node = next(n for n in student.graph.node if n.op_type == "SpatialShift")
    inits = lambda m: {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}   # noqa: E731
    before = inits(student)
    rng = np.random.default_rng(0)
    data = Examples([{"x": rng.normal(size=(3, 9, 10)).astype(np.float32)} for _ in range(32)])
    result = finetune(student, teacher, data, FinetuneConfig(steps=20, batch_size=8, lr=5e-3, rounding="nearest",
                                                            progress=False, keep_best=False))
    after = inits(result.model)
    for name in node.input[2:]:
        assert after[name].dtype == np.float32 and not np.array_equal(after[name], before[name])
    x = rng.normal(size=(4, 3, 9, 10)).astype(np.float32)
    got = run(result.model, x)
    with torch.no_grad():
        want = OnnxModule(result.model).eval()(x=torch.from_numpy(x))
    want = (want[0] if isinstance(want, (tuple, list)) else want).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_pipeline_fuses_last(tmp_path):
    """convert_model (the CLI's pipeline) with --spatial-shift --no-shift-conv: the saved model is
    fused and the notes say so. (Data-free: with --data the calibration steps run before this one,
    convert/pipeline.py's order, and read the unfused form; tests/test_spatial_shift_calibrate.py
    covers them.)"""
    from mfconvert.convert import ConvertConfig
    from mfconvert.convert.pipeline import PipelineOptions, convert_model
    from mfconvert.passes.spatial_shift import SpatialShiftConfig

    teacher = export(Block(2, True, seed=2))
    path = tmp_path / "block.onnx"
    onnx.save(teacher, path)
    cfg = ConvertConfig(shift_linear=None, add_attention=None, shift_conv=None, spatial_shift=SpatialShiftConfig())
    out = tmp_path / "block.mf.onnx"
    done = convert_model(str(path), cfg, PipelineOptions(shift_terms=1), output=str(out))
    saved = onnx.load(str(out))
    node = next(n for n in saved.graph.node if n.op_type == "SpatialShift")
    assert len(node.input) == 4 and any(a.name == "activation" for a in node.attribute)
    assert not any(n.name.endswith(".scale") for n in saved.graph.node)
    assert any(line.startswith("fuse-spatial-shift: 1 SpatialShift") for line in done.notes)
    unfused = convert(teacher).model
    x = np.random.default_rng(3).normal(size=(2, 3, 9, 10)).astype(np.float32)
    want = run(unfused, x)
    np.testing.assert_allclose(run(saved, x), want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("others", ["shift_conv", "adder_conv"])
@pytest.mark.parametrize("read_through", [False, True])
def test_conv_passes_leave_the_shift_scale_to_the_fusion(tmp_path, others, read_through):
    """With a conv pass on too (shift-conv, the default; or adder-conv), the per-channel scale conv
    after a SpatialShift stays float32 with its reason in the report (as a ShiftConv it would be
    a power-of-two scale in a second pass, as an AdderConv no scale at all), so the saved model's
    shift carries it fused; every other conv is converted. The block's output equals the same
    conversion's unfused model in ORT, within the multiply-add rounding above."""
    from mfconvert.convert import ConvertConfig
    from mfconvert.convert.pipeline import PipelineOptions, convert_model
    from mfconvert.passes.adder_conv import AdderConvConfig
    from mfconvert.passes.conv import ShiftConvConfig
    from mfconvert.passes.spatial_shift import SpatialShiftConfig

    teacher = export(Block(1, True, seed=5))
    path = tmp_path / "block.onnx"
    onnx.save(teacher, path)
    conv = dict(shift_conv=ShiftConvConfig()) if others == "shift_conv" else \
        dict(shift_conv=None, adder_conv=AdderConvConfig(first=True))
    cfg = ConvertConfig(shift_linear=None, add_attention=None, spatial_shift=SpatialShiftConfig(), **conv)
    done = convert_model(str(path), cfg, PipelineOptions(shift_terms=1, read_through=read_through))
    model = done.result.model
    op = "ShiftConv" if others == "shift_conv" else "AdderConv"
    assert "Conv" not in ops(model) and ops(model).count(op) == 2, ops(model)
    # the fused shift: a SpatialShift, or with read_through read by the ShiftConv after it (its
    # inputs 4-6 and shift_* attributes, docs/ops.md#input-shift-read-through; an AdderConv cannot)
    node = next(n for n in model.graph.node if n.op_type == "SpatialShift" or (n.op_type == "ShiftConv" and len(n.input) > 4))
    first, prefix = (1, "") if node.op_type == "SpatialShift" else (4, "shift_")
    assert node.op_type == ("ShiftConv" if others == "shift_conv" and read_through else "SpatialShift")
    assert len(node.input) == first + 3 and any(a.name == prefix + "activation" for a in node.attribute)
    skips = {s.node: s.reason for s in done.result.report.skips}
    assert any(label.endswith(".scale") and "per-channel scale of SpatialShift" in why for label, why in skips.items()), skips
    from mfconvert.convert import convert_onnx
    unfused = convert_onnx(teacher, cfg).model   # the passes alone: the pipeline's fusion not run
    assert "Conv" in ops(unfused)
    x = np.random.default_rng(4).normal(size=(2, 3, 9, 10)).astype(np.float32)
    want = run(unfused, x)
    np.testing.assert_allclose(run(model, x), want, rtol=0, atol=1e-5 * np.abs(want).max())
