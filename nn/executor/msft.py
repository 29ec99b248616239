"""com.microsoft ops with ORT's contrib-op semantics: the fusions onnxruntime.transformers.optimizer
emits (Attention, MultiHeadAttention, SkipLayerNormalization, SkipSimplifiedLayerNormalization,
SimplifiedLayerNormalization, EmbedLayerNormalization, BiasGelu, FastGelu, Gelu, QuickGelu,
FusedMatMul, FusedConv, FusedGemm) and the ops of ORT's quantization tool (QuantizeLinear,
DequantizeLinear, MatMulIntegerToFloat, DynamicQuantizeMatMul, QLinearAdd/Mul/Sigmoid/LeakyRelu/
Concat/GlobalAveragePool, QGemm)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mfconvert.nn.executor import quant as _q
from mfconvert.nn.executor.elementwise import _gemm
from mfconvert.nn.executor.nnops import _conv
from mfconvert.nn.executor.registry import MS, ints, op


def _ln(x, gamma, beta, eps):
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).square().mean(-1, keepdim=True)
    inv = torch.rsqrt(var + eps)
    y = (x - mean) * inv * gamma
    return (y + beta if beta is not None else y), mean, inv


def _rms(x, gamma, eps):
    inv = torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    return x * inv * gamma, inv


op("Gelu", 1, MS)(lambda a, x: F.gelu(x))
op("BiasGelu", 1, MS)(lambda a, x, b: F.gelu(x + b))
op("FastGelu", 1, MS)(lambda a, x, b=None: F.gelu(x + b if b is not None else x, approximate="tanh"))
op("QuickGelu", 1, MS)(lambda a, x: x * torch.sigmoid(a.get("alpha", 1.702) * x))


@op("FusedMatMul", 1, MS)
def _fused_matmul(a, x, y):
    if a.get("transA", 0):
        x = x.transpose(-1, -2)
    if a.get("transB", 0):
        y = y.transpose(-1, -2)
    return a.get("alpha", 1.0) * torch.matmul(x, y)


@op("SkipLayerNormalization", 1, MS)
def _skip_ln(a, x, skip, gamma, beta=None, bias=None):
    s = x + skip + (bias if bias is not None else 0)
    y, mean, inv = _ln(s, gamma, beta, a.get("epsilon", 1e-12))
    return (y, mean, inv, s)[:a["_nout"]]


@op("SkipSimplifiedLayerNormalization", 1, MS)
def _skip_rms(a, x, skip, gamma, bias=None):
    s = x + skip + (bias if bias is not None else 0)
    y, inv = _rms(s, gamma, a.get("epsilon", 1e-12))
    return (y, torch.zeros_like(inv), inv, s)[:a["_nout"]]


@op("SimplifiedLayerNormalization", 1)
def _simplified_ln(a, x, scale):
    axis = a.get("axis", -1) % x.dim()
    dims = tuple(range(axis, x.dim()))
    xs = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    inv = torch.rsqrt(xs.square().mean(dims, keepdim=True) + a.get("epsilon", 1e-5))
    y = (xs * inv).to(x.dtype) * scale
    return (y, inv)[:a["_nout"]]


@op("EmbedLayerNormalization", 1, MS)
def _embed_ln(a, ids, segment_ids, word, position, segment, gamma, beta, mask=None, position_ids=None):
    B, S = ids.shape
    pos_ids = position_ids.long() if position_ids is not None else torch.arange(S).expand(B, S)
    emb = word[ids.long()] + position[pos_ids]
    if segment_ids is not None and segment is not None:
        emb = emb + segment[segment_ids.long()]
    y, _, _ = _ln(emb, gamma, beta, a.get("epsilon", 1e-12))
    if mask is not None and a.get("mask_index_type", 1):
        mask_index = mask.to(torch.int32).sum(-1).to(torch.int32)
    else:
        mask_index = torch.zeros(B, dtype=torch.int32)
    return (y, mask_index, emb)[:a["_nout"]]


def _key_mask(mask, B, S, T, filter_value, dtype):
    """Additive [B, 1 or N, S, T] bias from ORT's mask_index / key_padding_mask forms."""
    if mask is None:
        return None
    if mask.dim() == 1:
        ends = mask[:B].long().reshape(B, 1)
        keep = torch.arange(T).reshape(1, T) < ends
        if mask.shape[0] == 2 * B:
            keep = keep & (torch.arange(T).reshape(1, T) >= mask[B:].long().reshape(B, 1))
        keep = keep.reshape(B, 1, 1, T)
    elif mask.dim() == 2:
        keep = mask.reshape(B, 1, 1, T) != 0
    elif mask.dim() == 3:
        keep = mask.reshape(B, 1, S, T) != 0
    else:
        keep = mask[:, :, :S, :T] != 0
    return torch.where(keep, torch.zeros((), dtype=dtype), torch.full((), filter_value, dtype=dtype))


def _mha(q, k, v, bias, scale, causal, filter_value, past_len=0):
    """q [B, N, S, H], k/v [B, N, T, H]; softmax(q·kᵀ·scale + bias)·v → [B, S, N·Hv]."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias
    if causal:
        S, T = scores.shape[-2], scores.shape[-1]
        allowed = torch.arange(T).reshape(1, T) <= torch.arange(S).reshape(S, 1) + (T - S)
        scores = scores + torch.where(allowed, 0.0, filter_value).to(scores.dtype)
    y = torch.matmul(torch.softmax(scores, -1), v)
    return y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1)


def _split_heads(x, n):
    B, T, D = x.shape
    return x.reshape(B, T, n, D // n).transpose(1, 2)


@op("Attention", 1, MS)
def _ms_attention(a, x, weights, bias=None, mask_index=None, past=None, attention_bias=None, past_seq_len=None, *rest):
    n = a["num_heads"]
    sizes = ints(a.get("qkv_hidden_sizes") or []) or [weights.shape[1] // 3] * 3
    qkv = torch.matmul(x, weights)
    if bias is not None:
        qkv = qkv + bias
    q, k, v = torch.split(qkv, sizes, -1)
    q, k, v = _split_heads(q, n), _split_heads(k, n), _split_heads(v, n)
    if past is not None:
        k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
    B, S, T = x.shape[0], q.shape[2], k.shape[2]
    filter_value = a.get("mask_filter_value", -10000.0)
    add = _key_mask(mask_index, B, S, T, filter_value, q.dtype)
    if attention_bias is not None:
        add = attention_bias if add is None else add + attention_bias
    scale = a.get("scale") or 1.0 / math.sqrt(sizes[0] // n)
    y = _mha(q, k, v, add, scale, a.get("unidirectional", 0), filter_value)
    return (y, torch.stack([k, v]))[:a["_nout"]]


@op("MultiHeadAttention", 1, MS)
def _ms_mha(a, q, k=None, v=None, bias=None, key_padding_mask=None, attention_bias=None, past_key=None,
            past_value=None, *rest):
    n = a["num_heads"]
    B, S = q.shape[0], q.shape[1]
    if q.dim() == 5:                      # packed QKV [B, S, N, 3, H]
        q, k, v = (q[:, :, :, i].transpose(1, 2) for i in range(3))
        qb = kb = vb = None
    else:
        D = q.shape[-1]
        if k is not None and k.dim() == 5:   # packed KV [B, L, N, 2, H]
            k, v = k[:, :, :, 0].transpose(1, 2), k[:, :, :, 1].transpose(1, 2)
        if bias is not None:
            Dk = D
            qb, kb, vb = bias[:D], bias[D:D + Dk], bias[D + Dk:]
        else:
            qb = kb = vb = None
        q = _split_heads(q + (qb if qb is not None else 0), n)
        if k.dim() == 3:
            k = _split_heads(k + (kb if kb is not None else 0), n)
            v = _split_heads(v + (vb if vb is not None else 0), n)
    if past_key is not None:
        k, v = torch.cat([past_key, k], 2), torch.cat([past_value, v], 2)
    T = k.shape[2]
    filter_value = a.get("mask_filter_value", -10000.0)
    add = _key_mask(key_padding_mask, B, S, T, filter_value, q.dtype)
    if attention_bias is not None:
        add = attention_bias if add is None else add + attention_bias
    scale = a.get("scale") or 1.0 / math.sqrt(q.shape[-1])
    y = _mha(q, k, v, add, scale, a.get("unidirectional", 0), filter_value)
    return (y, k, v)[:a["_nout"]]


# ------------------------------------------------- ORT's quantization tool (com.microsoft)
op("QuantizeLinear", 1, MS)(_q._quantize)
op("DequantizeLinear", 1, MS)(_q._dequantize)


def _deq(x, scale, zero):
    v = x.to(torch.float32) if x.dtype != torch.float64 else x
    if zero is not None:
        v = v - zero.to(v.dtype)
    return v * scale.to(v.dtype)


def _qout(y, scale, zero, like):
    """Quantized as ORT's lookup tables and MlasRequantizeOutput do: rounded, then the zero point."""
    dtype = zero.dtype if zero is not None else like
    lo, hi = _q._RANGES[dtype]
    q = torch.round(y / scale.to(y.dtype)) + (zero.to(y.dtype) if zero is not None else 0)
    return q.clamp(lo, hi).to(dtype)


def _col_scale(scale, x):
    return scale.reshape(-1) if scale.numel() > 1 else scale.reshape(())


@op("MatMulIntegerToFloat", 1, MS)
def _matmul_int_to_float(a, x, w, xs, ws, xz=None, wz=None, bias=None):
    acc = _q._matmul_integer(a, x, w, xz, wz).to(torch.float32)
    out = acc * xs.reshape(()).float() * _col_scale(ws, w).float()
    return out + bias if bias is not None else out


@op("DynamicQuantizeMatMul", 1, MS)
def _dynamic_quantize_matmul(a, x, w, ws, wz=None, bias=None):
    xq, xs, xz = _q._dynamic_quantize(a, x)
    return _matmul_int_to_float(a, xq, w, xs, ws, xz, wz, bias)


def _centred(x, zero):
    v = x.to(torch.float32)
    return v - zero.to(torch.float32) if zero is not None else v


def _requant(v, zero, dtype):
    lo, hi = _q._RANGES[dtype]
    return torch.round(v + (zero.to(torch.float32) if zero is not None else 0)).clamp(lo, hi).to(dtype)


@op("QLinearAdd", 1, MS)
def _qlinear_add(a, x, xs, xz, y, ys, yz, cs, cz=None):
    """MLAS's order: (x - zx)·(sx/sc) + (y - zy)·(sy/sc) + zc in float32, rounded half to even."""
    v = _centred(x, xz) * (xs.float() / cs.float()) + _centred(y, yz) * (ys.float() / cs.float())
    return _requant(v, cz, cz.dtype if cz is not None else x.dtype)


@op("QLinearMul", 1, MS)
def _qlinear_mul(a, x, xs, xz, y, ys, yz, cs, cz=None):
    """MLAS's order: (x - zx)·(y - zy)·(sx·sy/sc) + zc in float32."""
    v = _centred(x, xz) * _centred(y, yz) * (xs.float() * ys.float() / cs.float())
    return _requant(v, cz, cz.dtype if cz is not None else x.dtype)


def _qlinear_unary(fn):
    def run(a, x, xs, xz, ys, yz=None):
        return _qout(fn(a, _deq(x, xs, xz)), ys, yz, x.dtype)
    return run


op("QLinearSigmoid", 1, MS)(_qlinear_unary(lambda a, v: torch.sigmoid(v)))
op("QLinearLeakyRelu", 1, MS)(_qlinear_unary(lambda a, v: torch.where(v >= 0, v, a.get("alpha", 0.01) * v)))
@op("QLinearGlobalAveragePool", 1, MS)
def _qlinear_global_avg_pool(a, x, xs, xz, ys, yz=None):
    """MLAS: the int sum of x − zx times one float32 multiplier sx / (sy · count)."""
    dims = tuple(range(1, x.dim() - 1)) if a.get("channels_last", 0) else tuple(range(2, x.dim()))
    total = _centred(x, xz).to(torch.float64).sum(dim=dims, keepdim=True).to(torch.float32)
    count = math.prod(x.shape[d] for d in dims)
    return _qout(total * (xs.float() / (ys.float() * count)), torch.ones(()), yz, x.dtype)


@op("QLinearConcat", 1, MS)
def _qlinear_concat(a, ys, yz, *triples):
    parts = [_deq(triples[i], triples[i + 1], triples[i + 2]) for i in range(0, len(triples), 3)]
    return _qout(torch.cat(parts, a.get("axis", 0)), ys, yz, triples[0].dtype)


@op("QGemm", 1, MS)
def _qgemm(a, x, xs, xz, w, ws, wz, c=None, ys=None, yz=None):
    """int32 accumulation (plus the int32 bias C), one float32 multiplier alpha·sx·sw(/sy), as MLAS."""
    xa = x.transpose(0, 1) if a.get("transA", 0) else x
    wa = w.transpose(0, 1) if a.get("transB", 0) else w
    acc = _q._matmul_integer(a, xa, wa, xz, wz if wz is None or wz.numel() == 1 else wz.reshape(-1))
    if c is not None:
        acc = acc + c.to(torch.int32)
    wscale = ws.float().reshape(-1) if ws.numel() > 1 else ws.float().reshape(())
    multiplier = a.get("alpha", 1.0) * xs.float().reshape(()) * wscale
    if ys is None:
        return acc.float() * multiplier
    return _qout(acc.float() * (multiplier / ys.float()), torch.ones(()), yz, x.dtype)


_FUSED_ACTIVATIONS = {
    "Relu": lambda v, p: torch.relu(v), "Tanh": lambda v, p: torch.tanh(v), "Sigmoid": lambda v, p: torch.sigmoid(v),
    "LeakyRelu": lambda v, p: torch.where(v >= 0, v, (p[0] if p else 0.01) * v),
    "Clip": lambda v, p: torch.clamp(v, p[0], p[1]), "HardSigmoid": lambda v, p: torch.clamp(p[0] * v + p[1], 0, 1),
}


def _activate(a, v):
    name = a.get("activation")
    if not name:
        return v
    if name not in _FUSED_ACTIVATIONS:
        raise ValueError(f"fused activation '{name}' is not supported by the PyTorch executor")
    return _FUSED_ACTIVATIONS[name](v, list(a.get("activation_params") or []))


@op("FusedConv", 1, MS)
def _fused_conv(a, x, w, b=None, z=None):
    y = _conv(x, w, b, a)
    return _activate(a, y + z if z is not None else y)


@op("FusedGemm", 1, MS)
def _fused_gemm(a, x, w, c=None):
    return _activate(a, _gemm(a, x, w, c))

