"""mfconvert.nn.ShiftConv: the PyTorch face of the ShiftConv op (docs/ops.md#shiftconv).

A ShiftConv is a ShiftLinear applied to the im2col rows of its input (zero padding): the weight
[M, C/group, k...] is held as the matrix [M, C/group·prod(k)] (row-major, so the codes are laid out
as the op's [terms, M, C/group, k...]) with one exponent per output channel, and everything about
the weights — codes, the DeepShift-Q/PS parameterisations, terms, straight-through gradients,
onnx_constants — is ShiftLinear's (nn/shift_linear.py over nn/pow2.py). Only the forward passes
differ: the weight matrix is applied as a convolution.

In eval mode the layer computes exactly what the C++ kernel computes: x_q = sat_A(floor(x·2^F)),
Σ ±(x_q >> m) over taps, channels of the group and terms in int32 with wrap-around, one float32
rescale by 2^(e_m − F), the bias, then the fused activation if any. In training mode the same
arithmetic is emulated in float (F.conv on the rounded weights) with straight-through gradients.
1-D ([N, C, L]) and 2-D ([N, C, H, W]) convolutions; groups and depthwise.

An optional input shift (docs/ops.md#input-shift-read-through): `input_shift`, a SpatialShift
layer (nn/spatial_shift.py) applied to x first, is the node's inputs 4-6 and shift_* attributes
(passes/fuse_spatial_shift.py folds a SpatialShift into the ShiftConv that reads it). Its offsets,
scale and bias train with the conv (`mfconvert finetune` on a fused model) and export with it.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from mfconvert.nn import pow2
from mfconvert.nn.shift_linear import ShiftLinear, _ste
from mfconvert.nn.spatial_shift import SpatialShift

ACTIVATIONS = ("", "Relu", "Clip")
_CONV = {1: F.conv1d, 2: F.conv2d}


def conv_attributes(kernel_shape, strides=None, pads=None, dilations=None) -> tuple[list, list, list, list]:
    """Checked (kernel_shape, strides, pads [begin..., end...], dilations) with ONNX's defaults."""
    k = [int(v) for v in kernel_shape]
    if len(k) not in _CONV:
        raise ValueError(f"ShiftConv and AdderConv take 1-D or 2-D kernels, got kernel_shape {k}")
    if any(v < 1 for v in k):
        raise ValueError(f"kernel_shape must be positive, got {k}")
    s = [1] * len(k) if strides is None else [int(v) for v in strides]
    d = [1] * len(k) if dilations is None else [int(v) for v in dilations]
    p = [0] * (2 * len(k)) if pads is None else [int(v) for v in pads]
    if len(s) != len(k) or len(d) != len(k) or len(p) != 2 * len(k):
        raise ValueError(f"strides {s}, dilations {d} and pads {p} do not fit kernel_shape {k}")
    if any(v < 1 for v in s + d) or any(v < 0 for v in p):
        raise ValueError(f"strides/dilations must be ≥ 1 and pads ≥ 0, got {s}, {d}, {p}")
    return k, s, p, d


class ConvFaces:
    """What ShiftConv and AdderConv share around their arithmetic: the input check, the fused
    activation (docs/ops.md: Relu, or Clip to [clip_min, clip_max], after the bias) and the
    per-channel broadcast."""

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != len(self.kernel_shape) + 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__} expects [N, {self.in_channels}, {len(self.kernel_shape)} "
                             f"spatial dims], got {tuple(x.shape)}")

    def _activate(self, y: torch.Tensor) -> torch.Tensor:
        if self.activation == "Relu":
            return torch.relu(y)
        if self.activation == "Clip":
            return y.clamp(self.clip_min, self.clip_max)
        return y

    def _channel(self, v: torch.Tensor) -> torch.Tensor:
        return v.reshape(1, -1, *[1] * len(self.kernel_shape))


class ShiftConv(ConvFaces, ShiftLinear):
    """y = conv(x, W) + b with w = ±2^p or 0 (or a sum of `terms` such), W stored as [M, C/g·prod(k)]."""

    def __init__(self, in_channels: int, out_channels: int, kernel_shape, strides=None, pads=None, dilations=None,
                 group: int = 1, bias: bool = True, *, activation: str = "", clip_min: float = -math.inf,
                 clip_max: float = math.inf, input_shift: SpatialShift | None = None, **kwargs):
        k, s, p, d = conv_attributes(kernel_shape, strides, pads, dilations)
        if input_shift is not None and (len(k) != 2 or input_shift.channels != in_channels):
            raise ValueError(f"input_shift must be a SpatialShift over the {in_channels} input channels of a 2-D conv, "
                             f"got {input_shift.channels} channels, kernel_shape {k}")
        if group < 1 or in_channels % group or out_channels % group:
            raise ValueError(f"group {group} must divide in_channels {in_channels} and out_channels {out_channels}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        super().__init__(in_channels // group * math.prod(k), out_channels, bias, **kwargs)
        self.in_channels, self.out_channels, self.group = in_channels, out_channels, group
        self.kernel_shape, self.strides, self.pads, self.dilations = k, s, p, d
        self.activation, self.clip_min, self.clip_max = activation, float(clip_min), float(clip_max)
        self.input_shift = input_shift

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_conv(cls, conv: nn.Conv1d | nn.Conv2d, **kwargs) -> "ShiftConv":
        """A ShiftConv initialised from a float nn.Conv1d/nn.Conv2d (zero padding only)."""
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode {conv.padding_mode!r}: ShiftConv pads with zeros")
        if isinstance(conv.padding, str):
            raise ValueError(f"padding {conv.padding!r}: give explicit pads (the ONNX pass resolves auto_pad)")
        pads = list(conv.padding) * 2
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, pads, conv.dilation,
                    conv.groups, conv.bias is not None, **kwargs)
        return layer.load_float_weight(conv.weight.reshape(conv.out_channels, -1), conv.bias)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, exponent: torch.Tensor, bias: torch.Tensor | None, *,
                   in_channels: int, kernel_shape, strides=None, pads=None, dilations=None, group: int = 1,
                   **kwargs) -> "ShiftConv":
        """The layer an ONNX ShiftConv node stands for: unpacked codes [M, C/g·prod(k)] (one term)
        or [terms, M, C/g·prod(k)] (unpack_conv_codes)."""
        per_term = codes.unsqueeze(0) if codes.dim() == 2 else codes
        terms, out_channels = per_term.shape[:2]
        layer = cls(in_channels, out_channels, kernel_shape, strides, pads, dilations, group, bias is not None,
                    terms=terms, **kwargs)
        if per_term.shape[2] != layer.in_features:
            raise ValueError(f"codes of {per_term.shape[2]} per row, the conv needs C/group·prod(k) = {layer.in_features}")
        weight = torch.stack([pow2.decode_codes(c, exponent, layer.weight_bits) for c in per_term])
        return layer.load_float_weight(weight if terms > 1 else weight[0], bias, exponent=exponent)

    def weight_shape(self) -> list[int]:
        """The op's weight shape [M, C/group, k...] (one term)."""
        return [self.out_channels, self.in_channels // self.group, *self.kernel_shape]

    def onnx_attributes(self) -> dict:
        """The ShiftConv node's attributes for this layer."""
        attrs = {"out_channels": self.out_channels, "kernel_shape": self.kernel_shape, "strides": self.strides,
                 "pads": self.pads, "dilations": self.dilations, "group": self.group,
                 "weight_bits": self.weight_bits, "act_bits": self.act_bits, "act_frac_bits": self.act_frac_bits}
        if self.terms > 1:
            attrs["terms"] = self.terms
        if self.activation:
            attrs["activation"] = self.activation
        if self.activation == "Clip":
            attrs.update(clip_min=self.clip_min, clip_max=self.clip_max)
        if self.input_shift is not None:
            attrs.update({f"shift_{k}": v for k, v in self.input_shift.onnx_attributes().items()})
        return attrs

    # -- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The input shift (if any), then the conv: the float emulation in training, the
        kernel's integer arithmetic in eval mode."""
        if self.input_shift is not None:
            x = self.input_shift(x)
        return super().forward(x)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """Zero padding [begin..., end...] in F.pad's order (last dimension first)."""
        n = len(self.kernel_shape)
        order = [v for i in reversed(range(n)) for v in (self.pads[i], self.pads[n + i])]
        return F.pad(x, order) if any(order) else x


    def _conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return _CONV[len(self.kernel_shape)](self._pad(x), weight.reshape(self.weight_shape()), None,
                                             self.strides, 0, self.dilations, self.group)

    def _forward_float(self, x: torch.Tensor) -> torch.Tensor:
        """Training: Q-format activations and power-of-two weights emulated in float, STE."""
        self._check_input(x)
        scale = 2.0 ** self.act_frac_bits
        lo, hi = -(2.0 ** (self.act_bits - 1)), 2.0 ** (self.act_bits - 1) - 1
        x_fixed = _ste(x, torch.floor(x * scale).clamp(lo, hi) / scale)
        y = self._conv(x_fixed, self.rounded_weight())
        if self.bias is not None:
            y = y + self._channel(self.bias)
        return self._activate(y)

    @torch.no_grad()
    def forward_integer(self, x: torch.Tensor) -> torch.Tensor:
        """Exactly the kernel's arithmetic: Σ ±(x_q >> m) in int32 (wrapping), one rescale."""
        self._check_input(x)
        x_q = pow2.quantize_activation(x, self.act_bits, self.act_frac_bits).to(torch.int64)
        codes = self.codes().to(torch.int64).reshape(-1, self.out_channels, self.in_features)
        z = pow2.zero_shift(self.weight_bits)
        acc = None
        # One float64 convolution per term and shift amount, as ShiftLinear does with matrix
        # products: the summands ±(x_q >> m) are integers below 2^31 and there are at most
        # terms·C/g·prod(k) < 2^22 of them per output, so every partial sum is exact; a padded
        # position is 0 and 0 >> m = 0, so padding after the shift is padding x_q with zeros.
        for term in codes:
            m = term & z
            sign = torch.where(term >> (self.weight_bits - 1) == 1, -1.0, 1.0).to(torch.float64)
            for shift in torch.unique(m).tolist():
                if shift == z:
                    continue
                selector = torch.where(m == shift, sign, torch.zeros_like(sign))
                part = self._conv((x_q >> shift).to(torch.float64), selector)
                acc = part if acc is None else acc + part
        if acc is None:
            acc = self._conv(torch.zeros_like(x_q, dtype=torch.float64), torch.zeros(self.out_channels, self.in_features,
                                                                                     dtype=torch.float64))
        wrapped = ((acc.to(torch.int64) + 2 ** 31) % 2 ** 32 - 2 ** 31).to(torch.int32)
        y = wrapped.to(torch.float32) * self._channel(
            pow2.power_of_two(self.exponent.to(torch.int32) - self.act_frac_bits))
        if self.bias is not None:
            y = y + self._channel(self.bias.detach().to(torch.float32))
        return self._activate(y)

    def im2col(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's input as im2col rows per group: [group, N·L, C/g·prod(k)] (zero padding),
        the rows whose product with the weight matrix of each group is the convolution (after the
        input shift, if any)."""
        if self.input_shift is not None:
            x = self.input_shift(x)
        self._check_input(x)
        x = self._pad(x)
        if len(self.kernel_shape) == 1:
            x = x.unsqueeze(2)
            k, s, d = [1, *self.kernel_shape], [1, *self.strides], [1, *self.dilations]
        else:
            k, s, d = self.kernel_shape, self.strides, self.dilations
        cols = F.unfold(x, k, dilation=d, stride=s)                  # [N, C·prod(k), L], (c, taps) order
        n, _, length = cols.shape
        cols = cols.reshape(n, self.group, self.in_features, length)
        return cols.permute(1, 0, 3, 2).reshape(self.group, n * length, self.in_features)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_shape={self.kernel_shape}, strides={self.strides}, "
                f"pads={self.pads}, dilations={self.dilations}, group={self.group}, bias={self.bias is not None}, "
                f"mode={self.mode}, weight_bits={self.weight_bits}, terms={self.terms}, "
                f"act=Q{self.act_bits - self.act_frac_bits}.{self.act_frac_bits}"
                + (f", activation={self.activation}" if self.activation else "")
                + (", input_shift" if self.input_shift is not None else ""))


def unpack_conv_codes(packed: np.ndarray, out_channels: int, in_features: int, terms: int, weight_bits: int) -> torch.Tensor:
    """Unpacked codes [terms, M, C/g·prod(k)] of a ShiftConv node's W_codes input."""
    codes = pow2.unpack_codes(np.asarray(packed, np.uint8), terms * out_channels * in_features, weight_bits)
    return torch.from_numpy(codes.reshape(terms, out_channels, in_features))


# -- executor glue (the ShiftConv entry of nn/registry.py) ---------------------------------------
def _in_features(packed_bytes: int, terms: int, out_channels: int, bits: int) -> int | None:
    """C/g·prod(k) from the size of W_codes, None when the last byte's spare bits leave it open."""
    rows = terms * out_channels
    fits = [k for k in range(max(packed_bytes * 8 // bits // rows - 1, 1), packed_bytes * 8 // bits // rows + 1)
            if -(-rows * k * bits // 8) == packed_bytes]
    return fits[0] if len(fits) == 1 else None


def from_onnx(node, attrs: dict, constants: dict, ctx) -> ShiftConv:
    """The layer of a ShiftConv node: codes and exponents from its constant inputs 1–2, bias 3; C
    from the input's inferred shape, else from the size of W_codes; latent weights [M, C/g·k]
    from ctx.latent (the teacher's folded conv) in mode 'Q'."""
    missing = [i for i in (1, 2) if i not in constants]
    if missing:
        raise ValueError(f"ShiftConv without its constant inputs {missing} (W_codes, W_exponent)")
    bits, terms, m = attrs.get("weight_bits", 5), attrs.get("terms", 1), attrs["out_channels"]
    k, group = list(attrs["kernel_shape"]), attrs.get("group", 1)
    dims = ctx.shape(node.input[0]) if ctx is not None else None
    if dims and len(dims) == len(k) + 2 and dims[1]:
        in_features = int(dims[1]) // group * math.prod(k)
    else:
        in_features = _in_features(constants[1].size, terms, m, bits)
        if in_features is None:
            raise ValueError("the input's channel count is unknown (no static C after shape inference, and the "
                             "size of W_codes leaves it open)")
    codes = unpack_conv_codes(constants[1], m, in_features, terms, bits)
    bias = torch.from_numpy(constants[3].astype(np.float32).copy()) if 3 in constants else None
    layer = ShiftConv.from_codes(codes if terms > 1 else codes[0], torch.from_numpy(constants[2].astype(np.int8)), bias,
                                 in_channels=in_features // math.prod(k) * group, kernel_shape=k,
                                 strides=attrs.get("strides"), pads=attrs.get("pads"), dilations=attrs.get("dilations"),
                                 group=group, weight_bits=bits, act_bits=attrs.get("act_bits", 32),
                                 act_frac_bits=attrs.get("act_frac_bits", 16), mode=ctx.shift_mode if ctx else "Q",
                                 activation=attrs.get("activation", ""),
                                 clip_min=attrs.get("clip_min", -math.inf), clip_max=attrs.get("clip_max", math.inf),
                                 input_shift=_input_shift(node, attrs, constants))
    latent = ctx.latent.get(node.name) if ctx is not None else None
    if latent is not None and layer.mode == "Q":
        latent = np.asarray(latent, dtype=np.float32).reshape(m, -1)
        if latent.shape == (m, layer.in_features):
            layer.set_latent_weight(torch.from_numpy(latent))
    return layer


def _input_shift(node, attrs: dict, constants: dict) -> SpatialShift | None:
    """The SpatialShift layer of a node's input shift (inputs 4-6, shift_* attributes), or None:
    nn/spatial_shift.py's from_onnx on the same constants and the attributes without the prefix."""
    from mfconvert.nn import spatial_shift

    if len(node.input) <= 4 or not node.input[4]:
        return None
    if 4 not in constants:
        raise ValueError("ShiftConv without its constant input 4 (shift_offsets)")
    shift_attrs = {k[len("shift_"):]: v for k, v in attrs.items() if k.startswith("shift_")}
    try:
        return spatial_shift.from_onnx(node, shift_attrs, {i - 3: v for i, v in constants.items() if i >= 4}, None)
    except ValueError as err:
        raise ValueError(f"input shift (inputs 4-6, shift_* attributes): {err}") from None


def to_onnx(layer: ShiftConv, node, values: dict) -> list:
    """Write the layer's packed codes, exponents and bias under the node's input names, and its
    input shift's rounded offsets, scale and bias under inputs 4-6."""
    from mfconvert.nn import spatial_shift

    packed, exponent, bias = layer.onnx_constants()
    values[node.input[1]], values[node.input[2]] = packed, exponent
    if bias is not None:
        values[node.input[3]] = bias
    if layer.input_shift is not None:
        view = onnx.NodeProto()
        view.input.extend([node.input[0], *node.input[4:7]])
        spatial_shift.to_onnx(layer.input_shift, view, values)
    return []


def registry_examples() -> list:
    """Small ShiftConv nodes for the registry test: 2-D with two terms and ReLU6, depthwise stride 2,
    1-D dilated without bias, and two reading through an input shift (a 1x1 conv after a stride-2
    shift with scale, bias and ReLU6; a depthwise 3x3 after an edge-padded, channel-shifted one);
    the layer must match the kernel bit for bit (atol 0)."""
    from mfconvert.nn.registry import Example   # the registry imports this module
    from onnx import helper
    from mfconvert.ort_ops import DOMAIN

    rng = np.random.default_rng(3)
    torch.manual_seed(3)
    cases = [(dict(in_channels=4, out_channels=6, kernel_shape=[3, 3], pads=[1, 0, 1, 1], terms=2,
                   activation="Clip", clip_min=0.0, clip_max=6.0), True, (2, 4, 7, 6)),
             (dict(in_channels=6, out_channels=6, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], group=6),
              True, (1, 6, 9, 8)),
             (dict(in_channels=4, out_channels=5, kernel_shape=[3], dilations=[2], pads=[2, 2]), False, (2, 4, 11)),
             (dict(in_channels=5, out_channels=7, kernel_shape=[1, 1],
                   input_shift=SpatialShift(5, rng.integers(-1, 2, size=(5, 2)), strides=[2, 2],
                                            scale=rng.normal(size=5), bias=rng.normal(size=5), activation="Clip",
                                            clip=(0.0, 6.0))), True, (2, 5, 9, 8)),
             (dict(in_channels=6, out_channels=6, kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=6,
                   input_shift=SpatialShift(6, rng.integers(-2, 3, size=(6, 2)), padding="edge", channel_shift=2,
                                            bias=rng.normal(size=6), activation="Relu")), False, (1, 6, 7, 9))]
    out = []
    for i, (kw, bias, shape) in enumerate(cases):
        layer = ShiftConv(bias=bias, act_frac_bits=12, **kw).eval()
        packed, exponent, b = layer.onnx_constants()
        consts = {f"codes{i}": packed, f"exponent{i}": exponent, **({f"bias{i}": b} if bias else {})}
        inputs = ["X", f"codes{i}", f"exponent{i}", f"bias{i}" if bias else ""]
        shift = layer.input_shift
        if shift is not None:
            tail = {"offsets": shift.integer_offsets(), "scale": shift.scale, "bias": shift.bias}
            for what, value in tail.items():
                name = f"shift_{what}{i}" if value is not None else ""
                inputs.append(name)
                if name:
                    consts[name] = value if isinstance(value, np.ndarray) else value.detach().numpy().astype(np.float32)
        while not inputs[-1]:
            inputs.pop()
        node = helper.make_node("ShiftConv", inputs, ["Y"], name=f"shift_conv{i}", domain=DOMAIN,
                                **layer.onnx_attributes())
        out.append(Example(node, consts, {"X": (rng.normal(size=shape) * 2).astype(np.float32)}, 0.0))
    return out
