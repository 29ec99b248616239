"""mfconvert.nn.AdderConv: the PyTorch face of the AdderConv op (AdderNet; docs/ops.md#adderconv).

y = −Σ |x − w| over the taps and the channels of the group (+ bias), then the fused activation:
additions, subtractions and absolute values only. In eval mode the layer computes exactly what
the C++ kernel computes: x_q = sat_A(floor(x·2^F)) (a padded position is 0), w_q likewise,
acc = Σ |x_q − w_q| in int64, y = −float32(acc)·2^(−F) + b. In training mode the same arithmetic
is emulated in float (straight-through for the fixed-point rounding of x and w) with AdderNet's
gradients (Chen et al., CVPR 2020), not the true ones:
  ∂y/∂w = x − w                 (the full-precision gradient, eq. 5, instead of sign(x − w));
  ∂y/∂x = HardTanh(w − x)       (eq. 6: the true sign(w − x) clipped to [−1, 1]);
and the weight gradient of the whole layer rescaled to the adaptive learning rate (eq. 11)
  ΔW ← η·√k · ΔW / ‖ΔW‖₂        (k = the weight's element count, η = 0.2),
so an optimiser's step is lr·η·√k in norm whatever the layer's depth (plain SGD with momentum,
the paper's optimiser, is what calibrate/finetune.py uses for these weights).
1-D ([N, C, L]) and 2-D ([N, C, H, W]) convolutions, groups and depthwise.

AdderLinear is the 1×1 case on [..., in] (a linear layer's shape). It fits a linear whose output
feeds a normalisation (BatchNorm/LayerNorm: the distances are large and negative) — an MLP's
hidden layer, AdderNet's and ShiftAddNet's 1×1-conv classifiers before their BatchNorm. It does not
fit a classifier head or an attention projection that feeds softmax or dot products unnormalised;
the ONNX passes leave linears to shift-linear.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mfconvert.nn import pow2
from mfconvert.nn.shift_conv import ACTIVATIONS, ConvFaces, conv_attributes

ETA = 0.2                      # AdderNet's η of the adaptive learning rate
OP_NAME = "AdderConv"
MAX_TAPS = 1 << 22             # taps · C/group per output element (docs/ops.md: the kernel checks it)
_CHUNK = 1 << 18               # elements of a [rows, M/g, C/g·prod(k)] block built at a time


def _fixed(x: torch.Tensor, act_bits: int, act_frac_bits: int) -> torch.Tensor:
    """sat_A(floor(x·2^F))·2^(−F) in float, with a straight-through gradient."""
    scale = 2.0 ** act_frac_bits
    lo, hi = -(2.0 ** (act_bits - 1)), 2.0 ** (act_bits - 1) - 1
    return x + (torch.floor(x * scale).clamp(lo, hi) / scale - x).detach()


class AdderFunction(torch.autograd.Function):
    """−Σ_d |cols[g, r, d] − w[g, m, d]| → [g, r, m], with AdderNet's backward (module docstring).
    eta None: no rescaling of the weight gradient."""

    @staticmethod
    def forward(ctx, cols: torch.Tensor, weight: torch.Tensor, eta: float | None):
        ctx.save_for_backward(cols, weight)
        ctx.eta = eta
        return -torch.cdist(cols, weight, p=1)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        cols, weight = ctx.saved_tensors
        grad_cols = grad_w = None
        if ctx.needs_input_grad[1]:
            # Σ_r (x_r − w)·g_r = gᵀx − w·Σ_r g_r: two matrix products, nothing materialised.
            grad_w = grad_out.transpose(1, 2) @ cols - weight * grad_out.sum(1).unsqueeze(2)
            if ctx.eta is not None:
                grad_w = grad_w * (ctx.eta * math.sqrt(grad_w.numel()) / grad_w.norm().clamp_min(1e-12))
        if ctx.needs_input_grad[0]:
            grad_cols = torch.empty_like(cols)
            g, r, d = cols.shape
            m = weight.shape[1]
            step = max(1, _CHUNK // max(1, m * d))
            for start in range(0, r, step):
                x = cols[:, start:start + step]                                   # [g, s, d]
                s = x.shape[1]
                clipped = (weight.unsqueeze(1) - x.unsqueeze(2)).clamp_(-1, 1)    # [g, s, m, d]
                # Σ_m clipped[., ., m, :]·g[., ., m] as one batched product per row
                part = torch.bmm(grad_out[:, start:start + step].reshape(g * s, 1, m), clipped.reshape(g * s, m, d))
                grad_cols[:, start:start + step] = part.reshape(g, s, d)
        return grad_cols, grad_w, None


class AdderConv(ConvFaces, nn.Module):
    """y = −Σ|x − w| (+ b) over each output's window; see the module docstring."""

    def __init__(self, in_channels: int, out_channels: int, kernel_shape, strides=None, pads=None, dilations=None,
                 group: int = 1, bias: bool = True, *, act_bits: int = 32, act_frac_bits: int = 16,
                 activation: str = "", clip_min: float = -math.inf, clip_max: float = math.inf,
                 eta: float | None = ETA):
        super().__init__()
        k, s, p, d = conv_attributes(kernel_shape, strides, pads, dilations)
        if group < 1 or in_channels % group or out_channels % group:
            raise ValueError(f"group {group} must divide in_channels {in_channels} and out_channels {out_channels}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        pow2.check_format(5, act_bits, act_frac_bits)
        self.in_channels, self.out_channels, self.group = in_channels, out_channels, group
        self.kernel_shape, self.strides, self.pads, self.dilations = k, s, p, d
        self.act_bits, self.act_frac_bits = act_bits, act_frac_bits
        self.activation, self.clip_min, self.clip_max = activation, float(clip_min), float(clip_max)
        self.eta = eta
        self.taps = in_channels // group * math.prod(k)
        if self.taps > MAX_TAPS:
            raise ValueError(f"C/group·prod(kernel_shape) = {self.taps} exceeds {MAX_TAPS} (the int64 sum's bound)")
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels // group, *k))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    @classmethod
    def from_conv(cls, conv: nn.Conv1d | nn.Conv2d, **kwargs) -> "AdderConv":
        """An AdderConv with a float conv's geometry and its weights as they are (zero padding only;
        the passes choose better starting weights, passes/adder_conv.py)."""
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"padding {conv.padding!r}/{conv.padding_mode!r}: AdderConv takes explicit zero pads")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, list(conv.padding) * 2,
                    conv.dilation, conv.groups, conv.bias is not None, **kwargs)
        with torch.no_grad():
            layer.weight.copy_(conv.weight)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer

    def onnx_attributes(self) -> dict:
        """The AdderConv node's attributes for this layer."""
        attrs = {"out_channels": self.out_channels, "kernel_shape": self.kernel_shape, "strides": self.strides,
                 "pads": self.pads, "dilations": self.dilations, "group": self.group,
                 "act_bits": self.act_bits, "act_frac_bits": self.act_frac_bits}
        if self.activation:
            attrs["activation"] = self.activation
        if self.activation == "Clip":
            attrs.update(clip_min=self.clip_min, clip_max=self.clip_max)
        return attrs

    # -- forward ----------------------------------------------------------------------------

    def im2col(self, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """([group, N·L, C/g·prod(k)] im2col rows with zero padding, output spatial shape)."""
        n = len(self.kernel_shape)
        order = [v for i in reversed(range(n)) for v in (self.pads[i], self.pads[n + i])]
        x = F.pad(x, order) if any(order) else x
        k, s, d = self.kernel_shape, self.strides, self.dilations
        if n == 1:
            x, k, s, d = x.unsqueeze(2), [1, *k], [1, *s], [1, *d]
        spatial = [(x.shape[2 + i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(2)]
        if min(spatial) < 1:
            raise ValueError(f"AdderConv: input {tuple(x.shape)} (padded) is smaller than the kernel")
        cols = F.unfold(x, k, dilation=d, stride=s)                       # [N, C·prod(k), L], (c, taps) order
        batch, _, length = cols.shape
        cols = cols.reshape(batch, self.group, self.taps, length).permute(1, 0, 3, 2)
        return cols.reshape(self.group, batch * length, self.taps), spatial[1:] if n == 1 else spatial

    def _fold(self, out: torch.Tensor, batch: int, spatial: list[int]) -> torch.Tensor:
        """[group, N·L, M/g] → [N, M, *spatial]."""
        out = out.reshape(self.group, batch, -1, self.out_channels // self.group).permute(1, 0, 3, 2)
        return out.reshape(batch, self.out_channels, *spatial)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self._forward_float(x)
        return self.forward_integer(x)

    def _forward_float(self, x: torch.Tensor) -> torch.Tensor:
        """Training: fixed-point x and w emulated in float (STE), AdderNet's gradients."""
        self._check_input(x)
        cols, spatial = self.im2col(_fixed(x, self.act_bits, self.act_frac_bits))
        w = _fixed(self.weight, self.act_bits, self.act_frac_bits).reshape(self.group, -1, self.taps)
        y = self._fold(AdderFunction.apply(cols, w, self.eta), x.shape[0], spatial)
        if self.bias is not None:
            y = y + self._channel(self.bias)
        return self._activate(y)

    def weight_fixed(self) -> torch.Tensor:
        """w_q = sat_A(floor(w·2^F)) as int64, [M, C/g, k...]."""
        return pow2.quantize_activation(self.weight.detach(), self.act_bits, self.act_frac_bits).to(torch.int64)

    @torch.no_grad()
    def forward_integer(self, x: torch.Tensor) -> torch.Tensor:
        """Exactly the kernel's arithmetic: Σ|x_q − w_q| in int64, −float32(acc)·2^(−F) + b."""
        self._check_input(x)
        x_q = pow2.quantize_activation(x, self.act_bits, self.act_frac_bits).to(torch.float64)
        cols, spatial = self.im2col(x_q)                 # padding after quantising: x_q = 0 there
        w_q = self.weight_fixed().to(torch.float64).reshape(self.group, -1, self.taps)
        # |x_q − w_q| < 2^32 are integers; with taps ≤ 2^21 every partial sum stays below 2^53, so
        # float64's cdist is exact in any order. Beyond that, sum int64 blocks.
        if self.taps <= 1 << 21:
            acc = torch.cdist(cols, w_q, p=1).to(torch.int64)
        else:
            acc = torch.empty(cols.shape[0], cols.shape[1], w_q.shape[1], dtype=torch.int64)
            step = max(1, _CHUNK // max(1, w_q.shape[1] * self.taps))
            for start in range(0, cols.shape[1], step):
                diff = cols[:, start:start + step].to(torch.int64).unsqueeze(2) - w_q.to(torch.int64).unsqueeze(1)
                acc[:, start:start + step] = diff.abs_().sum(3)
        # int64 → float32 rounds to nearest even once: through float64 (exact below 2^53), then float32.
        acc32 = acc.to(torch.float64).to(torch.float32)
        y = self._fold(-acc32 * pow2.power_of_two(torch.tensor(-self.act_frac_bits)), x.shape[0], spatial)
        if self.bias is not None:
            y = y + self._channel(self.bias.detach().to(torch.float32))
        return self._activate(y)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_shape={self.kernel_shape}, strides={self.strides}, "
                f"pads={self.pads}, dilations={self.dilations}, group={self.group}, bias={self.bias is not None}, "
                f"act=Q{self.act_bits - self.act_frac_bits}.{self.act_frac_bits}, eta={self.eta}"
                + (f", activation={self.activation}" if self.activation else ""))


class AdderLinear(AdderConv):
    """y = −Σ_i |x_i − w_oi| (+ b_o) on the last dim: AdderConv's arithmetic with a 1×1 kernel.
    Where it fits: see the module docstring."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **kwargs):
        super().__init__(in_features, out_features, [1], bias=bias, **kwargs)
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"AdderLinear expects last dim {self.in_features}, got {tuple(x.shape)}")
        rows = x.reshape(-1, self.in_features, 1)
        return super().forward(rows).reshape(*x.shape[:-1], self.out_features)


# -- the op's ONNX face (nn/registry.py's AdderConv entry) ----------------------------------------
def from_onnx(node, attrs: dict, constants: dict, ctx=None) -> AdderConv:
    """The layer an ONNX AdderConv node stands for (W from input 1, B from input 2 if given)."""
    if 1 not in constants:
        raise ValueError("AdderConv without its constant weight (input 1)")
    w = torch.from_numpy(constants[1].astype("float32"))
    bias = constants.get(2)
    group = int(attrs.get("group", 1))
    if w.dim() not in (3, 4) or "out_channels" in attrs and int(attrs["out_channels"]) != w.shape[0]:
        raise ValueError(f"weight of shape {list(w.shape)} for out_channels {attrs.get('out_channels')}")
    layer = AdderConv(w.shape[1] * group, w.shape[0], attrs.get("kernel_shape", list(w.shape[2:])),
                      attrs.get("strides"), attrs.get("pads"), attrs.get("dilations"), group, bias is not None,
                      act_bits=int(attrs.get("act_bits", 32)), act_frac_bits=int(attrs.get("act_frac_bits", 16)),
                      activation=attrs.get("activation", "") or "", clip_min=attrs.get("clip_min", -math.inf),
                      clip_max=attrs.get("clip_max", math.inf))
    if list(layer.weight.shape) != list(w.shape):
        raise ValueError(f"weight of shape {list(w.shape)}, kernel_shape {layer.kernel_shape} needs "
                         f"{list(layer.weight.shape)}")
    with torch.no_grad():
        layer.weight.copy_(w)
        if bias is not None:
            layer.bias.copy_(torch.from_numpy(bias.astype("float32")))
    return layer


def to_onnx(layer: AdderConv, node, values: dict) -> list:
    """Write the trained weight (and bias) under the node's input names."""
    values[node.input[1]] = layer.weight.detach().cpu().numpy().astype("float32")
    if layer.bias is not None and len(node.input) > 2 and node.input[2]:
        values[node.input[2]] = layer.bias.detach().cpu().numpy().astype("float32")
    return []


def registry_examples() -> list:
    """Small AdderConv nodes for the registry test: 2-D with asymmetric pads, bias and ReLU6,
    depthwise stride 2, 1-D dilated without bias at Q8.8; the layer must match the kernel bit for
    bit (atol 0)."""
    import numpy as np
    from onnx import helper

    from mfconvert.nn.registry import Example   # the registry imports this module
    from mfconvert.ort_ops import DOMAIN

    rng = np.random.default_rng(5)
    torch.manual_seed(5)
    cases = [(dict(in_channels=4, out_channels=6, kernel_shape=[3, 3], pads=[1, 0, 1, 1], activation="Clip",
                   clip_min=0.0, clip_max=6.0), True, (2, 4, 7, 6)),
             (dict(in_channels=6, out_channels=6, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], group=6),
              True, (1, 6, 9, 8)),
             (dict(in_channels=4, out_channels=5, kernel_shape=[3], dilations=[2], pads=[2, 2], act_bits=16,
                   act_frac_bits=8), False, (2, 4, 11))]
    out = []
    for i, (kw, bias, shape) in enumerate(cases):
        layer = AdderConv(bias=bias, **kw).eval()
        with torch.no_grad():
            layer.weight.mul_(0.5)
            if bias:
                layer.bias.uniform_(10.0, 30.0)
        consts = {f"weight{i}": layer.weight.detach().numpy().copy(),
                  **({f"bias{i}": layer.bias.detach().numpy().copy()} if bias else {})}
        node = helper.make_node(OP_NAME, ["X", *consts], ["Y"], name=f"adder_conv{i}", domain=DOMAIN,
                                **layer.onnx_attributes())
        out.append(Example(node, consts, {"X": (rng.normal(size=shape) * 2).astype(np.float32)}, 0.0))
    return out
