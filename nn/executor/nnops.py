"""Convolution, pooling and normalization."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mfconvert.nn.executor.registry import ints, op

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _same_pads(auto_pad, sizes, kernel, strides, dilations):
    """[begins…, ends…] of SAME_UPPER / SAME_LOWER / VALID."""
    n = len(sizes)
    if auto_pad == "VALID":
        return [0] * 2 * n
    begins, ends = [], []
    for size, k, s, d in zip(sizes, kernel, strides, dilations):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, big = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else big)
        ends.append(big if auto_pad == "SAME_UPPER" else small)
    return begins + ends


def _spatial(a, x, kernel):
    n = x.dim() - 2
    strides = a.get("strides") or [1] * n
    dilations = a.get("dilations") or [1] * n
    auto_pad = a.get("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER", "VALID"):
        pads = _same_pads(auto_pad, x.shape[2:], kernel, strides, dilations)
    else:
        pads = a.get("pads") or [0] * 2 * n
    return n, list(strides), list(dilations), list(pads)


def _pad_spatial(x, pads, value=0.0):
    n = len(pads) // 2
    return F.pad(x, [p for i in reversed(range(n)) for p in (pads[i], pads[i + n])], value=value)


def _conv(x, w, b, a):
    n, strides, dilations, pads = _spatial(a, x, list(w.shape[2:]))
    if pads[:n] != pads[n:] or n > 3:
        x, pads = _pad_spatial(x, pads), [0] * 2 * n
    if n > 3:
        raise ValueError(f"Conv over {n} spatial dims is not supported by the PyTorch executor")
    return _CONV[n](x, w, b, stride=strides, padding=pads[:n], dilation=dilations, groups=a.get("group", 1))


op("Conv")(lambda a, x, w, b=None: _conv(x, w, b, a))


@op("ConvTranspose")
def _conv_transpose(a, x, w, b=None):
    n = x.dim() - 2
    kernel = list(w.shape[2:])
    strides = a.get("strides") or [1] * n
    dilations = a.get("dilations") or [1] * n
    out_pad = a.get("output_padding") or [0] * n
    y = _CONV_T[n](x, w, None, stride=strides, groups=a.get("group", 1), dilation=dilations)
    full = [(x.shape[2 + i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 + out_pad[i] for i in range(n)]
    y = _pad_spatial(y, [0] * n + list(out_pad)) if any(out_pad) else y
    auto_pad = a.get("auto_pad", "NOTSET")
    target = list(a["output_shape"])[-n:] if a.get("output_shape") else None
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        target = target or [x.shape[2 + i] * strides[i] for i in range(n)]
        total = [full[i] - target[i] for i in range(n)]
        if auto_pad == "SAME_UPPER":
            pads = [t // 2 for t in total] + [t - t // 2 for t in total]
        else:
            pads = [t - t // 2 for t in total] + [t // 2 for t in total]
    else:   # explicit pads; an output_shape then crops or extends at the end (as onnx.reference)
        pads = list(a.get("pads") or [0] * 2 * n)
        if target:
            pads = pads[:n] + [full[i] - pads[i] - target[i] for i in range(n)]
    y = _pad_spatial(y, [-p for p in pads])
    if b is not None:
        y = y + b.reshape(1, -1, *[1] * n)
    return y


# ----------------------------------------------------------------------------------- pooling
def _pool_geometry(a, x):
    kernel = list(a["kernel_shape"])
    n, strides, dilations, pads = _spatial(a, x, kernel)
    ceil_mode = a.get("ceil_mode", 0)
    sizes = list(x.shape[2:])
    if a.get("auto_pad", "NOTSET") in ("SAME_UPPER", "SAME_LOWER"):
        out = [-(-sizes[i] // strides[i]) for i in range(n)]
    elif a.get("auto_pad", "NOTSET") == "VALID":
        out = [(sizes[i] - ((kernel[i] - 1) * dilations[i] + 1)) // strides[i] + 1 for i in range(n)]
    else:
        out = []
        for i in range(n):
            size = (sizes[i] + pads[i] + pads[n + i] - dilations[i] * (kernel[i] - 1) - 1) / strides[i] + 1
            o = math.ceil(size) if ceil_mode else math.floor(size)
            if ceil_mode and (o - 1) * strides[i] >= sizes[i] + pads[i]:
                o -= 1
            out.append(o)
    return n, kernel, strides, dilations, pads, out


def _windows(x, n, kernel, strides, dilations, out):
    """[N, C, *out, *kernel] windows of an already padded x."""
    for i in range(n):
        span = (kernel[i] - 1) * dilations[i] + 1
        x = x.narrow(2 + i, 0, min(x.shape[2 + i], (out[i] - 1) * strides[i] + span))
        x = x.unfold(2 + i, span, strides[i])
        if dilations[i] > 1:
            x = x[..., ::dilations[i]]
    return x


def _padded_to_window(x, n, pads, kernel, strides, dilations, out, value):
    """x padded with the explicit pads, then (value) up to what the last window needs."""
    extra = []
    for i in range(n):
        need = (out[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1
        extra.append(max(0, need - (x.shape[2 + i] + pads[i] + pads[n + i])))
    return _pad_spatial(x, pads[:n] + [pads[n + i] + extra[i] for i in range(n)], value)


def _generic_pool(kind, a, x, p=2):
    n, kernel, strides, dilations, pads, out = _pool_geometry(a, x)
    flat = lambda t: t.reshape(*t.shape[:2 + n], -1)
    if kind == "max":
        low = -math.inf if x.is_floating_point() else torch.iinfo(x.dtype).min
        win = flat(_windows(_padded_to_window(x, n, pads, kernel, strides, dilations, out, low),
                            n, kernel, strides, dilations, out))
        values, arg = win.max(dim=-1)
        if a["_nout"] < 2:
            return values
        # Indices into the flattened input (storage_order 1: column-major within each plane).
        plane = [int(s) for s in x.shape[2:]]
        idx = torch.arange(math.prod(plane), dtype=torch.float64).reshape(plane)
        if a.get("storage_order", 0):
            idx = torch.arange(math.prod(plane), dtype=torch.float64).reshape(list(reversed(plane))).permute(
                *reversed(range(n)))
        idx = idx.reshape(1, 1, *plane)
        iwin = flat(_windows(_padded_to_window(idx, n, pads, kernel, strides, dilations, out, -1),
                             n, kernel, strides, dilations, out))
        chosen = torch.gather(iwin.expand(*win.shape[:2], *iwin.shape[2:]), -1, arg.unsqueeze(-1)).squeeze(-1)
        offset = torch.arange(x.shape[0] * x.shape[1], dtype=torch.float64).reshape(x.shape[0], x.shape[1],
                                                                                      *[1] * n) * math.prod(plane)
        return values, (chosen + offset).to(torch.int64)
    ones = torch.ones(1, 1, *x.shape[2:], dtype=x.dtype)
    include = a.get("count_include_pad", 0) if kind == "avg" else 1
    mask = _pad_spatial(ones, pads, 1.0 if include else 0.0)
    mask = _padded_to_window(mask, n, [0] * 2 * n, kernel, strides, dilations, out, 0.0)
    xs = x.abs().pow(p) if kind == "lp" else x
    win = flat(_windows(_padded_to_window(xs, n, pads, kernel, strides, dilations, out, 0.0),
                        n, kernel, strides, dilations, out))
    total = win.sum(-1)
    if kind == "lp":
        return total.pow(1.0 / p)
    count = flat(_windows(mask, n, kernel, strides, dilations, out)).sum(-1)
    return total / count


_NATIVE_MAX = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_NATIVE_AVG = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _native_ok(a, x):
    n, kernel, strides, dilations, pads, out = _pool_geometry(a, x)
    return (n <= 3 and not a.get("ceil_mode", 0) and pads[:n] == pads[n:]
            and all(2 * pads[i] <= kernel[i] for i in range(n)) and x.is_floating_point()), (kernel, strides,
                                                                                               dilations, pads[:n])


def _half_as_float(fn):
    """float16 / bfloat16 pooled in float32 (torch's CPU kernels lack some half forms), cast back."""
    def run(a, x):
        if x.dtype not in (torch.float16, torch.bfloat16):
            return fn(a, x)
        out = fn(a, x.float())
        return tuple(o.to(x.dtype) if o.is_floating_point() else o for o in out) if isinstance(out, tuple) \
            else out.to(x.dtype)
    return run


@op("MaxPool")
@_half_as_float
def _max_pool(a, x):
    ok, (kernel, strides, dilations, pads) = _native_ok(a, x)
    if ok and a["_nout"] < 2:
        return _NATIVE_MAX[x.dim() - 2](x, kernel, strides, pads, dilations)
    return _generic_pool("max", a, x)


@op("AveragePool")
@_half_as_float
def _avg_pool(a, x):
    ok, (kernel, strides, dilations, pads) = _native_ok(a, x)
    if ok and all(d == 1 for d in dilations):
        return _NATIVE_AVG[x.dim() - 2](x, kernel, strides, pads, count_include_pad=bool(a.get("count_include_pad", 0)))
    return _generic_pool("avg", a, x)


op("LpPool")(_half_as_float(lambda a, x: _generic_pool("lp", a, x, a.get("p", 2))))
op("GlobalAveragePool")(lambda a, x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True))
op("GlobalMaxPool")(lambda a, x: x.amax(dim=tuple(range(2, x.dim())), keepdim=True))
op("GlobalLpPool", 2)(lambda a, x: x.abs().pow(a.get("p", 2)).sum(dim=tuple(range(2, x.dim())), keepdim=True).pow(
    1.0 / a.get("p", 2)))


@op("MaxUnpool", 9)
def _max_unpool(a, x, indices, output_shape=None):
    kernel = a["kernel_shape"]
    n = len(kernel)
    strides = a.get("strides") or [1] * n
    pads = a.get("pads") or [0] * 2 * n
    inferred = [x.shape[0], x.shape[1]] + [(x.shape[2 + i] - 1) * strides[i] - pads[i] - pads[n + i] + kernel[i]
                                           for i in range(n)]
    y = torch.zeros(math.prod(inferred), dtype=x.dtype).index_put((indices.reshape(-1).long(),), x.reshape(-1))
    y = y.reshape(inferred)
    if output_shape is not None:
        shape = ints(output_shape)
        y = F.pad(y, [p for i in reversed(range(n)) for p in (0, shape[2 + i] - inferred[2 + i])])
    return y


# ------------------------------------------------------------------------------ normalization
def _bcast(t, x, axis=1):
    return t.reshape(*t.shape, *[1] * (x.dim() - axis - t.dim()))


@op("BatchNormalization")
def _batch_norm(a, x, scale, bias, mean, var, *rest):
    shape = [1, -1] + [1] * (x.dim() - 2)
    if a.get("training_mode", 0):   # opset ≥ 14: batch statistics, and the updated running ones
        dims = [0] + list(range(2, x.dim()))
        cur_mean, cur_var = x.mean(dims), x.var(dims, unbiased=False)
        y = (x - cur_mean.reshape(shape)) / torch.sqrt(cur_var.reshape(shape) + a.get("epsilon", 1e-5))
        y = (y * scale.reshape(shape) + bias.reshape(shape)).to(x.dtype)
        m = a.get("momentum", 0.9)
        return (y, mean * m + cur_mean * (1 - m), var * m + cur_var * (1 - m))[:a["_nout"]]
    y = (x - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + a.get("epsilon", 1e-5))
    return (y * scale.reshape(shape) + bias.reshape(shape)).to(x.dtype)


@op("InstanceNormalization")
def _instance_norm(a, x, scale, bias):
    dims = tuple(range(2, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    var = (x - mean).square().mean(dim=dims, keepdim=True)
    shape = [1, -1] + [1] * (x.dim() - 2)
    return (x - mean) / torch.sqrt(var + a["epsilon"]) * scale.reshape(shape) + bias.reshape(shape)


def _stash(a, x):
    return torch.float32 if a.get("stash_type", 1) == 1 and x.dtype in (torch.float16, torch.bfloat16) else x.dtype


@op("LayerNormalization", 17)
def _layer_norm(a, x, scale, bias=None):
    axis = a["axis"] % x.dim()
    dims = tuple(range(axis, x.dim()))
    shape = tuple(x.shape[axis:])
    if a["_nout"] == 1 and x.dtype in (torch.float32, torch.float64) and tuple(scale.shape) == shape and (
            bias is None or tuple(bias.shape) == shape):   # the fused kernel: faster and lighter in training
        return F.layer_norm(x, shape, scale, bias, a["epsilon"])
    xs = x.to(_stash(a, x))
    mean = xs.mean(dim=dims, keepdim=True)
    var = (xs - mean).square().mean(dim=dims, keepdim=True)
    inv = torch.rsqrt(var + a["epsilon"])
    y = ((xs - mean) * inv).to(x.dtype) * scale
    if bias is not None:
        y = y + bias
    if a["_nout"] == 1:
        return y
    return y, mean, inv


@op("RMSNormalization", 23)
def _rms_norm(a, x, scale):
    axis = a["axis"] % x.dim()
    dims = tuple(range(axis, x.dim()))
    xs = x.to(_stash(a, x))
    inv = torch.rsqrt(xs.square().mean(dim=dims, keepdim=True) + a["epsilon"])
    return (xs * inv).to(x.dtype) * scale


@op("GroupNormalization", 18)
def _group_norm(a, x, scale, bias):
    g = a["num_groups"]
    n, c = x.shape[:2]
    xs = x.to(_stash(a, x)).reshape(n, g, -1)
    mean = xs.mean(-1, keepdim=True)
    var = (xs - mean).square().mean(-1, keepdim=True)
    y = ((xs - mean) * torch.rsqrt(var + a["epsilon"])).to(x.dtype)
    shape = [1, -1] + [1] * (x.dim() - 2)
    if a["_opset"] < 21 and scale.numel() == g and g != c:   # opset 18: scale and bias per group
        y = y.reshape(n, g, -1) * scale.reshape(1, g, 1) + bias.reshape(1, g, 1)
        return y.reshape(x.shape)
    return y.reshape(x.shape) * scale.reshape(shape) + bias.reshape(shape)


@op("LpNormalization")
def _lp_norm(a, x):
    axis, p = a.get("axis", -1), a.get("p", 2)
    norm = x.abs().sum(axis, keepdim=True) if p == 1 else x.square().sum(axis, keepdim=True).sqrt()
    return torch.where(norm == 0, torch.zeros_like(x), x / torch.where(norm == 0, torch.ones_like(norm), norm))


@op("LRN")
def _lrn(a, x):
    size = a["size"]
    sq = x.square()
    c1, c2 = (size - 1) // 2, math.ceil((size - 1) / 2)
    padded = F.pad(sq.unsqueeze(1), [0, 0] * (x.dim() - 2) + [c1, c2]).squeeze(1)
    summed = padded.unfold(1, size, 1).sum(-1)
    return x / (a["bias"] + a["alpha"] / size * summed).pow(a["beta"])


@op("MeanVarianceNormalization", 9)
def _mvn(a, x):
    axes = tuple(a.get("axes") or [0, 2, 3])
    mean = x.mean(dim=axes, keepdim=True)
    var = x.square().mean(dim=axes, keepdim=True) - mean.square()
    return (x - mean) / (torch.sqrt(var) + 1e-9)


@op("MeanVarianceNormalization", 1)
def _mvn1(a, x):
    """Opsets < 9 as ONNX Runtime runs them: over N, H, W (and C with across_channels);
    normalize_variance=0 only centres."""
    axes = (0, 1, 2, 3) if a.get("across_channels", 0) else (0, 2, 3)
    y = x - x.mean(dim=axes, keepdim=True)
    if a.get("normalize_variance", 1):
        y = y / (torch.sqrt(y.square().mean(dim=axes, keepdim=True)) + 1e-9)
    return y


@op("MaxRoiPool")
def _max_roi_pool(a, x, rois):
    ph_n, pw_n = a["pooled_shape"]
    scale = a.get("spatial_scale", 1.0)
    H, W = x.shape[2], x.shape[3]
    rnd = lambda v: int(math.floor(v + 0.5)) if v >= 0 else -int(math.floor(-v + 0.5))
    outs = []
    for roi in rois.tolist():
        b = int(roi[0])
        sw, sh, ew, eh = (rnd(v * scale) for v in roi[1:5])
        bin_h, bin_w = max(eh - sh + 1, 1) / ph_n, max(ew - sw + 1, 1) / pw_n
        rows = []
        for ph in range(ph_n):
            h0 = min(max(math.floor(ph * bin_h) + sh, 0), H)
            h1 = min(max(math.ceil((ph + 1) * bin_h) + sh, 0), H)
            cols = []
            for pw in range(pw_n):
                w0 = min(max(math.floor(pw * bin_w) + sw, 0), W)
                w1 = min(max(math.ceil((pw + 1) * bin_w) + sw, 0), W)
                cols.append(x[b, :, h0:h1, w0:w1].amax((1, 2)) if h1 > h0 and w1 > w0 else x.new_zeros(x.shape[1]))
            rows.append(torch.stack(cols, -1))
        outs.append(torch.stack(rows, -2))
    return torch.stack(outs)


# Experimental ops of opsets ≤ 9 that ONNX Runtime still runs (old exporters wrote them).
op("ImageScaler")(lambda a, x: x * a.get("scale", 1.0) + torch.tensor(a.get("bias") or [0.0] * x.shape[1],
                                                                    dtype=x.dtype).reshape(1, -1, 1, 1))
op("Affine")(lambda a, x: a.get("alpha", 1.0) * x + a.get("beta", 0.0))
op("Scale")(lambda a, x: a.get("scale", 1.0) * x)
op("ScaledTanh")(lambda a, x: a.get("alpha", 1.0) * torch.tanh(a.get("beta", 1.0) * x))
op("ParametricSoftplus")(lambda a, x: a.get("alpha", 1.0) * F.softplus(a.get("beta", 1.0) * x))


@op("Crop")
def _crop(a, x):
    left, top, right, bottom = (list(a.get("border") or [0, 0, 0, 0]) + [0, 0, 0, 0])[:4]
    if a.get("scale"):
        h, w = a["scale"]
        return x[:, :, top:top + h, left:left + w]
    return x[:, :, top:x.shape[2] - bottom, left:x.shape[3] - right]
