"""mfconvert.nn.ShiftLinear: the PyTorch face of the ShiftLinear op (docs/ops.md#shiftlinear).

In eval mode it computes exactly what the C++ kernel computes (integer shift-and-add on Q-format
activations, one float rescale), bit for bit. In training mode it emulates that arithmetic in
float with straight-through gradients, in one of DeepShift's two parameterisations:
  - "Q"  (DeepShift-Q): keep float weights, round them to ±2^p in the forward pass;
  - "PS" (DeepShift-PS): learn the shift p and the sign s directly, each rounded in the forward.
With terms > 1 (Q mode only) each weight is a sum of signed powers of two, and the layer keeps
one latent float matrix per term ([terms, out, in]; term t+1 starts as what term t's rounding
left over), so codes read back from ONNX round-trip exactly.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mfconvert.nn import pow2


def _ste(value: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    """`rounded` in the forward pass, the gradient of `value` in the backward pass."""
    return value + (rounded - value).detach()


class ShiftLinear(nn.Module):
    """y = x Wᵀ + b with w = ±2^p or 0; see the module docstring for the two training modes."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, weight_bits: int = 5,
                 act_bits: int = 32, act_frac_bits: int = 16, weight_scale: str = "channel",
                 mode: str = "Q", terms: int = 1):
        super().__init__()
        pow2.check_format(weight_bits, act_bits, act_frac_bits, terms)
        if mode not in ("Q", "PS"):
            raise ValueError(f"mode must be 'Q' or 'PS', got {mode!r}")
        if mode == "PS" and terms > 1:
            raise ValueError("mode 'PS' learns one shift per weight; terms > 1 needs mode 'Q'")
        self.in_features, self.out_features, self.terms = in_features, out_features, terms
        self.weight_bits, self.act_bits, self.act_frac_bits = weight_bits, act_bits, act_frac_bits
        self.weight_scale, self.mode = weight_scale, mode
        w = torch.empty(out_features, in_features)
        nn.init.kaiming_uniform_(w, a=5 ** 0.5)
        self.register_buffer("exponent", pow2.channel_exponents(w, weight_scale))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._set_weight(w)

    # -- parameters -------------------------------------------------------------------------
    def _set_weight(self, weight: torch.Tensor) -> None:
        """Store a float weight [out, in] (or, with terms > 1, the latent of each term
        [terms, out, in]) in the parameterisation of self.mode."""
        weight = weight.detach().to(torch.float32)
        if self.mode == "Q":
            if self.terms > 1 and weight.dim() == 2:
                weight = pow2.residual_terms(weight, self.exponent, self.weight_bits, self.terms)
            self.weight = nn.Parameter(weight.clone())
            return
        codes = pow2.round_to_codes(weight, self.exponent, self.weight_bits)
        z = pow2.zero_shift(self.weight_bits)
        m = (codes & z).to(torch.float32)
        sign = torch.where(codes >> (self.weight_bits - 1) == 1, -1.0, 1.0)
        sign = torch.where(m == z, torch.zeros_like(sign), sign)
        # shift holds -m (the power relative to the channel exponent), sign holds s ∈ [-1, 1].
        self.shift = nn.Parameter(-m.clamp(max=z - 1))
        self.sign = nn.Parameter(sign)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "ShiftLinear":
        """A ShiftLinear initialised from a float nn.Linear (weights rounded at first use)."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, **kwargs)
        return layer.load_float_weight(linear.weight, linear.bias)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, exponent: torch.Tensor, bias: torch.Tensor | None,
                   **kwargs) -> "ShiftLinear":
        """The layer that an ONNX ShiftLinear node (unpacked codes [out, in], or [terms, out, in])
        stands for."""
        out_features, in_features = codes.shape[-2:]
        terms = codes.shape[0] if codes.dim() == 3 else 1
        layer = cls(in_features, out_features, bias is not None, terms=terms, **kwargs)
        weight = torch.stack([pow2.decode_codes(c, exponent, layer.weight_bits) for c in codes]) \
            if terms > 1 else pow2.decode_codes(codes, exponent, layer.weight_bits)
        return layer.load_float_weight(weight, bias, exponent=exponent)

    @torch.no_grad()
    def load_float_weight(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                          exponent: torch.Tensor | None = None) -> "ShiftLinear":
        if exponent is None:
            exponent = pow2.channel_exponents(weight.sum(0) if weight.dim() == 3 else weight, self.weight_scale)
        self.exponent.copy_(exponent.to(torch.int8))
        self._set_weight(weight)
        if bias is not None:
            self.bias.copy_(bias.detach().to(torch.float32))
        return self

    @torch.no_grad()
    def set_latent_weight(self, weight: torch.Tensor) -> None:
        """DeepShift-Q: continue from the float weight [out, in] (split into terms with terms > 1),
        in place, so an optimiser holding the parameter keeps it."""
        if self.mode != "Q":
            raise ValueError("only mode 'Q' keeps latent float weights")
        weight = weight.detach().to(torch.float32)
        if self.terms > 1:
            weight = pow2.residual_terms(weight, self.exponent, self.weight_bits, self.terms)
        self.weight.copy_(weight)

    @torch.no_grad()
    def float_weight(self) -> torch.Tensor:
        """The float weight [out, in] the latent stands for (mode 'Q'): with terms > 1, the rounded
        values of all terms but the last plus the last term's latent, which is what the split of
        set_latent_weight inverts."""
        if self.mode != "Q":
            raise ValueError("only mode 'Q' keeps latent float weights")
        if self.terms == 1:
            return self.weight.detach().clone()
        head = pow2.round_weight(self.weight[:-1], self.exponent, self.weight_bits).sum(0)
        return head + self.weight[-1]

    # -- codes ------------------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        """The B-bit codes [out, in] (uint8; [terms, out, in] with terms > 1) this layer's
        weights round to now."""
        if self.mode == "Q":
            return pow2.round_to_codes(self.weight, self.exponent, self.weight_bits)
        z = pow2.zero_shift(self.weight_bits)
        m = (-self.shift.detach().round()).clamp(0, z - 1).to(torch.int64)
        s = self.sign.detach().round().clamp(-1, 1)
        m = torch.where(s == 0, torch.full_like(m, z), m)
        neg = (s < 0).to(torch.int64)
        return ((neg << (self.weight_bits - 1)) | m).to(torch.uint8)

    def rounded_weight(self) -> torch.Tensor:
        """The power-of-two weights the forward pass uses, with straight-through gradients."""
        if self.mode == "Q":
            # Rounded once per weight update, not per forward: a model that fixes its batch to 1
            # trains piece by piece, each piece a forward of every layer.
            # The cache holds the tensors it was computed from (no address reuse) and their versions.
            key = (self.weight, self.weight._version, self.exponent, self.exponent._version)
            cache = self.__dict__.get("_rounded")
            if cache is None or any(a is not b for a, b in zip(cache[0][::2], key[::2])) or cache[0][1::2] != key[1::2]:
                cache = self.__dict__["_rounded"] = (
                    key, pow2.round_weight(self.weight.detach(), self.exponent, self.weight_bits))
            rounded = _ste(self.weight, cache[1])
            return rounded.sum(0) if self.terms > 1 else rounded
        z = pow2.zero_shift(self.weight_bits)
        e = self.exponent.to(torch.int32).unsqueeze(1)
        shift = self.shift.round().clamp(-(z - 1), 0)
        magnitude = _ste(torch.exp2(self.shift + e), pow2.power_of_two(shift.to(torch.int32) + e))
        sign = _ste(self.sign, self.sign.round().clamp(-1, 1))
        return sign * magnitude

    def onnx_constants(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(packed codes uint8, exponent int8, bias float32 or None): the op's inputs 1–3."""
        packed = pow2.pack_codes(self.codes().numpy(), self.weight_bits)
        bias = None if self.bias is None else self.bias.detach().numpy().astype(np.float32)
        return packed, self.exponent.numpy().astype(np.int8), bias

    # -- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self._forward_float(x)
        return self.forward_integer(x)

    def _forward_float(self, x: torch.Tensor) -> torch.Tensor:
        """Training: Q-format activations and power-of-two weights emulated in float, STE."""
        scale = 2.0 ** self.act_frac_bits
        lo, hi = -(2.0 ** (self.act_bits - 1)), 2.0 ** (self.act_bits - 1) - 1
        x_fixed = _ste(x, torch.floor(x * scale).clamp(lo, hi) / scale)
        return F.linear(x_fixed, self.rounded_weight(), self.bias)

    @torch.no_grad()
    def forward_integer(self, x: torch.Tensor) -> torch.Tensor:
        """Exactly the kernel's arithmetic: Σ ±(x_q >> m) in int32 (wrapping), one rescale."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"ShiftLinear expects last dim {self.in_features}, got {tuple(x.shape)}")
        x_q = pow2.quantize_activation(x, self.act_bits, self.act_frac_bits).reshape(-1, self.in_features)
        codes = self.codes().to(torch.int64).reshape(-1, self.out_features, self.in_features)
        z = pow2.zero_shift(self.weight_bits)
        acc = torch.zeros(x_q.shape[0], self.out_features, dtype=torch.float64)
        # One matrix product per term and shift amount: float64 holds these integer sums exactly
        # (|x_q >> m| < 2^31, and terms · in_features < 2^22 summands stay below 2^53).
        for term in codes:
            m = term & z
            sign = torch.where(term >> (self.weight_bits - 1) == 1, -1.0, 1.0).to(torch.float64)
            for shift in torch.unique(m).tolist():
                if shift == z:
                    continue
                selector = torch.where(m == shift, sign, torch.zeros_like(sign))
                acc += (x_q.to(torch.int64) >> shift).to(torch.float64) @ selector.T
        wrapped = ((acc.to(torch.int64) + 2 ** 31) % 2 ** 32 - 2 ** 31).to(torch.int32)
        y = wrapped.to(torch.float32) * pow2.power_of_two(self.exponent.to(torch.int32) - self.act_frac_bits)
        if self.bias is not None:
            y = y + self.bias.detach().to(torch.float32)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, bias={self.bias is not None}, mode={self.mode}, "
                f"weight_bits={self.weight_bits}, terms={self.terms}, act=Q{self.act_bits - self.act_frac_bits}.{self.act_frac_bits}")
