"""The SpatialShift C++ kernel (ort_ops/src/spatial_shift*) against the NumPy reference of
docs/ops.md (tests/numpy_reference.py: spatial_shift), exactly (it moves floats: np.array_equal
on their bits, NaN and -0.0 included): zero and edge padding, strides 1-3, offsets past the image
(and at the int64 limits), the channel shift, offsets as an initializer or a run-time input, empty
sizes, and errors naming the node."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from mfconvert.runtime import session
from tests import numpy_reference as ref

DOMAIN = "ai.mfconvert"
NODE = "spatial_shift_under_test"


def shift_model(x_shape, offsets, *, as_input=False, offsets_type=TensorProto.INT64, **attrs):
    """One SpatialShift node named NODE."""
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)]
    inits = []
    if as_input:
        inputs.append(helper.make_tensor_value_info("offsets", offsets_type, list(offsets.shape)))
    else:
        inits.append(helper.make_tensor("offsets", offsets_type, list(offsets.shape), offsets.reshape(-1).tolist()))
    node = helper.make_node("SpatialShift", ["X", "offsets"], ["Y"], name=NODE, domain=DOMAIN,
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
