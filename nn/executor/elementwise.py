"""Elementwise math, comparisons, logic, bit ops and activations."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mfconvert.nn.executor.registry import NARROW_UNSIGNED, op, wide


def _back(r, dtype):
    return r.to(dtype) if dtype in NARROW_UNSIGNED and r.dtype != torch.bool else r


def _binary(fn):
    def run(a, x, y):
        return _back(fn(wide(x), wide(y)), x.dtype)
    return run


for _name, _fn in {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Equal": torch.eq, "Less": torch.lt,
                   "LessOrEqual": torch.le, "Greater": torch.gt, "GreaterOrEqual": torch.ge,
                   "And": torch.logical_and, "Or": torch.logical_or, "Xor": torch.logical_xor,
                   "BitwiseAnd": torch.bitwise_and, "BitwiseOr": torch.bitwise_or,
                   "BitwiseXor": torch.bitwise_xor}.items():
    op(_name, 7)(_binary(_fn))


@op("Add Sub Mul Div", 1)
def _legacy_arith(a, x, y):
    """Opset < 7: `broadcast` / `axis` attributes align y to x from `axis` on."""
    if a.get("broadcast") and "axis" in a and y.dim() and y.dim() < x.dim():
        axis = a["axis"] % x.dim()
        y = y.reshape(*y.shape, *[1] * (x.dim() - axis - y.dim()))
    return {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": _divide}[a["_op"]](x, y)


def _divide(x, y):
    if x.is_floating_point() or x.is_complex():
        return x / y
    return _back(torch.div(wide(x), wide(y), rounding_mode="trunc"), x.dtype)


op("Div", 7)(lambda a, x, y: _divide(x, y))


@op("Pow", 1)
def _pow(a, x, y):
    if x.is_floating_point():
        return torch.pow(x, y.to(x.dtype))
    if y.is_floating_point():
        return torch.pow(x.to(torch.float64), y.to(torch.float64)).to(x.dtype)
    return _back(torch.pow(wide(x), wide(y)), x.dtype)


@op("Mod", 10)
def _mod(a, x, y):
    if a["fmod"]:
        return _back(torch.fmod(wide(x), wide(y)), x.dtype)
    return _back(torch.remainder(wide(x), wide(y)), x.dtype)


@op("BitShift", 11)
def _bitshift(a, x, y):
    bits = torch.iinfo(x.dtype).bits if x.dtype != torch.uint64 else 64
    xw, yw = wide(x), wide(y)
    if a["direction"] == "LEFT":
        r = torch.bitwise_left_shift(xw, yw)
        if bits < 64:
            r = r & ((1 << bits) - 1)
    else:
        r = torch.bitwise_right_shift(xw, yw)
    return r.to(x.dtype)


def _fold(fn, xs):
    dtype = xs[0].dtype
    out = wide(xs[0])
    for x in xs[1:]:
        out = fn(out, wide(x))
    return _back(out, dtype)


op("Max", 1)(lambda a, *xs: _fold(torch.maximum, xs))
op("Min", 1)(lambda a, *xs: _fold(torch.minimum, xs))
op("Sum", 1)(lambda a, *xs: _fold(torch.add, xs))
op("Mean", 1)(lambda a, *xs: _fold(torch.add, xs) / len(xs))


def _unary(names, fn, since=1):
    for name in names.split():
        op(name, since)(lambda a, x, _fn=fn: _back(_fn(wide(x)), x.dtype))


_unary("Neg", torch.neg)
_unary("Abs", torch.abs)
_unary("Sign", torch.sign)
_unary("Not", torch.logical_not)
_unary("BitwiseNot", torch.bitwise_not)
for _name, _fn in {"Sqrt": torch.sqrt, "Exp": torch.exp, "Log": torch.log, "Reciprocal": torch.reciprocal,
                   "Erf": torch.erf, "Tanh": torch.tanh, "Sigmoid": torch.sigmoid, "Floor": torch.floor,
                   "Ceil": torch.ceil, "Round": torch.round, "Sin": torch.sin, "Cos": torch.cos, "Tan": torch.tan,
                   "Asin": torch.asin, "Acos": torch.acos, "Atan": torch.atan, "Sinh": torch.sinh,
                   "Cosh": torch.cosh, "Asinh": torch.asinh, "Acosh": torch.acosh, "Atanh": torch.atanh,
                   "Softsign": F.softsign, "Mish": F.mish, "IsNaN": torch.isnan}.items():
    op(_name)(lambda a, x, _fn=_fn: _fn(x))


@op("Relu")
def _relu(a, x):
    return torch.relu(x) if x.dtype != torch.int8 else torch.clamp(x, min=0)


@op("Identity")
def _identity(a, x):
    return x


@op("IsInf", 10)
def _isinf(a, x):
    out = torch.zeros_like(x, dtype=torch.bool)
    if a["detect_positive"]:
        out = out | torch.isposinf(x)
    if a["detect_negative"]:
        out = out | torch.isneginf(x)
    return out


@op("Softplus")
def _softplus(a, x):
    return F.softplus(x)   # ln(exp(x) + 1), x itself above 20 (2e-9 off), stable in float16


op("Elu")(lambda a, x: torch.where(x > 0, x, a["alpha"] * torch.expm1(torch.clamp(x, max=0))))
op("Selu")(lambda a, x: a["gamma"] * torch.where(x > 0, x, a["alpha"] * torch.expm1(torch.clamp(x, max=0))))
op("Celu", 12)(lambda a, x: torch.clamp(x, min=0) + torch.clamp(a["alpha"] * torch.expm1(x / a["alpha"]), max=0))
op("ThresholdedRelu", 10)(lambda a, x: torch.where(x > a["alpha"], x, torch.zeros_like(x)))
op("LeakyRelu")(lambda a, x: torch.where(x >= 0, x, x * a["alpha"]))
op("HardSigmoid")(lambda a, x: torch.clamp(a["alpha"] * x + a["beta"], 0, 1))
op("HardSwish", 14)(lambda a, x: x * torch.clamp(x / 6 + 0.5, 0, 1))
op("Swish", 24)(lambda a, x: x * torch.sigmoid(a["alpha"] * x))
op("PRelu")(lambda a, x, slope: torch.where(x < 0, x * slope, x))


@op("Shrink", 9)
def _shrink(a, x):
    lambd, bias = a["lambd"], a["bias"]
    zero = torch.zeros_like(x)
    return torch.where(x < -lambd, x + bias, torch.where(x > lambd, x - bias, zero)).to(x.dtype)


@op("Gelu", 20)
def _gelu(a, x):
    return F.gelu(x, approximate="tanh" if a.get("approximate", "none") == "tanh" else "none")


def _clamp(x, lo, hi):
    xw = wide(x)
    if lo is not None:
        xw = torch.maximum(xw, torch.as_tensor(lo, dtype=xw.dtype))
    if hi is not None:
        xw = torch.minimum(xw, torch.as_tensor(hi, dtype=xw.dtype))
    return _back(xw, x.dtype)


op("Clip", 1)(lambda a, x: _clamp(x, a.get("min"), a.get("max")))
op("Clip", 11)(lambda a, x, lo=None, hi=None: _clamp(x, lo, hi))


@op("Where", 9)
def _where(a, c, x, y):
    return _back(torch.where(c.to(torch.bool), wide(x), wide(y)), x.dtype)


def _softmax_fn(kind):
    def legacy(a, x):
        """Opset < 13: the input coerced to 2-D at `axis`."""
        axis = a["axis"] % x.dim() if x.dim() else 0
        flat = x.reshape(math.prod(x.shape[:axis]), -1)
        return kind(flat, 1).reshape(x.shape)

    def modern(a, x):
        return kind(x, a["axis"])
    return legacy, modern


def _hardmax(x, axis):
    idx = torch.argmax(x, dim=axis, keepdim=True)
    return torch.zeros_like(x).scatter(axis, idx, 1)


for _name, _kind in {"Softmax": lambda x, d: torch.softmax(x, d),
                     "LogSoftmax": lambda x, d: torch.log_softmax(x, d), "Hardmax": _hardmax}.items():
    _legacy, _modern = _softmax_fn(_kind)
    op(_name, 1)(_legacy)
    op(_name, 13)(_modern)


@op("MatMul")
def _matmul(a, x, y):
    if not x.is_floating_point():
        return torch.matmul(x.to(torch.float64), y.to(torch.float64)).round().to(x.dtype) \
            if x.dtype not in (torch.int64, torch.int32) else torch.matmul(x.long(), y.long()).to(x.dtype)
    return torch.matmul(x, y)


@op("Gemm")
def _gemm(a, x, y, c=None):
    x = x.transpose(0, 1) if a.get("transA", 0) else x
    y = y.transpose(0, 1) if a.get("transB", 0) else y
    out = _matmul(a, x, y)
    if a.get("alpha", 1.0) != 1.0:
        out = a["alpha"] * out
    if c is not None:
        out = out + (c if a.get("beta", 1.0) == 1.0 else a["beta"] * c)
    return out.to(x.dtype)
