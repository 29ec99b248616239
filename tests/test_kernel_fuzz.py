"""Fuzzing both C++ ops through ONNX Runtime (issue 10, "Keep it fixed"): random shapes (empty
dims included), attributes (out of range, wrong types), weights (every code bit pattern,
malformed lengths), inputs (NaN, ±inf, saturating, subnormal) and ISA paths. Every case is
either a clean ORT error naming the node, or exactly the NumPy reference (ShiftLinear), or
within the float32 bound of the NumPy reference (AddLinearAttention).

MFCONVERT_FUZZ_EXAMPLES sets the examples per test (default 20: seconds); `make fuzz` runs
thousands, and `make sanitize` runs these under ASan + UBSan. With MFCONVERT_FUZZ_STATS=FILE the
cases, errors and checked results per test are appended to FILE as JSON lines."""
from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from mfconvert.ort_ops import DOMAIN
from mfconvert.runtime import session
from tests.fuzz_stats import stats_fixture
from tests import numpy_reference as ref
from tests.test_add_attention_kernel import op_inputs
from tests.test_add_attention_reference import bound, reference as attention_reference
from tests.test_shift_linear_kernel import ISAS
from tests.test_shift_linear_kernel import reference as shift_reference

pytestmark = pytest.mark.fuzz

EXAMPLES = int(os.environ.get("MFCONVERT_FUZZ_EXAMPLES", "20"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
                suppress_health_check=list(HealthCheck))
NODE = "fuzz0"
STATS: dict[str, Counter] = {}

write_stats = stats_fixture(STATS)


def count(test, outcome, case=True):
    """Tallies one case's outcome (case=False: a note on a case counted elsewhere)."""
    STATS.setdefault(test, Counter())["cases"] += case
    STATS[test][outcome] += 1


def run(model_bytes, feeds, isa):
    os.environ["MFCONVERT_ISA"] = isa
    try:
        return session(model_bytes, threads=2).run(None, feeds)[0]
    finally:
        os.environ.pop("MFCONVERT_ISA", None)


def run_or_error(model_bytes, feeds, isa):
    """(output, None) or (None, message) for an ORT error that names the node; any other
    exception (or an error that does not name the node) fails the test."""
    try:
        return run(model_bytes, feeds, isa), None
    except Exception as e:  # noqa: BLE001 - checked below
        msg = str(e)
        assert type(e).__module__.startswith("onnxruntime"), f"{type(e).__name__}: {msg}"
        assert f"node '{NODE}'" in msg or "type" in msg.lower(), msg   # ORT's own type checks name no node
        return None, msg


def graph(op, inputs, typed, attrs, inits, extra):
    node = helper.make_node(op, inputs, ["Y"], name=NODE, domain=DOMAIN, **attrs)
    node.attribute.extend(extra)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, t, None) for n, t in typed],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    m.ir_version = 8
    return m.SerializeToString()


def hostile_floats(rng, shape, scale, special):
    """Normal values at `scale`, and with `special` a share of NaN, ±inf, ±3e38, subnormals, -0."""
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    if special and x.size:
        flat = x.reshape(-1)
        picks = rng.random(flat.size) < 0.15
        values = np.array([np.nan, np.inf, -np.inf, 3e38, -3e38, 1e-45, -1e-45, -0.0], np.float32)
        flat[picks] = values[rng.integers(0, len(values), picks.sum())]
    return x


# ---------------------------------------------------------------------------------------------
# ShiftLinear

WRONG_TYPES = [2.0, "2", [1, 2], [1.0]]
SL_MALFORMED = ["codes_length", "exponent_length", "bias_length", "x_last_dim", "x_scalar", "attr_range",
                "attr_type", "codes_dtype"]


def unpack(packed, n, bits):
    """The n codes of the LSB-first bit stream (docs/ops.md#weight-codes)."""
    b = np.unpackbits(packed, bitorder="little")[: n * bits].reshape(n, bits).astype(np.uint8)
    return (b << np.arange(bits, dtype=np.uint8)).sum(1).astype(np.uint8)


@st.composite
def shift_linear_cases(draw):
    c = dict(
        seed=draw(st.integers(0, 2**32 - 1)),
        isa=draw(st.sampled_from(ISAS)),
        terms=draw(st.sampled_from([1, 1, 2, 3, 4])),
        weight_bits=draw(st.integers(2, 5)),
        act_bits=draw(st.integers(2, 32)),
        act_frac_bits=draw(st.integers(-32, 32)),
        in_f=draw(st.one_of(st.integers(1, 40), st.integers(41, 300), st.sampled_from([8192, 8193]))),
        out_f=draw(st.one_of(st.integers(1, 20), st.integers(21, 140))),
        lead=draw(st.lists(st.integers(0, 7), min_size=0, max_size=3)),
        as_inputs=draw(st.booleans()),
        bias=draw(st.sampled_from(["none", "finite", "special"])),
        x_special=draw(st.booleans()),
        x_scale=draw(st.sampled_from([1e-3, 1.0, 1e3, 1e9])),
        exponent_wide=draw(st.booleans()),
        malformed=draw(st.one_of(st.none(), st.none(), st.sampled_from(SL_MALFORMED))),
        default_attrs=draw(st.booleans()),
    )
    c["lead"] = c["lead"] or [draw(st.integers(0, 70))]
    if c["in_f"] >= 8192:                  # a wide layer: a few rows only
        c["lead"] = [draw(st.integers(0, 3))]
        c["terms"] = 1
    c["rank_attr"] = draw(st.sampled_from(["weight_bits", "act_bits", "act_frac_bits", "terms", "in_features",
                                           "out_features"]))
    c["bad_value"] = draw(st.sampled_from(WRONG_TYPES))
    return c


@FUZZ
@given(shift_linear_cases())
def test_shift_linear_fuzz(c):
    rng = np.random.default_rng(c["seed"])
    terms, bits, in_f, out_f = c["terms"], c["weight_bits"], c["in_f"], c["out_f"]
    act_bits, frac = c["act_bits"], c["act_frac_bits"]
    if c["default_attrs"]:
        bits, act_bits, frac, terms = 5, 32, 16, 1
    if terms * in_f > 1 << 22:
        terms = 1
    n = terms * out_f * in_f
    packed = rng.integers(0, 256, (n * bits + 7) // 8, dtype=np.uint8)     # every bit pattern is a code
    lo, hi = (-128, 127) if c["exponent_wide"] else (frac - 20, frac + 20)
    exponent = rng.integers(max(lo, -128), min(hi, 127) + 1, out_f).astype(np.int8)
    bias = None
    if c["bias"] != "none":
        bias = hostile_floats(rng, (out_f,), 4.0, c["bias"] == "special")
    x = hostile_floats(rng, (*c["lead"], in_f), c["x_scale"], c["x_special"])

    attrs = dict(in_features=in_f, out_features=out_f)
    if not c["default_attrs"]:
        attrs.update(weight_bits=bits, act_bits=act_bits, act_frac_bits=frac, terms=terms)
    extra = []
    bad = c["malformed"]
    codes_type = TensorProto.UINT8
    if bad == "codes_length":
        packed = np.concatenate([packed, [0]]).astype(np.uint8) if rng.random() < 0.5 or len(packed) < 2 else packed[:-1]
    elif bad == "exponent_length":
        exponent = np.concatenate([exponent, [0]]).astype(np.int8) if rng.random() < 0.5 or out_f < 2 else exponent[:-1]
    elif bad == "bias_length":
        bias = np.zeros(out_f + (1 if rng.random() < 0.5 or out_f < 2 else -1), np.float32)
    elif bad == "x_last_dim":
        x = np.zeros((*c["lead"], in_f + 1), np.float32)
    elif bad == "x_scalar":
        x = np.array(1.0, np.float32)
    elif bad == "attr_range":
        attrs[c["rank_attr"]] = {"weight_bits": 6, "act_bits": 33, "act_frac_bits": -33, "terms": 5,
                                 "in_features": 0, "out_features": -1}[c["rank_attr"]]
    elif bad == "attr_type":
        attrs.pop(c["rank_attr"], None)
        extra.append(helper.make_attribute(c["rank_attr"], c["bad_value"]))
    elif bad == "codes_dtype":
        codes_type = TensorProto.INT8
        packed = packed.view(np.int8)

    inputs = ["X", "W_codes", "W_exponent"] + (["B"] if bias is not None else [])
    weights = {"W_codes": packed, "W_exponent": exponent, **({"B": bias} if bias is not None else {})}
    types = {"X": TensorProto.FLOAT, "W_codes": codes_type, "W_exponent": TensorProto.INT8, "B": TensorProto.FLOAT}
    if c["as_inputs"]:
        typed = [(name, types[name]) for name in inputs]
        inits, feeds = [], {"X": x, **weights}
    else:
        typed = [("X", TensorProto.FLOAT)]
        inits = [numpy_helper.from_array(weights[k], k) for k in inputs[1:]]
        if codes_type == TensorProto.INT8:
            inits[0] = helper.make_tensor("W_codes", TensorProto.INT8, [len(packed)], packed.tobytes(), raw=True)
        feeds = {"X": x}
    model = graph("ShiftLinear", inputs, typed, attrs, inits, extra)
    y, err = run_or_error(model, feeds, c["isa"])

    shifts_ok = all(-126 <= int(e) - frac <= 127 for e in exponent)
    if bad is not None or not shifts_ok:
        assert err is not None, f"malformed case ({bad}, exponents ok: {shifts_ok}) ran"
        if bad is None:
            assert "outside [-126, 127]" in err, err
        if bad in ("attr_range", "attr_type"):
            assert c["rank_attr"] in err, err
        count("shift_linear", "clean_error")
        return
    assert err is None, err
    codes = unpack(packed, n, bits).reshape(terms, out_f, in_f)
    with np.errstate(all="ignore"):
        if terms == 1 and x.size * out_f <= 2_000_000:     # tests/numpy_reference.py: [rows, out, in] int64
            z = (1 << (bits - 1)) - 1
            expect = ref.shift_linear(x, codes[0] >> (bits - 1), codes[0] & z, exponent, bias, bits, act_bits, frac)
        else:                                              # terms add up: test_shift_linear_kernel.reference
            expect = shift_reference(x, codes, exponent, bias, bits, act_bits, frac)
    assert y.shape == (*c["lead"], out_f) and y.dtype == np.float32
    assert np.array_equal(y, expect, equal_nan=True), \
        f"{c['isa']}: {np.argwhere(~((y == expect) | (np.isnan(y) & np.isnan(expect))))[:5].tolist()}"
    count("shift_linear", "exact")


# ---------------------------------------------------------------------------------------------
# AddLinearAttention

ATT_MALFORMED = ["k_shape", "c_not_divisible", "threshold_shape", "conv_even", "conv_heads", "grid_mismatch",
                 "grid_overflow", "mask_shape", "mask_per_query", "hash_missing", "hash_nbits", "sigma",
                 "ksh_with_k", "attr_type", "binarizer_type", "num_heads_zero", "q_rank"]


@st.composite
def attention_cases(draw):
    c = dict(
        seed=draw(st.integers(0, 2**32 - 1)),
        isa=draw(st.sampled_from(ISAS)),
        binarizer=draw(st.sampled_from(["sign", "sign", "ksh"])),
        b=draw(st.sampled_from([1, 1, 2, 2, 3, 0])),
        h=draw(st.integers(1, 4)),
        d=draw(st.one_of(st.integers(1, 20), st.integers(60, 70))),
        with_k=draw(st.booleans()),
        thresholds=draw(st.booleans()),
        mask=draw(st.sampled_from(["none", "bt", "b111t", "b1tt", "btt", "shared"])),
        conv=draw(st.sampled_from(["none", "tokens", "grid"])),
        k=draw(st.sampled_from([1, 3, 5, 7])),
        grid=(draw(st.integers(1, 5)), draw(st.integers(1, 5)), draw(st.integers(0, 2))),
        t=draw(st.integers(-3, 40).map(lambda n: max(n, 0))),      # 0 about one time in ten
        special=draw(st.booleans()),
        scale=draw(st.sampled_from([1e-3, 1.0, 1e3])),
        m=draw(st.integers(1, 9)),
        nbits=draw(st.integers(1, 64)),
        malformed=draw(st.one_of(st.none(), st.none(), st.sampled_from(ATT_MALFORMED))),
        bad_value=draw(st.sampled_from(WRONG_TYPES)),
    )
    if c["conv"] == "grid":
        gh, gw, p = c["grid"]
        c["t"] = p + gh * gw
    return c


@FUZZ
@given(attention_cases())
def test_add_attention_fuzz(c):
    rng = np.random.default_rng(c["seed"])
    b, t, h, d = c["b"], c["t"], c["h"], c["d"]
    ksh = c["binarizer"] == "ksh"
    cdim = h * d
    q, k, v = (hostile_floats(rng, (b, t, cdim), c["scale"], False) for _ in range(3))
    if c["special"] and b:      # NaN, ±inf, ±3e38, subnormals in batch item 0 (the others are compared)
        for x in (q, k, v):
            if rng.random() < 0.6:
                x[0] = hostile_floats(rng, x[0].shape, c["scale"], True)
    if ksh or not c["with_k"]:
        k = None
    consts, attrs, extra = {}, {"num_heads": h, "binarizer": c["binarizer"]}, []
    if c["conv"] == "tokens":
        consts[4] = rng.standard_normal((h, c["k"])).astype(np.float32)
    elif c["conv"] == "grid":
        gh, gw, p = c["grid"]
        consts[4] = rng.standard_normal((h, c["k"], max(1, c["k"] - 2))).astype(np.float32)
        attrs.update(grid_h=gh, grid_w=gw, prefix_tokens=p)
    if not ksh and c["thresholds"]:
        consts[5] = (0.2 * rng.standard_normal((h, d))).astype(np.float32)
        consts[6] = (0.2 * rng.standard_normal((h, d))).astype(np.float32)
    if ksh:
        m = c["m"]
        anchors = rng.standard_normal((h, m, d))
        consts[7] = (anchors / np.linalg.norm(anchors, axis=-1, keepdims=True)).astype(np.float32)
        consts[8] = rng.uniform(0.0, 0.6, (h, m)).astype(np.float32)
        consts[9] = rng.standard_normal((h, c["nbits"], m)).astype(np.float32)
        consts[10] = rng.uniform(0.3, 2.0, h).astype(np.float32)
    mask = None
    keys = np.where(rng.random((b, t)) < 0.3, np.float32(-1e4), np.float32(0)).astype(np.float32)
    if t and rng.random() < 0.3:
        keys[rng.random((b, t)) < 0.1] = np.nan          # NaN masks the key (not >= -1000)
    if c["mask"] == "bt":
        mask = keys
    elif c["mask"] == "b111t":
        mask = keys[:, None, None, :]
    elif c["mask"] == "b1tt":
        mask = np.broadcast_to(keys[:, None, None, :], (b, 1, t, t)).copy()
        mask += np.where(mask < -1000, 0, rng.uniform(-900, 0, mask.shape)).astype(np.float32)
    elif c["mask"] == "btt":
        mask = np.broadcast_to(keys[:, None, :], (b, t, t)).copy()
    elif c["mask"] == "shared":
        mask = keys[:1] if b else keys

    bad = c["malformed"]
    if bad == "k_shape" and not ksh:
        k = np.zeros((b, t + 1, cdim), np.float32)
    elif bad == "c_not_divisible" and h > 1:
        q = v = np.zeros((b, t, cdim + 1), np.float32)
        k = None if k is None else np.zeros((b, t, cdim + 1), np.float32)
    elif bad == "threshold_shape" and not ksh:
        consts[5] = np.zeros((h, d + 1), np.float32)
    elif bad == "conv_even":
        consts[4] = np.zeros((h, 2), np.float32)
    elif bad == "conv_heads":
        consts[4] = np.zeros((h + 1, 3), np.float32)
    elif bad == "grid_mismatch":
        consts[4] = np.zeros((h, 3, 3), np.float32)
        attrs.update(grid_h=2, grid_w=2, prefix_tokens=t - 3 if t > 4 else t + 1)
    elif bad == "grid_overflow":
        consts[4] = np.zeros((h, 3, 3), np.float32)
        attrs.update(grid_h=(1 << 62) + 1, grid_w=4, prefix_tokens=max(0, t - 4))
    elif bad == "mask_shape":
        mask = np.zeros((b + 2, t + 1), np.float32)
    elif bad == "mask_per_query" and t > 1 and b > 0:
        mask = np.zeros((b, 1, t, t), np.float32)
        mask[0, 0, 1, 0] = -1e4                          # query row 1 masks key 0, row 0 does not
    elif bad == "hash_missing" and ksh:
        del consts[8]
    elif bad == "hash_nbits" and ksh:
        consts[9] = np.zeros((h, 65, c["m"]), np.float32)
    elif bad == "sigma" and ksh:
        consts[10][0] = -1.0 if rng.random() < 0.5 else np.nan
    elif bad == "ksh_with_k" and ksh:
        k = q.copy()
    elif bad == "attr_type":
        name = ["num_heads", "grid_h", "grid_w", "prefix_tokens"][c["seed"] % 4]
        attrs.pop(name, None)
        extra.append(helper.make_attribute(name, c["bad_value"]))
    elif bad == "binarizer_type":
        attrs.pop("binarizer")
        extra.append(helper.make_attribute("binarizer", 1))
    elif bad == "num_heads_zero":
        attrs["num_heads"] = 0
    elif bad == "q_rank":
        q = v = np.zeros((b, cdim), np.float32)
        k = None if k is None else np.zeros((b, cdim), np.float32)
    else:
        bad = None    # the drawn malformation does not apply to this case

    names, inits = op_inputs(consts, k is not None, mask is not None)
    typed = [(n, TensorProto.FLOAT) for n in names[:4] if n]
    feeds = {"Q": q, "V": v, **({"K": k} if k is not None else {}), **({"mask": mask} if mask is not None else {})}
    model = graph("AddLinearAttention", names, typed, attrs, inits, extra)
    y, err = run_or_error(model, feeds, c["isa"])

    # Some malformations are harmless on empty tensors (nothing is read); the others must fail.
    empty = q.size == 0
    if bad is not None:
        harmless_when_empty = {"mask_per_query", "sigma", "c_not_divisible"}
        if err is None:
            assert empty and bad in harmless_when_empty, f"malformed case ({bad}) ran"
            count("add_attention", "empty_ok")
        else:
            count("add_attention", "clean_error")
        return
    assert err is None, err
    assert y.shape == q.shape and y.dtype == np.float32
    if y.size == 0:
        count("add_attention", "empty_ok")
        return
    # K absent (sign) is K = Q.
    case = dict(q=q, k=q if k is None and not ksh else k, v=v, mask=mask, consts=consts, attrs=attrs, h=h, d=d)
    with np.errstate(all="ignore"):
        expect, tol = bound(case)
        _, parts = attention_reference(case, parts=True)
    # Every (batch item, head) depends only on its own Q, K, V channels and key mask: compare
    # the slices whose inputs are finite (NaN/inf propagate in an order-dependent way) and whose
    # sums stay in float32's range (|Z| and the conv below 1e38; float32 has no answer beyond).
    def head_finite(x):
        return np.isfinite(x.reshape(b, t, h, d)).all(axis=(1, 3))
    ok = head_finite(q) & head_finite(v) & (head_finite(k) if k is not None else True)
    with np.errstate(all="ignore"):
        in_range = (np.nan_to_num(parts["magnitude"], nan=np.inf) < 1e38).all(axis=(2, 3)) \
            & (np.nan_to_num(parts["conv_abs"], nan=np.inf) < 1e38).all(axis=(2, 3))
    if ok.any() and not (ok & in_range).any():
        count("add_attention", "float32_range_only", case=False)
    ok &= in_range
    yh, eh, th = (a.reshape(b, t, h, d) for a in (y.astype(np.float64), expect, tol))
    diff = np.abs(yh - eh)
    for bi, hi in zip(*np.nonzero(ok)):
        assert (diff[bi, :, hi] <= th[bi, :, hi]).all(), \
            f"{c['isa']}: batch {bi} head {hi}: max |diff| {diff[bi, :, hi].max():.3g}, bound {th[bi, :, hi].min():.3g}"
    count("add_attention", "within_bound" if ok.any() else "not_compared")


# ---------------------------------------------------------------------------------------------
# ShiftConv and AdderConv: exactly the NumPy reference, or a clean error naming the node.

CONV_MALFORMED = ["codes_length", "exponent_length", "w_shape", "x_channels", "group", "attr_type", "attr_range",
                  "output_size", "activation"]


@st.composite
def conv_cases(draw):
    d = draw(st.sampled_from([1, 2, 2]))
    c = dict(
        seed=draw(st.integers(0, 2**32 - 1)),
        isa=draw(st.sampled_from(ISAS)),
        op=draw(st.sampled_from(["ShiftConv", "AdderConv"])),
        d=d,
        n=draw(st.sampled_from([0, 1, 1, 2, 3])),
        group=draw(st.sampled_from([1, 1, 2, 3, "depthwise"])),
        cg=draw(st.integers(1, 5)),
        mg=draw(st.integers(1, 4)),
        kernel=[draw(st.integers(1, 5)) for _ in range(d)],
        strides=[draw(st.integers(1, 3)) for _ in range(d)],
        dilations=[draw(st.integers(1, 3)) for _ in range(d)],
        pads=[draw(st.integers(0, 3)) for _ in range(2 * d)],
        spatial=[draw(st.integers(0, 20)) for _ in range(d)],
        terms=draw(st.sampled_from([1, 1, 2, 3, 4])),
        weight_bits=draw(st.integers(2, 5)),
        act_bits=draw(st.integers(2, 32)),
        act_frac_bits=draw(st.integers(-32, 32)),
        activation=draw(st.sampled_from(["", "", "Relu", "Clip"])),
        as_inputs=draw(st.booleans()),
        bias=draw(st.booleans()),
        x_special=draw(st.booleans()),
        x_scale=draw(st.sampled_from([1e-3, 1.0, 1e3, 1e9])),
        malformed=draw(st.one_of(st.none(), st.none(), st.none(), st.sampled_from(CONV_MALFORMED))),
        bad_value=draw(st.sampled_from(WRONG_TYPES)),
    )
    if c["group"] == "depthwise":
        c["group"], c["cg"] = draw(st.integers(1, 6)), 1
    return c


def _fused_activation(rng, activation, attrs: dict) -> tuple[float, float]:
    """Adds a conv's fused activation to `attrs` (Clip with random bounds); its clip range."""
    if not activation:
        return (-np.inf, np.inf)
    attrs["activation"] = activation
    if activation != "Clip":
        return (-np.inf, np.inf)
    lo = float(rng.standard_normal() * 3)
    clip = (lo, lo + abs(float(rng.standard_normal() * 5)))
    attrs.update(clip_min=clip[0], clip_max=clip[1])
    return clip


@FUZZ
@given(conv_cases())
def test_conv_fuzz(c):
    rng = np.random.default_rng(c["seed"])
    d, g, kernel = c["d"], c["group"], c["kernel"]
    cin, m = g * c["cg"], g * c["mg"]
    act_bits, frac, terms, bits = c["act_bits"], c["act_frac_bits"], c["terms"], c["weight_bits"]
    attrs = dict(out_channels=m, kernel_shape=kernel, strides=c["strides"], pads=c["pads"],
                 dilations=c["dilations"], group=g, act_bits=act_bits, act_frac_bits=frac)
    clip = _fused_activation(rng, c["activation"], attrs)
    kk = int(np.prod(kernel))
    x = hostile_floats(rng, (c["n"], cin, *c["spatial"]), c["x_scale"], c["x_special"])
    bias = hostile_floats(rng, (m,), 4.0, False) if c["bias"] else None
    if c["op"] == "ShiftConv":
        attrs.update(weight_bits=bits, terms=terms)
        z = (1 << (bits - 1)) - 1
        codes = rng.integers(0, 1 << bits, size=(terms, m, c["cg"], *kernel)).astype(np.uint8)
        packed = np.packbits(((codes.reshape(-1)[:, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(-1),
                             bitorder="little")
        exponent = rng.integers(-20, 21, m).astype(np.int8)
        exponent = np.clip(exponent, frac - 126, frac + 127).astype(np.int8)
        weights = [("W_codes", TensorProto.UINT8, packed), ("W_exponent", TensorProto.INT8, exponent)]
        assert (codes & z).max(initial=0) <= z
    else:
        w = hostile_floats(rng, (m, c["cg"], *kernel), c["x_scale"], c["x_special"])
        weights = [("W", TensorProto.FLOAT, w)]
    if bias is not None:
        weights.append(("B", TensorProto.FLOAT, bias))

    bad, extra = c["malformed"], []
    if bad == "codes_length" and c["op"] == "ShiftConv":
        weights[0] = ("W_codes", TensorProto.UINT8, np.concatenate([packed, [0]]).astype(np.uint8))
    elif bad == "exponent_length" and c["op"] == "ShiftConv":
        weights[1] = ("W_exponent", TensorProto.INT8, np.zeros(m + 1, np.int8))
    elif bad == "w_shape" and c["op"] == "AdderConv":
        weights[0] = ("W", TensorProto.FLOAT, np.zeros((m, c["cg"] + 1, *kernel), np.float32))
    elif bad == "x_channels":
        x = np.zeros((c["n"], cin + g, *c["spatial"]), np.float32)
    elif bad == "group" and g > 1:
        attrs["group"] = g + 1 if m % (g + 1) else 0
    elif bad == "attr_type":
        name = ["out_channels", "kernel_shape", "strides", "pads", "group", "act_bits"][c["seed"] % 6]
        attrs.pop(name, None)
        lists = ("kernel_shape", "strides", "pads")      # [1, 2] is a list of ints: a float instead
        extra.append(helper.make_attribute(name, 2.0 if name in lists and c["bad_value"] == [1, 2] else c["bad_value"]))
    elif bad == "attr_range":
        name, value = [("act_bits", 33), ("act_frac_bits", -33), ("strides", [0] * d), ("dilations", [-1] * d),
                       ("pads", [-1] * (2 * d)), ("kernel_shape", [0] * d)][c["seed"] % 6]
        attrs[name] = value
    elif bad == "output_size":
        attrs["pads"] = [0] * (2 * d)
        attrs["dilations"] = [1] * d
        attrs["kernel_shape"] = kernel = [s + 1 for s in c["spatial"]]
        if c["op"] == "AdderConv":
            weights[0] = ("W", TensorProto.FLOAT, np.zeros((m, c["cg"], *kernel), np.float32))
    elif bad == "activation":
        attrs["activation"] = "HardSwish"
    else:
        bad = None

    names = ["X"] + [n for n, _, _ in weights]
    typed = [("X", TensorProto.FLOAT)] + ([(n, t) for n, t, _ in weights] if c["as_inputs"] else [])
    inits = [] if c["as_inputs"] else [numpy_helper.from_array(a, n) for n, _, a in weights]
    model = graph(c["op"], names, typed, attrs, inits, extra)
    feeds = {"X": x, **({n: a for n, _, a in weights} if c["as_inputs"] else {})}
    y, err = run_or_error(model, feeds, c["isa"])
    test = c["op"].lower()
    if bad is not None:
        # Malformed weights on an empty batch are still checked (every run checks its weights).
        assert err is not None, f"malformed case ({bad}) ran"
        count(test, "clean_error")
        return
    # A geometry whose output size is below 1 is an error by the spec.
    out = ref.conv_output_shape(c["spatial"], kernel, c["strides"], c["pads"], c["dilations"])
    if min(out) < 1:
        assert err is not None and "output size below 1" in err, err
        count(test, "clean_error")
        return
    assert err is None, err
    if c["op"] == "ShiftConv":
        expect = ref.shift_conv(x, codes, exponent, bias, bits, act_bits, frac, kernel, c["strides"], c["pads"],
                                c["dilations"], g, c["activation"], *clip)
    else:
        expect = ref.adder_conv(x, w, bias, act_bits, frac, kernel, c["strides"], c["pads"], c["dilations"], g,
                                c["activation"], *clip)
    assert y.shape == expect.shape and y.dtype == np.float32
    same = (y == expect) | (np.isnan(y) & np.isnan(expect))
    assert same.all(), f"{c['isa']}: {(~same).sum()} of {same.size} differ"
    count(test, "exact" if y.size else "empty_ok")


# ---------------------------------------------------------------------------------------------
# ShiftConv's lookup-table path (AVX-512; shift_conv.h ShiftConvLutPays: group 1, M >= 64,
# 64 <= (C/G) * K * T): shapes, formats and inputs drawn so that every case selects it there
# (on the other ISAs the same cases run the direct kernels), exactly the NumPy reference.

@st.composite
def lut_conv_cases(draw):
    d = draw(st.sampled_from([1, 2, 2]))
    kernel = [draw(st.integers(1, 3)) for _ in range(d)]
    terms = draw(st.sampled_from([1, 1, 2, 4]))
    kk = int(np.prod(kernel))
    c = draw(st.integers(max(1, -(-64 // (kk * terms))), 300 // kk + 16))
    return dict(seed=draw(st.integers(0, 2**32 - 1)), isa=draw(st.sampled_from(ISAS)), d=d, kernel=kernel,
                terms=terms, c=c, m=draw(st.integers(64, 150)), n=draw(st.sampled_from([1, 1, 2])),
                strides=[draw(st.integers(1, 3)) for _ in range(d)],
                dilations=[draw(st.integers(1, 2)) for _ in range(d)],
                pads=[draw(st.integers(0, 2)) for _ in range(2 * d)],
                spatial=[draw(st.integers(1, 13)) for _ in range(d)],
                weight_bits=draw(st.integers(2, 5)), act_bits=draw(st.integers(2, 32)),
                act_frac_bits=draw(st.integers(-8, 24)), activation=draw(st.sampled_from(["", "Relu", "Clip"])),
                x_scale=draw(st.sampled_from([1e-3, 1.0, 1e3, 1e9])), x_special=draw(st.booleans()),
                bias=draw(st.booleans()))


@FUZZ
@given(lut_conv_cases())
def test_shift_conv_lut_fuzz(c):
    rng = np.random.default_rng(c["seed"])
    d, kernel, terms, bits, m = c["d"], c["kernel"], c["terms"], c["weight_bits"], c["m"]
    out = ref.conv_output_shape(c["spatial"], kernel, c["strides"], c["pads"], c["dilations"])
    if min(out) < 1:                                   # the spec's error, covered by test_conv_fuzz
        c["pads"] = [p + (k - 1) * dl for p, k, dl in zip(c["pads"], kernel * 2, c["dilations"] * 2)]
    frac = c["act_frac_bits"]
    attrs = dict(out_channels=m, kernel_shape=kernel, strides=c["strides"], pads=c["pads"], dilations=c["dilations"],
                 act_bits=c["act_bits"], act_frac_bits=frac, weight_bits=bits, terms=terms)
    clip = _fused_activation(rng, c["activation"], attrs)
    x = hostile_floats(rng, (c["n"], c["c"], *c["spatial"]), c["x_scale"], c["x_special"])
    codes = rng.integers(0, 1 << bits, size=(terms, m, c["c"], *kernel)).astype(np.uint8)
    packed = np.packbits(((codes.reshape(-1)[:, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(-1),
                         bitorder="little")
    exponent = np.clip(rng.integers(-20, 21, m), frac - 126, frac + 127).astype(np.int8)
    bias = hostile_floats(rng, (m,), 4.0, False) if c["bias"] else None
    weights = [("W_codes", packed), ("W_exponent", exponent)] + ([("B", bias)] if bias is not None else [])
    model = graph("ShiftConv", ["X"] + [n for n, _ in weights], [("X", TensorProto.FLOAT)], attrs,
                  [numpy_helper.from_array(a, n) for n, a in weights], [])
    y, err = run_or_error(model, {"X": x}, c["isa"])
    assert err is None, err
    expect = ref.shift_conv(x, codes, exponent, bias, bits, c["act_bits"], frac, kernel, c["strides"], c["pads"],
                            c["dilations"], 1, c["activation"], *clip)
    assert y.shape == expect.shape and y.dtype == np.float32
    same = (y == expect) | (np.isnan(y) & np.isnan(expect))
    assert same.all(), f"{c['isa']}: {(~same).sum()} of {same.size} differ"
    count("shift_conv_lut", "exact")
