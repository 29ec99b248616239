"""Signal (DFT, STFT, windows, MelWeightMatrix), image (GridSample, AffineGrid, RoiAlign, Col2Im,
DeformConv, CenterCropPad, NonMaxSuppression) and the newer ops (SwiGLU, TensorScatter, BitCast,
CausalConvWithState)."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from mfconvert.nn.executor.registry import ints, op, scalar, tdtype


# ------------------------------------------------------------------------------------ signal
def _window(kind):
    def run(a, size):
        n = int(scalar(size))
        N = n if a.get("periodic", 1) else n - 1
        i = torch.arange(n, dtype=torch.float64)
        if kind == "hann":
            w = torch.sin(i * math.pi / N) ** 2
        elif kind == "hamming":
            w = 25 / 46 - torch.cos(i * math.pi * 2 / N) * (1 - 25 / 46)
        else:
            w = 0.42 - 0.5 * torch.cos(i * math.pi * 2 / N) + 0.08 * torch.cos(i * math.pi * 4 / N)
        return w.to(tdtype(a.get("output_datatype", 1)))
    return run


op("HannWindow", 17)(_window("hann"))
op("HammingWindow", 17)(_window("hamming"))
op("BlackmanWindow", 17)(_window("blackman"))


@op("MelWeightMatrix", 17)
def _mel(a, num_mel_bins, dft_length, sample_rate, lower, upper):
    bins, n_fft, rate = int(scalar(num_mel_bins)), int(scalar(dft_length)), int(scalar(sample_rate))
    lo, hi = float(scalar(lower)), float(scalar(upper))
    freq = np.arange(0, bins + 2)
    low_mel = 2595 * np.log1p(lo / 700) / np.log(10)
    high_mel = 2595 * np.log1p(hi / 700) / np.log(10)
    step = (high_mel - low_mel) / freq.shape[0]
    freq = 700 * np.expm1((freq * step + low_mel) / 2595 * np.log(10))
    freq = (((n_fft + 1) * freq) // rate).astype(int)
    out = np.zeros((n_fft // 2 + 1, bins))
    for i in range(bins):
        left, center, right = freq[i], freq[i + 1], freq[i + 2]
        if center == left:
            out[center, i] = 1
        else:
            for j in range(left, center + 1):
                out[j, i] = (j - left) / (center - left)
        if right > center:
            for j in range(center, right):
                out[j, i] = (right - j) / (right - center)
    return torch.from_numpy(out).to(tdtype(a.get("output_datatype", 1)))


def _as_complex(x):
    if x.shape[-1] == 1:
        return x[..., 0].to(torch.complex128 if x.dtype == torch.float64 else torch.complex64)
    return torch.complex(x[..., 0], x[..., 1]) if x.dtype in (torch.float32, torch.float64) else \
        torch.complex(x[..., 0].float(), x[..., 1].float())


def _dft(x, length, axis, inverse, onesided):
    axis %= x.dim()
    if length is None:
        length = 2 * (x.shape[axis] - 1) if inverse and onesided else x.shape[axis]
    c = _as_complex(x)
    if inverse and onesided:
        return torch.fft.irfft(c, n=length, dim=axis).unsqueeze(-1).to(x.dtype)
    y = torch.fft.ifft(c, n=length, dim=axis) if inverse else torch.fft.fft(c, n=length, dim=axis)
    if onesided and not inverse:
        y = y.narrow(axis, 0, length // 2 + 1)
    return torch.stack([y.real, y.imag], -1).to(x.dtype)


op("DFT", 17)(lambda a, x, n=None: _dft(x, int(scalar(n)) if n is not None else None, a.get("axis", 1),
                                          a.get("inverse", 0), a.get("onesided", 0)))
op("DFT", 20)(lambda a, x, n=None, axis=None: _dft(x, int(scalar(n)) if n is not None else None,
                                                   int(scalar(axis)) if axis is not None else -2,
                                                   a.get("inverse", 0), a.get("onesided", 0)))


@op("STFT", 17)
def _stft(a, x, step, window=None, length=None):
    step = int(scalar(step))
    n = int(scalar(length)) if length is not None else window.shape[0] if window is not None else x.shape[-2]
    frames = 1 + (x.shape[1] - n) // step
    sig = _as_complex(x)                           # [B, L]
    seg = sig.unfold(1, n, step)[:, :frames]       # [B, frames, n]
    if window is not None:
        seg = seg * window.to(seg.real.dtype)
    y = torch.fft.fft(seg, n=n, dim=-1)
    if a.get("onesided", 1) and x.shape[-1] == 1:
        y = y[..., :n // 2 + 1]
    return torch.stack([y.real, y.imag], -1).to(x.dtype)


# ------------------------------------------------------------------------------------- image
@op("AffineGrid", 20)
def _affine_grid(a, theta, size):
    return F.affine_grid(theta, ints(size), align_corners=bool(a.get("align_corners", 0)))


@op("GridSample", 16)
def _grid_sample(a, x, grid):
    mode = {"linear": "bilinear", "cubic": "bicubic"}.get(a.get("mode", "bilinear"), a.get("mode", "bilinear"))
    return F.grid_sample(x, grid.to(x.dtype), mode=mode, padding_mode=a.get("padding_mode", "zeros"),
                         align_corners=bool(a.get("align_corners", 0)))


@op("RoiAlign", 10)
def _roi_align(a, x, rois, batch_indices):
    half = a.get("coordinate_transformation_mode", "output_half_pixel") == "half_pixel"
    mode, oh, ow = a.get("mode", "avg"), a.get("output_height", 1), a.get("output_width", 1)
    ratio, scale = a.get("sampling_ratio", 0), a.get("spatial_scale", 1.0)
    H, W = x.shape[2], x.shape[3]
    outs = []
    for roi, b in zip(rois.tolist(), ints(batch_indices)):
        off = 0.5 if half else 0.0
        sw, sh, ew, eh = (v * scale - off for v in roi)
        rw, rh = ew - sw, eh - sh
        if not half:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bh, bw = rh / oh, rw / ow
        gh = int(ratio) if ratio > 0 else int(np.ceil(rh / oh))
        gw = int(ratio) if ratio > 0 else int(np.ceil(rw / ow))
        ys = sh + np.arange(oh)[:, None] * bh + (np.arange(gh)[None, :] + 0.5) * bh / gh     # [oh, gh]
        xs = sw + np.arange(ow)[:, None] * bw + (np.arange(gw)[None, :] + 0.5) * bw / gw     # [ow, gw]

        def axis_terms(p, n):
            out = (p < -1.0) | (p > n)
            p = np.maximum(p, 0)
            low = p.astype(np.int64)
            top = low >= n - 1
            low = np.where(top, n - 1, low)
            high = np.where(top, n - 1, low + 1)
            p = np.where(top, low, p)
            lp = p - low
            return low, high, 1 - lp, lp, out
        yl, yh, hy, ly, yo = axis_terms(ys, H)
        xl, xh, hx, lx, xo = axis_terms(xs, W)
        img = x[b]                                   # [C, H, W]
        grid = lambda yi, xi: img[:, torch.from_numpy(yi)[:, :, None, None], torch.from_numpy(xi)[None, None]]
        wgt = lambda wy, wx: torch.from_numpy((wy[:, :, None, None] * wx[None, None]) *
                                              ~(yo[:, :, None, None] | xo[None, None])).to(x.dtype)
        terms = [wgt(hy, hx) * grid(yl, xl), wgt(hy, lx) * grid(yl, xh),
                 wgt(ly, hx) * grid(yh, xl), wgt(ly, lx) * grid(yh, xh)]   # each [C, oh, gh, ow, gw]
        if mode == "avg":
            v = sum(terms).sum((2, 4)) / max(gh * gw, 1)
        else:
            v = torch.stack(terms).amax(0).amax(4).amax(2)
        outs.append(v)
    return torch.stack(outs) if outs else x.new_zeros(0, x.shape[1], oh, ow)


@op("Col2Im", 18)
def _col2im(a, x, image_shape, block_shape):
    image, kernel = ints(image_shape), ints(block_shape)
    n = len(image)
    dil = a.get("dilations") or [1] * n
    pads = a.get("pads") or [0] * 2 * n
    strides = a.get("strides") or [1] * n
    blocks = [(image[i] + pads[i] + pads[n + i] - dil[i] * (kernel[i] - 1) - 1) // strides[i] + 1 for i in range(n)]
    kk = np.stack(np.meshgrid(*[np.arange(k) for k in kernel], indexing="ij"), 0).reshape(n, -1)   # [n, K]
    bb = np.stack(np.meshgrid(*[np.arange(b) for b in blocks], indexing="ij"), 0).reshape(n, -1)   # [n, L]
    pos = [bb[i][None, :] * strides[i] - pads[i] + kk[i][:, None] * dil[i] for i in range(n)]      # [K, L]
    valid = np.all([(p >= 0) & (p < image[i]) for i, p in enumerate(pos)], 0).reshape(-1)
    lin = np.ravel_multi_index([np.clip(p, 0, image[i] - 1) for i, p in enumerate(pos)], image).reshape(-1)
    N = x.shape[0]
    K = int(np.prod(kernel))
    cols = x.reshape(N, -1, K * x.shape[-1])[:, :, torch.from_numpy(np.nonzero(valid)[0])]
    out = x.new_zeros(N, cols.shape[1], int(np.prod(image)))
    out = out.index_add(2, torch.from_numpy(lin[valid]), cols)
    return out.reshape(N, -1, *image)


@op("DeformConv", 19)
def _deform_conv(a, x, w, offset, b=None, mask=None):
    N, C, H, W_ = x.shape
    oc, cg, kh, kw = w.shape
    pads = a.get("pads") or [0, 0, 0, 0]
    sh, sw = a.get("strides") or [1, 1]
    dh, dw = a.get("dilations") or [1, 1]
    group, og = a.get("group", 1), a.get("offset_group", 1)
    OH, OW = offset.shape[2], offset.shape[3]
    K = kh * kw
    ky = torch.arange(kh).repeat_interleave(kw).to(x.dtype) * dh
    kx = torch.arange(kw).repeat(kh).to(x.dtype) * dw
    base_y = (torch.arange(OH) * sh - pads[0]).to(x.dtype)
    base_x = (torch.arange(OW) * sw - pads[1]).to(x.dtype)
    off = offset.reshape(N, og, K, 2, OH, OW)
    py = base_y.reshape(1, 1, 1, OH, 1) + ky.reshape(1, 1, K, 1, 1) + off[:, :, :, 0]       # [N, og, K, OH, OW]
    px = base_x.reshape(1, 1, 1, 1, OW) + kx.reshape(1, 1, K, 1, 1) + off[:, :, :, 1]
    y0, x0 = torch.floor(py), torch.floor(px)
    xg = x.reshape(N, og, C // og, H * W_)
    cols = 0
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            inside = (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W_)
            idx = (yy.clamp(0, H - 1) * W_ + xx.clamp(0, W_ - 1)).long().reshape(N, og, 1, -1)
            vals = torch.gather(xg, 3, idx.expand(N, og, C // og, idx.shape[-1])).reshape(N, og, C // og, K, OH, OW)
            cols = cols + vals * (wy * wx * inside).unsqueeze(2)
    if mask is not None:
        cols = cols * mask.reshape(N, og, 1, K, OH, OW)
    cols = cols.reshape(N, group, C // group * K, OH * OW)
    wg = w.reshape(group, oc // group, cg * K)
    y = torch.einsum("gok,ngkl->ngol", wg, cols).reshape(N, oc, OH, OW)
    if b is not None:
        y = y + b.reshape(1, -1, 1, 1)
    return y


@op("CenterCropPad", 18)
def _center_crop_pad(a, x, shape):
    axes = [v % x.dim() for v in (a.get("axes") or range(x.dim()))]
    for axis, size in zip(axes, ints(shape)):
        dim = x.shape[axis]
        if size < dim:
            x = x.narrow(axis, (dim - size) // 2, size)
        elif size > dim:
            before = (size - dim) // 2
            shp = list(x.shape)
            shp[axis] = before
            left = x.new_zeros(shp)
            shp[axis] = size - dim - before
            x = torch.cat([left, x, x.new_zeros(shp)], axis)
    return x


@op("NonMaxSuppression", 10)
def _nms(a, boxes, scores, max_out=None, iou_threshold=None, score_threshold=None):
    max_out = int(scalar(max_out)) if max_out is not None and max_out.numel() else 0
    iou_t = float(scalar(iou_threshold)) if iou_threshold is not None and iou_threshold.numel() else 0.0
    score_t = float(scalar(score_threshold)) if score_threshold is not None and score_threshold.numel() else None
    bx = boxes.detach().double().numpy()
    sc = scores.detach().double().numpy()
    if a.get("center_point_box", 0):
        c = bx
        bx = np.stack([c[..., 1] - c[..., 3] / 2, c[..., 0] - c[..., 2] / 2,
                       c[..., 1] + c[..., 3] / 2, c[..., 0] + c[..., 2] / 2], -1)
    y1, y2 = np.minimum(bx[..., 0], bx[..., 2]), np.maximum(bx[..., 0], bx[..., 2])
    x1, x2 = np.minimum(bx[..., 1], bx[..., 3]), np.maximum(bx[..., 1], bx[..., 3])
    out = []
    for b in range(sc.shape[0]):
        area = (y2[b] - y1[b]) * (x2[b] - x1[b])
        for c in range(sc.shape[1]):
            s = sc[b, c]
            order = [i for i in np.argsort(-s, kind="stable") if score_t is None or s[i] > score_t]
            kept = []
            for i in order:
                if max_out and len(kept) >= max_out:
                    break
                ok = True
                for j in kept:
                    ih = max(0.0, min(y2[b, i], y2[b, j]) - max(y1[b, i], y1[b, j]))
                    iw = max(0.0, min(x2[b, i], x2[b, j]) - max(x1[b, i], x1[b, j]))
                    inter = ih * iw
                    union = area[i] + area[j] - inter
                    if union > 0 and inter / union > iou_t:
                        ok = False
                        break
                if ok:
                    kept.append(i)
            out += [[b, c, int(i)] for i in kept]
    return torch.tensor(out, dtype=torch.int64).reshape(-1, 3)


# ------------------------------------------------------------------------------- newer ops
op("SwiGLU", 1)(lambda a, x, y: x * torch.sigmoid(a.get("alpha", 1.0) * x).to(x.dtype) * y)


@op("TensorScatter", 24)
def _tensor_scatter(a, cache, update, write_indices=None):
    axis = a.get("axis", -2) % cache.dim()
    n, L = update.shape[axis], cache.shape[axis]
    starts = ints(write_indices) if write_indices is not None else [0] * cache.shape[0]
    out = cache.clone()
    for bi, start in enumerate(starts):
        pos = torch.arange(start, start + n)
        if a.get("mode", "linear") == "circular":
            pos = pos % L
        out[bi] = out[bi].index_copy(axis - 1, pos, update[bi])
    return out


@op("BitCast", 1)
def _bitcast(a, x):
    return x.view(tdtype(a["to"]))


@op("CausalConvWithState", 1)
def _causal_conv_with_state(a, x, w, b=None, past=None):
    B, C, _ = x.shape
    k = w.shape[2]
    pad = past if past is not None else x.new_zeros(B, C, k - 1)
    padded = torch.cat([pad, x], 2)
    y = F.conv1d(padded, w, b, groups=C)
    if a.get("activation", "none") in ("silu", "swish"):
        y = (y.float() * torch.sigmoid(y.float())).to(x.dtype)
    return y, padded[:, :, padded.shape[2] - (k - 1):]
