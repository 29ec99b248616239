"""The one place passes are registered: the CLI, the Python API and the tests all look them up here.

A pass is keyed by its config type (one small validated dataclass per transform), so choosing a
transform and configuring it are the same act: `ConvertConfig(shift_linear=ShiftLinearConfig())`.
Passes run in the order of `ORDER`, whatever order their modules are imported in: attention and
MLP rewrites claim their linears before shift-linear converts whatever linears remain; spatial-shift
takes the depthwise convs (and scales the pointwise ones) before the conv passes; the adder passes
take the convs before shift-conv converts whatever convs remain.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import onnx_graphsurgeon as gs

from mfconvert.passes.report import PassResult


class PassError(ValueError):
    """A model a pass cannot convert safely (e.g. NaN weights): one line naming the node."""


@dataclass(frozen=True)
class PassSpec:
    name: str
    config_type: type
    run: Callable[[gs.Graph, object], PassResult]
    summary: str


PASSES: dict[str, PassSpec] = {}

ORDER = ("add-attention", "moe-mlp", "shift-linear", "spatial-shift", "adder-conv", "shift-add-conv", "shift-conv")


def register(name: str, config_type: type, summary: str):
    """Decorator registering `run(graph, config) -> PassResult` as pass `name`."""
    def wrap(run):
        if name in PASSES:
            raise ValueError(f"pass {name!r} registered twice")
        if any(spec.config_type is config_type for spec in PASSES.values()):
            raise ValueError(f"config {config_type.__name__} already keys a pass")
        PASSES[name] = PassSpec(name, config_type, run, summary)
        return run
    return wrap


def pass_for(config) -> PassSpec:
    """The pass a config object selects."""
    for spec in PASSES.values():
        if isinstance(config, spec.config_type):
            return spec
    raise TypeError(f"no pass takes a {type(config).__name__}")


def put_in_order() -> None:
    """Reorder PASSES by ORDER (called once every pass module is imported); a pass missing from
    ORDER, or a name in ORDER no module registered, is a programming error."""
    if set(PASSES) != set(ORDER):
        raise RuntimeError(f"passes registered {sorted(PASSES)} differ from ORDER {sorted(ORDER)}")
    ordered = [(name, PASSES[name]) for name in ORDER]
    PASSES.clear()
    PASSES.update(ordered)
