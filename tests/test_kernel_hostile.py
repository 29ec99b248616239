"""Hostile inputs to the two C++ ops (issue 10): sizes whose products wrap int64, attributes of
the wrong type, empty tensors, layers too large to pack, and the scratch memory of a row at the
largest in_features. Every case is a clean ORT error naming the node, or the right result.
Also run against the ASan + UBSan build (make sanitize)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mfconvert.ort_ops import DOMAIN
from mfconvert.runtime import session
from tests import numpy_reference as ref
from tests.test_shift_linear_kernel import ISAS as SL_ISAS

NODE = "hostile0"


def model(op, inputs, attrs, inits=(), extra_attrs=()):
    """One `op` node named NODE; `inputs` names (""= absent), float32 graph inputs for the names
    without an initializer; extra_attrs: AttributeProtos added as they are (any type)."""
    node = helper.make_node(op, list(inputs), ["Y"], name=NODE, domain=DOMAIN, **attrs)
    node.attribute.extend(extra_attrs)
    init_names = {i.name for i in inits}
    graph_inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in inputs
                    if n and n not in init_names]
    graph = helper.make_graph([node], "g", graph_inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              list(inits))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    return m.SerializeToString()


def run(model_bytes, feeds, isa=None):
    old = os.environ.get("MFCONVERT_ISA")
    if isa:
        os.environ["MFCONVERT_ISA"] = isa
    try:
        return session(model_bytes, threads=2).run(None, feeds)[0]
    finally:
        if isa:
            os.environ.pop("MFCONVERT_ISA", None)
            if old is not None:
                os.environ["MFCONVERT_ISA"] = old


def expect_error(model_bytes, feeds, *parts, isa=None):
    """The session or the run fails with an ORT error naming the node and containing `parts`."""
    with pytest.raises(Exception) as info:
        run(model_bytes, feeds, isa)
    msg = str(info.value)
    assert type(info.value).__module__.startswith("onnxruntime"), f"{type(info.value)}: {msg}"
    assert f"node '{NODE}'" in msg, msg
    for p in parts:
        assert p in msg, msg
    return msg


# ---------------------------------------------------------------------------------------------
# Finding 1: prefix + grid_h * grid_w wrapped int64 and the conv taps read outside V and the mask.

def grid_case(b, t, grid_h, grid_w, prefix=0, h=2, d=4):
    rng = np.random.default_rng(0)
    conv = numpy_helper.from_array(rng.standard_normal((h, 3, 3)).astype(np.float32), "conv")
    m = model("AddLinearAttention", ["Q", "", "V", "", "conv"],
              dict(num_heads=h, grid_h=grid_h, grid_w=grid_w, prefix_tokens=prefix), [conv])
    x = rng.standard_normal((b, t, h * d)).astype(np.float32)
    return m, {"Q": x, "V": x}


def wrapping_grid_h(grid_w, target):
    """grid_h > 0 with grid_h * grid_w ≡ target (mod 2^64), grid_w odd: the product wraps to it."""
    inv = pow(grid_w, -1, 1 << 64)
    return target * inv % (1 << 64)


def test_grid_w_2147483651_is_an_error_not_a_segfault():
    grid_w = 2147483651
    t = next(t for t in range(2, 200) if 0 < wrapping_grid_h(grid_w, t - 1) < 1 << 63)
    grid_h = wrapping_grid_h(grid_w, t - 1)
    assert (1 + grid_h * grid_w) % (1 << 64) == t        # the check the op made passed
    m, feeds = grid_case(1, t, grid_h, grid_w, prefix=1)
    for isa in SL_ISAS:
        expect_error(m, feeds, "prefix_tokens + grid_h * grid_w", f"{grid_h} * {grid_w} does not fit int64", isa=isa)


def test_grid_h_2_62_plus_1_does_not_read_the_next_batch_item():
    # 4 * (2^62 + 1) = 2^64 + 4 wraps to T = 4: batch item 0's conv read batch item 1's values.
    m, feeds = grid_case(2, 4, (1 << 62) + 1, 4)
    for isa in SL_ISAS:
        expect_error(m, feeds, "does not fit int64", isa=isa)


def test_grid_that_fits_still_works():
    """The checked path with an ordinary grid agrees with the NumPy reference (within the
    parity bound's order: float32 sums of a few terms)."""
    h, d, t = 2, 4, 1 + 2 * 3
    rng = np.random.default_rng(1)
    w = rng.standard_normal((h, 3, 3)).astype(np.float32)
    q, k, v = (rng.standard_normal((2, t, h * d)).astype(np.float32) for _ in range(3))
    m = model("AddLinearAttention", ["Q", "K", "V", "", "conv"],
              dict(num_heads=h, grid_h=2, grid_w=3, prefix_tokens=1), [numpy_helper.from_array(w, "conv")])
    expect = ref.add_linear_attention(q, k, v, h, None, w, grid=(2, 3), prefix_tokens=1)
    for isa in SL_ISAS:
        np.testing.assert_allclose(run(m, {"Q": q, "K": k, "V": v}, isa), expect, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Finding 9: attributes of the wrong type were read as absent (their defaults).

WRONG = {
    "a float": 2.0,
    "a string": "2",
    "a list of ints": [1, 2],
    "a list of floats": [1.0],
    "a tensor": numpy_helper.from_array(np.array(2, np.int64)),
}


def sl_model(extra=(), **attrs):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.integers(0, 256, 5, dtype=np.uint8), "W"),
             numpy_helper.from_array(np.zeros(2, np.int8), "E")]
    base = dict(in_features=4, out_features=2)
    base.update(attrs)
    return model("ShiftLinear", ["X", "W", "E"], {k: v for k, v in base.items() if v is not None}, inits, extra)


@pytest.mark.parametrize("got", list(WRONG))
@pytest.mark.parametrize("attr", ["in_features", "out_features", "weight_bits", "act_bits", "act_frac_bits", "terms"])
def test_shift_linear_attribute_of_wrong_type(attr, got):
    m = sl_model([helper.make_attribute(attr, WRONG[got])], **{attr: None})
    expect_error(m, {"X": np.zeros((1, 4), np.float32)}, f"attribute {attr} must be an int, got {got}")


def test_shift_linear_attribute_of_unreadable_type():
    """A strings or graph attribute (no C API getter reads them) is still not taken as absent."""
    for value in (["a", "b"], helper.make_graph([], "sub", [], [])):
        m = sl_model([helper.make_attribute("terms", value)])
        expect_error(m, {"X": np.zeros((1, 4), np.float32)}, "attribute terms must be an int, got another type")


def test_shift_linear_defaults_still_apply():
    """Absent optional attributes take the spec's defaults: 5-bit codes, Q16.16, one term."""
    codes = np.array([[0, 1, 2, 15], [16, 17, 3, 31]], np.uint8)     # sign << 4 | m, 15 = zero
    packed = np.packbits(((codes[..., None] >> np.arange(5)) & 1).astype(np.uint8).reshape(-1), bitorder="little")
    inits = [numpy_helper.from_array(packed, "W"), numpy_helper.from_array(np.array([0, 1], np.int8), "E")]
    m = model("ShiftLinear", ["X", "W", "E"], dict(in_features=4, out_features=2), inits)
    x = np.array([[1.5, -2.25, 8.0, 3.0]], np.float32)
    sign, shift = codes >> 4, codes & 15
    expect = ref.shift_linear(x, sign, shift, np.array([0, 1]), None, 5, 32, 16)
    np.testing.assert_array_equal(run(m, {"X": x}), expect)


def attn_model(extra=(), **attrs):
    base = dict(num_heads=2)
    base.update(attrs)
    return model("AddLinearAttention", ["Q", "", "V"], {k: v for k, v in base.items() if v is not None}, (), extra)


@pytest.mark.parametrize("got", list(WRONG))
@pytest.mark.parametrize("attr", ["num_heads", "grid_h", "grid_w", "prefix_tokens"])
def test_add_attention_int_attribute_of_wrong_type(attr, got):
    m = attn_model([helper.make_attribute(attr, WRONG[got])], **{attr: None})
    x = np.zeros((1, 3, 8), np.float32)
    expect_error(m, {"Q": x, "V": x}, f"attribute {attr} must be an int, got {got}")


@pytest.mark.parametrize("value, got", [(1, "an int"), (1.0, "a float"), ([1, 2], "a list of ints"),
                                        (numpy_helper.from_array(np.array(1, np.int64)), "a tensor")])
def test_binarizer_of_wrong_type(value, got):
    m = attn_model([helper.make_attribute("binarizer", value)])
    x = np.zeros((1, 3, 8), np.float32)
    expect_error(m, {"Q": x, "V": x}, f"attribute binarizer must be a string, got {got}")


def test_num_heads_is_required():
    m = attn_model(num_heads=None)
    x = np.zeros((1, 3, 8), np.float32)
    expect_error(m, {"Q": x, "V": x}, "missing required attribute num_heads")


def test_binarizer_string_is_read():
    """binarizer="sign" given explicitly is the default; "ksh" is read (and wants its inputs)."""
    x = np.random.default_rng(0).standard_normal((1, 3, 8)).astype(np.float32)
    np.testing.assert_array_equal(run(attn_model(binarizer="sign"), {"Q": x, "V": x}), run(attn_model(), {"Q": x, "V": x}))
    expect_error(attn_model(binarizer="ksh"), {"Q": x, "V": x}, "needs hash_anchors")


# ---------------------------------------------------------------------------------------------
# Sizes at and past the limits.

def test_shift_linear_at_the_size_limit_fails_cleanly():
    """in = out = 2^22 is in range but its W_codes would be 10 TiB: a one-byte W_codes is a
    length error (computed without wrapping, nothing allocated), as an initializer or input."""
    big = 1 << 22
    for as_input in (False, True):
        inits = [numpy_helper.from_array(np.array([7], np.uint8), "W"), numpy_helper.from_array(np.zeros(big, np.int8), "E")]
        m = model("ShiftLinear", ["X", "W", "E"], dict(in_features=big, out_features=big), [] if as_input else inits)
        if as_input:   # typed inputs: W uint8, E int8
            mp = onnx.load_from_string(m)
            del mp.graph.input[:]
            mp.graph.input.extend([helper.make_tensor_value_info("X", TensorProto.FLOAT, None),
                                   helper.make_tensor_value_info("W", TensorProto.UINT8, None),
                                   helper.make_tensor_value_info("E", TensorProto.INT8, None)])
            m = mp.SerializeToString()
            feeds = {"X": np.zeros((1, big), np.float32), "W": np.array([7], np.uint8), "E": np.zeros(big, np.int8)}
        else:
            feeds = {"X": np.zeros((1, big), np.float32)}
        expect_error(m, feeds, f"W_codes must have shape [{big * big * 5 // 8}]")
    expect_error(sl_model(in_features=big, terms=2), {"X": np.zeros((1, 4), np.float32)}, "terms * in_features")
    expect_error(sl_model(in_features=1 << 62), {"X": np.zeros((1, 4), np.float32)}, "in_features=4611686018427387904")
    expect_error(sl_model(out_features=-(1 << 63)), {"X": np.zeros((1, 4), np.float32)}, "out_features")


@pytest.mark.parametrize("shape", [(0, 4), (3, 0, 4), (0, 0, 4), (0, 0, 0, 4)])
def test_shift_linear_empty_inputs(shape):
    for isa in SL_ISAS:
        y = run(sl_model(), {"X": np.zeros(shape, np.float32)}, isa)
        assert y.shape == (*shape[:-1], 2) and y.dtype == np.float32


@pytest.mark.parametrize("shape", [(0, 3, 8), (2, 0, 8), (0, 0, 8), (2, 3, 0)])
def test_add_attention_empty_inputs(shape):
    rng = np.random.default_rng(0)
    conv = numpy_helper.from_array(rng.standard_normal((2, 3)).astype(np.float32), "conv")
    mask = np.zeros(shape[:2], np.float32)
    m = model("AddLinearAttention", ["Q", "K", "V", "mask", "conv"], dict(num_heads=2), [conv])
    x = np.zeros(shape, np.float32)
    for isa in SL_ISAS:
        y = run(m, {"Q": x, "K": x, "V": x, "mask": mask}, isa)
        assert y.shape == shape


def test_add_attention_empty_query_key_mask():
    """T = 0 with a query × key mask [B, 1, 0, 0] or [B, 0, 0] is an empty result, not a mask
    shape error (found by the fuzz harness)."""
    x = np.zeros((2, 0, 8), np.float32)
    m = model("AddLinearAttention", ["Q", "", "V", "mask"], dict(num_heads=2))
    for mask in (np.zeros((2, 1, 0, 0), np.float32), np.zeros((2, 0, 0), np.float32)):
        assert run(m, {"Q": x, "V": x, "mask": mask}).shape == x.shape


def test_add_attention_norm_of_huge_values():
    """|Z| above ~1.8e19 overflowed ‖Z‖² in float32 and the row came out 0 (found by the fuzz
    harness: V = -3e38 in one channel); the norm is now taken on Z scaled by a power of two."""
    rng = np.random.default_rng(4)
    q, k = (rng.standard_normal((1, 3, 6)).astype(np.float32) for _ in range(2))
    v = rng.standard_normal((1, 3, 6)).astype(np.float32)
    v[0, 0, 2], v[0, 1, 4], v[0, 2, 3] = -3e38, 1e25, 2e20
    m = model("AddLinearAttention", ["Q", "K", "V"], dict(num_heads=2))
    expect = ref.add_linear_attention(q, k, v, 2)
    for isa in SL_ISAS:
        y = run(m, {"Q": q, "K": k, "V": v}, isa)
        np.testing.assert_allclose(y, expect, rtol=0, atol=1e-6)
        assert np.abs(y).max() > 0.5            # the rows are unit vectors, not 0


def test_add_attention_mask_and_conv_shapes_are_checked_before_reading():
    """A mask of the right rank but too short, and a conv of too few heads, are errors (the
    kernel would read past them)."""
    x = np.zeros((2, 5, 8), np.float32)
    conv = numpy_helper.from_array(np.ones((1, 3), np.float32), "conv")
    expect_error(model("AddLinearAttention", ["Q", "", "V", "mask"], dict(num_heads=2)),
                 {"Q": x, "V": x, "mask": np.zeros((2, 4), np.float32)}, "mask must be")
    expect_error(model("AddLinearAttention", ["Q", "", "V", "", "conv"], dict(num_heads=2), [conv]),
                 {"Q": x, "V": x}, "conv_weight must be")


# ---------------------------------------------------------------------------------------------
# Finding 10: one row at a large in_features needed GiBs of scratch, kept after the session.

UNDER_ASAN = "libasan" in os.environ.get("LD_PRELOAD", "")


@pytest.mark.skipif(UNDER_ASAN, reason="ASan's shadow memory and quarantine change the RSS")
def test_scratch_of_a_wide_row_is_bounded_and_freed():
    """in_features = 2^19, one row, on every ISA (in a subprocess): the run adds < 24 MiB to the
    session's memory (was 256 MiB on AVX2, 64 MiB on AVX-512), and deleting the session gives
    back what it took (the scratch was thread-local and stayed)."""
    script = os.path.join(os.path.dirname(__file__), "..", "ort_ops", "scripts", "scratch_rss.py")
    out = subprocess.run([sys.executable, script, "--in-features", str(1 << 19), "--out-features", "8",
                          "--isa", ",".join(SL_ISAS), "--one-process"],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(results) == set(SL_ISAS), results
    for isa, r in results.items():
        assert r["run_peak"] < 24, (isa, r)
        assert r["held_after_run"] < 24, (isa, r)
        assert r["after_session_deleted"] < 24, (isa, r)


# ---------------------------------------------------------------------------------------------
# ShiftConv and AdderConv (issue 13): attributes of the wrong type, sizes past the limits, empty
# tensors. Every case is a clean ORT error naming the node, or the reference's result.

def conv_model(op, extra=(), x_channels=4, **attrs):
    """A 3x3 ShiftConv (M = 6, C = 4) or AdderConv with initializer weights."""
    if op == "ShiftConv":
        inits = [numpy_helper.from_array(np.zeros((6 * 4 * 9 * 5 + 7) // 8, np.uint8), "W"),
                 numpy_helper.from_array(np.zeros(6, np.int8), "E")]
        names = ["X", "W", "E"]
    else:
        inits = [numpy_helper.from_array(np.zeros((6, 4, 3, 3), np.float32), "W")]
        names = ["X", "W"]
    base = dict(out_channels=6, kernel_shape=[3, 3])
    base.update(attrs)
    return model(op, names, {k: v for k, v in base.items() if v is not None}, inits, extra)


CONV_X = np.zeros((1, 4, 5, 5), np.float32)
CONV_INT = ["out_channels", "group", "act_bits", "act_frac_bits"]
CONV_LISTS = ["kernel_shape", "strides", "pads", "dilations"]


@pytest.mark.parametrize("op", ["ShiftConv", "AdderConv"])
@pytest.mark.parametrize("got", list(WRONG))
@pytest.mark.parametrize("attr", CONV_INT + ["weight_bits", "terms"] + CONV_LISTS + ["activation", "clip_min"])
def test_conv_attribute_of_wrong_type(op, attr, got):
    if op == "AdderConv" and attr in ("weight_bits", "terms"):
        return    # not AdderConv attributes (ignored)
    kind = ("an int" if attr in CONV_INT + ["weight_bits", "terms"] else "a list of ints" if attr in CONV_LISTS
            else "a string" if attr == "activation" else "a float")
    if got == kind or (kind == "a float" and got == "a list of floats" and False):
        return
    if attr in CONV_LISTS and got == "a list of ints":
        return    # the right type
    extra = [helper.make_attribute(attr, WRONG[got])]
    m = conv_model(op, extra, **{attr: None}, **({"activation": "Clip"} if attr == "clip_min" else {}))
    expect_error(m, {"X": CONV_X}, f"attribute {attr} must be {kind}, got {got}")


@pytest.mark.parametrize("op", ["ShiftConv", "AdderConv"])
@pytest.mark.parametrize("attrs,part", [
    (dict(pads=[1 << 31, 1 << 31, 1 << 31, 1 << 31]), "does not fit int64"),        # OH * OW * M wraps
    (dict(kernel_shape=[1 << 22, 1 << 22]), "4194304"),   # K = 2^44: larger than X (and W)
    (dict(dilations=[1, 1 << 31]), "smaller than the dilated kernel 4294967297"),
    (dict(pads=[(1 << 31) + 1, 0, 0, 0]), "pads"),
    (dict(strides=[-(1 << 63), 1]), "strides"),
    (dict(out_channels=1 << 62), "out_channels"),
    (dict(group=-(1 << 63)), "group"),
])
def test_conv_sizes_past_the_limits(op, attrs, part):
    expect_error(conv_model(op, **attrs), {"X": CONV_X}, part)


def test_conv_reduction_above_2_22_is_an_error():
    """(C/G) * K * terms above 2^22 is refused before the codes length is even computed."""
    m = conv_model("ShiftConv", kernel_shape=[1, 1], terms=4)
    expect_error(m, {"X": np.zeros((1, (1 << 20) + 1, 1, 1), np.float32)}, "above 2^22")


@pytest.mark.parametrize("op", ["ShiftConv", "AdderConv"])
@pytest.mark.parametrize("shape", [(0, 4, 5, 5), (0, 4, 0, 0), (2, 4, 0, 3)])
def test_conv_empty_inputs(op, shape):
    """N = 0: an empty Y; a spatial size 0 with padding that makes the output >= 1 reads only
    padding (x_q = 0); without padding it is an output size below 1."""
    pads = [2, 2, 2, 2]
    m = conv_model(op, pads=pads)
    x = np.zeros(shape, np.float32)
    if op == "ShiftConv":
        codes = np.zeros((1, 6, 4, 3, 3), np.uint8)
        expect = ref.shift_conv(x, codes, np.zeros(6, np.int8), None, 5, 32, 16, [3, 3], None, pads)
    else:
        expect = ref.adder_conv(x, np.zeros((6, 4, 3, 3), np.float32), None, 32, 16, [3, 3], None, pads)
    for isa in SL_ISAS:
        np.testing.assert_array_equal(run(m, {"X": x}, isa), expect)
    expect_error(conv_model(op), {"X": np.zeros((1, 4, 0, 5), np.float32)}, "output size below 1")
