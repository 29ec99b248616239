"""Independent NumPy statements of docs/ops.md, written from the spec alone (no mfconvert code),
for the tests to check the PyTorch layers and the C++ kernels against."""
from __future__ import annotations

import numpy as np


def round_weight_pow2(w: np.ndarray, exponent: np.ndarray, bits: int):
    """(sign 0/1, shift m) per weight, DeepShift's log-domain rounding, zero code m = Z."""
    z = 2 ** (bits - 1) - 1
    e = exponent.astype(np.float64)[:, None]
    mag = np.abs(w.astype(np.float64))
    with np.errstate(divide="ignore"):
        p = np.clip(np.round(np.log2(mag)), e - z + 1, e)
    m = (e - p).astype(np.int64)
    zero = mag < 2.0 ** (e - z)
    m[zero] = z
    sign = ((w < 0) & ~zero).astype(np.int64)
    return sign, m


def channel_exponent(w: np.ndarray) -> np.ndarray:
    peak = np.abs(w.astype(np.float64)).max(axis=1)
    with np.errstate(divide="ignore"):
        e = np.where(peak > 0, np.round(np.log2(peak)), 0)
    return np.clip(e, -100, 100).astype(np.int8)


def quantize(x: np.ndarray, act_bits: int, frac_bits: int) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        f = np.floor(x.astype(np.float32) * np.float32(2.0 ** frac_bits)).astype(np.float64)
    f = np.nan_to_num(f, nan=0.0, posinf=np.inf, neginf=-np.inf)
    return np.clip(f, -(2 ** (act_bits - 1)), 2 ** (act_bits - 1) - 1).astype(np.int64)


def shift_linear(x: np.ndarray, sign: np.ndarray, m: np.ndarray, exponent: np.ndarray,
                 bias: np.ndarray | None, bits: int, act_bits: int, frac_bits: int) -> np.ndarray:
    """The ShiftLinear op: Σ ±(x_q >> m) with int32 wrap, then float32(acc)·2^(e−F) + b."""
    z = 2 ** (bits - 1) - 1
    xq = quantize(x, act_bits, frac_bits).reshape(-1, x.shape[-1])          # [R, in] int64
    terms = xq[:, None, :] >> np.minimum(m, 62)[None, :, :]                  # [R, out, in]
    terms = np.where(sign[None] == 1, -terms, terms)
    terms = np.where(m[None] == z, 0, terms)
    acc = terms.sum(axis=2)
    acc = ((acc + 2 ** 31) % 2 ** 32 - 2 ** 31).astype(np.int32)            # two's-complement wrap
    scale = np.array([np.ldexp(np.float32(1), int(e) - frac_bits) for e in exponent], dtype=np.float32)
    y = acc.astype(np.float32) * scale
    if bias is not None:
        y = y + bias.astype(np.float32)
    return y.reshape(*x.shape[:-1], len(exponent))


def round_weight_terms(w: np.ndarray, exponent: np.ndarray, bits: int, terms: int):
    """Greedy T-term rounding: [(sign, m)] per term, each term rounding (in float32) what the
    terms before it left over."""
    z = 2 ** (bits - 1) - 1
    rest = w.astype(np.float32)
    out = []
    for _ in range(terms):
        sign, m = round_weight_pow2(rest, exponent, bits)
        value = np.where(m == z, 0.0, (1 - 2 * sign) * 2.0 ** (exponent.astype(np.float64)[:, None] - m))
        rest = (rest - value.astype(np.float32)).astype(np.float32)
        out.append((sign, m))
    return out
