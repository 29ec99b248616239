"""ShiftConv reading through a SpatialShift (docs/ops.md#input-shift-read-through): the optional
inputs 4-6 (shift_offsets, shift_scale, shift_bias) and the shift_* attributes. By definition
ShiftConv(X, …, shift_…) = ShiftConv(SpatialShift(X, …), …); checked bit for bit (equal bits, any
NaN for a NaN) on every ISA path (MFCONVERT_ISA) against the NumPy references composed
(tests/numpy_reference.py: shift_conv_read_through) and against the two-node ORT graph, over
shift strides 1/2, conv strides 1/2, zeros/edge padding, channel shifts, with and without the
fused tail, group 1 and depthwise, the lookup-table path (>= 64 in and out channels on AVX-512)
and the direct one; malformed shift inputs and attributes are one error naming the node. The
fusion pass that writes the node (passes/fuse_spatial_shift.py) and the torch layer are checked
too. A kernel test: also run under the ASan build (Makefile KERNEL_TESTS)."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from mfconvert.nn import pow2
from mfconvert.ort_ops import DOMAIN
from mfconvert.runtime import session
from tests import numpy_reference as ref
from tests.cpu_isas import supported_isas
from tests.test_kernel_fuzz import FUZZ, hostile_floats
from tests.test_shift_linear_kernel import random_codes, random_x

NODE = "read_through"
ISAS = supported_isas()


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("MFCONVERT_ISA", request.param)
    return request.param


def same_bits(a: np.ndarray, b: np.ndarray) -> None:
    """Equal shape and bits, except that any NaN matches any NaN."""
    assert a.dtype == np.float32 and a.shape == b.shape, (a.shape, b.shape)
    nan = np.isnan(a)
    assert np.array_equal(nan, np.isnan(b)), "NaN positions differ"
    diff = a.view(np.uint32)[~nan] != b.view(np.uint32)[~nan]
    assert not diff.any(), f"{diff.sum()} of {diff.size} differ"


def case(rng, n, c, hw, m, kernel, *, conv=None, shift=None, tail="", terms=1, act=(32, 16), as_inputs=False,
         special=True):
    """A random fused ShiftConv: (fused model bytes, two-node model bytes, feeds, reference Y).
    conv: the ShiftConv's strides/pads/group/activation...; shift: SpatialShift attributes
    (strides, padding, channel_shift, activation, clip_min, clip_max); tail: 's' scale, 'b' bias."""
    conv = dict(conv or {})
    shift = dict(shift or {})
    group = conv.get("group", 1)
    kk = int(np.prod(kernel))
    codes = random_codes(rng, m, c // group * kk, 5, terms=terms).reshape(terms, m, c // group, *kernel)
    packed = pow2.pack_codes(codes, 5)
    exponent = rng.integers(-5, 4, size=m).astype(np.int8)
    bias = (rng.standard_normal(m) * 2).astype(np.float32)
    x = random_x(rng, (n, c, *hw), act[0], act[1], special)
    offsets = rng.integers(-2, 3, size=(c, 2)).astype(np.int64)
    scale = (rng.standard_normal(c) * 2).astype(np.float32) if "s" in tail else None
    sbias = (rng.standard_normal(c)).astype(np.float32) if "b" in tail else None
    conv_attrs = dict(out_channels=m, kernel_shape=list(kernel), act_bits=act[0], act_frac_bits=act[1], **conv)
    if terms > 1:
        conv_attrs["terms"] = terms
    consts = {"W": (TensorProto.UINT8, packed), "E": (TensorProto.INT8, exponent), "B": (TensorProto.FLOAT, bias),
              "off": (TensorProto.INT64, offsets)}
    if scale is not None:
        consts["s"] = (TensorProto.FLOAT, scale)
    if sbias is not None:
        consts["sb"] = (TensorProto.FLOAT, sbias)
    shift_inputs = ["off", "s" if scale is not None else "", "sb" if sbias is not None else ""]
    while not shift_inputs[-1]:
        shift_inputs.pop()

    def build(nodes, runtime):
        inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x.shape))]
        inits = []
        for name, (ty, arr) in consts.items():
            if name in runtime:
                inputs.append(helper.make_tensor_value_info(name, ty, list(arr.shape)))
            else:
                inits.append(numpy_helper.from_array(arr, name))
        graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                                  inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
        model.ir_version = 8
        return model.SerializeToString()

    runtime = {"off", "s", "sb"} if as_inputs else set()
    fused = build([helper.make_node("ShiftConv", ["X", "W", "E", "B", *shift_inputs], ["Y"], name=NODE, domain=DOMAIN,
                                    **conv_attrs, **{f"shift_{k}": v for k, v in shift.items()})], runtime)
    two = build([helper.make_node("SpatialShift", ["X", *shift_inputs], ["S"], name="shift", domain=DOMAIN, **shift),
                 helper.make_node("ShiftConv", ["S", "W", "E", "B"], ["Y"], name="conv", domain=DOMAIN, **conv_attrs)],
                runtime)
    feeds = {"X": x, **({k: consts[k][1] for k in runtime if k in consts} if as_inputs else {})}
    clip = None
    if shift.get("activation") == "Relu":
        clip = (0.0, np.inf)
    elif shift.get("activation") == "Clip":
        clip = (shift.get("clip_min", -np.inf), shift.get("clip_max", np.inf))
    expected = ref.shift_conv_read_through(
        x, offsets, dict(codes=codes, exponent=exponent, bias=bias, bits=5, act_bits=act[0], frac_bits=act[1],
                         kernel_shape=list(kernel), strides=conv.get("strides"), pads=conv.get("pads"),
                         dilations=conv.get("dilations"), group=group, activation=conv.get("activation", ""),
                         clip_min=conv.get("clip_min", -np.inf), clip_max=conv.get("clip_max", np.inf)),
        shift.get("strides", (1, 1)), shift.get("padding", "zeros"), shift.get("channel_shift", 0), scale, sbias, clip)
    return fused, two, feeds, expected


def run(model_bytes, feeds, threads=2):
    return session(model_bytes, threads=threads).run(None, feeds)[0]


# (n, c, (h, w), m, kernel, conv attributes): the direct kernel (dense, strided, depthwise, 37
# channels: slots of 3 channels), and the lookup-table path on AVX-512 (>= 64 in and out
# channels: a 1x1 unpadded conv in one strip, shifted block by block into the task's slot and
# transposed from there; one of several strips, whose planes the shift writes; a padded 3x3).
CONVS = {
    "pointwise": (2, 8, (9, 10), 12, (1, 1), {}),
    "dense3x3_37ch": (1, 37, (7, 9), 10, (3, 3), dict(pads=[1, 1, 1, 1])),
    "conv_stride2": (1, 6, (11, 12), 9, (3, 3), dict(strides=[2, 2], pads=[1, 1, 1, 1], activation="Relu")),
    "depthwise": (2, 16, (10, 9), 16, (3, 3), dict(group=16, pads=[1, 1, 1, 1])),
    "depthwise_stride2": (1, 24, (11, 14), 24, (3, 3), dict(group=24, strides=[2, 2], pads=[0, 0, 1, 1])),
    "lut_pointwise": (2, 64, (7, 9), 72, (1, 1), dict(activation="Clip", clip_min=-1.0, clip_max=6.0)),
    "lut_3x3": (1, 16, (8, 9), 64, (3, 3), dict(pads=[1, 1, 1, 1])),
    "lut_pointwise_stride2": (1, 80, (9, 9), 64, (1, 1), dict(strides=[2, 2])),
    # more flat outputs than one strip of im2col rows (2048 at 64 inputs): the shift writes the planes
    "lut_pointwise_strips": (1, 64, (46, 47), 64, (1, 1), {}),
}
# SpatialShift attributes and tail (s: scale, b: bias).
SHIFTS = {
    "plain": ({}, ""),
    "stride2_edge": (dict(strides=[2, 2], padding="edge"), ""),
    "relu6_tail": (dict(activation="Clip", clip_min=0.0, clip_max=6.0), "sb"),
    "stride2_channel_shift_relu": (dict(strides=[2, 2], channel_shift=3, activation="Relu"), "b"),
    "stride_1x2_edge_scale": (dict(strides=[1, 2], padding="edge", channel_shift=-1), "s"),
}


@pytest.mark.parametrize("shift", list(SHIFTS))
@pytest.mark.parametrize("conv", list(CONVS))
def test_fused_equals_reference_and_two_nodes(isa, conv, shift):
    n, c, hw, m, kernel, attrs = CONVS[conv]
    sattrs, tail = SHIFTS[shift]
    rng = np.random.default_rng(sum(map(ord, conv + shift)))
    fused, two, feeds, expected = case(rng, n, c, hw, m, kernel, conv=attrs, shift=sattrs, tail=tail)
    y = run(fused, feeds)
    same_bits(y, expected)
    same_bits(y, run(two, feeds))


@pytest.mark.parametrize("threads", [1, 2])
def test_inputs_at_run_time_terms_and_threads(isa, threads):
    """Offsets, scale and bias as graph inputs; two terms; a narrow format; both thread counts."""
    rng = np.random.default_rng(threads)
    for conv in ("dense3x3_37ch", "depthwise", "lut_pointwise"):
        n, c, hw, m, kernel, attrs = CONVS[conv]
        fused, _, feeds, expected = case(rng, n, c, hw, m, kernel, conv=attrs, tail="sb", terms=2, act=(16, 8),
                                         shift=dict(strides=[2, 1], activation="Relu"), as_inputs=True)
        same_bits(run(fused, feeds, threads), expected)


def test_shift_to_zero_size_and_empty_batch(isa):
    """N = 0 gives an empty Y; a shifted input of 1 x 1 (3 x 2 at stride 4) still convolves."""
    rng = np.random.default_rng(0)
    for n, hw, sattrs in ((0, (6, 6), {}), (1, (3, 2), dict(strides=[4, 4]))):
        fused, _, feeds, expected = case(rng, n, 4, hw, 5, (3, 3), conv=dict(pads=[1, 1, 1, 1]), shift=sattrs)
        same_bits(run(fused, feeds), expected)


def test_without_shift_inputs_shift_conv_is_unchanged(isa):
    """Input 4 absent: the plain ShiftConv of the kernel tests (reference without a shift)."""
    from tests.test_shift_conv_kernel import shift_case
    model, feeds, expected = shift_case(np.random.default_rng(5), 1, 6, (7, 8), 8, (3, 3), pads=[1, 1, 1, 1])
    same_bits(run(model, feeds), expected)


# -- errors: one line naming the node ------------------------------------------------------------
def error_model(inputs=("X", "W", "E", "", "off"), offsets=None, kernel=(3, 3), extra=(), **attrs):
    c = 4
    k = int(np.prod(kernel))
    consts = [numpy_helper.from_array(np.zeros(-(-6 * c * k * 5 // 8), np.uint8), "W"),
              numpy_helper.from_array(np.zeros(6, np.int8), "E"),
              numpy_helper.from_array(np.zeros((c, 2), np.int64) if offsets is None else offsets, "off"),
              numpy_helper.from_array(np.ones(c, np.float32), "s"),
              numpy_helper.from_array(np.ones(c + 1, np.float32), "s_long")]
    node = helper.make_node("ShiftConv", list(inputs), ["Y"], name=NODE, domain=DOMAIN, out_channels=6,
                            kernel_shape=list(kernel), **attrs)
    node.attribute.extend(extra)
    x_shape = [1, c, 5, 5] if len(kernel) == 2 else [1, c, 5]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    model.ir_version = 8
    return model.SerializeToString(), {"X": np.zeros(x_shape, np.float32)}


ERRORS = {
    "offsets_columns": (dict(offsets=np.zeros((4, 3), np.int64)), "shift_offsets must have shape [4, 2]"),
    "offsets_channels": (dict(offsets=np.zeros((3, 2), np.int64)), "shift_offsets must have shape [4, 2]"),
    "offsets_rank": (dict(offsets=np.zeros(8, np.int64)), "shift_offsets must have shape [4, 2]"),
    "scale_length": (dict(inputs=("X", "W", "E", "", "off", "s_long")), "shift_scale must have shape [4]"),
    "strides_length": (dict(shift_strides=[2]), "attribute shift_strides [2] must have 2 values"),
    "strides_zero": (dict(shift_strides=[0, 1]), "attribute shift_strides [0, 1] must be in [1, 65536]"),
    "padding": (dict(shift_padding="reflect"), "attribute shift_padding='reflect' must be 'zeros' or 'edge'"),
    "activation": (dict(shift_activation="Tanh"), "attribute shift_activation='Tanh' is not one of"),
    "clip_reversed": (dict(shift_activation="Clip", shift_clip_min=2.0, shift_clip_max=1.0),
                      "must be numbers with shift_clip_min <= shift_clip_max"),
    "clip_without_clip": (dict(shift_clip_max=6.0), "shift_clip_min/shift_clip_max are only allowed with "
                                                    "shift_activation='Clip'"),
    "attrs_without_offsets": (dict(inputs=("X", "W", "E"), shift_padding="edge"), "need input 4 (shift_offsets)"),
    "scale_without_offsets": (dict(inputs=("X", "W", "E", "", "", "s")), "need input 4 (shift_offsets)"),
    "conv1d": (dict(kernel=(3,)), "needs a 2-D ShiftConv"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_errors_name_the_node(name):
    kwargs, message = ERRORS[name]
    model, feeds = error_model(**kwargs)
    with pytest.raises(Exception) as err:
        run(model, feeds)
    text = str(err.value)
    assert f"ShiftConv node '{NODE}': " in text and message in text, text
    assert "\n" not in text.strip(), text


@pytest.mark.parametrize("attr,value,got", [("shift_strides", 2, "an int"), ("shift_channel_shift", 1.5, "a float"),
                                            ("shift_padding", 1, "an int"), ("shift_clip_min", "x", "a string")])
def test_shift_attribute_of_wrong_type(attr, value, got):
    extra = [helper.make_attribute(attr, value)]
    model, feeds = error_model(extra=extra, **({"shift_activation": "Clip"} if attr == "shift_clip_min" else {}))
    with pytest.raises(Exception) as err:
        run(model, feeds)
    assert f"ShiftConv node '{NODE}': attribute {attr} must be" in str(err.value) and got in str(err.value), \
        str(err.value)


def test_offsets_of_another_type_are_refused():
    model, feeds = error_model(offsets=np.zeros((4, 2), np.int32))
    with pytest.raises(Exception) as err:
        run(model, feeds)
    assert NODE in str(err.value) and ("int64" in str(err.value) or "type" in str(err.value).lower())


# -- fuzz (marker fuzz; MFCONVERT_FUZZ_EXAMPLES) ---------------------------------------------------
@st.composite
def fuzz_cases(draw):
    depthwise = draw(st.booleans())
    c = draw(st.integers(1, 20)) if not draw(st.booleans()) else draw(st.sampled_from([64, 70]))
    return dict(seed=draw(st.integers(0, 2**32 - 1)), n=draw(st.integers(0, 2)), c=c,
                hw=(draw(st.integers(1, 13)), draw(st.integers(1, 17))),
                m=c if depthwise else draw(st.sampled_from([3, 16, 64])), depthwise=depthwise,
                k=draw(st.sampled_from([1, 3])), conv_stride=draw(st.integers(1, 2)), pad=draw(st.booleans()),
                shift=dict(strides=[draw(st.integers(1, 3)), draw(st.integers(1, 3))],
                           padding=draw(st.sampled_from(["zeros", "edge"])), channel_shift=draw(st.integers(-5, 5)),
                           **draw(st.sampled_from([{}, dict(activation="Relu"),
                                                   dict(activation="Clip", clip_min=-1.0, clip_max=2.0)]))),
                tail=draw(st.sampled_from(["", "s", "b", "sb"])), special=draw(st.booleans()),
                as_inputs=draw(st.booleans()), isa=draw(st.sampled_from(ISAS)))


@pytest.mark.fuzz
@FUZZ
@given(fuzz_cases())
def test_read_through_fuzz(f):
    rng = np.random.default_rng(f["seed"])
    k, group = f["k"], f["c"] if f["depthwise"] else 1
    oh, ow = (-(-v // s) for v, s in zip(f["hw"], f["shift"]["strides"]))
    pad = (k // 2) if f["pad"] else 0
    if min(oh, ow) + 2 * pad < k:
        pad = k // 2
    conv = dict(strides=[f["conv_stride"]] * 2, pads=[pad] * 4, group=group)
    fused, two, feeds, expected = case(rng, f["n"], f["c"], f["hw"], f["m"], (k, k), conv=conv, shift=f["shift"],
                                       tail=f["tail"], special=f["special"], as_inputs=f["as_inputs"])
    if f["tail"] and f["special"]:   # hostile tail floats too (NaN, inf, subnormals)
        for name in ("s", "sb"):
            if name in feeds:
                feeds[name] = hostile_floats(rng, feeds[name].shape, 2.0, True)
    os.environ["MFCONVERT_ISA"] = f["isa"]
    try:
        y = run(fused, feeds)
        want = run(two, feeds) if f["as_inputs"] else expected
    finally:
        del os.environ["MFCONVERT_ISA"]
    same_bits(y, want)


# -- the pass (passes/fuse_spatial_shift.py: read_through_shift_convs) and the pipeline -------------
def two_node_chain(rng, *, graph_output=False, extra_reader=False, conv_reads_as_weight=False, has_shift=False):
    """X → SpatialShift(stride 2, scale, bias, Clip 0..6) → S → ShiftConv(3x3) → Y, with the
    variations that must block the fold."""
    _, two, _, _ = case(rng, 1, 6, (9, 8), 5, (3, 3), conv=dict(pads=[1, 1, 1, 1]), tail="sb",
                        shift=dict(strides=[2, 2], activation="Clip", clip_min=0.0, clip_max=6.0))
    model = onnx.load_from_string(two)
    g = model.graph
    if graph_output:
        g.output.append(helper.make_tensor_value_info("S", TensorProto.FLOAT, None))
    if extra_reader:
        g.node.append(helper.make_node("Relu", ["S"], ["R"], name="relu"))
        g.output.append(helper.make_tensor_value_info("R", TensorProto.FLOAT, None))
    if has_shift:
        conv = g.node[1]
        conv.input.extend(["", "off"])
    return model


def run_model(model: onnx.ModelProto, feeds, threads=2):
    return session(model.SerializeToString(), threads=threads).run(None, feeds)


def test_fold_writes_the_input_shift_and_keeps_the_output():
    from mfconvert.passes.fuse_spatial_shift import read_through_shift_convs
    rng = np.random.default_rng(11)
    model = two_node_chain(rng)
    folded, lines = read_through_shift_convs(model)
    assert [n.op_type for n in folded.graph.node] == ["ShiftConv"]
    conv = folded.graph.node[0]
    assert list(conv.input) == ["X", "W", "E", "B", "off", "s", "sb"]
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    assert attrs["shift_strides"] == [2, 2] and attrs["shift_activation"] == b"Clip"
    assert (attrs["shift_clip_min"], attrs["shift_clip_max"]) == (0.0, 6.0)
    assert lines == ["fuse-spatial-shift: 1 SpatialShift(s) read through by the ShiftConv after them (its input "
                     "shift; the shifted tensor is never written): shift → conv"]
    x = random_x(rng, (1, 6, 9, 8), 32, 16)
    same_bits(run_model(folded, {"X": x})[0], run_model(model, {"X": x})[0])
    assert read_through_shift_convs(folded) == (folded, [])   # nothing left: the same model back


@pytest.mark.parametrize("blocker", ["graph_output", "extra_reader", "has_shift"])
def test_fold_leaves_a_shift_others_read(blocker):
    from mfconvert.passes.fuse_spatial_shift import read_through_shift_convs
    model = two_node_chain(np.random.default_rng(2), **{blocker: True})
    folded, lines = read_through_shift_convs(model)
    assert folded is model and lines == []


def pipeline_block(tmp_path, stride, read_through):
    from mfconvert.convert import ConvertConfig
    from mfconvert.convert.pipeline import PipelineOptions, convert_model
    from mfconvert.passes.conv import ShiftConvConfig
    from mfconvert.passes.spatial_shift import SpatialShiftConfig
    from tests.test_spatial_shift_pass import Block, export

    path = tmp_path / "block.onnx"
    if not path.exists():
        onnx.save(export(Block(stride, True, seed=7 + stride)), path)
    cfg = ConvertConfig(shift_linear=None, add_attention=None, shift_conv=ShiftConvConfig(),
                        spatial_shift=SpatialShiftConfig())
    return convert_model(str(path), cfg, PipelineOptions(shift_terms=1, read_through=read_through))


@pytest.mark.parametrize("stride", [1, 2])
def test_pipeline_block_read_through_equals_unfused(tmp_path, stride):
    """A MobileNet-style block (stem conv, depthwise 3x3 + BN + ReLU6, 1x1 projection) through the
    default pipeline with --spatial-shift: with the read-through the projection ShiftConv reads the
    shift (scale, bias and ReLU6 fused into it), no SpatialShift is left, the note names it, the
    output equals read_through=False's in ORT bit for bit, and the report's totals are the same."""
    on, off = (pipeline_block(tmp_path, stride, flag) for flag in (True, False))
    kinds = [n.op_type for n in on.result.model.graph.node]
    assert "SpatialShift" not in kinds and "SpatialShift" in [n.op_type for n in off.result.model.graph.node]
    conv = next(n for n in on.result.model.graph.node if n.op_type == "ShiftConv" and len(n.input) > 4)
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    assert len(conv.input) == 7 and attrs["shift_activation"] == b"Clip" and attrs["shift_strides"] == [stride] * 2
    assert any("read through by the ShiftConv" in line for line in on.notes)
    assert not any("read through" in line for line in off.notes)
    x = np.random.default_rng(stride).normal(size=(3, 3, 9, 10)).astype(np.float32) * 2
    for threads in (1, 2):
        same_bits(run_model(on.result.model, {"x": x}, threads)[0], run_model(off.result.model, {"x": x}, threads)[0])
    # the report's counts (passes/cost.py): the shift's tail counted in the ShiftConv, the same totals
    costs = [r.result.report.costs for r in (on, off)]
    assert costs[0]["after"] == costs[1]["after"], (costs[0]["after"], costs[1]["after"])


def test_layer_parity_and_finetune_trains_the_folded_shift(tmp_path):
    """The fused model as an OnnxModule (the registry's ShiftConv entry with its input_shift
    layer): eval equals ORT bit for bit. calibrate.finetune (`mfconvert finetune`) on it moves the
    shift's scale and bias, writes them under the ShiftConv's inputs 5-6, and the export runs in
    ORT as the trained layers compute."""
    from mfconvert.calibrate.data import Examples
    from mfconvert.calibrate.finetune import FinetuneConfig, finetune
    from mfconvert.nn.onnx_module import OnnxModule
    from mfconvert.nn.shift_conv import ShiftConv
    from tests.test_spatial_shift_pass import Block, export
    import torch

    model = pipeline_block(tmp_path, 2, True).result.model
    module = OnnxModule(model).eval()
    assert any(isinstance(m, ShiftConv) and m.input_shift is not None for m in module.layers.values())
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 9, 10)).astype(np.float32)
    with torch.no_grad():
        got = module(x=torch.from_numpy(x))
    same_bits((got[0] if isinstance(got, (tuple, list)) else got).numpy(), run_model(model, {"x": x})[0])

    conv = next(n for n in model.graph.node if n.op_type == "ShiftConv" and len(n.input) > 4)
    inits = lambda m: {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}   # noqa: E731
    before = inits(model)
    data = Examples([{"x": rng.normal(size=(3, 9, 10)).astype(np.float32)} for _ in range(32)])
    result = finetune(model, export(Block(2, True, seed=9)), data,
                      FinetuneConfig(steps=10, batch_size=8, lr=5e-3, rounding="nearest", progress=False,
                                     keep_best=False))
    after = inits(result.model)
    trained = next(n for n in result.model.graph.node if n.op_type == "ShiftConv" and len(n.input) > 4)
    assert list(trained.input) == list(conv.input)
    for name in conv.input[5:]:
        assert after[name].dtype == np.float32 and not np.array_equal(after[name], before[name]), name
    assert after[conv.input[4]].dtype == np.int64
    x = rng.normal(size=(4, 3, 9, 10)).astype(np.float32)
    with torch.no_grad():
        want = OnnxModule(result.model).eval()(x=torch.from_numpy(x))
    want = (want[0] if isinstance(want, (tuple, list)) else want).numpy()
    same_bits(run_model(result.model, {"x": x})[0], want)
