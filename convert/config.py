"""ConvertConfig: which passes run and how, as one typed, JSON-round-trippable object."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

from mfconvert.passes import PASSES
from mfconvert.passes.add_attention import AddAttentionConfig
from mfconvert.passes.conv import ShiftConvConfig
from mfconvert.passes.adder_conv import AdderConvConfig, ShiftAddConvConfig
from mfconvert.passes.moe_mlp import MoEMLPConfig
from mfconvert.passes.shift_linear import ShiftLinearConfig
from mfconvert.passes.spatial_shift import SpatialShiftConfig

CONFIG_VERSION = 1


@dataclass
class ConvertConfig:
    """One field per pass; None turns that pass off. Passes run in registry order."""
    shift_linear: ShiftLinearConfig | None = dataclasses.field(default_factory=ShiftLinearConfig)
    add_attention: AddAttentionConfig | None = dataclasses.field(default_factory=AddAttentionConfig)
    moe_mlp: MoEMLPConfig | None = None
    shift_conv: ShiftConvConfig | None = dataclasses.field(default_factory=ShiftConvConfig)
    adder_conv: AdderConvConfig | None = None          # --adder-conv (AdderNet)
    shift_add_conv: ShiftAddConvConfig | None = None   # --shift-add-conv (ShiftAddNet)
    spatial_shift: SpatialShiftConfig | None = None    # --spatial-shift (depthwise convs → shifts)

    def enabled(self) -> list:
        """The pass configs that are on, in the order their passes run."""
        configs = [c for c in (getattr(self, f.name) for f in dataclasses.fields(self)) if c is not None]
        order = {spec.config_type: i for i, spec in enumerate(PASSES.values())}
        return sorted(configs, key=lambda c: order[type(c)])

    def to_dict(self) -> dict:
        return {"version": CONFIG_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "ConvertConfig":
        """From JSON: every key known and of its field's type, else a ValueError naming the key
        path (e.g. "shift_linear.include must be a list of regex strings, got a string")."""
        if not isinstance(data, dict):
            raise ValueError(f"the config must be a JSON object, got {_json_kind(data)}")
        data = dict(data)
        version = data.pop("version", CONFIG_VERSION)
        if version != CONFIG_VERSION or isinstance(version, bool):
            raise ValueError(f"config version {version!r} is not supported (this mfconvert reads {CONFIG_VERSION})")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in data if k not in known]
        if unknown:
            raise ValueError(f"unknown config key {unknown[0]!r} (known: version, {', '.join(known)})")
        kwargs = {}
        for name, value in data.items():
            if value is None:
                kwargs[name] = None
                continue
            if not isinstance(value, dict):
                raise ValueError(f"{name} must be an object (or null to turn the pass off), got {_json_kind(value)}")
            kind = _config_type(name)
            hints = typing.get_type_hints(kind)
            fields = [f.name for f in dataclasses.fields(kind)]
            for key, item in value.items():
                if key not in fields:
                    raise ValueError(f"{name}: unknown key {key!r} (known: {', '.join(fields)})")
                _check_type(item, hints[key], f"{name}.{key}")
            try:
                kwargs[name] = kind(**value)
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
        return cls(**kwargs)


def _json_kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return {int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object"}.get(
        type(value), type(value).__name__)


def _check_type(value, hint, path: str) -> None:
    """`value` (from JSON) has the type `hint` (int, float, bool, str, list[str], dict[str, int],
    X | None), else a ValueError naming `path`."""
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return
        hint = next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if hint is bool:
        ok, want = isinstance(value, bool), "true or false"
    elif hint is int:
        ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif hint is float:
        ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif hint is str:
        ok, want = isinstance(value, str), "a string"
    elif origin in (list, tuple):
        item = "regex string" if path.rsplit(".", 1)[-1] in ("include", "exclude") else _json_kind_of(args[0])
        ok, want = isinstance(value, list), f"a list of {item}s"
        if ok:
            for i, v in enumerate(value):
                try:
                    _check_type(v, args[0], f"{path}[{i}]")
                except ValueError:
                    raise ValueError(f"{path} must be {want}, got {_json_kind(v)} at [{i}]") from None
    elif origin is dict:
        ok, want = isinstance(value, dict), f"an object of {_json_kind_of(args[1])}s"
        for k, v in value.items() if ok else ():
            _check_type(v, args[1], f"{path}.{k}")
    else:
        return   # a type JSON cannot spell differently: the config class checks it
    if not ok:
        raise ValueError(f"{path} must be {want}, got {_json_kind(value)}")


def _json_kind_of(hint) -> str:
    return {int: "integer", float: "number", bool: "boolean", str: "string"}.get(hint, "value")


def _config_type(field_name: str) -> type:
    for spec in PASSES.values():
        if spec.name.replace("-", "_") == field_name:
            return spec.config_type
    raise AssertionError(f"ConvertConfig field {field_name} has no registered pass")
