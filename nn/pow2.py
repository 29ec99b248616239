"""Power-of-two weight codes and Q-format activations: the arithmetic of docs/ops.md#shiftlinear.

One place defines how a float weight becomes a (sign, shift) code, how codes are bit-packed,
and how activations become fixed point, so the ONNX pass, the PyTorch layer and the tests all
produce the same bytes the C++ kernel reads.
"""
from __future__ import annotations

import math

import numpy as np
import torch

WEIGHT_SCALES = ("channel", "tensor", "none")
EXPONENT_LIMIT = 100
MAX_TERMS = 4


def zero_shift(weight_bits: int) -> int:
    """The shift field value Z = 2^(B-1) - 1 that marks a zero weight."""
    return (1 << (weight_bits - 1)) - 1


def check_format(weight_bits: int, act_bits: int = 32, act_frac_bits: int = 16, terms: int = 1) -> None:
    if not 1 <= terms <= MAX_TERMS:
        raise ValueError(f"terms must be in [1, {MAX_TERMS}], got {terms}")
    if not 2 <= weight_bits <= 5:
        raise ValueError(f"weight_bits must be in [2, 5], got {weight_bits}")
    if not 2 <= act_bits <= 32:
        raise ValueError(f"act_bits must be in [2, 32], got {act_bits}")
    if not -32 <= act_frac_bits <= 32:
        raise ValueError(f"act_frac_bits must be in [-32, 32], got {act_frac_bits}")


def channel_exponents(weight: torch.Tensor, weight_scale: str = "channel") -> torch.Tensor:
    """e_o = round(log2(max |w_o|)) per output row (or one for the tensor, or 0), as int8."""
    if weight_scale not in WEIGHT_SCALES:
        raise ValueError(f"weight_scale must be one of {WEIGHT_SCALES}, got {weight_scale!r}")
    out_features = weight.shape[0]
    if weight_scale == "none":
        return torch.zeros(out_features, dtype=torch.int8)
    w = weight.detach().to(torch.float32).abs()
    peak = w.amax(dim=1) if weight_scale == "channel" else w.amax().expand(out_features)
    exp = torch.where(peak > 0, rounded_log2(peak.clamp_min(2.0 ** -126)), 0)
    return exp.clamp(-EXPONENT_LIMIT, EXPONENT_LIMIT).to(torch.int8)


def rounded_log2(magnitude: torch.Tensor) -> torch.Tensor:
    """round(log2 m) for float32 m > 0, exactly, from the bits: m = 1.f · 2^k rounds up to k+1
    when 1.f > √2, i.e. when the 23-bit fraction is at least 0x3504F4 (√2 in float32 is
    0x3FB504F3, just below the true value, so no float32 lies between the two)."""
    bits = magnitude.to(torch.float32).contiguous().view(torch.int32)
    return ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) >= 0x3504F4).to(torch.int32)


def power_of_two(exponent: torch.Tensor) -> torch.Tensor:
    """2^exponent as float32, exact, built from the bits (exponent in [-126, 127])."""
    return ((exponent.to(torch.int32) + 127) << 23).view(torch.float32)


def _shift_and_zero(weight: torch.Tensor, exponent: torch.Tensor, weight_bits: int):
    """(p, is_zero): the rounded power of each float32 weight, clamped to the channel's range,
    and whether it rounds to the zero code (|w| below half the smallest magnitude)."""
    z = zero_shift(weight_bits)
    e = exponent.to(torch.int32).unsqueeze(1)
    mag = weight.detach().to(torch.float32).abs()
    p = torch.maximum(torch.minimum(rounded_log2(mag), e), e - z + 1)
    return p, mag < power_of_two(e - z)


def round_to_codes(weight: torch.Tensor, exponent: torch.Tensor, weight_bits: int) -> torch.Tensor:
    """Round float weights [out, in] (or [terms, out, in], each term on its own) to B-bit codes
    (uint8, sign in the top bit) per docs/ops.md. Weights are rounded from their float32 values."""
    check_format(weight_bits)
    if not torch.isfinite(weight).all():
        raise ValueError("weight has NaN or Inf values")
    z = zero_shift(weight_bits)
    p, is_zero = _shift_and_zero(weight, exponent, weight_bits)
    m = exponent.to(torch.int32).unsqueeze(1) - p
    zero = is_zero.to(torch.int32)
    m = m + zero * (z - m)                       # the zero code where |w| is too small
    sign = (weight < 0).to(torch.int32) * (1 - zero)
    return ((sign << (weight_bits - 1)) | m).to(torch.uint8)


def round_weight(weight: torch.Tensor, exponent: torch.Tensor, weight_bits: int) -> torch.Tensor:
    """The float32 value of each weight's code (= decode_codes(round_to_codes(...))), computed
    directly: the training forward pass calls this for every layer at every step, so it avoids
    torch.where/masked_fill, which are several times slower than arithmetic on the CPU."""
    p, is_zero = _shift_and_zero(weight, exponent, weight_bits)
    return torch.copysign(power_of_two(p), weight.detach().to(torch.float32)) * ~is_zero


def residual_terms(weight: torch.Tensor, exponent: torch.Tensor, weight_bits: int, terms: int) -> torch.Tensor:
    """Weights [out, in] split into `terms` float32 parts [terms, out, in] for w ≈ Σ_t ±2^p_t:
    part 0 is w, part t+1 is what rounding part t left over (part t minus its rounded value).
    Rounding each part on its own (round_to_codes) gives the greedy T-term codes of docs/ops.md."""
    parts = [weight.detach().to(torch.float32)]
    for _ in range(terms - 1):
        parts.append(parts[-1] - round_weight(parts[-1], exponent, weight_bits))
    return torch.stack(parts)


def round_to_term_codes(weight: torch.Tensor, exponent: torch.Tensor, weight_bits: int, terms: int) -> torch.Tensor:
    """Greedy T-term codes [terms, out, in] (uint8) of float weights [out, in]: each term rounds
    what the terms before it left over (docs/ops.md#two-or-more-terms)."""
    check_format(weight_bits, terms=terms)
    return round_to_codes(residual_terms(weight, exponent, weight_bits, terms), exponent, weight_bits)


def decode_codes(codes: torch.Tensor, exponent: torch.Tensor, weight_bits: int) -> torch.Tensor:
    """The float32 weights that codes stand for: (-1)^s 2^(e-m), or 0. Codes [terms, out, in]
    of a multi-term layer decode to the sum of their terms."""
    if codes.dim() == 3:
        return sum(decode_codes(c, exponent, weight_bits) for c in codes)
    z = zero_shift(weight_bits)
    c = codes.to(torch.int32)
    m = c & z
    value = power_of_two(exponent.to(torch.int32).unsqueeze(1) - torch.where(m == z, 0, m))
    value = torch.where(c >> (weight_bits - 1) == 1, -value, value)
    return value.masked_fill(m == z, 0.0)


def pack_codes(codes: np.ndarray | torch.Tensor, weight_bits: int) -> np.ndarray:
    """Bit-pack codes (row-major) LSB first into a uint8 stream of ceil(n*B/8) bytes."""
    c = np.asarray(codes, dtype=np.uint8).reshape(-1)
    bits = ((c[:, None] >> np.arange(weight_bits, dtype=np.uint8)) & 1).reshape(-1)
    return np.packbits(bits, bitorder="little")


def unpack_codes(packed: np.ndarray, count: int, weight_bits: int) -> np.ndarray:
    """Inverse of pack_codes: the first `count` codes of the stream."""
    need = math.ceil(count * weight_bits / 8)
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if packed.size != need:
        raise ValueError(f"packed codes have {packed.size} bytes, expected {need}")
    bits = np.unpackbits(packed, bitorder="little")[: count * weight_bits].reshape(count, weight_bits)
    return (bits << np.arange(weight_bits, dtype=np.uint8)).sum(axis=1).astype(np.uint8)


def quantize_activation(x: torch.Tensor, act_bits: int = 32, act_frac_bits: int = 16) -> torch.Tensor:
    """x_q = sat_A(floor(x * 2^F)) as int32, NaN -> 0 (step 1 of docs/ops.md#arithmetic)."""
    scaled = torch.floor(x.to(torch.float32) * torch.tensor(2.0 ** act_frac_bits, dtype=torch.float32))
    lo, hi = -(2 ** (act_bits - 1)), 2 ** (act_bits - 1) - 1
    scaled = torch.nan_to_num(scaled, nan=0.0)
    # Compare in float64 so the bounds are exact, then convert the in-range integers.
    s64 = scaled.to(torch.float64).clamp(lo, hi)
    return s64.to(torch.int64).to(torch.int32)


# Range checks for the report (docs/ops.md#range-of-the-accumulator): they read the same codes the
# kernel runs and change nothing.

ACC_MAX = 2 ** 31 - 1


def weight_range_counts(weight: np.ndarray, exponent: np.ndarray, weight_bits: int) -> tuple[int, int, int]:
    """(clamped, flushed, nonzero) of float weights [out, in] with channel exponents [out]: how
    many round above the channel's largest magnitude 2^e_o and were clamped to it (rounded_log2
    > e_o, i.e. |w| ≥ 1.0x3504F4 · 2^e_o), how many non-zero ones lie below half its smallest
    magnitude 2^(e_o − Z) and became the zero code, and how many are non-zero; comparisons of
    the float32 bits, in NumPy (single-threaded: cheap beside the rounding)."""
    bits = np.abs(np.asarray(weight, dtype=np.float32)).view(np.int32)
    e = np.asarray(exponent, dtype=np.int32)[:, None] + 127          # e_o in [−100, 100]: a normal float
    clamped = int(np.count_nonzero(bits >= (e << 23 | 0x3504F4)))
    nonzero = bits > 0
    flushed = int(np.count_nonzero(nonzero & (bits < (e - zero_shift(weight_bits)) << 23)))
    return clamped, flushed, int(np.count_nonzero(nonzero))


def code_shifts(codes: np.ndarray, weight_bits: int) -> np.ndarray:
    """The shift m of each code (any shape), with the zero code as −1."""
    z = zero_shift(weight_bits)
    m = np.asarray(codes, dtype=np.int64) & z
    return np.where(m == z, -1, m)


def accumulator_bound(shifts: np.ndarray, x_max_q: np.ndarray) -> np.ndarray:
    """Per output row the largest |acc_o| that inputs with |x_q,i| ≤ x_max_q[i] can reach before
    wrap-around: Σ_t Σ_i ceil(x_max_q[i] / 2^m_toi), exact in int64 (|x_q >> m| is at most
    ceil(X / 2^m), at x_q = −X). `shifts` [terms, out, in] from code_shifts, x_max_q [in] ≥ 0."""
    x = np.asarray(x_max_q, dtype=np.int64)
    m = np.maximum(shifts, 0)
    part = np.where(shifts >= 0, -((-x) >> m), 0)
    return part.sum(axis=(0, 2))


def max_abs_fixed(max_abs: np.ndarray, act_bits: int, act_frac_bits: int) -> np.ndarray:
    """The largest |x_q| that activations with |x| ≤ max_abs give: ceil(max_abs · 2^F), saturated
    at 2^(A−1) (step 1 of the arithmetic; floor(−a · 2^F) = −ceil(a · 2^F))."""
    scaled = np.ceil(np.asarray(max_abs, dtype=np.float64) * 2.0 ** act_frac_bits)
    return np.minimum(np.nan_to_num(scaled, nan=0.0, posinf=2.0 ** 63), 2.0 ** (act_bits - 1)).astype(np.int64)


def row_magnitudes(shifts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per output row of shifts [terms, out, in]: S_o = Σ 2^−m (the row's code magnitudes, in
    units of its channel scale 2^e_o) and n_o, its non-zero codes."""
    nonzero = shifts >= 0
    s = np.where(nonzero, np.exp2(-np.maximum(shifts, 0).astype(np.float64)), 0.0).sum(axis=(0, 2))
    return s, nonzero.sum(axis=(0, 2))


def safe_input_bound(saturated_bound: int, s: np.ndarray, n: np.ndarray, act_frac_bits: int) -> float:
    """The largest a such that no input with |x| ≤ a on every element can wrap the accumulator of
    any row: inf when even saturated inputs cannot (`saturated_bound`: the largest row bound at
    |x_q| = 2^(A−1)), else the least over rows of (2^31 − 1 − n_o − S_o) / (2^F · S_o) (from
    row_magnitudes; each ceil adds less than 1, and ceil(a · 2^F) < a · 2^F + 1)."""
    if saturated_bound <= ACC_MAX:
        return math.inf
    rows = s > 0
    return float(((ACC_MAX - n[rows] - s[rows]) / (2.0 ** act_frac_bits * s[rows])).min())
