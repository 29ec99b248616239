"""The AdderConv C++ kernel (ort_ops/src/adder_conv*, shift_conv_simd.h) against the NumPy
reference of docs/ops.md (tests/numpy_reference.py: adder_conv), exactly, on every ISA path:
the layer kinds of test_shift_conv_kernel, narrow formats, the int32-chunk carries of the SIMD
kernels and their scalar fallback, fused activations, and errors naming the node."""
from __future__ import annotations

import os

import numpy as np
import pytest
from onnx import TensorProto

from mfconvert.runtime import session
from tests import numpy_reference as ref
from tests.cpu_isas import supported_isas
from tests.test_shift_conv_kernel import CASES, NODE, assert_same, conv_attrs, conv_model, run
from tests.test_shift_linear_kernel import random_x

ISAS = supported_isas()


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("MFCONVERT_ISA", request.param)
    return request.param


def adder_case(rng, n, c, spatial, m, kernel, *, strides=None, pads=None, dilations=None, group=1,
               act=(32, 16), activation="", clip=None, with_bias=True, as_inputs=False, special=True,
               w_scale=1.0, x_scale=None, dynamic=False):
    """(model bytes, feeds, expected Y) of a random AdderConv."""
    act_bits, frac = act
    w = (rng.standard_normal((m, c // group, *kernel)) * w_scale).astype(np.float32)
    bias = (rng.standard_normal(m) * 4).astype(np.float32) if with_bias else None
    if x_scale is None:
        x = random_x(rng, (n, c, *spatial), act_bits, frac, special)
    else:
        x = (rng.standard_normal((n, c, *spatial)) * x_scale).astype(np.float32)
    attrs = conv_attrs(kernel, strides, pads, dilations, group, activation, clip)
    attrs.update(out_channels=m, act_bits=act_bits, act_frac_bits=frac)
    weights = [("W", TensorProto.FLOAT, w), ("B", TensorProto.FLOAT, bias)]
    x_shape = ["n", c] + [f"s{i}" for i in range(len(spatial))] if dynamic else list(x.shape)
    model = conv_model("AdderConv", x_shape, weights, attrs, as_inputs=as_inputs)
    feeds = {"X": x}
    if as_inputs:
        feeds["W"] = w
        if bias is not None:
            feeds["B"] = bias
    expected = ref.adder_conv(x, w, bias, act_bits, frac, list(kernel), strides, pads, dilations, group,
                              activation, *(clip or (-np.inf, np.inf)))
    return model, feeds, expected


@pytest.mark.parametrize("special", [False, True])
@pytest.mark.parametrize("name", list(CASES))
def test_shapes(isa, name, special):
    """special=True feeds ±inf/NaN/saturating inputs: differences reach 2^31, the SIMD paths
    fall back to the scalar kernel; special=False stays in the SIMD paths."""
    n, c, spatial, m, kernel, opts = CASES[name]
    rng = np.random.default_rng(sum(map(ord, name)) + special)
    model, feeds, expected = adder_case(rng, n, c, spatial, m, kernel, special=special,
                                        x_scale=None if special else 3.0, **opts)
    assert_same(run(model, feeds), expected)


@pytest.mark.parametrize("act", [(16, 8), (8, 4), (32, 0), (20, -3), (12, 20), (32, 28)])
def test_formats(isa, act):
    rng = np.random.default_rng(act[0] * 7 + act[1])
    model, feeds, expected = adder_case(rng, 1, 6, (8, 9), 7, (3, 3), pads=[1, 0, 1, 2], act=act, special=False,
                                        x_scale=2.0 ** (act[0] - 2 - act[1]))
    assert_same(run(model, feeds), expected)


def test_int32_chunks_carry_into_int64(isa):
    """|x_q - w_q| near 2^29 over 1,152 taps x channels: a chunk holds 3 terms, the int64 sum
    passes 2^31 many times over and float32(acc) rounds (acc > 2^24)."""
    rng = np.random.default_rng(5)
    model, feeds, expected = adder_case(rng, 1, 128, (6, 6), 5, (3, 3), pads=[1, 1, 1, 1], act=(32, 8),
                                        special=False, x_scale=2.0 ** 20, w_scale=2.0 ** 19)
    assert np.abs(expected).max() > 2.0 ** 24
    assert_same(run(model, feeds), expected)


def test_differences_past_int32_fall_back_exactly(isa):
    """x_q at -2^31 against w_q near 2^31: |x_q - w_q| ~ 2^32 (SIMD paths hand over to scalar)."""
    rng = np.random.default_rng(6)
    model, feeds, expected = adder_case(rng, 2, 3, (5, 5), 4, (3, 3), pads=[1, 1, 1, 1], act=(32, 0),
                                        special=False, x_scale=1.0)
    feeds["X"][0, 0, 0, :3] = -3e9
    import onnx
    proto = onnx.load_from_string(model)
    w = onnx.numpy_helper.to_array(proto.graph.initializer[0]).copy()
    w[1, 2, 1, 1] = 2.1e9
    proto.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w, "W"))
    b = onnx.numpy_helper.to_array(proto.graph.initializer[1])
    expected = ref.adder_conv(feeds["X"], w, b, 32, 0, [3, 3], None, [1, 1, 1, 1])
    assert_same(run(proto.SerializeToString(), feeds), expected)


@pytest.mark.parametrize("activation,clip", [("Relu", None), ("Clip", (-40.0, -10.0)), ("Clip", (-np.inf, -20.0))])
def test_fused_activation(isa, activation, clip):
    model, feeds, expected = adder_case(np.random.default_rng(4), 2, 8, (9, 7), 8, (3, 3), group=2,
                                        pads=[1, 1, 1, 1], activation=activation, clip=clip, special=False,
                                        x_scale=1.0, w_scale=0.3)
    assert_same(run(model, feeds), expected)


@pytest.mark.parametrize("with_bias", [True, False])
def test_weights_as_inputs(isa, with_bias):
    model, feeds, expected = adder_case(np.random.default_rng(8), 2, 6, (7, 7), 4, (3, 3), group=2,
                                        pads=[1, 1, 1, 1], as_inputs=True, with_bias=with_bias, special=False,
                                        x_scale=1.0)
    assert_same(run(model, feeds), expected)


@pytest.mark.parametrize("threads", [1, 3])
def test_larger_layers_and_threads(isa, threads):
    rng = np.random.default_rng(threads)
    for n, c, spatial, m, kernel, opts in [(1, 32, (28, 28), 32, (3, 3), dict(group=32, pads=[1, 1, 1, 1])),
                                           (1, 24, (14, 14), 40, (1, 1), {}),
                                           (2, 16, (15, 15), 24, (3, 3), dict(strides=[2, 2], pads=[1, 1, 1, 1]))]:
        model, feeds, expected = adder_case(rng, n, c, spatial, m, kernel, special=False, x_scale=2.0, **opts)
        assert_same(run(model, feeds, threads), expected)


def test_isa_paths_agree_and_any_spatial_size():
    rng = np.random.default_rng(21)
    model, feeds, _ = adder_case(rng, 2, 12, (13, 10), 18, (3, 3), group=3, strides=[1, 2], pads=[1, 1, 0, 2],
                                 special=False, x_scale=1.0, dynamic=True)
    import onnx
    proto = onnx.load_from_string(model)
    w, b = (onnx.numpy_helper.to_array(i) for i in proto.graph.initializer)
    for name in ISAS:
        os.environ["MFCONVERT_ISA"] = name
        try:
            sess = session(model, threads=2)
        finally:
            del os.environ["MFCONVERT_ISA"]
        for shape in [(2, 12, 13, 10), (1, 12, 4, 25), (0, 12, 5, 5)]:
            x = (rng.standard_normal(shape)).astype(np.float32)
            y = sess.run(None, {"X": x})[0]
            assert_same(y, ref.adder_conv(x, w, b, 32, 16, [3, 3], [1, 2], [1, 1, 0, 2], None, 3))


# ---------------------------------------------------------------------------------------------
# Errors.

def expect_error(model_bytes, feeds, *parts):
    with pytest.raises(Exception) as info:
        run(model_bytes, feeds)
    msg = str(info.value)
    assert NODE in msg, msg
    for p in parts:
        assert p in msg, msg


X = np.zeros((1, 4, 6, 6), np.float32)


def small(w_shape=(6, 4, 3, 3), b_shape=(6,), **over):
    weights = [("W", TensorProto.FLOAT, np.zeros(w_shape, np.float32)),
               ("B", TensorProto.FLOAT, None if b_shape is None else np.zeros(b_shape, np.float32))]
    attrs = dict(out_channels=6, kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    attrs.update(over)
    return weights, attrs


@pytest.mark.parametrize("as_inputs", [False, True])
@pytest.mark.parametrize("kw,part", [
    (dict(w_shape=(6, 4, 3, 2)), "W must be"), (dict(w_shape=(5, 4, 3, 3)), "W must be"),
    (dict(w_shape=(6, 4, 9)), "W must be"), (dict(b_shape=(5,)), "B must have shape"),
    (dict(w_shape=(6, 2, 3, 3)), "C/group=2"), (dict(out_channels=0), "out_channels"),
    (dict(act_bits=33), "act_bits"), (dict(act_frac_bits=-33), "act_frac_bits"), (dict(group=3), "group"),
    (dict(activation="Relu6"), "activation"), (dict(kernel_shape=[3, 3], strides=[1, 1, 1]), "strides"),
])
def test_errors(as_inputs, kw, part):
    weights, attrs = small(**kw)
    feeds = {"X": X, **({n: a for n, _, a in weights if a is not None} if as_inputs else {})}
    expect_error(conv_model("AdderConv", list(X.shape), weights, attrs, as_inputs=as_inputs), feeds, part)


def test_error_reduction_too_large():
    weights, attrs = small(w_shape=(1, 2 ** 21, 1, 3), out_channels=1, kernel_shape=[1, 3], pads=None)
    weights[1] = ("B", TensorProto.FLOAT, None)
    x = np.zeros((1, 2 ** 21, 1, 3), np.float32)
    expect_error(conv_model("AdderConv", list(x.shape), weights, attrs, as_inputs=True),
                 {"X": x, "W": weights[0][2]}, "above 2^22")
