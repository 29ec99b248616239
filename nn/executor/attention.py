"""Attention (opsets 23–25) and RotaryEmbedding (23), ported from onnx.reference to torch."""
from __future__ import annotations

import math

import torch

from mfconvert.nn.executor.registry import op, tdtype


def _bias_from_bool(mask, dtype):
    return torch.where(mask, torch.zeros((), dtype=dtype), torch.full((), -math.inf, dtype=dtype))


def _window_or_causal(q_len, kv_len, offset, left, right, causal):
    i = torch.arange(q_len).reshape(q_len, 1)
    j = torch.arange(kv_len).reshape(1, kv_len)
    if offset.dim():
        i = i + offset.reshape(-1, 1, 1)
    else:
        i = i + offset
    allowed = torch.ones(torch.broadcast_shapes(i.shape, j.shape), dtype=torch.bool)
    if causal:
        allowed = allowed & (j <= i)
    if left is not None and left >= 0:
        allowed = allowed & (i - j <= left)
    if right is not None and right >= 0:
        allowed = allowed & (j - i <= right)
    return allowed if not offset.dim() else allowed.unsqueeze(1)


@op("Attention", 23)
def _attention(a, q, k, v, mask=None, past_key=None, past_value=None, nonpad_kv_seqlen=None):
    three_d = q.dim() == 3
    B = q.shape[0]
    if three_d:
        qh, kvh = a["q_num_heads"], a["kv_num_heads"]
        q = q.reshape(B, q.shape[1], qh, -1).transpose(1, 2)
        k = k.reshape(B, k.shape[1], kvh, -1).transpose(1, 2)
        v = v.reshape(B, v.shape[1], kvh, -1).transpose(1, 2)
    scale = a.get("scale")
    if scale is None:
        scale = 1 / math.sqrt(q.shape[3])
    s = torch.tensor(math.sqrt(scale), dtype=q.dtype)
    present_k = torch.cat([past_key, k], 2) if past_key is not None else k
    present_v = torch.cat([past_value, v], 2) if past_value is not None else v
    k, v = present_k, present_v
    q_len, kv_len = q.shape[2], k.shape[2]
    bias = torch.zeros(q_len, kv_len, dtype=q.dtype)
    if mask is not None and mask.shape[-1] < kv_len:
        pad = kv_len - mask.shape[-1]
        fill = torch.zeros if mask.dtype == torch.bool else (lambda *s, dtype: torch.full(s, -math.inf, dtype=dtype))
        mask = torch.cat([mask, fill(*mask.shape[:-1], pad, dtype=mask.dtype)], -1)
    left, right = a.get("left_window_size", -1), a.get("right_window_size", -1)
    windowed = (left is not None and left >= 0) or (right is not None and right >= 0)
    if past_key is None and nonpad_kv_seqlen is not None:
        offset = nonpad_kv_seqlen.reshape(-1).long() - q_len
    else:
        offset = torch.tensor(past_key.shape[2] if past_key is not None else 0)
    if mask is not None and mask.dtype == torch.bool:
        mask = _bias_from_bool(mask, q.dtype)
    if mask is not None:
        bias = bias + mask.to(q.dtype)
    if a.get("is_causal", 0):
        bias = bias + _bias_from_bool(_window_or_causal(q_len, kv_len, offset, None, None, True), q.dtype)
    if windowed:
        bias = bias + _bias_from_bool(_window_or_causal(q_len, kv_len, offset, left, right, False), q.dtype)
    if nonpad_kv_seqlen is not None:
        keep = torch.arange(kv_len).reshape(1, kv_len) < nonpad_kv_seqlen.reshape(-1, 1)
        bias = bias + _bias_from_bool(keep.reshape(B, 1, 1, kv_len), q.dtype)
    qh, kh = q.shape[1], k.shape[1]
    if qh != kh and qh % kh == 0:
        k = k.repeat_interleave(qh // kh, 1)
        v = v.repeat_interleave(qh // kh, 1)
    qk = torch.matmul(q * s, (k * s).transpose(-1, -2))
    softcap = a.get("softcap", 0.0)
    if softcap and softcap > 0:
        qk = torch.tanh(qk / softcap) * softcap
    with_bias = qk + bias
    mode = a.get("qk_matmul_output_mode", 0)
    qk_out = with_bias if mode == 2 else qk
    precision = a.get("softmax_precision")
    logits = with_bias.to(tdtype(precision)) if precision else with_bias
    row_max = logits.amax(-1, keepdim=True)
    safe = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)
    e = torch.exp(logits - safe)
    total = e.sum(-1, keepdim=True)
    probs = e / torch.where(total == 0, torch.ones_like(total), total)
    dead = torch.isneginf(bias.amax(-1, keepdim=True))
    probs = torch.where(dead, torch.zeros_like(probs), probs)
    if mode == 3:
        qk_out = probs
    probs = probs.to(q.dtype)
    y = torch.matmul(probs, v)
    if three_d:
        y = y.transpose(1, 2).reshape(B, y.shape[2], -1)
    return (y, present_k, present_v, qk_out.to(q.dtype))[:a["_nout"]]


@op("RotaryEmbedding", 23)
def _rotary(a, x, cos, sin, position_ids=None):
    three_d = x.dim() == 3
    if x.dim() == 4:
        x = x.transpose(1, 2)          # [B, S, H, D]
    else:
        x = x.reshape(x.shape[0], x.shape[1], a.get("num_heads") or 0, -1) if a.get("num_heads") else x
        if not a.get("num_heads"):
            raise ValueError("RotaryEmbedding on 3-D input needs num_heads")
    if position_ids is not None:
        cos, sin = cos[position_ids.long()], sin[position_ids.long()]
    D = x.shape[-1]
    rot = a.get("rotary_embedding_dim", 0) or D
    xr, xp = x[..., :rot], x[..., rot:]
    cos, sin = cos[..., :rot // 2].unsqueeze(2), sin[..., :rot // 2].unsqueeze(2)
    if a.get("interleaved", 0):
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
    else:
        x1, x2 = xr[..., :rot // 2], xr[..., rot // 2:]
    r1 = cos * x1 - sin * x2
    r2 = sin * x1 + cos * x2
    if a.get("interleaved", 0):
        out = torch.stack([r1, r2], -1).reshape(xr.shape)
    else:
        out = torch.cat([r1, r2], -1)
    out = torch.cat([out, xp], -1)
    if three_d:
        return out.reshape(out.shape[0], out.shape[1], -1)
    return out.transpose(1, 2)


def _heads(x, n):
    b, t, hd = x.shape
    return x.reshape(b, t, n, hd // n).transpose(1, 2)


@op("LinearAttention", 1)
def _linear_attention(a, q, k, v, past=None, decay=None, beta=None):
    rule = a.get("update_rule", "gated_delta")
    qh, kvh = a["q_num_heads"], a["kv_num_heads"]
    gating, delta = rule in ("gated", "gated_delta"), rule in ("delta", "gated_delta")
    b, t, _ = q.shape
    dk, dv = q.shape[-1] // qh, v.shape[-1] // kvh
    q4, k4, v4 = (_heads(x, n).float() for x, n in ((q, qh), (k, kvh), (v, kvh)))
    if decay is not None:
        d4 = (decay.reshape(b, t, kvh, 1).transpose(1, 2) if decay.shape[-1] == kvh else _heads(decay, kvh)).float()
    if beta is not None:
        b4 = beta.reshape(b, t, beta.shape[-1], 1).transpose(1, 2).float()
    state = past.float() if past is not None else torch.zeros(b, kvh, dk, dv)
    scale = a.get("scale") or 1.0 / math.sqrt(dk)
    outs = []
    for i in range(t):
        vt = v4[:, :, i]
        kt = k4[:, :, i]
        if gating:
            state = state * torch.exp(d4[:, :, i]).unsqueeze(-1)
        if delta:
            vt = b4[:, :, i] * (vt - torch.einsum("bhdm,bhd->bhm", state, kt))
        state = state + kt.unsqueeze(-1) * vt.unsqueeze(-2)
        read = state.repeat_interleave(qh // kvh, 1) if qh != kvh else state
        outs.append(scale * torch.einsum("bhd,bhdm->bhm", q4[:, :, i], read))
    y = torch.stack(outs, 2).transpose(1, 2).reshape(b, t, qh * dv).to(q.dtype)
    return y, state.to(past.dtype if past is not None else q.dtype)


@op("FlexAttention", 1, "ai.onnx.preview")
def _flex_attention(a, q, k, v):
    hq, hkv = q.shape[1], k.shape[1]
    if hq != hkv:
        k, v = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
    scale = a.get("scale") or 1.0 / math.sqrt(q.shape[-1])
    s = torch.tensor(math.sqrt(scale), dtype=torch.float32).to(q.dtype)
    scores = torch.matmul(q * s, (k * s).transpose(-1, -2))
    precision = a.get("softmax_precision")
    low = q.dtype in (torch.float16, torch.bfloat16)
    dtype = tdtype(precision) if precision else torch.float32 if low else q.dtype
    scores = scores.to(dtype)
    if "score_mod" in a.get("_branches", {}):
        scores = a["_call"]("score_mod", [scores])[0].to(dtype)
    probs = torch.softmax(scores, -1)
    if "prob_mod" in a.get("_branches", {}):
        probs = a["_call"]("prob_mod", [probs])[0].to(dtype)
    return torch.matmul(probs, v.to(dtype)).to(v.dtype)
