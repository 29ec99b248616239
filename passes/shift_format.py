"""ShiftFormat: the ShiftLinear number format (docs/ops.md#shiftlinear), one dataclass for every
place that makes ShiftLinear layers — the shift-linear pass, the MoE's Shift expert, nn/swap.py and
ShiftMoEMLP.from_mlp — so a field added here reaches all of them."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mfconvert.nn import pow2


@dataclass
class ShiftFormat:
    weight_bits: int = 5
    act_bits: int = 32
    act_frac_bits: int = 16
    weight_scale: str = "channel"
    # Powers of two per weight: 1 is DeepShift's w = ±2^p; 2 gives w = ±2^p1 ± 2^p2 (greedy), at
    # twice the additions and code bytes (docs/ops.md#two-or-more-terms).
    terms: int = 1

    def __post_init__(self):
        pow2.check_format(self.weight_bits, self.act_bits, self.act_frac_bits, self.terms)
        if self.weight_scale not in pow2.WEIGHT_SCALES:
            raise ValueError(f"weight_scale must be one of {pow2.WEIGHT_SCALES}, got {self.weight_scale!r}")

    @property
    def shift_format(self) -> "ShiftFormat":
        """The format alone (a pass config is a ShiftFormat plus its own fields)."""
        return ShiftFormat(**self.layer_kwargs())

    def layer_kwargs(self) -> dict:
        """The format as keyword arguments of ShiftLinear(...) and ShiftLinear.from_linear(...)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(ShiftFormat)}
