"""ConvertConfig: which passes run and how, as one typed, JSON-round-trippable object."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mfconvert.passes import PASSES
from mfconvert.passes.add_attention import AddAttentionConfig
from mfconvert.passes.moe_mlp import MoEMLPConfig
from mfconvert.passes.shift_linear import ShiftLinearConfig

CONFIG_VERSION = 1


@dataclass
class ConvertConfig:
    """One field per pass; None turns that pass off. Passes run in registry order."""
    shift_linear: ShiftLinearConfig | None = dataclasses.field(default_factory=ShiftLinearConfig)
    add_attention: AddAttentionConfig | None = dataclasses.field(default_factory=AddAttentionConfig)
    moe_mlp: MoEMLPConfig | None = None

    def enabled(self) -> list:
        """The pass configs that are on, in the order their passes run."""
        configs = [c for c in (getattr(self, f.name) for f in dataclasses.fields(self)) if c is not None]
        order = {spec.config_type: i for i, spec in enumerate(PASSES.values())}
        return sorted(configs, key=lambda c: order[type(c)])

    def to_dict(self) -> dict:
        return {"version": CONFIG_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "ConvertConfig":
        data = dict(data)
        version = data.pop("version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise ValueError(f"config version {version} is not supported (this mfconvert reads {CONFIG_VERSION})")
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in data:
                continue
            value = data.pop(f.name)
            kind = _config_type(f.name)
            kwargs[f.name] = None if value is None else kind(**value)
        if data:
            raise ValueError(f"unknown config keys: {sorted(data)}")
        return cls(**kwargs)


def _config_type(field_name: str) -> type:
    for spec in PASSES.values():
        if spec.name.replace("-", "_") == field_name:
            return spec.config_type
    raise AssertionError(f"ConvertConfig field {field_name} has no registered pass")
