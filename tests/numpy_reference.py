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
    # acc = Σ_i ±(x_q >> m_oi), grouped by shift: Σ_m (x_q >> m) · (±1 where m_oi = m)ᵀ. The float64
    # products are ±integers below 2^31 and every partial sum is below in·2^31 ≤ 2^53 (in ≤ 2^22),
    # so these sums are exact integers, in any order.
    acc = np.zeros((len(xq), len(exponent)), np.float64)
    signed = np.where(sign == 1, -1.0, 1.0)
    for shift in np.unique(m[m != z]):
        acc += (xq >> int(shift)).astype(np.float64) @ ((m == shift) * signed).T   # [out, in] of ±1 / 0
    acc = acc.astype(np.int64)
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


# ---------------------------------------------------------------------------------------------
# AddLinearAttention (docs/ops.md#addlinearattention), everything in float64.

def _normalise(x: np.ndarray) -> np.ndarray:
    """x / ‖x‖₂ over the last axis, 0 for a zero vector."""
    norm = np.sqrt(np.square(x).sum(-1, keepdims=True))
    return np.where(norm > 0, x / np.where(norm > 0, norm, 1.0), 0.0)


def key_mask(mask: np.ndarray | None, batch: int, tokens: int) -> np.ndarray:
    """[B, T] bool, True = key counts: key j of batch b is masked iff mask < −1000; a query × key
    mask ([B|1, 1, T, T] or [B|1, T, T]) gives row 0 (the op requires every row to agree)."""
    if mask is None:
        return np.ones((batch, tokens), bool)
    m = np.asarray(mask, np.float64)
    if m.ndim == 4:
        m = m[:, 0]
    if m.ndim == 3:
        m = m[:, 0]
    return np.broadcast_to(m >= -1000, (batch, tokens))


def sign_codes(x: np.ndarray, threshold: np.ndarray | None) -> np.ndarray:
    """{0,1} [B, H, T, D]: 1[x̂ > τ] per channel (τ [H, D], absent = 0)."""
    xn = _normalise(x.astype(np.float64))
    tau = 0.0 if threshold is None else threshold.astype(np.float64)[None, :, None, :]
    return (xn > tau).astype(np.float64)


def ksh_codes(x: np.ndarray, anchors: np.ndarray, center: np.ndarray, projection: np.ndarray,
              sigma: np.ndarray) -> np.ndarray:
    """{0,1} [B, H, T, nbits]: 1[Σ_i A[r, i] (exp(−‖x̂ − a_i‖² / 2σ) − μ_i) > 0]."""
    xn = _normalise(x.astype(np.float64))                                       # [B, H, T, D]
    a = anchors.astype(np.float64)                                              # [H, m, D]
    d2 = np.square(xn[:, :, :, None, :] - a[None, :, None]).sum(-1)             # [B, H, T, m]
    kappa = np.exp(-d2 / (2 * sigma.astype(np.float64))[None, :, None, None]) - center.astype(np.float64)[None, :, None]
    y = np.einsum("bhtm,hrm->bhtr", kappa, projection.astype(np.float64))
    return (y > 0).astype(np.float64)


def depthwise_conv(vm: np.ndarray, weight: np.ndarray, grid=None, prefix_tokens: int = 0) -> np.ndarray:
    """conv(V') on heads vm [B, H, T, D]: [H, k] along the tokens (zero outside [0, T)), or
    [H, kh, kw] over a row-major grid after prefix_tokens (each prefix token: the centre tap)."""
    w = weight.astype(np.float64)
    b, h, t, d = vm.shape
    out = np.zeros_like(vm)
    if w.ndim == 2:
        k = w.shape[1]
        for u in range(k):
            shift = u - k // 2                       # out[t] += w[u] · V'[t + shift]
            lo = max(0, -shift)
            hi = max(lo, min(t, t - shift))          # lo = hi when |shift| >= T: no tap
            out[:, :, lo:hi] += w[None, :, u, None, None] * vm[:, :, lo + shift:hi + shift]
        return out
    kh, kw = w.shape[1:]
    gh, gw = grid
    img = vm[:, :, prefix_tokens:].reshape(b, h, gh, gw, d)
    res = np.zeros_like(img)
    for i in range(kh):
        for j in range(kw):
            di, dj = i - kh // 2, j - kw // 2
            for r in range(gh):
                for c in range(gw):
                    if 0 <= r + di < gh and 0 <= c + dj < gw:
                        res[:, :, r, c] += w[None, :, i, j, None] * img[:, :, r + di, c + dj]
    out[:, :, prefix_tokens:] = res.reshape(b, h, gh * gw, d)
    out[:, :, :prefix_tokens] = w[None, :, kh // 2, kw // 2, None, None] * vm[:, :, :prefix_tokens]
    return out


def add_linear_attention(q, k, v, num_heads: int, mask=None, conv_weight=None, q_threshold=None,
                         k_threshold=None, ksh=None, grid=None, prefix_tokens: int = 0,
                         parts: bool = False):
    """Y [B, T, C] of the AddLinearAttention op in float64. Q, K, V [B, T, C], channel h·D + d;
    k None with ksh = (anchors, center, projection, sigma) (shared qk). With parts=True also
    returns, per head layout [B, H, T, ·], what a float32 evaluation's error bound needs: the
    magnitudes A = 0.5|V| + Q_b(K_bᵀ|V|)/π, ‖Z‖, and Σ|w·V'| of the conv."""
    b, t, c = v.shape
    d = c // num_heads

    def heads(x):
        return np.asarray(x, np.float64).reshape(b, t, num_heads, d).transpose(0, 2, 1, 3)

    qh, vh = heads(q), heads(v)
    if ksh is not None:
        qb = kb = ksh_codes(qh, *ksh)
    else:
        qb, kb = sign_codes(qh, q_threshold), sign_codes(heads(k), k_threshold)
    keep = key_mask(mask, b, t)[:, None, :, None].astype(np.float64)
    kb = kb * keep                                   # masked keys add nothing to S
    vm = vh * keep                                   # V': masked tokens 0 (for the conv)
    s = np.swapaxes(kb, -1, -2) @ vh                 # [B, H, bits, D]
    u = qb @ s
    z = 0.5 * vh + u / np.pi
    znorm = np.sqrt(np.square(z).sum(-1, keepdims=True))
    y = z / np.maximum(znorm, 1e-12)
    conv_abs = np.zeros_like(y)
    if conv_weight is not None:
        y = y + depthwise_conv(vm, conv_weight, grid, prefix_tokens)
        conv_abs = depthwise_conv(np.abs(vm), np.abs(conv_weight), grid, prefix_tokens)
    out = y.transpose(0, 2, 1, 3).reshape(b, t, c)
    if not parts:
        return out
    mag = 0.5 * np.abs(vh) + qb @ (np.swapaxes(kb, -1, -2) @ np.abs(vh)) / np.pi
    return out, dict(magnitude=mag, znorm=znorm, conv_abs=conv_abs, bits=qb.shape[-1], y=y)


# ---------------------------------------------------------------------------------------------
# ShiftMoEMLP (docs/ops.md#shiftmoemlp).

def moe_route(x2: np.ndarray, router_w: np.ndarray, router_b: np.ndarray):
    """(logits [R, 2], chosen expert [R] (a tie goes to 0, Mult), gate = softmax(l)[e]) in float64."""
    logits = x2.astype(np.float64) @ router_w.astype(np.float64).T + router_b.astype(np.float64)
    expert = (logits[:, 1] > logits[:, 0]).astype(np.int64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return logits, expert, p[np.arange(len(p)), expert]


def shift_expert_codes(weight: np.ndarray, bits: int = 5):
    """(sign, m, exponent) of a float weight [out, in] by the spec's rounding (per-channel e_o)."""
    exponent = channel_exponent(weight)
    sign, m = round_weight_pow2(weight.astype(np.float32), exponent, bits)
    return sign, m, exponent


def moe_mlp(x: np.ndarray, router_w, router_b, fc1_w, fc1_b, fc2_w, fc2_b, act, bits: int = 5,
            act_bits: int = 32, frac_bits: int = 16):
    """y = g · E_e(x) per token of x [..., d]: E_0 the float MLP (float64 here), E_1 the same MLP
    with both linears as ShiftLinear ops (exact integer arithmetic, see shift_linear) and `act` (a
    float64 → float64 function) between them, evaluated on float32 like the op. Returns
    (y float64, dict of the intermediate values for error bounds)."""
    x2 = x.reshape(-1, x.shape[-1]).astype(np.float32)
    logits, expert, gate = moe_route(x2, router_w, router_b)
    h_mult = x2.astype(np.float64) @ fc1_w.astype(np.float64).T + fc1_b
    e_mult = act(h_mult) @ fc2_w.astype(np.float64).T + fc2_b
    s1, m1, e1 = shift_expert_codes(fc1_w, bits)
    s2, m2, e2 = shift_expert_codes(fc2_w, bits)
    h_shift = shift_linear(x2, s1, m1, e1, fc1_b.astype(np.float32), bits, act_bits, frac_bits)
    a_shift = act(h_shift.astype(np.float64))
    e_shift = shift_linear(a_shift.astype(np.float32), s2, m2, e2, fc2_b.astype(np.float32), bits, act_bits,
                           frac_bits).astype(np.float64)
    chosen = np.where(expert[:, None] == 1, e_shift, e_mult)
    y = gate[:, None] * chosen
    return y.reshape(*x.shape[:-1], -1), dict(
        logits=logits, expert=expert, gate=gate, x2=x2, h_mult=h_mult, e_mult=e_mult, h_shift=h_shift,
        a_shift=a_shift, e_shift=e_shift, fc2_codes=(s2, m2, e2), chosen=chosen)


# ---------------------------------------------------------------------------------------------
# ShiftConv and AdderConv (docs/ops.md#shiftconv, #adderconv): integer arithmetic in int64.

def conv_output_shape(in_shape, kernel_shape, strides, pads, dilations):
    """O_i = floor((I_i + begin_i + end_i − d_i·(k_i − 1) − 1) / s_i) + 1 per spatial axis."""
    d = len(kernel_shape)
    return tuple((in_shape[i] + pads[i] + pads[d + i] - dilations[i] * (kernel_shape[i] - 1) - 1) // strides[i] + 1
                 for i in range(d))


def conv_columns(xq: np.ndarray, kernel_shape, strides, pads, dilations) -> np.ndarray:
    """im2col of integer activations xq [N, C, I...] (1-D or 2-D), padding 0: [N, C, K, O...] with
    taps row-major over the kernel, tap u reading input position p·s + u·d − begin."""
    d = len(kernel_shape)
    n, c = xq.shape[:2]
    out = conv_output_shape(xq.shape[2:], kernel_shape, strides, pads, dilations)
    padded = np.pad(xq, [(0, 0), (0, 0)] + [(pads[i], pads[d + i]) for i in range(d)])
    taps = []
    for u in np.ndindex(*kernel_shape):
        idx = tuple(slice(u[i] * dilations[i], u[i] * dilations[i] + (out[i] - 1) * strides[i] + 1, strides[i])
                    for i in range(d))
        taps.append(padded[(slice(None), slice(None)) + idx])
    return np.stack(taps, axis=2) if taps else np.zeros((n, c, 0, *out), xq.dtype)


def int_to_float32(acc: np.ndarray) -> np.ndarray:
    """float32(acc) of int64 integers, rounded to nearest even with integer operations (no
    double rounding through float64)."""
    a = np.asarray(acc, np.int64)
    mag = np.abs(a)
    bits = np.zeros(a.shape, np.int64)
    for k in range(64):
        bits = np.where(mag >> k > 0, k + 1, bits)            # bit length of |acc|
    shift = np.maximum(bits - 24, 0)
    q = mag >> shift
    rest = mag - (q << shift)
    half = np.where(shift > 0, np.left_shift(1, np.maximum(shift - 1, 0)), 1 << 62)
    q = q + ((rest > half) | ((rest == half) & (q & 1 == 1))).astype(np.int64)
    f = np.ldexp(q.astype(np.float64), shift.astype(np.int32))  # q ≤ 2^24: exact in float32
    return (np.sign(a) * f).astype(np.float32)


def conv_activation(y: np.ndarray, activation: str = "", clip_min=-np.inf, clip_max=np.inf) -> np.ndarray:
    """The fused activation of ShiftConv/AdderConv on float32 y: "", "Relu" or "Clip" (NaN stays)."""
    y = y.astype(np.float32)
    if activation == "Relu":
        return np.where(np.isnan(y) | (y > 0), y, np.float32(0))
    if activation == "Clip":
        return np.where(np.isnan(y), y, np.minimum(np.maximum(y, np.float32(clip_min)), np.float32(clip_max)))
    assert activation == "", activation
    return y


def shift_conv(x: np.ndarray, codes: np.ndarray, exponent: np.ndarray, bias, bits: int, act_bits: int,
               frac_bits: int, kernel_shape, strides=None, pads=None, dilations=None, group: int = 1,
               activation: str = "", clip_min=-np.inf, clip_max=np.inf) -> np.ndarray:
    """The ShiftConv op. codes: the unpacked B-bit codes [T, M, C/G, k...] (sign bit on top, zero
    code m = Z); acc = Σ ±(x_q >> m) over terms, channels of the group and taps, int32 wrap."""
    d = len(kernel_shape)
    strides = strides or [1] * d
    pads = pads or [0] * (2 * d)
    dilations = dilations or [1] * d
    z = 2 ** (bits - 1) - 1
    codes = np.asarray(codes).astype(np.int64)
    t, m_out, cg = codes.shape[:3]
    kk = int(np.prod(kernel_shape))
    codes = codes.reshape(t, m_out, cg * kk)
    sign, shift = codes >> (bits - 1), codes & z
    n, c = x.shape[:2]
    xq = quantize(x, act_bits, frac_bits)
    cols = conv_columns(xq, kernel_shape, strides, pads, dilations)          # [N, C, K, O...]
    out = cols.shape[3:]
    cols = cols.reshape(n, c * kk, int(np.prod(out)))                       # channel-major: c·K + tap
    mg = m_out // group
    acc = np.zeros((n, m_out, cols.shape[-1]), np.int64)
    for g in range(group):
        xg = cols[:, g * cg * kk:(g + 1) * cg * kk]                           # [N, Cg·K, P]
        for s in range(z):
            w = np.where(shift[:, g * mg:(g + 1) * mg] == s, 1 - 2 * sign[:, g * mg:(g + 1) * mg], 0).sum(0)
            if w.any():
                acc[:, g * mg:(g + 1) * mg] += np.einsum("ok,nkp->nop", w, xg >> s)
    acc32 = ((acc + 2 ** 31) % 2 ** 32 - 2 ** 31).astype(np.int32)
    scale = np.array([np.ldexp(np.float32(1), int(e) - frac_bits) for e in exponent], np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        y = acc32.astype(np.float32) * scale[None, :, None]
        if bias is not None:
            y = y + np.asarray(bias, np.float32)[None, :, None]
    return conv_activation(y, activation, clip_min, clip_max).reshape(n, m_out, *out)


def adder_conv(x: np.ndarray, w: np.ndarray, bias, act_bits: int, frac_bits: int, kernel_shape,
               strides=None, pads=None, dilations=None, group: int = 1, activation: str = "",
               clip_min=-np.inf, clip_max=np.inf) -> np.ndarray:
    """The AdderConv op: acc = Σ |x_q − w_q| in int64 (padding x_q = 0), y = b − float32(acc)·2^−F."""
    d = len(kernel_shape)
    strides = strides or [1] * d
    pads = pads or [0] * (2 * d)
    dilations = dilations or [1] * d
    m_out, cg = w.shape[:2]
    kk = int(np.prod(kernel_shape))
    wq = quantize(w, act_bits, frac_bits).reshape(m_out, cg * kk)
    n, c = x.shape[:2]
    cols = conv_columns(quantize(x, act_bits, frac_bits), kernel_shape, strides, pads, dilations)
    out = cols.shape[3:]
    cols = cols.reshape(n, c * kk, int(np.prod(out)))
    mg = m_out // group
    acc = np.zeros((n, m_out, cols.shape[-1]), np.int64)
    for o in range(m_out):
        g = o // mg
        acc[:, o] = np.abs(cols[:, g * cg * kk:(g + 1) * cg * kk] - wq[o][None, :, None]).sum(1)
    b = np.zeros(m_out, np.float32) if bias is None else np.asarray(bias, np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        y = b[None, :, None] - int_to_float32(acc) * np.float32(2.0 ** -frac_bits)
    return conv_activation(y, activation, clip_min, clip_max).reshape(n, m_out, *out)


def spatial_shift(x: np.ndarray, offsets: np.ndarray, strides=(1, 1), padding: str = "zeros",
                  channel_shift: int = 0, scale=None, bias=None, clip=None) -> np.ndarray:
    """SpatialShift (docs/ops.md#spatialshift), element by element: Y[n, c, i, j] =
    X[n, (c - channel_shift) mod C, i·sh + dy_c, j·sw + dx_c], outside the image 0 or (edge) the
    nearest pixel; [OH, OW] = ceil([H, W] / strides). Then the fused tail, in float32 and this
    order: v·scale_c (if scale), + bias_c (if bias), clip = (lo, hi): v < lo → lo, then v > hi →
    hi (NaN kept)."""
    y = _spatial_shift_move(x, offsets, strides, padding, channel_shift)
    with np.errstate(all="ignore"):   # inf·0, inf − inf: NaN, as in float32 hardware
        if scale is not None:
            y = y * np.asarray(scale, np.float32).reshape(1, -1, 1, 1)
        if bias is not None:
            y = y + np.asarray(bias, np.float32).reshape(1, -1, 1, 1)
        if clip is not None:
            lo, hi = np.float32(clip[0]), np.float32(clip[1])
            y = np.where(y < lo, lo, y)
            y = np.where(y > hi, hi, y)
    return y.astype(np.float32)


def _spatial_shift_move(x: np.ndarray, offsets: np.ndarray, strides, padding: str, channel_shift: int) -> np.ndarray:
    n, c, h, w = x.shape
    sh, sw = strides
    oh, ow = -(-h // sh), -(-w // sw)
    y = np.zeros((n, c, oh, ow), np.float32)
    for ch in range(c):
        src = (ch - channel_shift) % c if c else 0
        dy, dx = int(offsets[ch, 0]), int(offsets[ch, 1])
        for i in range(oh):
            r = i * sh + dy
            if not 0 <= r < h:
                if padding != "edge":
                    continue
                r = min(max(r, 0), h - 1)
            for j in range(ow):
                q = j * sw + dx
                if not 0 <= q < w:
                    if padding != "edge":
                        continue
                    q = min(max(q, 0), w - 1)
                y[:, ch, i, j] = x[:, src, r, q]
    return y


def shift_conv_read_through(x: np.ndarray, offsets: np.ndarray, conv: dict, shift_strides=(1, 1),
                            shift_padding: str = "zeros", shift_channel_shift: int = 0, shift_scale=None,
                            shift_bias=None, shift_clip=None) -> np.ndarray:
    """ShiftConv with an input shift (docs/ops.md#input-shift-read-through): by definition
    ShiftConv(SpatialShift(X, offsets, scale, bias; attrs), ...) — the two references composed.
    conv: shift_conv's keyword arguments (codes, exponent, bias, bits, ...)."""
    shifted = spatial_shift(x, offsets, shift_strides, shift_padding, shift_channel_shift, shift_scale, shift_bias,
                            shift_clip)
    return shift_conv(shifted, **conv)
