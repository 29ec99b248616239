"""Swap a PyTorch module's nn.Linear layers for ShiftLinear: the PyTorch counterpart of the
shift-linear pass, selecting layers by the same include/exclude/min_params rules."""
from __future__ import annotations

from torch import nn

from mfconvert.nn.shift_linear import ShiftLinear
from mfconvert.passes.shift_linear import ShiftLinearConfig
from mfconvert.passes.targeting import exclusion_reason


def shift_linears(module: nn.Module, cfg: ShiftLinearConfig | None = None, mode: str = "Q") -> list[str]:
    """Replace (in place) every selected nn.Linear by a ShiftLinear; returns the swapped names.

    Names are PyTorch module names (`encoder.layer.0.attention.self.query`), so include/exclude
    patterns here match module names, as they match node names in the ONNX pass.
    """
    cfg = cfg or ShiftLinearConfig()
    swapped = []
    for name, child in list(module.named_modules()):
        if not isinstance(child, nn.Linear) or isinstance(child, ShiftLinear):
            continue
        if exclusion_reason(name, cfg.include, cfg.exclude) or child.weight.numel() < cfg.min_params:
            continue
        layer = ShiftLinear.from_linear(child, **cfg.layer_kwargs(), mode=mode)   # the whole ShiftFormat
        parent_name, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, attr, layer)
        swapped.append(name)
    return swapped
