"""Standard ONNX ops as torch functions, for OnnxModule. Each takes (attrs, *inputs) with
absent optional inputs as None, and follows the ONNX spec of opsets 13–21 (attribute-or-input
forms of axes are both handled)."""
from __future__ import annotations

import math

import onnx
import torch
import torch.nn.functional as F

_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT16: torch.int16, onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8, onnx.TensorProto.BOOL: torch.bool,
}


def attributes(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _ints(t) -> list[int]:
    return [int(v) for v in (t.tolist() if isinstance(t, torch.Tensor) else t)]


def _axes(attrs, axes_input):
    """Axes from the input (opset ≥ 13/18) or the attribute (older)."""
    if axes_input is not None:
        return _ints(axes_input)
    return attrs.get("axes")


def _reshape(attrs, x, shape):
    dims = _ints(shape)
    if not attrs.get("allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _reduce(fn):
    def op(attrs, x, axes=None):
        dims = _axes(attrs, axes)
        keep = bool(attrs.get("keepdims", 1))
        if not dims:
            if attrs.get("noop_with_empty_axes", 0):
                return x
            dims = list(range(x.dim()))
        return fn(x, dims, keep)
    return op


def _slice(attrs, x, starts, ends, axes=None, steps=None):
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    for s, e, a, st in zip(starts, ends, axes, steps):
        n = x.shape[a]
        if st < 0:
            raise ValueError("Slice with negative steps is not supported by the PyTorch executor")
        s = max(0, min(n, s + n if s < 0 else s))
        e = max(0, min(n, e + n if e < 0 else e))
        index[a] = slice(s, e, st)
    return x[tuple(index)]


def _split(attrs, x, split=None):
    axis = attrs.get("axis", 0)
    sizes = _ints(split) if split is not None else attrs.get("split")
    if sizes is None:
        parts = attrs.get("num_outputs")
        n = x.shape[axis]
        sizes = [math.ceil(n / parts)] * (parts - 1)
        sizes.append(n - sum(sizes))
    return tuple(torch.split(x, sizes, dim=axis))


def _gemm(attrs, a, b, c=None):
    a = a.transpose(0, 1) if attrs.get("transA", 0) else a
    b = b.transpose(0, 1) if attrs.get("transB", 0) else b
    y = attrs.get("alpha", 1.0) * (a @ b)
    return y if c is None else y + attrs.get("beta", 1.0) * c


def _layer_norm(attrs, x, scale, bias=None):
    axis = attrs.get("axis", -1) % x.dim()
    return F.layer_norm(x, x.shape[axis:], scale, bias, attrs.get("epsilon", 1e-5))


def _gather(attrs, x, index):
    axis = attrs.get("axis", 0) % x.dim()
    idx = torch.where(index < 0, index + x.shape[axis], index).long()
    out = torch.index_select(x, axis, idx.reshape(-1))
    return out.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1:]))


def _gelu(attrs, x):
    return F.gelu(x, approximate="tanh" if attrs.get("approximate", "none") == "tanh" else "none")


def _clip(attrs, x, lo=None, hi=None):
    lo = attrs.get("min") if lo is None else lo
    hi = attrs.get("max") if hi is None else hi
    if lo is not None:
        x = torch.maximum(x, torch.as_tensor(lo, dtype=x.dtype))
    if hi is not None:
        x = torch.minimum(x, torch.as_tensor(hi, dtype=x.dtype))
    return x


def _conv(attrs, x, w, b=None):
    dims = w.dim() - 2
    pads = attrs.get("pads", [0] * 2 * dims)
    if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise ValueError("Conv auto_pad SAME_* is not supported by the PyTorch executor")
    if pads[:dims] != pads[dims:]:
        x = F.pad(x, [p for i in reversed(range(dims)) for p in (pads[i], pads[i + dims])])
        pads = [0] * 2 * dims
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    return conv(x, w, b, stride=attrs.get("strides", 1), padding=pads[:dims],
                dilation=attrs.get("dilations", 1), groups=attrs.get("group", 1))


def _batch_norm(attrs, x, scale, bias, mean, var):
    return F.batch_norm(x, mean, var, scale, bias, training=False, eps=attrs.get("epsilon", 1e-5))


def _pool(kind):
    def op(attrs, x):
        dims = x.dim() - 2
        kernel = attrs["kernel_shape"]
        pads = attrs.get("pads", [0] * 2 * dims)
        strides = attrs.get("strides", [1] * dims)
        fn = {("max", 1): F.max_pool1d, ("max", 2): F.max_pool2d,
              ("avg", 1): F.avg_pool1d, ("avg", 2): F.avg_pool2d}[(kind, dims)]
        extra = {"count_include_pad": bool(attrs.get("count_include_pad", 0))} if kind == "avg" else {}
        return fn(x, kernel, strides, pads[:dims], ceil_mode=bool(attrs.get("ceil_mode", 0)), **extra)
    return op


def _scatter_nd(attrs, data, indices, updates):
    if attrs.get("reduction", "none") != "none":
        raise ValueError("ScatterND with a reduction is not supported by the PyTorch executor")
    out = data.clone()
    k = indices.shape[-1]
    flat_idx = indices.reshape(-1, k).long()
    out[tuple(flat_idx[:, i] for i in range(k))] = updates.reshape(-1, *data.shape[k:])
    return out


def _gather_nd(attrs, data, indices):
    if attrs.get("batch_dims", 0):
        raise ValueError("GatherND with batch_dims is not supported by the PyTorch executor")
    k = indices.shape[-1]
    flat = indices.reshape(-1, k).long()
    out = data[tuple(flat[:, i] for i in range(k))]
    return out.reshape(*indices.shape[:-1], *data.shape[k:])


def _gather_elements(attrs, x, index):
    axis = attrs.get("axis", 0) % x.dim()
    return torch.gather(x, axis, torch.where(index < 0, index + x.shape[axis], index).long())


def _compress(attrs, x, condition):
    """Compress-11: the slices along `axis` (the flattened input when absent) where `condition`
    is true; a condition shorter than the axis selects from its leading slices only."""
    axis = attrs.get("axis")
    if axis is None:
        x, axis = x.reshape(-1), 0
    axis %= x.dim()
    keep = condition.reshape(-1).to(torch.bool)[: x.shape[axis]]
    return torch.index_select(x, axis, keep.nonzero().reshape(-1))


def _expand(attrs, x, shape):
    target = _ints(shape)
    full = torch.broadcast_shapes(tuple(x.shape), tuple(target))
    return x.expand(full)


def _range(attrs, start, limit, delta):
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)


def _constant_of_shape(attrs, shape):
    value = attrs.get("value")
    fill = torch.from_numpy(onnx.numpy_helper.to_array(value).copy()) if value is not None else torch.zeros(1)
    return fill.reshape(()).expand(_ints(shape)).clone()


def _argmax(attrs, x):
    axis, keep = attrs.get("axis", 0), bool(attrs.get("keepdims", 1))
    if attrs.get("select_last_index", 0):
        flipped = x.flip(axis)
        return x.shape[axis] - 1 - flipped.argmax(dim=axis, keepdim=keep)
    return x.argmax(dim=axis, keepdim=keep)


def _unsqueeze(attrs, x, axes=None):
    axes = sorted(a % (x.dim() + len(_axes(attrs, axes))) for a in _axes(attrs, axes))
    for a in axes:
        x = x.unsqueeze(a)
    return x


def _squeeze(attrs, x, axes=None):
    axes = _axes(attrs, axes)
    if not axes:
        return x.squeeze()
    for a in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.squeeze(a)
    return x


def _flatten(attrs, x):
    axis = attrs.get("axis", 1) % (x.dim() + 1) if x.dim() else 0
    return x.reshape(math.prod(x.shape[:axis]), -1)


def _softmax(fn):
    def op(attrs, x):
        return fn(x, dim=attrs.get("axis", -1))
    return op


def _binary(fn):
    return lambda attrs, a, b: fn(a, b)


def _unary(fn):
    return lambda attrs, x: fn(x)


def _div(attrs, a, b):
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


def _pow(attrs, a, b):
    return torch.pow(a, b.to(a.dtype) if a.is_floating_point() else b)


OPS = {
    "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul), "Div": _div,
    "Pow": _pow, "MatMul": _binary(torch.matmul), "Gemm": _gemm,
    "Max": lambda attrs, *xs: _fold(torch.maximum, xs), "Min": lambda attrs, *xs: _fold(torch.minimum, xs),
    "Sum": lambda attrs, *xs: _fold(torch.add, xs), "Mean": lambda attrs, *xs: _fold(torch.add, xs) / len(xs),
    "Equal": _binary(torch.eq), "Less": _binary(torch.lt), "LessOrEqual": _binary(torch.le),
    "Greater": _binary(torch.gt), "GreaterOrEqual": _binary(torch.ge),
    "And": _binary(torch.logical_and), "Or": _binary(torch.logical_or), "Xor": _binary(torch.logical_xor),
    "Not": _unary(torch.logical_not), "Where": lambda attrs, c, a, b: torch.where(c, a, b),
    "Neg": _unary(torch.neg), "Abs": _unary(torch.abs), "Sqrt": _unary(torch.sqrt), "Exp": _unary(torch.exp),
    "Log": _unary(torch.log), "Reciprocal": _unary(torch.reciprocal), "Erf": _unary(torch.erf),
    "Tanh": _unary(torch.tanh), "Sigmoid": _unary(torch.sigmoid), "Relu": _unary(F.relu),
    "Floor": _unary(torch.floor), "Ceil": _unary(torch.ceil), "Round": _unary(torch.round),
    "Sign": _unary(torch.sign), "Identity": _unary(lambda x: x),
    "Gelu": _gelu, "HardSigmoid": lambda attrs, x: torch.clamp(attrs.get("alpha", 0.2) * x + attrs.get("beta", 0.5), 0, 1),
    "HardSwish": _unary(F.hardswish), "LeakyRelu": lambda attrs, x: F.leaky_relu(x, attrs.get("alpha", 0.01)),
    "Softmax": _softmax(torch.softmax), "LogSoftmax": _softmax(torch.log_softmax),
    "LayerNormalization": _layer_norm, "BatchNormalization": _batch_norm, "Clip": _clip,
    "Conv": _conv, "MaxPool": _pool("max"), "AveragePool": _pool("avg"),
    "GlobalAveragePool": lambda attrs, x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True),
    "Reshape": _reshape, "Flatten": _flatten, "Transpose": lambda attrs, x: x.permute(
        attrs.get("perm", list(reversed(range(x.dim()))))),
    "Unsqueeze": _unsqueeze, "Squeeze": _squeeze,
    "Concat": lambda attrs, *xs: torch.cat(xs, dim=attrs["axis"]), "Split": _split, "Slice": _slice,
    "Gather": _gather, "GatherND": _gather_nd, "ScatterND": _scatter_nd, "Compress": _compress,
    "GatherElements": _gather_elements,
    "Shape": lambda attrs, x: torch.tensor(list(x.shape), dtype=torch.int64)[
        slice(attrs.get("start", 0), attrs.get("end"))],
    "Size": lambda attrs, x: torch.tensor(x.numel(), dtype=torch.int64),
    "Cast": lambda attrs, x: x.to(_DTYPES[attrs["to"]]), "CastLike": lambda attrs, x, like: x.to(like.dtype),
    "Expand": _expand, "Tile": lambda attrs, x, reps: x.repeat(_ints(reps)), "Range": _range,
    "ConstantOfShape": _constant_of_shape, "Constant": None,
    "ReduceSum": _reduce(lambda x, d, k: x.sum(dim=d, keepdim=k)),
    "ReduceMean": _reduce(lambda x, d, k: x.mean(dim=d, keepdim=k)),
    "ReduceMax": _reduce(lambda x, d, k: x.amax(dim=d, keepdim=k)),
    "ReduceMin": _reduce(lambda x, d, k: x.amin(dim=d, keepdim=k)),
    "ReduceProd": _reduce(lambda x, d, k: _reduce_prod(x, d, k)),
    "ReduceL2": _reduce(lambda x, d, k: x.square().sum(dim=d, keepdim=k).sqrt()),
    "ArgMax": _argmax, "NonZero": lambda attrs, x: torch.stack(torch.nonzero(x, as_tuple=True)),
    "Dropout": lambda attrs, x, *rest: x,
}


def _fold(fn, xs):
    out = xs[0]
    for x in xs[1:]:
        out = fn(out, x)
    return out


def _reduce_prod(x, dims, keep):
    for d in sorted(dims, reverse=True):
        x = x.prod(dim=d, keepdim=keep)
    return x
