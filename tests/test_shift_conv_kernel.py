"""The ShiftConv C++ kernel (ort_ops/src/shift_conv*) against the NumPy reference of docs/ops.md
(tests/numpy_reference.py: shift_conv), exactly (np.array_equal on float32), on every ISA path the
CPU can run (forced with MFCONVERT_ISA): depthwise, groups, strides, dilations, asymmetric pads,
1-D convs, 1-4 terms, narrow activation formats, empty batches, fused Relu/Clip, and errors
naming the node."""
from __future__ import annotations

import os

import numpy as np
import pytest
from onnx import TensorProto, helper

from mfconvert.nn import pow2
from mfconvert.runtime import session
from tests import numpy_reference as ref
from tests.cpu_isas import supported_isas
from tests.test_shift_linear_kernel import random_codes, random_x

DOMAIN = "ai.mfconvert"
NODE = "shift_conv_under_test"
ISAS = supported_isas()


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("MFCONVERT_ISA", request.param)
    return request.param


def conv_model(op, x_shape, weights, attrs, *, as_inputs=False, x_type=TensorProto.FLOAT, extra=()):
    """One `op` node named NODE; weights: [(name, TensorProto type, array or None = absent)]."""
    inputs = [helper.make_tensor_value_info("X", x_type, x_shape)]
    inits, names = [], ["X"]
    for name, ty, arr in weights:
        if arr is None:
            names.append("")
            continue
        names.append(name)
        if as_inputs:
            inputs.append(helper.make_tensor_value_info(name, ty, list(arr.shape)))
        else:
            inits.append(helper.make_tensor(name, ty, list(arr.shape), arr.reshape(-1).tolist()))
    attrs = {k: v for k, v in attrs.items() if v is not None}
    node = helper.make_node(op, names, ["Y"], name=NODE, domain=DOMAIN, **attrs)
    node.attribute.extend(extra)
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    model.ir_version = 8
    return model.SerializeToString()


def conv_attrs(kernel, strides=None, pads=None, dilations=None, group=1, activation="", clip=None):
    a = dict(kernel_shape=list(kernel), strides=strides, pads=pads, dilations=dilations, group=group)
    if activation:
        a["activation"] = activation
    if clip is not None:
        a["clip_min"], a["clip_max"] = clip
    return a


def shift_case(rng, n, c, spatial, m, kernel, *, strides=None, pads=None, dilations=None, group=1,
               terms=1, weight_bits=5, act=(32, 16), activation="", clip=None, with_bias=True,
               as_inputs=False, special=True, exp_range=(-6, 6), dynamic=False):
    """(model bytes, feeds, expected Y) of a random ShiftConv."""
    act_bits, frac = act
    cg = c // group
    kk = int(np.prod(kernel))
    codes = random_codes(rng, m, cg * kk, weight_bits, terms=terms).reshape(terms, m, cg, *kernel)
    packed = pow2.pack_codes(codes, weight_bits)
    exponent = rng.integers(exp_range[0], exp_range[1] + 1, size=m).astype(np.int8)
    bias = (rng.standard_normal(m) * 4).astype(np.float32) if with_bias else None
    x = random_x(rng, (n, c, *spatial), act_bits, frac, special)
    attrs = conv_attrs(kernel, strides, pads, dilations, group, activation, clip)
    attrs.update(out_channels=m, weight_bits=weight_bits, act_bits=act_bits, act_frac_bits=frac,
                 terms=terms if terms > 1 else None)
    weights = [("W_codes", TensorProto.UINT8, packed), ("W_exponent", TensorProto.INT8, exponent),
               ("B", TensorProto.FLOAT, bias)]
    x_shape = ["n", c] + [f"s{i}" for i in range(len(spatial))] if dynamic else list(x.shape)
    model = conv_model("ShiftConv", x_shape, weights, attrs, as_inputs=as_inputs)
    feeds = {"X": x}
    if as_inputs:
        feeds.update(W_codes=packed, W_exponent=exponent)
        if bias is not None:
            feeds["B"] = bias
    expected = ref.shift_conv(x, codes, exponent, bias, weight_bits, act_bits, frac, list(kernel), strides, pads,
                              dilations, group, activation, *(clip or (-np.inf, np.inf)))
    return model, feeds, expected


def run(model_bytes, feeds, threads=2):
    return session(model_bytes, threads=threads).run(None, feeds)[0]


def assert_same(y, expected):
    assert y.dtype == np.float32 and y.shape == expected.shape, (y.shape, expected.shape)
    same = (y == expected) | (np.isnan(y) & np.isnan(expected))
    assert same.all(), f"{(~same).sum()} of {same.size} differ, first at {np.argwhere(~same)[:3].tolist()}"


# (n, c, spatial, m, kernel, options): the layer kinds of MobileNetV2 / ResNet and the corners.
CASES = {
    "dense3x3_pad1": (2, 6, (9, 11), 10, (3, 3), dict(pads=[1, 1, 1, 1])),
    "stride2": (1, 5, (13, 12), 7, (3, 3), dict(strides=[2, 2], pads=[1, 1, 1, 1])),
    "stride_2x3_dilation": (1, 4, (15, 17), 6, (3, 2), dict(strides=[2, 3], dilations=[2, 3], pads=[2, 0, 1, 3])),
    "asymmetric_pads": (2, 3, (7, 8), 5, (2, 4), dict(pads=[0, 3, 2, 1])),
    "groups": (1, 8, (9, 9), 12, (3, 3), dict(group=4, pads=[1, 1, 1, 1])),
    "depthwise": (2, 16, (12, 10), 16, (3, 3), dict(group=16, pads=[1, 1, 1, 1])),
    "depthwise_stride2": (1, 24, (11, 14), 24, (3, 3), dict(group=24, strides=[2, 2], pads=[0, 0, 1, 1])),
    "depthwise_multiplier2": (1, 4, (8, 8), 8, (5, 5), dict(group=4, pads=[2, 2, 2, 2])),
    # stride-2 rows of 77 and 76 padded columns: the vector de-interleave (Split2: 16 or 8 lanes
    # per step) and its scalar tail
    "depthwise_stride2_wide": (1, 8, (9, 75), 8, (3, 3), dict(group=8, strides=[2, 2], pads=[1, 1, 1, 1])),
    "dense_stride_1x2_wide": (1, 6, (5, 70), 10, (3, 3), dict(strides=[1, 2], pads=[0, 3, 2, 3])),
    "pointwise": (2, 20, (7, 9), 33, (1, 1), {}),
    "pointwise_stride2": (1, 9, (10, 10), 17, (1, 1), dict(strides=[2, 2])),
    "kernel_bigger_than_input": (1, 2, (3, 4), 3, (5, 5), dict(pads=[2, 2, 2, 2])),
    "one_by_wide": (1, 3, (1, 70), 4, (1, 7), dict(pads=[0, 3, 0, 3])),
    "conv1d": (3, 5, (40,), 6, (5,), dict(pads=[2, 1])),
    "conv1d_stride_dilation_groups": (2, 6, (37,), 9, (3,), dict(strides=[3], dilations=[4], pads=[0, 5], group=3)),
    "conv1d_depthwise": (1, 10, (65,), 10, (7,), dict(group=10, pads=[3, 3])),
    "empty_batch": (0, 4, (6, 6), 5, (3, 3), dict(pads=[1, 1, 1, 1])),
    "zero_width_input_padded": (1, 2, (4, 0), 3, (1, 1), dict(pads=[0, 1, 0, 1])),
}


@pytest.mark.parametrize("name", list(CASES))
def test_shapes(isa, name):
    n, c, spatial, m, kernel, opts = CASES[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    model, feeds, expected = shift_case(rng, n, c, spatial, m, kernel, **opts)
    assert_same(run(model, feeds), expected)


@pytest.mark.parametrize("terms", [1, 2, 3, 4])
@pytest.mark.parametrize("name", ["dense3x3_pad1", "depthwise_stride2", "conv1d"])
def test_terms(isa, name, terms):
    n, c, spatial, m, kernel, opts = CASES[name]
    model, feeds, expected = shift_case(np.random.default_rng(terms), n, c, spatial, m, kernel, terms=terms, **opts)
    assert_same(run(model, feeds), expected)


@pytest.mark.parametrize("weight_bits", [2, 3, 5])
@pytest.mark.parametrize("act", [(16, 8), (8, 4), (32, 0), (20, -3), (12, 20)])
def test_formats(isa, weight_bits, act):
    model, feeds, expected = shift_case(np.random.default_rng(weight_bits + act[0]), 1, 6, (8, 9), 7, (3, 3),
                                        pads=[1, 0, 1, 2], weight_bits=weight_bits, act=act)
    assert_same(run(model, feeds), expected)


@pytest.mark.parametrize("activation,clip", [("Relu", None), ("Clip", (0.0, 6.0)), ("Clip", (-2.5, 1e30)),
                                             ("Clip", (-np.inf, -1.0))])
def test_fused_activation(isa, activation, clip):
    model, feeds, expected = shift_case(np.random.default_rng(4), 2, 8, (9, 7), 8, (3, 3), group=8,
                                        pads=[1, 1, 1, 1], activation=activation, clip=clip)
    assert_same(run(model, feeds), expected)


@pytest.mark.parametrize("with_bias", [True, False])
def test_weights_as_inputs(isa, with_bias):
    rng = np.random.default_rng(8)
    model, feeds, expected = shift_case(rng, 2, 6, (7, 7), 4, (3, 3), group=2, pads=[1, 1, 1, 1], terms=2,
                                        as_inputs=True, with_bias=with_bias)
    assert_same(run(model, feeds), expected)


def test_initializer_weights_serve_any_spatial_size(isa):
    """Weights decoded once; the plane layout follows each run's input size (and its batch)."""
    rng = np.random.default_rng(12)
    model, feeds, _ = shift_case(rng, 1, 4, (5, 5), 6, (3, 3), strides=[2, 1], pads=[1, 1, 1, 1], dynamic=True)
    sess = session(model, threads=2)
    import onnx
    proto = onnx.load_from_string(model)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    codes = pow2.unpack_codes(inits["W_codes"], 6 * 4 * 9, 5).reshape(1, 6, 4, 3, 3)
    for shape in [(1, 4, 5, 5), (3, 4, 11, 6), (2, 4, 1, 2), (0, 4, 3, 3)]:
        x = random_x(rng, shape, 32, 16)
        y = sess.run(None, {"X": x})[0]
        assert_same(y, ref.shift_conv(x, codes, inits["W_exponent"], inits["B"], 5, 32, 16, [3, 3], [2, 1],
                                      [1, 1, 1, 1]))


def test_wraparound_and_extreme_exponents(isa):
    """Saturated inputs over many channels wrap the int32 accumulator; e - F at -126 and 127."""
    rng = np.random.default_rng(3)
    m, c = 4, 300
    codes = np.zeros((1, m, c, 1, 1), np.uint8)               # shift 0, positive
    codes[0, 1, ::3] = 0x10
    exponent = np.array([-126, 127, 0, 5], np.int8)
    x = np.full((1, c, 3, 3), 3e9, np.float32)
    x[:, ::2] = -3e9
    x[0, 5, 1] = np.nan
    model = conv_model("ShiftConv", list(x.shape), [("W_codes", TensorProto.UINT8, pow2.pack_codes(codes, 5)),
                                                    ("W_exponent", TensorProto.INT8, exponent)],
                       dict(out_channels=m, kernel_shape=[1, 1], act_frac_bits=0))
    expected = ref.shift_conv(x, codes, exponent, None, 5, 32, 0, [1, 1])
    assert np.isinf(expected).any() and (np.isfinite(expected) & (expected != 0)).any()
    assert_same(run(model, {"X": x}), expected)


@pytest.mark.parametrize("threads", [1, 3])
def test_larger_layers_and_threads(isa, threads):
    """MobileNetV2-like blocks (several tasks per output block and flat chunk)."""
    rng = np.random.default_rng(threads)
    for n, c, spatial, m, kernel, opts in [(1, 32, (28, 28), 32, (3, 3), dict(group=32, pads=[1, 1, 1, 1])),
                                           (1, 24, (14, 14), 40, (1, 1), {}),
                                           (1, 16, (15, 15), 24, (3, 3), dict(strides=[2, 2], pads=[1, 1, 1, 1]))]:
        model, feeds, expected = shift_case(rng, n, c, spatial, m, kernel, special=False, **opts)
        assert_same(run(model, feeds, threads), expected)


def test_isa_paths_agree():
    rng = np.random.default_rng(21)
    model, feeds, expected = shift_case(rng, 2, 12, (13, 10), 18, (3, 3), group=3, strides=[1, 2], pads=[1, 1, 0, 2],
                                        terms=2)
    ys = []
    for name in ISAS:
        os.environ["MFCONVERT_ISA"] = name
        try:
            ys.append(run(model, feeds))
        finally:
            del os.environ["MFCONVERT_ISA"]
    for y in ys:
        assert_same(y, expected)


# ---------------------------------------------------------------------------------------------
# Errors: one ORT error naming the node.

def expect_error(model_bytes, feeds, *parts):
    with pytest.raises(Exception) as info:
        run(model_bytes, feeds)
    msg = str(info.value)
    assert NODE in msg, msg
    for p in parts:
        assert p in msg, msg


def small(**over):
    """A valid 3x3 ShiftConv on [1, 4, 6, 6] with attributes overridden (None removes)."""
    rng = np.random.default_rng(0)
    codes = random_codes(rng, 6, 4 * 9, 5)
    weights = [("W_codes", TensorProto.UINT8, pow2.pack_codes(codes, 5)),
               ("W_exponent", TensorProto.INT8, np.zeros(6, np.int8)), ("B", TensorProto.FLOAT, np.ones(6, np.float32))]
    attrs = dict(out_channels=6, kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    attrs.update(over)
    return weights, attrs


X = np.zeros((1, 4, 6, 6), np.float32)


@pytest.mark.parametrize("over,part", [
    (dict(out_channels=None), "out_channels"), (dict(out_channels=0), "out_channels"),
    (dict(kernel_shape=None), "kernel_shape"), (dict(kernel_shape=[3, 3, 3]), "kernel_shape"),
    (dict(kernel_shape=[3, 0]), "kernel_shape"), (dict(strides=[1]), "strides"), (dict(strides=[0, 1]), "strides"),
    (dict(pads=[1, 1, 1]), "pads"), (dict(pads=[-1, 0, 0, 0]), "pads"), (dict(dilations=[1, 0]), "dilations"),
    (dict(group=0), "group"), (dict(group=4), "out_channels=6 is not divisible by group=4"),
    (dict(weight_bits=6), "weight_bits"), (dict(act_bits=1), "act_bits"), (dict(act_frac_bits=33), "act_frac_bits"),
    (dict(terms=5), "terms"), (dict(terms=2), "W_codes must have shape"),
    (dict(activation="Gelu"), "activation"), (dict(clip_min=0.0), "clip_min"),
    (dict(activation="Clip", clip_min=3.0, clip_max=1.0), "clip_min"),
    (dict(activation="Clip", clip_min=float("nan")), "clip_min"),
    (dict(pads=[0, 0, 0, 0], kernel_shape=[7, 3]), "output size below 1"),
    (dict(kernel_shape=[3], pads=[1, 1]), "rank 3"),
])
def test_error_attributes(over, part):
    weights, attrs = small(**over)
    expect_error(conv_model("ShiftConv", list(X.shape), weights, attrs), {"X": X}, part)


@pytest.mark.parametrize("attr,value,got", [("strides", 2, "an int"), ("group", 1.0, "a float"),
                                            ("kernel_shape", "3", "a string"), ("activation", 1, "an int"),
                                            ("clip_max", 6, "an int"), ("out_channels", [6], "a list of ints")])
def test_error_attribute_types(attr, value, got):
    weights, attrs = small(**{attr: value, **({"activation": "Clip"} if attr == "clip_max" else {})})
    expect_error(conv_model("ShiftConv", list(X.shape), weights, attrs), {"X": X}, attr, got)


@pytest.mark.parametrize("as_inputs", [False, True])
def test_error_weight_lengths(as_inputs):
    weights, attrs = small()
    for k, (name, ty, arr) in enumerate(weights):
        bad = list(weights)
        bad[k] = (name, ty, np.concatenate([arr, arr[:1]]))
        feeds = {"X": X, **({n: a for n, _, a in bad} if as_inputs else {})}
        expect_error(conv_model("ShiftConv", list(X.shape), bad, attrs, as_inputs=as_inputs), feeds, name)


def test_error_channels_and_exponent():
    weights, attrs = small(group=2)
    expect_error(conv_model("ShiftConv", [1, 5, 6, 6], weights, attrs), {"X": np.zeros((1, 5, 6, 6), np.float32)},
                 "not a positive multiple of group=2")
    weights, attrs = small()
    expect_error(conv_model("ShiftConv", [1, 8, 6, 6], weights, attrs), {"X": np.zeros((1, 8, 6, 6), np.float32)},
                 "W_codes must have shape")
    weights[1] = ("W_exponent", TensorProto.INT8, np.array([0, 0, 0, 127, 0, 0], np.int8))
    expect_error(conv_model("ShiftConv", list(X.shape), weights, dict(attrs, act_frac_bits=-1)), {"X": X},
                 "outside [-126, 127]")


def test_error_input_type_and_rank():
    weights, attrs = small()
    expect_error(conv_model("ShiftConv", [1, 4, 6, 6], weights, attrs, x_type=TensorProto.DOUBLE),
                 {"X": np.zeros((1, 4, 6, 6))}, "ShiftConv")
    expect_error(conv_model("ShiftConv", [4, 6, 6], weights, attrs), {"X": np.zeros((4, 6, 6), np.float32)}, "rank 4")


# ---------------------------------------------------------------------------------------------
# The lookup-table path (AVX-512 only; ort_ops/src/shift_conv_lut_avx512.cc): the ShiftLinear
# kernel over im2col strips. ShiftConvLutPays selects it for group 1, M >= 64 and
# 64 <= (C/G) * K * T <= 2^16; on the other ISAs the same cases run the direct kernels, so every
# case is also a cross-ISA check. Shapes: C and M off multiples of 16 and 64, flat outputs off
# multiples of 16 (the transposes' masked tails), fewer than 29 flat outputs (ShiftLinear's
# shared-table branch), several strips (strip = 2^17 / (C * K) rows, multiple of 16), junk
# columns (pads, strides) and none (1x1).
LUT_CASES = {
    "lut_pointwise_tails": (2, 260, (5, 7), 70, (1, 1), {}),
    "lut_pointwise_64": (1, 256, (8, 8), 64, (1, 1), {}),
    "lut_3x3_pad1": (1, 40, (9, 11), 65, (3, 3), dict(pads=[1, 1, 1, 1])),
    "lut_3x3_stride2": (1, 30, (13, 12), 80, (3, 3), dict(strides=[2, 2], pads=[1, 0, 1, 1])),
    "lut_stride_dilation_asym": (1, 48, (15, 17), 72, (3, 2), dict(strides=[2, 3], dilations=[2, 3],
                                                                   pads=[2, 0, 1, 3])),
    "lut_pointwise_stride2_pads": (1, 300, (9, 10), 64, (1, 1), dict(strides=[2, 2], pads=[1, 0, 0, 1])),
    "lut_few_rows": (2, 256, (3, 4), 65, (1, 1), {}),
    "lut_one_pixel": (1, 288, (1, 1), 130, (1, 1), {}),
    "lut_many_strips_3x3": (1, 256, (10, 10), 64, (3, 3), dict(pads=[1, 1, 1, 1])),
    "lut_many_strips_1x1": (1, 256, (30, 30), 100, (1, 1), {}),
    "lut_few_inputs_many_outputs": (1, 64, (14, 14), 384, (1, 1), {}),
    "lut_conv1d": (3, 100, (33,), 64, (3,), dict(pads=[1, 2])),
    "lut_kernel_wider_than_input": (1, 32, (3, 4), 67, (5, 5), dict(pads=[2, 2, 2, 2])),
}


@pytest.mark.parametrize("name", list(LUT_CASES))
def test_lut_shapes(isa, name):
    n, c, spatial, m, kernel, opts = LUT_CASES[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    model, feeds, expected = shift_case(rng, n, c, spatial, m, kernel, **opts)
    assert_same(run(model, feeds), expected)


@pytest.mark.parametrize("terms", [2, 3, 4])
@pytest.mark.parametrize("name", ["lut_3x3_stride2", "lut_pointwise_tails"])
def test_lut_terms(isa, name, terms):
    n, c, spatial, m, kernel, opts = LUT_CASES[name]
    model, feeds, expected = shift_case(np.random.default_rng(terms), n, c, spatial, m, kernel, terms=terms, **opts)
    assert_same(run(model, feeds), expected)


def test_lut_terms_reach_the_threshold(isa):
    """C * K = 32 with 2 terms is 64 table inputs: the lookup-table path with 2 terms only."""
    for terms in (1, 2):
        model, feeds, expected = shift_case(np.random.default_rng(7), 1, 32, (6, 7), 70, (1, 1), terms=terms)
        assert_same(run(model, feeds), expected)


@pytest.mark.parametrize("weight_bits", [2, 5])
@pytest.mark.parametrize("act", [(16, 8), (8, 4), (32, 0), (20, -3), (12, 20)])
def test_lut_formats(isa, weight_bits, act):
    model, feeds, expected = shift_case(np.random.default_rng(weight_bits + act[0]), 1, 36, (7, 8), 66, (3, 3),
                                        pads=[1, 0, 1, 2], weight_bits=weight_bits, act=act)
    assert_same(run(model, feeds), expected)


@pytest.mark.parametrize("activation,clip", [("Relu", None), ("Clip", (0.0, 6.0)), ("Clip", (-np.inf, -1.0))])
@pytest.mark.parametrize("name", ["lut_3x3_pad1", "lut_pointwise_tails"])
def test_lut_fused_activation(isa, name, activation, clip):
    n, c, spatial, m, kernel, opts = LUT_CASES[name]
    model, feeds, expected = shift_case(np.random.default_rng(5), n, c, spatial, m, kernel, activation=activation,
                                        clip=clip, **opts)
    assert_same(run(model, feeds), expected)


@pytest.mark.parametrize("with_bias", [True, False])
def test_lut_weights_as_inputs(isa, with_bias):
    model, feeds, expected = shift_case(np.random.default_rng(9), 2, 64, (6, 5), 72, (3, 3), pads=[1, 1, 1, 1],
                                        terms=2, as_inputs=True, with_bias=with_bias)
    assert_same(run(model, feeds), expected)


@pytest.mark.parametrize("threads", [1, 3])
def test_lut_threads(isa, threads):
    model, feeds, expected = shift_case(np.random.default_rng(threads), 2, 96, (14, 14), 80, (3, 3),
                                        strides=[2, 2], pads=[1, 1, 1, 1], special=False)
    assert_same(run(model, feeds, threads), expected)


def test_lut_any_spatial_size(isa):
    """The prepared tables follow each run's input size (initializer weights, dynamic shape)."""
    rng = np.random.default_rng(13)
    model, _, _ = shift_case(rng, 1, 64, (5, 5), 68, (3, 3), pads=[1, 1, 1, 1], dynamic=True)
    import onnx
    proto = onnx.load_from_string(model)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    codes = pow2.unpack_codes(inits["W_codes"], 68 * 64 * 9, 5).reshape(1, 68, 64, 3, 3)
    sess = session(model, threads=2)
    for shape in [(1, 64, 5, 5), (2, 64, 9, 4), (1, 64, 1, 1), (0, 64, 3, 3), (1, 64, 5, 5)]:
        x = random_x(rng, shape, 32, 16)
        assert_same(sess.run(None, {"X": x})[0],
                    ref.shift_conv(x, codes, inits["W_exponent"], inits["B"], 5, 32, 16, [3, 3], None, [1, 1, 1, 1]))


def test_lut_wraparound_and_extreme_exponents(isa):
    """Saturated inputs over 300 channels wrap the int32 accumulator on the table path too."""
    m, c = 64, 300
    codes = np.zeros((1, m, c, 1, 1), np.uint8)
    codes[0, 1::2, ::3] = 0x10
    codes[0, 2::4, 1::5] = 0x0F                                # the zero code at weight_bits 5
    exponent = np.tile(np.array([-126, 127, 0, 5], np.int8), m // 4)
    x = np.full((1, c, 3, 3), 3e9, np.float32)
    x[:, ::2] = -3e9
    x[0, 5, 1] = np.nan
    x[0, 7, 2, 2] = np.inf
    model = conv_model("ShiftConv", list(x.shape), [("W_codes", TensorProto.UINT8, pow2.pack_codes(codes, 5)),
                                                    ("W_exponent", TensorProto.INT8, exponent)],
                       dict(out_channels=m, kernel_shape=[1, 1], act_frac_bits=0))
    expected = ref.shift_conv(x, codes, exponent, None, 5, 32, 0, [1, 1])
    assert np.isinf(expected).any() and (np.isfinite(expected) & (expected != 0)).any()
    assert_same(run(model, {"X": x}), expected)
