"""The SpatialShift C++ kernel (ort_ops/src/spatial_shift*) against the NumPy reference of
docs/ops.md (tests/numpy_reference.py: spatial_shift), exactly (it moves floats: np.array_equal
on their bits, NaN and -0.0 included): zero and edge padding, strides 1-3, offsets past the image
(and at the int64 limits), the channel shift, offsets as an initializer or a run-time input, empty
sizes, and errors naming the node. The fused tail (scale, bias, Relu/Clip): every ISA path
(scalar, AVX2, AVX-512) bit for bit with the reference's float32 v·s + b and NaN-keeping clamp
(any NaN for a NaN: payloads of arithmetic are not specified), on widths around the vector
lengths, hostile values in X, scale and bias, and the errors of the new inputs and attributes."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from mfconvert.runtime import session
from tests import numpy_reference as ref
from tests.test_shift_linear_kernel import ISAS

DOMAIN = "ai.mfconvert"
NODE = "spatial_shift_under_test"


def shift_model(x_shape, offsets, *, as_input=False, offsets_type=TensorProto.INT64, tail=None, **attrs):
    """One SpatialShift node named NODE; tail: {"scale": array, "bias": array} (either may be
    missing: the input left out, or "" before bias) with "as_input" to feed them at run time."""
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)]
    inits = []
    if as_input:
        inputs.append(helper.make_tensor_value_info("offsets", offsets_type, list(offsets.shape)))
    else:
        inits.append(helper.make_tensor("offsets", offsets_type, list(offsets.shape), offsets.reshape(-1).tolist()))
    names = ["X", "offsets"]
    tail = dict(tail or {})
    tail_as_input = tail.pop("as_input", False)
    for name in ("scale", "bias"):
        if name not in tail:
            names.append("")
            continue
        v = np.asarray(tail[name])
        names.append(name)
        if tail_as_input:
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(v.shape)))
        else:
            inits.append(numpy_helper.from_array(v, name))
    while names[-1] == "":
        names.pop()
    node = helper.make_node("SpatialShift", names, ["Y"], name=NODE, domain=DOMAIN,
                            **{k: v for k, v in attrs.items() if v is not None})
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    model.ir_version = 8
    return model.SerializeToString()


def run(x, offsets, as_input=False, **attrs):
    sess = session(shift_model(list(x.shape), offsets, as_input=as_input, **attrs), threads=2)
    feeds = {"X": x, **({"offsets": offsets} if as_input else {})}
    return sess.run(None, feeds)[0]


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


CASES = [  # (shape, max offset, strides, padding, channel_shift)
    ((2, 5, 7, 9), 2, None, None, None),
    ((1, 6, 8, 8), 1, [2, 2], "zeros", None),
    ((1, 4, 9, 7), 3, [3, 2], "edge", None),
    ((2, 3, 5, 6), 9, [1, 1], "edge", 1),
    ((1, 7, 1, 10), 2, [1, 3], "zeros", -9),
    ((1, 2, 6, 1), 2, [2, 1], "edge", 5),
]


@pytest.mark.parametrize("shape, reach, strides, padding, channel_shift", CASES)
@pytest.mark.parametrize("as_input", [False, True])
def test_exact(shape, reach, strides, padding, channel_shift, as_input):
    rng = np.random.default_rng(sum(shape) + reach)
    x = rng.normal(size=shape).astype(np.float32)
    x.reshape(-1)[::7] = -0.0
    x.reshape(-1)[3] = np.nan
    offsets = rng.integers(-reach, reach + 1, size=(shape[1], 2)).astype(np.int64)
    got = run(x, offsets, as_input, strides=strides, padding=padding, channel_shift=channel_shift)
    want = ref.spatial_shift(x, offsets, strides or (1, 1), padding or "zeros", channel_shift or 0)
    assert same_bits(got, want)


@pytest.mark.parametrize("padding", ["zeros", "edge"])
def test_offsets_past_the_image_and_int64_limits(padding):
    x = np.arange(2 * 4 * 5 * 6, dtype=np.float32).reshape(2, 4, 5, 6)
    big = np.iinfo(np.int64)
    offsets = np.array([[big.max, 0], [0, big.min], [big.min, big.max], [-5, 6]], np.int64)
    got = run(x, offsets, strides=[2, 2], padding=padding)
    clipped = np.clip(offsets, -20, 20)   # any offset past the image reads the same pixels
    assert same_bits(got, ref.spatial_shift(x, clipped, (2, 2), padding))
    if padding == "zeros":
        assert not got.any()


def test_zero_offsets_copy_and_empty_sizes():
    x = np.random.default_rng(0).normal(size=(3, 4, 5, 5)).astype(np.float32)
    assert same_bits(run(x, np.zeros((4, 2), np.int64)), x)
    for shape in ((0, 4, 5, 5), (2, 4, 0, 5), (2, 4, 5, 0), (2, 0, 5, 5)):
        y = run(np.zeros(shape, np.float32), np.zeros((shape[1], 2), np.int64), strides=[2, 2])
        assert y.shape == (shape[0], shape[1], -(-shape[2] // 2), -(-shape[3] // 2))


@pytest.mark.parametrize("attrs, offsets, message", [
    (dict(strides=[0, 1]), None, "strides [0, 1] must be in [1, 65536]"),
    (dict(strides=[1, 1, 1]), None, "strides [1, 1, 1] must have 2 values"),
    (dict(padding="reflect"), None, "padding='reflect' must be 'zeros' or 'edge'"),
    (dict(channel_shift=1.5), None, "channel_shift must be an int, got a float"),
    ({}, np.zeros((3, 2), np.int64), "offsets must have shape [4, 2]"),
    ({}, np.zeros((4, 3), np.int64), "offsets must have shape [4, 2]"),
])
def test_errors_name_the_node(attrs, offsets, message):
    offsets = np.zeros((4, 2), np.int64) if offsets is None else offsets
    x = np.zeros((1, 4, 3, 3), np.float32)
    with pytest.raises(Exception) as err:
        run(x, offsets, as_input=True, **attrs)
    assert f"SpatialShift node '{NODE}'" in str(err.value) and message in str(err.value)


def test_offsets_of_another_type_are_refused():
    x = np.zeros((1, 2, 3, 3), np.float32)
    with pytest.raises(Exception) as err:
        session(shift_model([1, 2, 3, 3], np.zeros((2, 2), np.int32), offsets_type=TensorProto.INT32)).run(None, {"X": x})
    assert "offsets" in str(err.value) or "int64" in str(err.value) or "SpatialShift" in str(err.value)


# -- the fused tail: scale, bias, Relu/Clip ------------------------------------------------------
def same_or_nan(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal bits, except that any NaN matches any NaN (arithmetic's NaN payloads are unspecified)."""
    nan = np.isnan(a)
    return a.shape == b.shape and np.array_equal(nan, np.isnan(b)) and np.array_equal(
        a.view(np.uint32)[~nan], b.view(np.uint32)[~nan])


def run_tail(x, offsets, isa, tail, **attrs):
    feeds = {"X": x, **({k: np.asarray(v) for k, v in tail.items() if k != "as_input"} if tail.get("as_input") else {})}
    import os
    os.environ["MFCONVERT_ISA"] = isa
    try:
        sess = session(shift_model(list(x.shape), offsets, tail=tail, **attrs), threads=2)
    finally:
        del os.environ["MFCONVERT_ISA"]
    return sess.run(None, feeds)[0]


def hostile(rng, shape, special=True):
    v = rng.normal(size=shape).astype(np.float32) * 3
    if special and v.size:
        flat = v.reshape(-1)
        pick = rng.random(flat.size) < 0.2
        values = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, 3e38, -3e38, 1e-45, -1e-45, 6.0], np.float32)
        flat[pick] = values[rng.integers(0, len(values), pick.sum())]
    return v


TAILS = [  # (scale?, bias?, activation attrs, clip range for the reference)
    (True, True, {"activation": "Clip", "clip_min": 0.0, "clip_max": 6.0}, (0.0, 6.0)),
    (True, True, {}, None),
    (True, False, {"activation": "Relu"}, (0.0, np.inf)),
    (False, True, {"activation": "Clip", "clip_min": -1.5, "clip_max": -1.5}, (-1.5, -1.5)),
    (False, False, {"activation": "Clip", "clip_min": -2.0, "clip_max": 0.5}, (-2.0, 0.5)),
    (True, False, {}, None),
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("scale_on, bias_on, act, clip", TAILS)
@pytest.mark.parametrize("padding", ["zeros", "edge"])
def test_tail_exact_on_every_isa(isa, scale_on, bias_on, act, clip, padding):
    """Widths 1-40 (vector lengths 8 and 16, their tails and a 7-wide row as one vector), strides 1-3,
    offsets up to 4 past the edge, hostile values in X, scale and bias."""
    rng = np.random.default_rng([scale_on, bias_on, padding == "edge", len(act), int(clip is not None)])
    for w, h, stride, reach in [(1, 3, 1, 2), (7, 7, 1, 1), (7, 7, 2, 1), (14, 5, 2, 1), (16, 3, 1, 3), (17, 4, 1, 4),
                                (31, 2, 2, 3), (32, 3, 2, 1), (33, 2, 1, 2), (40, 3, 3, 4), (9, 9, 2, 5)]:
        c = 5
        x = hostile(rng, (2, c, h, w))
        offsets = rng.integers(-reach, reach + 1, size=(c, 2)).astype(np.int64)
        tail = {}
        if scale_on:
            tail["scale"] = hostile(rng, (c,))
        if bias_on:
            tail["bias"] = hostile(rng, (c,))
        got = run_tail(x, offsets, isa, tail, strides=[stride, stride], padding=padding, **act)
        want = ref.spatial_shift(x, offsets, (stride, stride), padding, 0, tail.get("scale"), tail.get("bias"), clip)
        assert same_or_nan(got, want), (w, h, stride, isa)


@pytest.mark.parametrize("isa", ISAS)
def test_tail_as_run_time_inputs_channel_shift_and_the_sign_of_zero(isa):
    rng = np.random.default_rng(3)
    x = hostile(rng, (1, 6, 9, 12), special=False)
    x[0, :, :, ::3] = -0.0
    offsets = rng.integers(-2, 3, size=(6, 2)).astype(np.int64)
    scale = np.array([1, -1, 0.5, -0.0, 2, -3], np.float32)
    bias = np.array([0, -0.0, 1, 0, -0.0, 0.25], np.float32)
    for as_input in (False, True):
        tail = {"scale": scale, "bias": bias, "as_input": as_input}
        got = run_tail(x, offsets, isa, tail, channel_shift=2, activation="Relu")
        want = ref.spatial_shift(x, offsets, (1, 1), "zeros", 2, scale, bias, (0.0, np.inf))
        assert same_bits(got, want)   # no NaN here: the bits, the sign of zero included
    # bias alone: no multiplication (x + b); scale alone: no addition (−0.0·1 stays −0.0)
    got = run_tail(x, offsets, isa, {"scale": np.ones(6, np.float32)})
    assert same_bits(got, ref.spatial_shift(x, offsets))


def test_tail_isas_agree_on_mobilenet_shapes():
    """The SIMD paths against the scalar one on the shapes bench/bench_spatial_shift_speed.py times
    (ReLU6 tail, strides 1 and 2), a thread split included (Y over 64K floats)."""
    rng = np.random.default_rng(4)
    for c, h, s in [(32, 112, 1), (96, 112, 2), (960, 7, 1), (576, 14, 2), (144, 56, 1)]:
        x = rng.normal(size=(1, c, h, h)).astype(np.float32)
        offsets = rng.integers(-1, 2, size=(c, 2)).astype(np.int64)
        tail = {"scale": rng.normal(size=c).astype(np.float32), "bias": rng.normal(size=c).astype(np.float32)}
        ys = [run_tail(x, offsets, isa, tail, strides=[s, s], activation="Clip", clip_min=0.0, clip_max=6.0)
              for isa in ISAS]
        for y in ys[1:]:
            assert same_bits(y, ys[0])
        if c * h * h <= 200_000:   # the reference is a Python loop: the small ones
            want = ref.spatial_shift(x, offsets, (s, s), "zeros", 0, tail["scale"], tail["bias"], (0.0, 6.0))
            assert same_bits(ys[0], want)


@pytest.mark.parametrize("tail, attrs, message", [
    ({"scale": np.ones(3, np.float32)}, {}, "scale must have shape [4] (C = X's channels), got [3]"),
    ({"scale": np.ones((4, 1), np.float32)}, {}, "scale must have shape [4]"),
    ({"bias": np.ones(5, np.float32)}, {}, "bias must have shape [4]"),
    ({}, {"activation": "Sigmoid"}, "activation='Sigmoid' is not one of '', 'Relu', 'Clip'"),
    ({}, {"activation": "Clip", "clip_min": 2.0, "clip_max": 1.0}, "must be numbers with clip_min <= clip_max"),
    ({}, {"activation": "Clip", "clip_min": float("nan")}, "must be numbers with clip_min <= clip_max"),
    ({}, {"activation": "Relu", "clip_max": 6.0}, "clip_min/clip_max are only allowed with activation='Clip'"),
    ({}, {"clip_min": 0.0}, "clip_min/clip_max are only allowed with activation='Clip'"),
    ({}, {"activation": "Clip", "clip_min": 1}, "clip_min must be a float, got an int"),
])
def test_tail_errors_name_the_node(tail, attrs, message):
    x = np.zeros((1, 4, 3, 3), np.float32)
    with pytest.raises(Exception) as err:
        run_tail(x, np.zeros((4, 2), np.int64), "scalar", {**tail, "as_input": True}, **attrs)
    assert f"SpatialShift node '{NODE}'" in str(err.value) and message in str(err.value), str(err.value)


def test_tail_of_another_type_is_refused():
    x = np.zeros((1, 2, 3, 3), np.float32)
    model = shift_model([1, 2, 3, 3], np.zeros((2, 2), np.int64), tail={"scale": np.ones(2, np.float64)})
    with pytest.raises(Exception) as err:
        session(model).run(None, {"X": x})
    assert "scale" in str(err.value) or "type" in str(err.value).lower()
