"""ShiftFormat: the ShiftLinear number format (docs/ops.md#shiftlinear), one dataclass for every
place that makes ShiftLinear layers — the shift-linear pass, the MoE's Shift expert, nn/swap.py and
ShiftMoEMLP.from_mlp — so a field added here reaches all of them."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

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
    # Terms per shift-weighted node (its name in the converted graph), chosen by the allocation
    # (calibrate/allocate.py); a node not listed uses `terms`. Not a layer argument: each pass
    # reads it through terms_for.
    terms_by_node: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        pow2.check_format(self.weight_bits, self.act_bits, self.act_frac_bits, self.terms)
        if self.weight_scale not in pow2.WEIGHT_SCALES:
            raise ValueError(f"weight_scale must be one of {pow2.WEIGHT_SCALES}, got {self.weight_scale!r}")
        for name, terms in self.terms_by_node.items():
            if isinstance(terms, bool) or not isinstance(terms, int) or not 1 <= terms <= pow2.MAX_TERMS:
                raise ValueError(f"terms_by_node[{name!r}] must be in [1, {pow2.MAX_TERMS}], got {terms!r}")

    def terms_for(self, node: str) -> int:
        """The terms of shift-weighted node `node`: its allocated number, else `terms`."""
        return self.terms_by_node.get(node, self.terms)

    @property
    def shift_format(self) -> "ShiftFormat":
        """The format alone (a pass config is a ShiftFormat plus its own fields)."""
        return ShiftFormat(**self.layer_kwargs())

    def layer_kwargs(self) -> dict:
        """The format as keyword arguments of ShiftLinear(...) and ShiftLinear.from_linear(...)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(ShiftFormat) if f.name != "terms_by_node"}
