"""Quantization: QuantizeLinear / DequantizeLinear (per tensor, per axis, blocked),
DynamicQuantizeLinear, MatMulInteger, ConvInteger, QLinearMatMul, QLinearConv. Integer
arithmetic runs exactly in float64 (|values| < 2^53) and is cast back. For training, a
QuantizeLinear read directly by a DequantizeLinear passes its gradient straight through (STE,
zero where the value was clipped); integers reaching any other op carry none."""
from __future__ import annotations

import torch

from mfconvert.nn.executor.nnops import _conv
from mfconvert.nn.executor.registry import NARROW_UNSIGNED, op, tdtype, wide

_RANGES = {torch.uint8: (0, 255), torch.int8: (-128, 127), torch.uint16: (0, 65535), torch.int16: (-32768, 32767),
           torch.int32: (-2 ** 31, 2 ** 31 - 1)}


def _expand(v, x, axis, block):
    """Scale / zero point broadcastable to x (per tensor, per axis, or blocks along axis)."""
    if v.dim() == 0 or v.numel() == 1 and not block:
        return v.reshape(())
    axis %= x.dim()
    if not block:
        return v.reshape([-1 if i == axis else 1 for i in range(x.dim())])
    return torch.repeat_interleave(v, block, dim=axis).narrow(axis, 0, x.shape[axis])


def _quantize(a, x, scale, zero=None):
    axis, block = a.get("axis", 1), a.get("block_size", 0)
    dtype = zero.dtype if zero is not None else tdtype(a["output_dtype"]) if a.get("output_dtype") else torch.uint8
    if dtype not in _RANGES:
        raise ValueError(f"QuantizeLinear to {dtype} is not supported by the PyTorch executor")
    s = _expand(scale, x, axis, block)
    if a.get("precision"):
        p = tdtype(a["precision"])
        q = x.to(p) / s.to(p)
    else:
        q = x / s
    q = torch.round(q.to(torch.float64) if q.dtype != torch.float64 else q)
    if zero is not None:
        q = q + _expand(wide(zero), x, axis, block).to(torch.float64)
    lo, hi = _RANGES[dtype]
    inside = (q >= lo) & (q <= hi) if x.requires_grad else None
    q = q.clamp(lo, hi)
    q = q.to(torch.int64).to(dtype) if dtype in NARROW_UNSIGNED else q.to(dtype)
    if inside is not None:
        # Integers carry no gradient. For training, the integer tensor remembers the float it was
        # quantised from, and a DequantizeLinear that reads it directly passes the gradient
        # straight through (below): the STE of quantisation-aware training.
        q._mf_ste = (x, s, inside)
    return q


def _dequantize(a, x, scale, zero=None):
    axis, block = a.get("axis", 1), a.get("block_size", 0)
    xf = wide(x).to(torch.float64) if x.dtype != torch.int32 else x.to(torch.float64)
    if zero is not None:
        xf = xf - _expand(wide(zero), x, axis, block).to(torch.float64)
    out_dtype = tdtype(a["output_dtype"]) if a.get("output_dtype") else scale.dtype
    s = _expand(scale, x, axis, block)
    y = (xf.to(scale.dtype) * s).to(out_dtype)
    ste = getattr(x, "_mf_ste", None)
    if ste is not None:
        # Straight-through estimator of a QuantizeLinear → DequantizeLinear pair (fake
        # quantisation): d y / d source = (this scale / the quantiser's scale) where the source
        # was inside the integer range, 0 where it was clipped. The added term is exactly zero in
        # value, so the forward result is the executor's (and ORT's) dequantised value unchanged.
        source, q_scale, inside = ste
        ratio = (s.to(source.dtype) / q_scale.to(source.dtype)).detach()
        y = y + ((source - source.detach()) * ratio * inside.to(source.dtype)).to(out_dtype)
    return y


op("QuantizeLinear", 10)(_quantize)
op("DequantizeLinear", 10)(_dequantize)


@op("DynamicQuantizeLinear", 11)
def _dynamic_quantize(a, x):
    hi = torch.clamp(x.max(), min=0).to(torch.float32)
    lo = torch.clamp(x.min(), max=0).to(torch.float32)
    scale = torch.where(hi == lo, torch.tensor(1.0), hi - lo) / 255.0
    zp = torch.round(torch.clamp(0 - lo / scale, 0, 255))
    y = torch.clamp(torch.round(x / scale) + zp, 0, 255)
    return y.to(torch.uint8), scale.to(x.dtype), zp.to(torch.uint8)


def _centered(v, zero, per_row_axis=None):
    v = wide(v).to(torch.float64)
    if zero is None:
        return v
    z = wide(zero).to(torch.float64)
    if z.dim() == 1 and z.numel() > 1 and per_row_axis is not None:
        shape = [1] * v.dim()
        shape[per_row_axis] = -1
        z = z.reshape(shape)
    return v - z


@op("MatMulInteger", 10)
def _matmul_integer(a, x, w, x_zero=None, w_zero=None):
    xa = _centered(x, x_zero, per_row_axis=x.dim() - 2 if x.dim() >= 2 else None)
    wa = _centered(w, w_zero, per_row_axis=w.dim() - 1)
    return torch.matmul(xa, wa).to(torch.int32)


@op("ConvInteger", 10)
def _conv_integer(a, x, w, x_zero=None, w_zero=None):
    return _conv(_centered(x, x_zero), _centered(w, w_zero, per_row_axis=0), None, a).round().to(torch.int32)


def _requantize(acc, scale, y_scale, y_zero, dtype):
    out = acc * (scale / y_scale.to(torch.float64))
    if y_zero is not None:
        out = out + wide(y_zero).to(torch.float64)
        dtype = y_zero.dtype
    lo, hi = _RANGES[dtype]
    return torch.round(out).clamp(lo, hi).to(dtype)


@op("QLinearMatMul", 10)
def _qlinear_matmul(a, x, xs, xz, w, ws, wz, ys, yz):
    acc = torch.matmul(_centered(x, xz, x.dim() - 2), _centered(w, wz, w.dim() - 1))
    xs64, ws64 = xs.to(torch.float64), ws.to(torch.float64)
    if xs64.numel() > 1:
        xs64 = xs64.reshape(-1, 1)
    return _requantize(acc, xs64 * ws64, ys, yz, x.dtype)


@op("QLinearConv", 10)
def _qlinear_conv(a, x, xs, xz, w, ws, wz, ys, yz, b=None):
    acc = _conv(_centered(x, xz), _centered(w, wz, per_row_axis=0),
                b.to(torch.float64) if b is not None else None, a).round()
    ws64 = ws.to(torch.float64)
    if ws64.numel() > 1:
        ws64 = ws64.reshape(1, -1, *[1] * (x.dim() - 2))
    return _requantize(acc, xs.to(torch.float64) * ws64, ys, yz, x.dtype)
