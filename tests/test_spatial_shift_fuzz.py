"""SpatialShift under hypothesis (marker fuzz; MFCONVERT_FUZZ_EXAMPLES examples): random shapes
(empty included), strides 1-4, offsets near and far past the image (int64 limits too), channel
shifts, both paddings, the fused tail (scale, bias, Relu/Clip with random bounds) with hostile
floats (NaN, ±inf, ±3e38, subnormals, -0.0) in X, scale and bias, every ISA path, constants as
initializers or run-time inputs — against the NumPy reference (equal bits, any NaN for a NaN) —
and malformed inputs and attributes, which must be one error naming the node."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests import numpy_reference as ref
from tests.test_kernel_fuzz import FUZZ, hostile_floats
from tests.test_shift_linear_kernel import ISAS
from tests.test_spatial_shift_kernel import NODE, run_tail, same_or_nan

pytestmark = pytest.mark.fuzz

MALFORMED = ["scale_length", "scale_rank", "bias_length", "clip_reversed", "clip_without_clip", "activation_name"]


@st.composite
def cases(draw):
    far = draw(st.booleans())
    return dict(
        seed=draw(st.integers(0, 2**32 - 1)),
        shape=(draw(st.integers(0, 2)), draw(st.integers(1, 6)), draw(st.integers(0, 20)), draw(st.integers(0, 40))),
        strides=[draw(st.integers(1, 4)), draw(st.integers(1, 4))],
        reach=draw(st.sampled_from([1, 3, 25])) if not far else 0,
        extreme=far,
        padding=draw(st.sampled_from(["zeros", "edge"])),
        channel_shift=draw(st.integers(-10, 10)),
        scale=draw(st.booleans()), bias=draw(st.booleans()),
        activation=draw(st.sampled_from(["", "Relu", "Clip"])),
        special=draw(st.booleans()),
        as_input=draw(st.booleans()),
        isa=draw(st.sampled_from(ISAS)),
        malformed=draw(st.one_of(st.none(), st.none(), st.none(), st.sampled_from(MALFORMED))),
    )


@FUZZ
@given(cases())
def test_spatial_shift_fuzz(c):
    rng = np.random.default_rng(c["seed"])
    n, ch, h, w = c["shape"]
    x = hostile_floats(rng, (n, ch, h, w), 3.0, c["special"])
    if c["extreme"]:
        big = np.iinfo(np.int64)
        offsets = rng.choice(np.array([big.min, big.max, -h - 5, w + 5, 0, -1, 1], np.int64), size=(ch, 2))
    else:
        offsets = rng.integers(-c["reach"], c["reach"] + 1, size=(ch, 2)).astype(np.int64)
    tail = {"as_input": c["as_input"]}
    if c["scale"]:
        tail["scale"] = hostile_floats(rng, (ch,), 2.0, c["special"])
    if c["bias"]:
        tail["bias"] = hostile_floats(rng, (ch,), 2.0, c["special"])
    attrs = dict(strides=c["strides"], padding=c["padding"], channel_shift=c["channel_shift"])
    clip = None
    if c["activation"]:
        attrs["activation"] = c["activation"]
        clip = (0.0, np.inf)
    if c["activation"] == "Clip":
        lo = float(np.float32(rng.standard_normal() * 3))
        clip = (lo, float(np.float32(lo + abs(rng.standard_normal() * 5))))
        attrs.update(clip_min=clip[0], clip_max=clip[1])
    bad = c["malformed"]
    if bad == "scale_length":
        tail["scale"] = np.ones(ch + 1, np.float32)
    elif bad == "scale_rank":
        tail["scale"] = np.ones((ch, 1), np.float32)
    elif bad == "bias_length":
        tail["bias"] = np.ones(max(ch - 1, 0), np.float32) if ch > 1 else np.ones(2, np.float32)
    elif bad == "clip_reversed":
        attrs.update(activation="Clip", clip_min=1.0, clip_max=-1.0)
    elif bad == "clip_without_clip":
        attrs.update(activation="Relu", clip_min=0.0)
    elif bad == "activation_name":
        attrs["activation"] = "Tanh"
    try:
        got = run_tail(x, offsets, c["isa"], tail, **attrs)
    except Exception as e:  # noqa: BLE001 - checked below
        assert bad is not None, f"unexpected error: {e}"
        assert type(e).__module__.startswith("onnxruntime") and f"SpatialShift node '{NODE}'" in str(e), str(e)
        return
    assert bad is None, f"{bad} was accepted"
    clipped = np.clip(offsets, -(max(h, w) + 8), max(h, w) + 8)   # past the image reads the same pixels
    want = ref.spatial_shift(x, clipped, c["strides"], c["padding"], c["channel_shift"], tail.get("scale"),
                             tail.get("bias"), clip)
    assert same_or_nan(got, want)
