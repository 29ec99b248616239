"""SpatialShift as a PyTorch layer (docs/ops.md#spatialshift): each channel moved by its own
offset (dy, dx). The offsets are continuous parameters, sampled by bilinear interpolation (Active
Shift, Jeon & Kim 2018); an L1 penalty on them drives most to zero (Sparse Shift, Chen et al. 2019);
in training they are rounded to integers with a straight-through estimator, so the forward pass is
the exported op's and the gradient is the bilinear one at the rounded point (quantisation-aware).
In eval mode the layer is the kernel bit for bit (integer offsets: a gather of X's floats).

The fused tail (docs/ops.md#spatialshift; passes/fuse_spatial_shift.py writes it): an optional
per-channel scale and bias, trainable, and a Relu/Clip, in float32 in the kernel's order —
v·s_c, + b_c, then v < lo → lo, v > hi → hi (NaN kept) — so a fused model still finetunes."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

MODES = ("ste", "active")
OFFSET_UNIT = 100.0


class SpatialShift(nn.Module):
    """offsets [C, 2] (dy, dx), read addresses: Y[n, c, i, j] = X[n, c', i·sh + dy, j·sw + dx].
    mode 'ste' rounds the offsets in training too (straight-through), 'active' trains the
    continuous ones (rounded at export); `sparsity` is the L1 coefficient on the offsets, added
    to their gradient during backward (so any training loop, `mfconvert finetune` included,
    applies it without a loss term of its own)."""

    def __init__(self, channels: int, offsets=None, strides=(1, 1), padding: str = "zeros", channel_shift: int = 0,
                 sparsity: float = 0.0, mode: str = "ste", scale=None, bias=None, activation: str = "",
                 clip: tuple[float, float] | None = None):
        super().__init__()
        if activation not in ("", "Relu", "Clip"):
            raise ValueError(f"activation must be '', 'Relu' or 'Clip', got {activation!r}")
        if activation == "Clip":
            lo, hi = (-np.inf, np.inf) if clip is None else (float(clip[0]), float(clip[1]))
            if np.isnan(lo) or np.isnan(hi) or lo > hi:
                raise ValueError(f"clip ({lo}, {hi}) must be numbers with min <= max")
        elif clip is not None:
            raise ValueError("clip is only allowed with activation 'Clip'")
        if padding not in ("zeros", "edge"):
            raise ValueError(f"padding must be 'zeros' or 'edge', got {padding!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if len(strides) != 2 or min(strides) < 1:
            raise ValueError(f"strides must be two ints >= 1, got {list(strides)}")
        if sparsity < 0:
            raise ValueError(f"sparsity must be >= 0, got {sparsity}")
        init = torch.zeros(channels, 2) if offsets is None else torch.as_tensor(np.asarray(offsets), dtype=torch.float32)
        if init.shape != (channels, 2):
            raise ValueError(f"offsets must have shape [{channels}, 2], got {list(init.shape)}")
        self.channels, self.strides, self.padding = channels, [int(s) for s in strides], padding
        self.channel_shift, self.sparsity, self.mode = int(channel_shift), float(sparsity), mode
        # Stored in units of OFFSET_UNIT pixels: AdamW's steps are ~lr in the parameter, so at
        # finetune's lr of 1e-4 an offset moves ~0.01 px a step (a rounding boundary in ~50).
        self.offset_p = nn.Parameter(init.clone() / OFFSET_UNIT)
        self.offset_p.register_hook(self._l1_gradient)
        self.scale = None if scale is None else nn.Parameter(self._per_channel(scale, "scale"))
        self.bias = None if bias is None else nn.Parameter(self._per_channel(bias, "bias"))
        self.activation = activation
        self.clip = {"": None, "Relu": (0.0, np.inf), "Clip": (lo, hi) if activation == "Clip" else None}[activation]

    def _per_channel(self, value, what: str) -> torch.Tensor:
        t = torch.tensor(np.array(value, np.float32))
        if t.shape != (self.channels,):
            raise ValueError(f"{what} must have shape [{self.channels}], got {list(t.shape)}")
        return t.clone()

    def tail(self, y: torch.Tensor) -> torch.Tensor:
        """The fused scale, bias and clamp, elementwise in the kernel's order."""
        if self.scale is not None:
            y = y * self.scale.view(1, -1, 1, 1)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        if self.clip is not None:
            lo, hi = (torch.tensor(v, dtype=y.dtype, device=y.device) for v in self.clip)
            y = torch.where(y < lo, lo, y)   # NaN compares false: kept, as in the kernel
            y = torch.where(y > hi, hi, y)
        return y

    @property
    def offset(self) -> torch.Tensor:
        """The offsets in pixels, [C, 2] (dy, dx)."""
        return self.offset_p * OFFSET_UNIT

    def _l1_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        return grad + self.sparsity * torch.sign(self.offset_p.detach()) if self.sparsity else grad

    def penalty(self) -> torch.Tensor:
        """Σ |offsets| (the Sparse Shift term whose gradient, times `sparsity`, the hook adds)."""
        return self.offset.abs().sum()

    def integer_offsets(self) -> np.ndarray:
        """The exported offsets: int64 [C, 2], torch.round (half to even)."""
        return torch.round(self.offset.detach()).to(torch.int64).cpu().numpy()

    def _gather(self, x: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
        """x sampled along `dim` (2 or 3) at per-channel integer positions index [C, L]: zeros
        outside (padding 'zeros') or the nearest pixel ('edge')."""
        size = x.shape[dim]
        inside = (index >= 0) & (index < size)
        clamped = index.clamp(0, max(size - 1, 0))
        shape = list(x.shape)
        shape[dim] = index.shape[1]
        view = (1, self.channels, -1, 1) if dim == 2 else (1, self.channels, 1, -1)
        out = torch.gather(x, dim, clamped.view(view).expand(shape))
        if self.padding == "zeros":   # exactly 0.0 (a product with the mask would keep -0.0, inf·0 = NaN)
            out = torch.where(inside.view(view).expand(shape), out, torch.zeros((), dtype=out.dtype, device=out.device))
        return out

    def _axis(self, x: torch.Tensor, dim: int, offset: torch.Tensor) -> torch.Tensor:
        """Bilinear sampling along one axis: (1 − t)·S(floor) + t·S(floor + 1), t = offset − floor."""
        stride = self.strides[dim - 2]
        out_size = -(-x.shape[dim] // stride)
        base = torch.arange(out_size, device=x.device) * stride
        floor = torch.floor(offset.detach())
        t = (offset - floor).to(x.dtype).view((1, -1, 1, 1))
        index = base[None, :] + floor.to(torch.int64)[:, None]
        low = self._gather(x, dim, index)
        if not t.requires_grad and not t.any():
            return low
        return low + t * (self._gather(x, dim, index + 1) - low)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"SpatialShift expects [N, {self.channels}, H, W], got {list(x.shape)}")
        if x.shape[0] * x.shape[2] * x.shape[3] == 0:
            return self.tail(x.new_zeros(x.shape[0], self.channels, -(-x.shape[2] // self.strides[0]),
                                         -(-x.shape[3] // self.strides[1])))
        if self.channel_shift:
            x = torch.roll(x, self.channel_shift, dims=1)
        offset = self.offset
        if self.mode == "ste" or not self.training:
            offset = offset + (torch.round(offset) - offset).detach()
        return self.tail(self._axis(self._axis(x, 2, offset[:, 0]), 3, offset[:, 1]))

    def onnx_attributes(self) -> dict:
        attrs = {"strides": self.strides}
        if self.activation:
            attrs["activation"] = self.activation
        if self.activation == "Clip":
            attrs.update(clip_min=self.clip[0], clip_max=self.clip[1])
        if self.padding != "zeros":
            attrs["padding"] = self.padding
        if self.channel_shift:
            attrs["channel_shift"] = self.channel_shift
        if self.sparsity:
            attrs["sparsity"] = self.sparsity
        return attrs

    def extra_repr(self) -> str:
        moved = int((self.integer_offsets() != 0).any(axis=1).sum())
        tail = "".join(f", {k}" for k, on in (("scale", self.scale is not None), ("bias", self.bias is not None)) if on)
        return (f"{self.channels}, strides={self.strides}, padding={self.padding}, channel_shift={self.channel_shift}, "
                f"sparsity={self.sparsity}, mode={self.mode}, channels moved={moved}{tail}"
                + (f", activation={self.activation}{self.clip if self.activation == 'Clip' else ''}" if self.activation else ""))


# -- executor glue (the SpatialShift entry of nn/registry.py) ------------------------------------
def from_onnx(node, attrs: dict, constants: dict, ctx) -> SpatialShift:
    """The layer of a SpatialShift node: offsets from its constant input 1, the fused tail's scale
    and bias from inputs 2 and 3 (trainable) and its activation attributes."""
    if 1 not in constants:
        raise ValueError("SpatialShift without its constant input 1 (offsets)")
    offsets = np.asarray(constants[1])
    if offsets.ndim != 2 or offsets.shape[1] != 2 or not np.issubdtype(offsets.dtype, np.integer):
        raise ValueError(f"offsets must be int64 [C, 2], got {offsets.dtype} {list(offsets.shape)}")
    tail = {}
    for index, what in ((2, "scale"), (3, "bias")):
        if index in constants:
            v = np.asarray(constants[index])
            if v.dtype != np.float32 or v.shape != (offsets.shape[0],):
                raise ValueError(f"{what} must be float32 [{offsets.shape[0]}], got {v.dtype} {list(v.shape)}")
            tail[what] = v
    activation = attrs.get("activation", "")
    activation = activation.decode() if isinstance(activation, bytes) else activation
    clip = (attrs.get("clip_min", -np.inf), attrs.get("clip_max", np.inf)) if activation == "Clip" else None
    return SpatialShift(offsets.shape[0], offsets.astype(np.float32), strides=attrs.get("strides", [1, 1]),
                        padding=attrs.get("padding", "zeros"), channel_shift=attrs.get("channel_shift", 0),
                        sparsity=attrs.get("sparsity", 0.0), activation=activation, clip=clip, **tail)


def to_onnx(layer: SpatialShift, node, values: dict) -> list:
    """Write the rounded offsets, and the trained scale and bias, under the node's input names."""
    values[node.input[1]] = layer.integer_offsets()
    for index, p in ((2, layer.scale), (3, layer.bias)):
        if p is not None:
            values[node.input[index]] = p.detach().cpu().numpy().astype(np.float32)
    return []


def registry_examples() -> list:
    """Small SpatialShift nodes for the registry test (bit for bit, atol 0): stride 1 zeros,
    stride 2 edge with a channel shift, offsets past the image; fused tails: scale, bias and
    Clip 0..6 at stride 2, bias and Relu, scale alone with edge padding."""
    from onnx import helper

    from mfconvert.nn.registry import Example   # the registry imports this module
    from mfconvert.ort_ops import DOMAIN

    rng = np.random.default_rng(5)
    cases = [(dict(), (2, 4, 6, 7), 1, ""), (dict(strides=[2, 2], padding="edge", channel_shift=1), (1, 5, 9, 8), 2, ""),
             (dict(strides=[1, 2]), (1, 3, 4, 5), 7, ""),
             (dict(strides=[2, 2], activation="Clip", clip_min=0.0, clip_max=6.0), (1, 6, 7, 7), 1, "sb"),
             (dict(activation="Relu"), (2, 3, 5, 6), 2, "b"), (dict(padding="edge"), (1, 4, 5, 5), 2, "s")]
    out = []
    for i, (attrs, shape, reach, tail) in enumerate(cases):
        offsets = rng.integers(-reach, reach + 1, size=(shape[1], 2)).astype(np.int64)
        consts = {f"offsets{i}": offsets}
        inputs = ["X", f"offsets{i}", f"scale{i}" if "s" in tail else "", f"bias{i}" if "b" in tail else ""]
        for name in inputs[2:]:
            if name:
                consts[name] = (rng.normal(size=shape[1]) * 2).astype(np.float32)
        while not inputs[-1]:
            inputs.pop()
        node = helper.make_node("SpatialShift", inputs, ["Y"], name=f"spatial_shift{i}", domain=DOMAIN, **attrs)
        out.append(Example(node, consts, {"X": (rng.normal(size=shape) * 4).astype(np.float32)}, 0.0))
    return out
