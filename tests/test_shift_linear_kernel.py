"""The ShiftLinear C++ kernel (ort_ops/src) against an independent NumPy model of docs/ops.md.

Every comparison is exact (np.array_equal on float32), on every ISA path the CPU can run
(forced with MFCONVERT_ISA, read at kernel creation).
"""
from __future__ import annotations

import math
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from mfconvert.nn import pow2
from mfconvert.runtime import session
from tests.cpu_isas import supported_isas

DOMAIN = "ai.mfconvert"
NODE = "shift_linear_under_test"
ISAS = supported_isas()


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("MFCONVERT_ISA", request.param)
    return request.param


# ---------------------------------------------------------------------------------------------
# The reference: docs/ops.md#arithmetic in NumPy, int64 accumulation wrapped to int32.

def reference(x, codes, exponent, bias, weight_bits, act_bits, act_frac_bits):
    """codes: unpacked uint8 [out, in], or [terms, out, in] (terms add up); returns float32 [..., out]."""
    codes = codes.reshape(-1, *codes.shape[-2:])
    out_f, in_f = codes.shape[1:]
    xf = np.asarray(x, dtype=np.float32).reshape(-1, in_f)
    with np.errstate(over="ignore", invalid="ignore"):
        scaled = np.floor(xf * np.float32(2.0 ** act_frac_bits))  # float32 product, then floor
    scaled = np.where(np.isnan(scaled), np.float32(0), scaled).astype(np.float64)
    xq = np.clip(scaled, -(2.0 ** (act_bits - 1)), 2.0 ** (act_bits - 1) - 1).astype(np.int64)

    z = (1 << (weight_bits - 1)) - 1
    sign = (codes >> (weight_bits - 1)).astype(np.int64)
    shift = (codes & z).astype(np.int64)
    acc = np.zeros((xf.shape[0], out_f), dtype=np.int64)
    for m in range(z):  # shift m: t = +-(x_q >> m); the zero code (m == z) adds nothing
        w = np.where(shift == m, 1 - 2 * sign, 0).astype(np.int64).sum(0)  # [out, in]: Σ_terms ±1
        if w.any():
            acc += (xq >> m) @ w.T
    acc32 = ((acc + 2**31) % 2**32 - 2**31).astype(np.int32)  # int32 wrap-around

    scale = np.array([2.0 ** (int(e) - act_frac_bits) for e in exponent], dtype=np.float32)
    with np.errstate(over="ignore"):
        y = acc32.astype(np.float32) * scale
        if bias is not None:
            y = y + np.asarray(bias, dtype=np.float32)
    return y.astype(np.float32).reshape(*np.shape(x)[:-1], out_f)


# ---------------------------------------------------------------------------------------------
# Models.

def make_model(in_f, out_f, packed, exponent, bias, *, weight_bits=5, act_bits=32,
               act_frac_bits=16, x_shape=None, x_type=TensorProto.FLOAT, weights_as_inputs=False,
               attrs=None):
    x_shape = x_shape if x_shape is not None else ["n", in_f]
    inputs = [helper.make_tensor_value_info("X", x_type, x_shape)]
    inits = []
    w = [("W_codes", TensorProto.UINT8, np.asarray(packed, np.uint8)),
         ("W_exponent", TensorProto.INT8, np.asarray(exponent, np.int8))]
    if bias is not None:
        w.append(("B", TensorProto.FLOAT, np.asarray(bias, np.float32)))
    for name, ty, arr in w:
        if weights_as_inputs:
            inputs.append(helper.make_tensor_value_info(name, ty, list(arr.shape)))
        else:
            inits.append(helper.make_tensor(name, ty, list(arr.shape), arr.reshape(-1).tolist()))
    attributes = dict(in_features=in_f, out_features=out_f, weight_bits=weight_bits,
                      act_bits=act_bits, act_frac_bits=act_frac_bits)
    attributes.update(attrs or {})
    attributes = {k: v for k, v in attributes.items() if v is not None}
    node = helper.make_node("ShiftLinear", ["X"] + [n for n, _, _ in w], ["Y"], name=NODE, domain=DOMAIN,
                            **attributes)
    graph = helper.make_graph([node], "g", inputs,
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid(DOMAIN, 1)])
    model.ir_version = 8
    return model.SerializeToString()


def random_codes(rng, out_f, in_f, weight_bits, zero_frac=0.15, terms=1):
    """Uniform codes of every shift and sign, some zero codes (sign bit set on some of them);
    [out, in], or [terms, out, in] for terms > 1."""
    z = (1 << (weight_bits - 1)) - 1
    shape = (out_f, in_f) if terms == 1 else (terms, out_f, in_f)
    m = rng.integers(0, z, size=shape)
    s = rng.integers(0, 2, size=shape)
    zero = rng.random(shape) < zero_frac
    m = np.where(zero, z, m)
    return ((s << (weight_bits - 1)) | m).astype(np.uint8)


def random_x(rng, shape, act_bits, act_frac_bits, special=True):
    """Values across the fixed-point range, some saturating, plus +-inf, NaN, -0, tiny values."""
    span = 2.0 ** (act_bits - 1 - act_frac_bits)
    x = rng.standard_normal(shape) * span * 10.0 ** rng.uniform(-4, 0.5, size=shape)
    x = x.astype(np.float32)
    if special and x.size:
        flat = x.reshape(-1)
        k = max(1, flat.size // 20)
        idx = rng.choice(flat.size, size=min(flat.size, 6 * k), replace=False)
        flat[idx[:k]] = np.inf
        flat[idx[k:2 * k]] = -np.inf
        flat[idx[2 * k:3 * k]] = np.nan
        flat[idx[3 * k:4 * k]] = -0.0
        flat[idx[4 * k:5 * k]] = np.float32(1e-30) * rng.choice([-1, 1], size=len(idx[4 * k:5 * k]))
        flat[idx[5 * k:]] = span * rng.choice([-4, 4], size=len(idx[5 * k:]))  # saturates
    return x


def run(model_bytes, x, **feeds):
    sess = session(model_bytes, threads=2)
    return sess.run(None, {"X": x, **feeds})[0]


def check(rng, in_f, out_f, rows_shape, weight_bits=5, act=(32, 16), with_bias=True,
          exp_range=(-8, 8), special=True, weights_as_inputs=False, terms=1):
    act_bits, act_frac_bits = act
    codes = random_codes(rng, out_f, in_f, weight_bits, terms=terms)
    packed = pow2.pack_codes(codes, weight_bits)
    exponent = rng.integers(exp_range[0], exp_range[1] + 1, size=out_f).astype(np.int8)
    bias = (rng.standard_normal(out_f) * 4).astype(np.float32) if with_bias else None
    x = random_x(rng, (*rows_shape, in_f), act_bits, act_frac_bits, special)
    model = make_model(in_f, out_f, packed, exponent, bias, weight_bits=weight_bits,
                       act_bits=act_bits, act_frac_bits=act_frac_bits,
                       x_shape=[*rows_shape, in_f], weights_as_inputs=weights_as_inputs,
                       attrs={"terms": terms} if terms > 1 else None)
    feeds = {}
    if weights_as_inputs:
        feeds = {"W_codes": packed, "W_exponent": exponent}
        if bias is not None:
            feeds["B"] = bias
    y = run(model, x, **feeds)
    ref = reference(x, codes, exponent, bias, weight_bits, act_bits, act_frac_bits)
    assert y.dtype == np.float32 and y.shape == (*rows_shape, out_f)
    assert np.array_equal(y, ref, equal_nan=True), (
        f"mismatch at {np.argwhere(~((y == ref) | (np.isnan(y) & np.isnan(ref))))[:5].tolist()}")


# ---------------------------------------------------------------------------------------------
# Exactness.

@pytest.mark.parametrize("rows", [0, 1, 3, 15, 16, 17, 64, 197])
@pytest.mark.parametrize("in_f,out_f", [(1, 5), (17, 33), (383, 1), (3, 7)])
def test_shapes(isa, rows, in_f, out_f):
    rng = np.random.default_rng(rows * 1000 + in_f * 10 + out_f)
    check(rng, in_f, out_f, (rows,))


@pytest.mark.parametrize("rows", [28, 29, 33])
@pytest.mark.parametrize("in_f", [64, 65, 130])
def test_block_boundaries(isa, rows, in_f):
    # Around the kernels' internal blocking: token groups of 4 (one task per group from 29
    # rows on), 64-input blocks, 64-output groups, 6-output tiles and 16/64-token blocks.
    rng = np.random.default_rng(rows * 7 + in_f)
    check(rng, in_f, 70, (rows,))


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("terms", [1, 2])
def test_few_rows_split_over_outputs(isa, rows, terms):
    # Few rows (AVX-512): the 64-output groups go to tasks of at least 2^20 MACs, several groups
    # each (here 41 groups, at batch 1 tasks of 22 groups with one term and 11 with two, the last
    # task shorter, the last group 40 outputs), on two threads; codes prefetched past the end.
    check(np.random.default_rng(rows * 10 + terms), 768, 2600, (rows,), terms=terms)


@pytest.mark.parametrize("weight_bits", [2, 3, 4, 5])
@pytest.mark.parametrize("act", [(32, 16), (16, 8), (8, 4), (32, 0), (20, -3)])
def test_formats(isa, weight_bits, act):
    rng = np.random.default_rng(weight_bits * 100 + act[0] + act[1])
    for rows in (2, 70):
        check(rng, 45, 70, (rows,), weight_bits=weight_bits, act=act)


@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_and_nd_input(isa, with_bias):
    rng = np.random.default_rng(7)
    check(rng, 19, 13, (2, 3, 7), with_bias=with_bias)
    check(rng, 19, 13, (1, 1), with_bias=with_bias)
    check(rng, 19, 13, (2, 0, 5), with_bias=with_bias)


def test_batch_of_one_wide(isa):
    rng = np.random.default_rng(11)
    check(rng, 384, 200, (1,))
    check(rng, 100, 130, (5,))


def test_wraparound_and_extreme_exponents(isa):
    # Saturated inputs summed over many inputs wrap the int32 accumulator; exponents at the ends
    # of e - F in [-126, 127] (the rescale overflows to inf at the top).
    rng = np.random.default_rng(3)
    in_f, out_f = 301, 40
    codes = np.zeros((out_f, in_f), dtype=np.uint8)  # shift 0, positive: t = x_q
    codes[::2, ::3] = 0x10  # some negative
    codes[1::4, 1::5] = 0x02
    exponent = np.array([-126, 127] * (out_f // 2), dtype=np.int8)
    x = np.full((33, in_f), 3e9, dtype=np.float32)
    x[::2] = -3e9
    x[1::3, ::7] = rng.standard_normal((11, 43)) * 1e8
    x[5, :7] = np.nan
    model = make_model(in_f, out_f, pow2.pack_codes(codes, 5), exponent, None, act_frac_bits=0)
    y = run(model, x)
    ref = reference(x, codes, exponent, None, 5, 32, 0)
    assert np.array_equal(y, ref, equal_nan=True)
    assert np.isinf(ref).any() and (np.isfinite(ref) & (ref != 0)).any()


@pytest.mark.parametrize("terms", [2, 3])
@pytest.mark.parametrize("rows,in_f,out_f", [(1, 5, 3), (17, 64, 70), (29, 65, 7), (64, 130, 64)])
def test_terms_add_up(isa, terms, rows, in_f, out_f):
    """A layer of T terms gives exactly the sum of its terms' integer accumulators."""
    check(np.random.default_rng(rows + in_f + terms), in_f, out_f, (rows,), terms=terms)
    check(np.random.default_rng(rows + in_f + terms), in_f, out_f, (2, rows), terms=terms, weights_as_inputs=True)


@pytest.mark.parametrize("rows", [1, 20, 70])
def test_wide_layers_in_chunks(isa, rows):
    """in_features past one chunk of the AVX2 activation buffer (8192 inputs: the int32 sums are
    carried from chunk to chunk) and past the AVX-512 table budget of a few rows (8 MiB: each
    task builds its own tables), so the scratch stays bounded at any width."""
    rng = np.random.default_rng(rows)
    check(rng, 2 * 8192 + 37, 7, (rows,))
    check(rng, 8192 + 5, 13, (rows,), terms=2)        # the widened input crosses a chunk edge


def test_weights_from_pow2_rounding(isa):
    # Realistic weights through the project's own rounding (nn/pow2.py).
    rng = np.random.default_rng(5)
    w = torch.from_numpy(rng.standard_normal((48, 96)).astype(np.float32) * 0.05)
    e = pow2.channel_exponents(w)
    codes = pow2.round_to_codes(w, e, 5).numpy()
    packed = pow2.pack_codes(codes, 5)
    assert np.array_equal(pow2.unpack_codes(packed, codes.size, 5).reshape(codes.shape), codes)
    bias = rng.standard_normal(48).astype(np.float32)
    x = rng.standard_normal((40, 96)).astype(np.float32)
    y = run(make_model(96, 48, packed, e.numpy(), bias), x)
    assert np.array_equal(y, reference(x, codes, e.numpy(), bias, 5, 32, 16))


def test_non_constant_weights(isa):
    rng = np.random.default_rng(9)
    check(rng, 29, 11, (20,), weights_as_inputs=True)
    check(rng, 29, 11, (3,), weights_as_inputs=True, with_bias=False)


def test_non_constant_weights_change_between_runs(isa):
    rng = np.random.default_rng(13)
    in_f, out_f = 40, 20
    model = make_model(in_f, out_f, np.zeros(math.ceil(in_f * out_f * 5 / 8), np.uint8),
                       np.zeros(out_f, np.int8), np.zeros(out_f, np.float32), weights_as_inputs=True)
    sess = session(model, threads=2)
    for _ in range(2):
        codes = random_codes(rng, out_f, in_f, 5)
        exponent = rng.integers(-3, 3, size=out_f).astype(np.int8)
        bias = rng.standard_normal(out_f).astype(np.float32)
        x = random_x(rng, (37, in_f), 32, 16)
        y = sess.run(None, {"X": x, "W_codes": pow2.pack_codes(codes, 5), "W_exponent": exponent,
                            "B": bias})[0]
        assert np.array_equal(y, reference(x, codes, exponent, bias, 5, 32, 16), equal_nan=True)


def test_isa_paths_agree():
    # The same inputs through every path give the same bytes (the tests above each compare one
    # path with the reference; this pins them to each other on a larger layer).
    rng = np.random.default_rng(21)
    codes = random_codes(rng, 97, 130, 4)
    exponent = rng.integers(-4, 4, size=97).astype(np.int8)
    bias = rng.standard_normal(97).astype(np.float32)
    model = make_model(130, 97, pow2.pack_codes(codes, 4), exponent, bias, weight_bits=4)
    for rows in (1, 9, 150):
        x = random_x(rng, (rows, 130), 32, 16)
        ys = []
        for name in ISAS:
            os.environ["MFCONVERT_ISA"] = name
            try:
                ys.append(run(model, x))
            finally:
                del os.environ["MFCONVERT_ISA"]
        for y in ys[1:]:
            assert np.array_equal(ys[0], y, equal_nan=True)


# ---------------------------------------------------------------------------------------------
# Errors: onnxruntime raises, naming the node.

def _expect_error(model_bytes, x, match, **feeds):
    with pytest.raises(Exception) as info:
        run(model_bytes, x, **feeds)
    msg = str(info.value)
    assert NODE in msg, msg
    assert match in msg, msg


@pytest.fixture
def layer():
    rng = np.random.default_rng(1)
    codes = random_codes(rng, 6, 10, 5)
    return dict(codes=codes, packed=pow2.pack_codes(codes, 5),
                exponent=np.zeros(6, np.int8), bias=np.ones(6, np.float32))


def test_error_wrong_last_dim(layer):
    model = make_model(10, 6, layer["packed"], layer["exponent"], layer["bias"], x_shape=["n", "k"])
    _expect_error(model, np.zeros((2, 11), np.float32), "in_features=10")


def test_error_rank_zero(layer):
    model = make_model(10, 6, layer["packed"], layer["exponent"], layer["bias"], x_shape=[])
    _expect_error(model, np.array(1.0, np.float32), "rank")


def test_error_float64_input(layer):
    model = make_model(10, 6, layer["packed"], layer["exponent"], layer["bias"],
                       x_type=TensorProto.DOUBLE)
    # ORT checks the input type against the op's schema (X: float32) when it loads the model.
    _expect_error(model, np.zeros((2, 10), np.float64), "Type 'tensor(double)' of input parameter (X) of operator "
                  "(ShiftLinear) in node (shift_linear_under_test) is invalid")


@pytest.mark.parametrize("as_inputs", [False, True])
def test_error_wrong_code_length(layer, as_inputs):
    packed = np.concatenate([layer["packed"], [0]]).astype(np.uint8)
    model = make_model(10, 6, packed, layer["exponent"], layer["bias"], weights_as_inputs=as_inputs)
    feeds = dict(W_codes=packed, W_exponent=layer["exponent"], B=layer["bias"]) if as_inputs else {}
    _expect_error(model, np.zeros((2, 10), np.float32), "W_codes", **feeds)


def test_error_code_length_of_one_term_with_two(layer):
    model = make_model(10, 6, layer["packed"], layer["exponent"], layer["bias"], attrs={"terms": 2})
    _expect_error(model, np.zeros((2, 10), np.float32), "ceil(terms * out_features")


@pytest.mark.parametrize("as_inputs", [False, True])
def test_error_wrong_exponent_and_bias_shape(layer, as_inputs):
    exponent = np.zeros(5, np.int8)
    model = make_model(10, 6, layer["packed"], exponent, layer["bias"], weights_as_inputs=as_inputs)
    feeds = dict(W_codes=layer["packed"], W_exponent=exponent, B=layer["bias"]) if as_inputs else {}
    _expect_error(model, np.zeros((2, 10), np.float32), "W_exponent", **feeds)
    bias = np.ones(7, np.float32)
    model = make_model(10, 6, layer["packed"], layer["exponent"], bias, weights_as_inputs=as_inputs)
    feeds = dict(W_codes=layer["packed"], W_exponent=layer["exponent"], B=bias) if as_inputs else {}
    _expect_error(model, np.zeros((2, 10), np.float32), "B must have shape", **feeds)


@pytest.mark.parametrize("as_inputs", [False, True])
def test_error_exponent_out_of_range(layer, as_inputs):
    exponent = np.array([0, 0, 0, 127, 0, 0], np.int8)  # 127 - (-1) = 128 > 127
    model = make_model(10, 6, layer["packed"], exponent, None, act_frac_bits=-1,
                       weights_as_inputs=as_inputs)
    feeds = dict(W_codes=layer["packed"], W_exponent=exponent) if as_inputs else {}
    _expect_error(model, np.zeros((2, 10), np.float32), "outside [-126, 127]", **feeds)


@pytest.mark.parametrize("attr,value", [("weight_bits", 6), ("weight_bits", 1), ("act_bits", 33),
                                        ("act_bits", 1), ("act_frac_bits", 33),
                                        ("act_frac_bits", -33), ("in_features", 0),
                                        ("out_features", None), ("terms", 0), ("terms", 5)])
def test_error_attributes(layer, attr, value):
    model = make_model(10, 6, layer["packed"], layer["exponent"], layer["bias"],
                       attrs={attr: value})
    _expect_error(model, np.zeros((2, 10), np.float32), attr)


def test_error_unknown_isa(layer, monkeypatch):
    monkeypatch.setenv("MFCONVERT_ISA", "sse9")
    model = make_model(10, 6, layer["packed"], layer["exponent"], layer["bias"])
    _expect_error(model, np.zeros((2, 10), np.float32), "MFCONVERT_ISA")
