"""Resize (opsets 10, 11, 13, 18, 19) and Upsample, separable as in onnx.reference: per axis, the
interpolation weights are computed eagerly from the shapes, the data flows through torch ops."""
from __future__ import annotations

import math

import numpy as np
import torch

from mfconvert.nn.executor.registry import floats, ints, op


def _nearest(mode):
    def coeffs(ratio, scale):
        if float(ratio).is_integer():
            return np.array([0.0, 1.0])
        if mode == "round_prefer_floor":
            return np.array([ratio <= 0.5, ratio > 0.5], dtype=np.float64)
        if mode == "round_prefer_ceil":
            return np.array([ratio < 0.5, ratio >= 0.5], dtype=np.float64)
        return np.array([1.0, 0.0]) if mode == "floor" else np.array([0.0, 1.0])
    return coeffs


def _linear(ratio, scale):
    return np.array([1 - ratio, ratio])


def _linear_aa(ratio, scale):
    scale = min(scale, 1.0)
    start = int(np.floor(-1 / scale) + 1)
    args = (np.arange(start, start + 2 - 2 * start) - ratio) * scale
    c = np.clip(1 - np.abs(args), 0, 1)
    return c / c.sum()


def _cubic(A):
    def coeffs(ratio, scale):
        return np.array([
            ((A * (ratio + 1) - 5 * A) * (ratio + 1) + 8 * A) * (ratio + 1) - 4 * A,
            ((A + 2) * ratio - (A + 3)) * ratio * ratio + 1,
            ((A + 2) * (1 - ratio) - (A + 3)) * (1 - ratio) * (1 - ratio) + 1,
            ((A * ((1 - ratio) + 1) - 5 * A) * ((1 - ratio) + 1) + 8 * A) * ((1 - ratio) + 1) - 4 * A])
    return coeffs


def _cubic_aa(A):
    def weight(x):
        x = abs(x)
        if x <= 1:
            return (A + 2) * x ** 3 - (A + 3) * x ** 2 + 1
        return A * x ** 3 - 5 * A * x ** 2 + 8 * A * x - 4 * A if x < 2 else 0.0

    def coeffs(ratio, scale):
        scale = min(scale, 1.0)
        i_start = int(np.floor(-2 / scale) + 1)
        c = np.array([weight(scale * (i - ratio)) for i in range(i_start, 2 - i_start)])
        return c / c.sum()
    return coeffs


def _source(mode, y, scale, n_in, n_out_f, n_out, roi):
    extrap = None
    if mode == "align_corners":
        x = np.zeros(n_out) if n_out_f == 1 else y * (n_in - 1) / (n_out_f - 1)
    elif mode == "asymmetric":
        x = y / scale
    elif mode == "tf_crop_and_resize":
        if n_out_f == 1:
            x = np.full(n_out, (roi[1] - roi[0]) * (n_in - 1) / 2)
        else:
            x = y * (roi[1] - roi[0]) * (n_in - 1) / (n_out_f - 1)
        x = x + roi[0] * (n_in - 1)
        extrap = (x < 0) | (x > n_in - 1)
    elif mode == "pytorch_half_pixel":
        x = np.full(n_out, -0.5) if n_out_f == 1 else (y + 0.5) / scale - 0.5
    elif mode == "half_pixel":
        x = (y + 0.5) / scale - 0.5
    elif mode == "half_pixel_symmetric":
        offset = n_in / 2 * (1 - n_out / n_out_f)
        x = offset + (y + 0.5) / scale - 0.5
    elif mode == "tf_half_pixel_for_nn":
        x = (y + 0.5) / scale
    else:
        raise ValueError(f"Resize: coordinate_transformation_mode '{mode}' is not supported")
    return x, extrap


def _resize_axis(data, axis, scale, n_out, get_coeffs, roi, extrapolation, mode, exclude_outside):
    n_in = data.shape[axis]
    if n_out == 0:
        shape = list(data.shape)
        shape[axis] = 0
        return data.new_zeros(shape)
    y = np.arange(n_out, dtype=np.float64)
    x, extrap = _source(mode, y, scale, n_in, scale * n_in, n_out, roi)
    xi = np.floor(x).astype(np.int64)
    ratios = np.where(x == xi, 1.0, x - xi)
    coeffs = np.stack([np.asarray(get_coeffs(float(r), scale), dtype=np.float64) for r in ratios])
    k = coeffs.shape[1]
    pad = int(np.ceil(k / 2))
    xp = x + pad
    p = np.floor(xp).astype(np.int64)
    frac = xp - p
    if k % 2 == 0:
        off = np.where(frac == 0, -(k // 2), -(k // 2) + 1)
    else:
        base = -((k - 1) // 2)
        off = np.where(frac <= 0.5, base, base + 1)
    idx = (p + off)[:, None] + np.arange(k)[None, :] - pad
    if exclude_outside:
        coeffs = np.where((idx < 0) | (idx >= n_in), 0.0, coeffs)
        total = coeffs.sum(-1, keepdims=True)
        coeffs = coeffs / np.where(total == 0, 1.0, total)
    idx = np.clip(idx, 0, n_in - 1)
    gathered = data.index_select(axis, torch.from_numpy(idx.reshape(-1)))
    shape = list(data.shape)
    shape[axis:axis + 1] = [n_out, k]
    gathered = gathered.reshape(shape)
    w = torch.from_numpy(coeffs).to(data.dtype).reshape([1] * axis + [n_out, k] + [1] * (data.dim() - axis - 1))
    out = (gathered * w).sum(axis + 1)
    if extrap is not None and extrap.any():
        mask = torch.from_numpy(extrap).reshape([1] * axis + [n_out] + [1] * (data.dim() - axis - 1))
        out = torch.where(mask, torch.tensor(extrapolation, dtype=out.dtype), out)
    return out


def _resize(a, x, roi=None, scales=None, sizes=None):
    r = x.dim()
    axes = [v % r for v in a.get("axes") or []] or list(range(r))
    mode = a.get("mode", "nearest")
    if mode == "nearest":
        get = _nearest(a.get("nearest_mode", "round_prefer_floor"))
    elif mode == "linear" or mode == "bilinear":
        get = _linear_aa if a.get("antialias", 0) else _linear
    elif mode == "cubic" or mode == "bicubic":
        A = a.get("cubic_coeff_a", -0.75)
        get = _cubic_aa(A) if a.get("antialias", 0) else _cubic(A)
    else:
        raise ValueError(f"Resize: mode '{mode}' is not supported")
    roi = floats(roi) if roi is not None and roi.numel() else None
    scales = floats(scales) if scales is not None and scales.numel() else None
    sizes = ints(sizes) if sizes is not None and sizes.numel() else None
    full_scales, full_sizes, full_roi = [1.0] * r, list(x.shape), None
    if roi is not None:
        full_roi = [0.0] * r + [1.0] * r
        for i, d in enumerate(axes):
            full_roi[d], full_roi[r + d] = roi[i], roi[len(axes) + i]
    if sizes is not None:
        for i, d in enumerate(axes):
            full_sizes[d] = sizes[i]
        full_scales = [full_sizes[i] / x.shape[i] for i in range(r)]
        policy = a.get("keep_aspect_ratio_policy", "stretch")
        if policy != "stretch":
            pick = min if policy == "not_larger" else max
            s = pick(full_scales[d] for d in axes)
            full_scales = [s if i in axes else 1.0 for i in range(r)]
            full_sizes = [int(s * x.shape[i] + 0.5) if i in axes else x.shape[i] for i in range(r)]
    else:
        for i, d in enumerate(axes):
            full_scales[d] = scales[i]
        full_sizes = [int(full_scales[i] * x.shape[i]) for i in range(r)]
    dtype = x.dtype
    out = x if x.dtype == torch.float64 else x.to(torch.float64) if not x.is_floating_point() else x.to(torch.float32)
    for axis in axes:
        if math.isclose(full_scales[axis], 1.0) and full_sizes[axis] == out.shape[axis] and (
                full_roi is None or (full_roi[axis] == 0 and full_roi[axis + r] == 1)):
            continue
        out = _resize_axis(out, axis, float(full_scales[axis]), int(full_sizes[axis]), get,
                           None if full_roi is None else [full_roi[axis], full_roi[axis + r]],
                           a.get("extrapolation_value", 0.0), a.get("coordinate_transformation_mode", "half_pixel"),
                           a.get("exclude_outside", 0))
    if not dtype.is_floating_point:
        info = torch.iinfo(dtype)
        out = out.round().clamp(info.min, info.max)
    return out.to(dtype)


@op("Resize", 10)
def _resize10(a, x, scales):
    """Resize-10 is Upsample-9: asymmetric coordinates, nearest rounds down."""
    return _resize({**a, "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}, x, scales=scales)


op("Resize", 11)(_resize)


@op("Upsample", 7)
def _upsample(a, x, scales=None):
    scales = scales if scales is not None else torch.tensor(a["scales"])
    return _resize({**a, "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}, x, scales=scales)
