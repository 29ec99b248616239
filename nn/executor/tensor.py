"""Shape, indexing, casting, reductions and the other tensor-manipulation ops. Shape arithmetic
(shapes, axes, indices that set sizes) runs eagerly on Python ints; data flows through torch ops."""
from __future__ import annotations

import math
import warnings

import numpy as np
import onnx
import torch

from mfconvert.nn.executor.registry import NARROW_UNSIGNED, ints, op, scalar, tdtype, to_tensor, wide


# ------------------------------------------------------------------------ shape and layout
def _reshape(x, dims, allowzero):
    if not allowzero:
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


op("Reshape", 1)(lambda a, x: _reshape(x, a["shape"], 0))
op("Reshape", 5)(lambda a, x, shape: _reshape(x, ints(shape), a.get("allowzero", 0)))


@op("Flatten")
def _flatten(a, x):
    axis = a["axis"] + x.dim() if a["axis"] < 0 else a["axis"]
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@op("Transpose")
def _transpose(a, x):
    perm = a.get("perm") or list(reversed(range(x.dim())))
    return x.permute(perm)


def _unsqueeze(x, axes):
    rank = x.dim() + len(axes)
    for axis in sorted(v % rank for v in axes):
        x = x.unsqueeze(axis)
    return x


def _squeeze(x, axes):
    if not axes:
        return x.reshape([d for d in x.shape if d != 1])
    axes = {v % x.dim() for v in axes}
    return x.reshape([d for i, d in enumerate(x.shape) if i not in axes])


op("Unsqueeze", 1)(lambda a, x: _unsqueeze(x, a["axes"]))
op("Unsqueeze", 13)(lambda a, x, axes: _unsqueeze(x, ints(axes)))
op("Squeeze", 1)(lambda a, x: _squeeze(x, a.get("axes")))
op("Squeeze", 13)(lambda a, x, axes=None: _squeeze(x, ints(axes)))


@op("Concat")
def _concat(a, *xs):
    xs = [x for x in xs if x is not None]
    dtype = xs[0].dtype
    out = torch.cat([wide(x) for x in xs], dim=a.get("axis", 1))
    return out.to(dtype) if dtype in NARROW_UNSIGNED else out


def _split(a, x, sizes):
    axis = a.get("axis", 0) % x.dim()
    n = x.shape[axis]
    if not sizes:
        parts = a.get("num_outputs") or a["_nout"]
        if a.get("num_outputs"):
            size = math.ceil(n / parts)
            sizes = [size] * (n // size) + ([n % size] if n % size else [])
        else:
            sizes = [n // parts] * parts
    return tuple(torch.split(x, list(sizes), dim=axis))


op("Split", 1)(lambda a, x, split=None: _split(a, x, ints(split) if split is not None else a.get("split")))
op("Split", 2)(lambda a, x: _split(a, x, a.get("split")))
op("Split", 13)(lambda a, x, split=None: _split(a, x, ints(split)))


def _slice(x, starts, ends, axes, steps):
    axes = axes or list(range(len(starts)))
    steps = steps or [1] * len(starts)
    index = [slice(None)] * x.dim()
    for s, e, axis, st in zip(starts, ends, axes, steps):
        axis %= x.dim()
        n = x.shape[axis]
        s = s + n if s < 0 else s
        e = e + n if e < 0 else e
        if st > 0:
            index[axis] = slice(max(0, min(n, s)), max(0, min(n, e)), st)
        else:
            s, e = max(-1, min(n - 1, s)), max(-1, min(n - 1, e))
            picks = list(range(s, e, st))
            x = x.index_select(axis, torch.tensor(picks, dtype=torch.long))
    return x[tuple(index)]


op("Slice", 1)(lambda a, x: _slice(x, a["starts"], a["ends"], a.get("axes"), None))
def _slice_inputs(a, x, starts, ends, axes=None, steps=None):
    return _slice(x, ints(starts), ints(ends), ints(axes) if axes is not None else None,
                  ints(steps) if steps is not None else None)


op("Slice", 10)(_slice_inputs)
op("DynamicSlice")(_slice_inputs)   # experimental (opsets ≤ 9): Slice-10 without steps


@op("Shape", 1)
def _shape(a, x):
    dims = list(x.shape)
    start, end = a.get("start", 0), a.get("end")
    return torch.tensor(dims[slice(start, end)], dtype=torch.int64)


op("Size")(lambda a, x: torch.tensor(x.numel(), dtype=torch.int64))


@op("Expand", 8)
def _expand(a, x, shape):
    full = torch.broadcast_shapes(tuple(x.shape), tuple(ints(shape)))
    return x.expand(full).clone() if x.dtype not in NARROW_UNSIGNED else wide(x).expand(full).to(x.dtype)


@op("Tile", 6)
def _tile(a, x, repeats):
    return wide(x).repeat(ints(repeats)).to(x.dtype) if x.dim() else x.clone()


def _pad_axis(x, axis, before, after, mode, value):
    n = x.shape[axis]
    if before < 0:
        x, n, before = x.narrow(axis, -before, n + before), n + before, 0
    if after < 0:
        x, n, after = x.narrow(axis, 0, n + after), n + after, 0
    if before == 0 and after == 0:
        return x
    if mode == "constant":
        shape = list(x.shape)
        parts = []
        for width in (before, after):
            shape[axis] = width
            parts.append(torch.full(shape, value, dtype=x.dtype) if width else None)
        return torch.cat([p for p in (parts[0], x, parts[1]) if p is not None], dim=axis)
    positions = np.arange(-before, n + after)
    if mode == "edge":
        idx = np.clip(positions, 0, n - 1)
    elif mode == "wrap":
        idx = positions % n
    else:   # reflect
        period = 2 * (n - 1) if n > 1 else 1
        idx = np.abs(positions) % period
        idx = np.where(idx >= n, period - idx, idx)
    return x.index_select(axis, torch.from_numpy(idx.astype(np.int64)))


def _pad(x, pads, mode, value, axes=None):
    axes = [v % x.dim() for v in axes] if axes else list(range(x.dim()))
    k = len(axes)
    dtype = x.dtype
    x = wide(x)
    if value is None:
        value = 0
    value = value.item() if isinstance(value, torch.Tensor) else value
    if not x.is_floating_point() and dtype != torch.bool:
        value = int(value)
    for i, axis in enumerate(axes):
        x = _pad_axis(x, axis, pads[i], pads[i + k], mode, value)
    return x.to(dtype)


op("Pad", 2)(lambda a, x: _pad(x, a.get("pads") or a.get("paddings"), a["mode"], a.get("value", 0.0)))
op("Pad", 11)(lambda a, x, pads, value=None, axes=None: _pad(
    x, ints(pads), a["mode"], value.reshape(-1)[0] if value is not None and value.numel() else 0,
    ints(axes) if axes is not None else None))


@op("DepthToSpace")
def _depth_to_space(a, x):
    b, c, h, w = x.shape
    s = a["blocksize"]
    if a.get("mode", "DCR") == "DCR":
        y = x.reshape(b, s, s, c // (s * s), h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(b, c // (s * s), s, s, h, w).permute(0, 1, 4, 2, 5, 3)
    return y.reshape(b, c // (s * s), h * s, w * s)


@op("SpaceToDepth")
def _space_to_depth(a, x):
    b, c, h, w = x.shape
    s = a["blocksize"]
    y = x.reshape(b, c, h // s, s, w // s, s)
    y = y.permute(0, 1, 3, 5, 2, 4) if a.get("mode", "DCR") == "CRD" else y.permute(0, 3, 5, 1, 2, 4)
    return y.reshape(b, c * s * s, h // s, w // s)


# ------------------------------------------------------------------------------ indexing
def _wrap(index, n):
    index = index.long()
    return torch.where(index < 0, index + n, index)


@op("Gather")
def _gather(a, x, index):
    axis = a["axis"] % x.dim()
    idx = _wrap(index, x.shape[axis])
    out = torch.index_select(wide(x), axis, idx.reshape(-1)).to(x.dtype)
    return out.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1:]))


@op("GatherElements", 11)
def _gather_elements(a, x, index):
    axis = a["axis"] % x.dim()
    return torch.gather(wide(x), axis, _wrap(index, x.shape[axis])).to(x.dtype)


@op("GatherND", 11)
def _gather_nd(a, data, indices):
    b = a.get("batch_dims", 0)
    batch = data.shape[:b]
    nb = math.prod(batch)
    k = indices.shape[-1]
    d = data.reshape(nb, *data.shape[b:])
    idx = indices.reshape(nb, -1, k).long()
    idx = torch.where(idx < 0, idx + torch.tensor(d.shape[1:k + 1]), idx)
    rows = torch.arange(nb).reshape(nb, 1).expand(nb, idx.shape[1])
    out = d[(rows, *[idx[..., i] for i in range(k)])]
    return out.reshape(*batch, *indices.shape[b:-1], *data.shape[b + k:])


def _scatter_nd(data, indices, updates, reduction):
    k = indices.shape[-1]
    inner = data.shape[k:]
    flat = data.reshape(math.prod(data.shape[:k]), *inner)
    idx = indices.reshape(-1, k).long()
    dims = torch.tensor(data.shape[:k])
    idx = torch.where(idx < 0, idx + dims, idx)
    strides = torch.tensor([math.prod(data.shape[i + 1:k]) for i in range(k)], dtype=torch.long)
    lin = (idx * strides).sum(-1)
    upd = updates.reshape(-1, *inner).to(flat.dtype)
    if reduction == "none":
        out = flat.index_copy(0, lin, upd)
    elif reduction == "add":
        out = flat.index_add(0, lin, upd)
    else:
        with warnings.catch_warnings():   # index_reduce is "beta" in torch 2.x; its semantics are the op's
            warnings.simplefilter("ignore", UserWarning)
            out = flat.index_reduce(0, lin, upd, {"mul": "prod", "max": "amax", "min": "amin"}[reduction])
    return out.reshape(data.shape)


op("ScatterND", 11)(lambda a, data, indices, updates: _back(
    _scatter_nd(wide(data), indices, wide(updates), a.get("reduction", "none")), data.dtype))


def _scatter_elements(a, data, indices, updates):
    axis = a.get("axis", 0) % data.dim()
    idx = _wrap(indices, data.shape[axis])
    red = a.get("reduction", "none")
    dw, uw = wide(data), wide(updates)
    if red == "none":
        out = dw.scatter(axis, idx, uw)
    else:
        out = dw.scatter_reduce(axis, idx, uw, {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}[red])
    return out.to(data.dtype)


op("ScatterElements Scatter", 9)(_scatter_elements)


def _back(x, dtype):
    return x.to(dtype)


@op("Compress", 9)
def _compress(a, x, condition):
    axis = a.get("axis")
    if axis is None:
        x, axis = x.reshape(-1), 0
    axis %= x.dim()
    keep = condition.reshape(-1).to(torch.bool)[: x.shape[axis]]
    return torch.index_select(x, axis, keep.nonzero().reshape(-1))


@op("NonZero", 9)
def _nonzero(a, x):
    if x.dim() == 0:
        return torch.zeros((0, int(bool(x.item()))), dtype=torch.int64)
    return torch.nonzero(wide(x)).T.contiguous()


@op("TopK", 1)
def _topk(a, x, k=None):
    k = scalar(k) if k is not None else a["k"]
    axis = a.get("axis", -1)
    largest = a.get("largest", 1)
    order = torch.sort(wide(x) if x.dtype in NARROW_UNSIGNED else x, dim=axis, descending=bool(largest), stable=True)[1]
    idx = order.narrow(axis, 0, int(k))
    return torch.gather(wide(x), axis, idx).to(x.dtype), idx


@op("Unique", 11)
def _unique(a, x):
    axis = a.get("axis")
    xn = x.detach().numpy() if x.dtype != torch.bfloat16 else x.detach().float().numpy()
    if axis is None:
        flat = x.reshape(-1)
        _, first, inverse, counts = np.unique(xn.reshape(-1), return_index=True, return_inverse=True,
                                              return_counts=True)
    else:
        axis %= x.dim()
        flat = x
        _, first, inverse, counts = np.unique(xn, return_index=True, return_inverse=True, return_counts=True, axis=axis)
    inverse = inverse.reshape(-1)
    if not a.get("sorted", 1):
        order = np.argsort(first, kind="stable")
        first, counts = first[order], counts[order]
        inverse = np.argsort(order)[inverse]
    y = flat.index_select(0 if axis is None else axis, torch.from_numpy(first.astype(np.int64)))
    as_t = lambda v: torch.from_numpy(np.asarray(v, dtype=np.int64))
    return y, as_t(first), as_t(inverse), as_t(counts)


def _cumulative(fn):
    def run(a, x, axis):
        axis = int(scalar(axis)) % x.dim()
        y = wide(x)
        if a["reverse"]:
            y = y.flip(axis)
        out = fn(y, axis)
        if a["exclusive"]:
            n = out.shape[axis]
            ident = torch.full_like(out.narrow(axis, 0, 1), 0 if fn is torch.cumsum else 1)
            out = torch.cat([ident, out.narrow(axis, 0, n - 1)], dim=axis) if n else out
        if a["reverse"]:
            out = out.flip(axis)
        return out.to(x.dtype)
    return run


op("CumSum", 11)(_cumulative(torch.cumsum))
op("CumProd", 26)(_cumulative(torch.cumprod))


@op("OneHot", 9)
def _one_hot(a, indices, depth, values):
    depth = int(scalar(depth))
    idx = indices.to(torch.float64).floor().long() if indices.is_floating_point() else wide(indices).long()
    idx = torch.where(idx < 0, idx + depth, idx)
    axis = a.get("axis", -1)
    axis = axis % (idx.dim() + 1)
    classes = torch.arange(depth).reshape([depth] + [1] * (idx.dim() - axis))
    hot = idx.unsqueeze(axis) == classes
    off, on = values.reshape(-1)[0], values.reshape(-1)[1]
    return torch.where(hot, on, off)


@op("Trilu", 14)
def _trilu(a, x, k=None):
    k = int(scalar(k)) if k is not None else 0
    n, m = x.shape[-2], x.shape[-1]
    ones = torch.ones(n, m, dtype=torch.bool)
    mask = ones.triu(k) if a.get("upper", 1) else ones.tril(k)
    return torch.where(mask, wide(x), torch.zeros((), dtype=wide(x).dtype)).to(x.dtype)


@op("EyeLike", 9)
def _eye_like(a, x):
    dtype = tdtype(a["dtype"]) if a.get("dtype") is not None else x.dtype
    n, m = x.shape
    i = torch.arange(n).reshape(n, 1)
    j = torch.arange(m).reshape(1, m)
    return (j - i == a.get("k", 0)).to(dtype)


@op("ReverseSequence", 10)
def _reverse_sequence(a, x, lengths):
    batch_axis, time_axis = a.get("batch_axis", 1), a.get("time_axis", 0)
    out = x.clone()
    for b, n in enumerate(ints(lengths)):
        src = x.select(batch_axis, b)
        t = time_axis if time_axis < batch_axis else time_axis - 1
        rev = torch.cat([src.narrow(t, 0, n).flip(t), src.narrow(t, n, src.shape[t] - n)], dim=t)
        out.select(batch_axis, b).copy_(rev)
    return out


@op("Einsum", 12)
def _einsum(a, *xs):
    eq = a["equation"].replace(" ", "")
    dtype = xs[0].dtype
    if not dtype.is_floating_point:
        return torch.einsum(eq, *[x.to(torch.float64) for x in xs]).round().to(dtype)
    return torch.einsum(eq, *xs)


op("Det", 11)(lambda a, x: torch.linalg.det(x))


# ------------------------------------------------------------------------ casts, constants
def _cast(x, dtype):
    if x.dtype == dtype:
        return x
    if x.is_floating_point() and not dtype.is_floating_point and dtype != torch.bool:
        x = torch.trunc(x)
        if dtype in NARROW_UNSIGNED:
            return x.to(torch.float64).to(torch.int64).to(dtype)
    if x.dtype in NARROW_UNSIGNED and dtype.is_floating_point:
        return x.to(torch.float64).to(dtype) if x.dtype == torch.uint64 else x.to(torch.int64).to(dtype)
    return x.to(dtype)


op("Cast", 1)(lambda a, x: _cast(x, tdtype(a["to"]) if isinstance(a["to"], int) else tdtype(
    onnx.helper.np_dtype_to_tensor_dtype(np.dtype(a["to"].lower())))))
op("CastLike", 15)(lambda a, x, like: _cast(x, like.dtype))


@op("ConstantOfShape", 9)
def _constant_of_shape(a, shape):
    value = a.get("value")
    fill = to_tensor(onnx.numpy_helper.to_array(value)) if value is not None else torch.zeros(1)
    return fill.reshape(()).expand(ints(shape)).clone()


@op("Range", 11)
def _range(a, start, limit, delta):
    s, l, d = scalar(start), scalar(limit), scalar(delta)
    n = max(int(math.ceil((l - s) / d)), 0)
    if start.is_floating_point():
        return (torch.arange(n, dtype=torch.float64) * d + s).to(start.dtype)
    return (torch.arange(n, dtype=torch.int64) * int(d) + int(s)).to(start.dtype)


@op("Dropout", 1)
def _dropout(a, x, *rest):
    if a["_nout"] > 1:
        return x, torch.ones(x.shape, dtype=torch.bool if a["_opset"] >= 10 else x.dtype)
    return x


# ------------------------------------------------------------------------------ reductions
_EMPTY = {"ReduceMax": -math.inf, "ReduceMin": math.inf, "ReduceProd": 1, "ReduceSum": 0, "ReduceLogSum": -math.inf,
          "ReduceLogSumExp": -math.inf, "ReduceL1": 0, "ReduceL2": 0, "ReduceSumSquare": 0, "ReduceMean": math.nan}


def _sumlike(x, d, k):
    return x.sum(dim=d, keepdim=k) if d else x


_REDUCERS = {
    "ReduceSum": _sumlike,
    "ReduceMean": lambda x, d, k: x.mean(dim=d, keepdim=k),
    "ReduceMax": lambda x, d, k: x.amax(dim=d, keepdim=k),
    "ReduceMin": lambda x, d, k: x.amin(dim=d, keepdim=k),
    "ReduceProd": lambda x, d, k: _prod(x, d, k),
    "ReduceL1": lambda x, d, k: x.abs().sum(dim=d, keepdim=k),
    "ReduceL2": lambda x, d, k: x.square().sum(dim=d, keepdim=k).sqrt(),
    "ReduceSumSquare": lambda x, d, k: x.square().sum(dim=d, keepdim=k),
    "ReduceLogSum": lambda x, d, k: x.sum(dim=d, keepdim=k).log(),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k),
}


def _prod(x, dims, keep):
    for d in sorted(dims, reverse=True):
        x = x.prod(dim=d, keepdim=keep)
    return x


def _reduce(name, a, x, axes):
    keep = bool(a.get("keepdims", 1))
    if not axes:
        if a.get("noop_with_empty_axes", 0):
            return x
        axes = list(range(x.dim()))
    dims = sorted({v % x.dim() for v in axes}) if x.dim() else []
    dtype = x.dtype
    y = wide(x)
    if dtype == torch.bool:
        y = y.to(torch.uint8)
    if any(x.shape[d] == 0 for d in dims):
        shape = [1 if i in dims else s for i, s in enumerate(x.shape)] if keep else \
            [s for i, s in enumerate(x.shape) if i not in dims]
        fill = _EMPTY[name]
        if not x.is_floating_point() and name in ("ReduceMax", "ReduceMin"):
            info = torch.iinfo(y.dtype)
            fill = info.min if name == "ReduceMax" else info.max
        return torch.full(shape, fill, dtype=y.dtype).to(dtype)
    if not dims:
        out = _REDUCERS[name](y.reshape(1), [0], False).reshape(()) if name not in ("ReduceSum",) else y
    else:
        out = _REDUCERS[name](y, dims, keep)
    return out.to(dtype)


def _register_reduce(name, input_since):
    op(name, 1)(lambda a, x, _n=name: _reduce(_n, a, x, a.get("axes")))
    op(name, input_since)(lambda a, x, axes=None, _n=name: _reduce(_n, a, x, ints(axes) if axes is not None else None))


for _name in _REDUCERS:
    _register_reduce(_name, 13 if _name == "ReduceSum" else 18)


def _arg(fn):
    def run(a, x):
        axis, keep = a.get("axis", 0) % max(x.dim(), 1), bool(a.get("keepdims", 1))
        y = wide(x) if x.dtype != torch.bool else x.to(torch.uint8)
        if a.get("select_last_index", 0):
            return x.shape[axis] - 1 - fn(y.flip(axis), dim=axis, keepdim=keep)
        return fn(y, dim=axis, keepdim=keep)
    return run


op("ArgMax", 1)(_arg(torch.argmax))
op("ArgMin", 1)(_arg(torch.argmin))
