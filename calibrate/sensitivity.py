"""Sensitivity-guided conversion (`--max-drop`): measure the error each conversion causes on its
own, then keep the most sensitive layers in float until the whole model's error fits the budget.

Error is measured in ONNX Runtime on calibration data against the original model's outputs (the
ones named, by default every float output; their mean): 1 − mean per-example cosine
(embeddings, hidden states) or, for logits, the loss of top-1 agreement. The terms allocation
(calibrate/allocate.py) measures by `nsr_drop` instead (Measurer(metric="nsr")): ½·‖y − y′‖²/‖y‖²,
which also sees one-number and two-class outputs. Keeping the k most
sensitive layers is searched by bisection over k (the error falls as more layers stay float),
so a model with n candidate layers costs n + log2(n) conversions.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import numpy as np
import onnx

from mfconvert.calibrate.data import Examples
from mfconvert.calibrate.evaluate import fidelity, model_outputs
from mfconvert.convert.config import ConvertConfig
from mfconvert.convert.onnx_entry import ConversionResult, convert_onnx
from mfconvert.passes import PASSES


@dataclass
class LayerSensitivity:
    pass_name: str
    node: str
    error: float          # the drop when this layer alone is converted
    # The name the pass's include/exclude match (LayerChange.target): an MoE block's fc1 and fc2
    # convert, and stay float, together, so both carry the block's drop.
    target: str = ""

    @property
    def unit(self) -> tuple[str, str]:
        return self.pass_name, self.target or self.node


@dataclass
class BudgetResult:
    result: ConversionResult
    error: float
    kept_float: list[LayerSensitivity]
    sensitivities: list[LayerSensitivity]

    def lines(self) -> list[str]:
        out = [f"--max-drop: measured drop {self.error:.4f} with {len(self.kept_float)} layer(s) kept float"]
        out += [f"  kept float: {s.node} ({s.pass_name}; alone it drops {s.error:.4f}, "
                f"rank {self.sensitivities.index(s) + 1} of {len(self.sensitivities)})" for s in self.kept_float]
        return out


def drop(reference, test, logits: bool) -> float:
    """1 − mean cosine (or top-1 agreement lost) of `test` against `reference` (ModelOutputs); an
    output of one number per example (a score, a probability), whose per-example cosine is only
    its sign, counts as one vector across the examples instead."""
    if not logits and hasattr(reference, "rows") and all(
            all(np.size(r) == 1 for r in rows) for rows in reference.rows.values()):
        drops = []
        for name, rows in reference.rows.items():
            a = np.asarray(rows, dtype=np.float64).reshape(-1)
            b = np.asarray(test.rows[name], dtype=np.float64).reshape(-1)
            denom = np.linalg.norm(a) * np.linalg.norm(b)
            drops.append(float(1 - a @ b / denom) if denom > 0 else float(np.any(a != b)))
        return float(np.mean(drops))
    figures = fidelity(reference, test, logits)
    return 1.0 - (figures["top1_agreement"] if logits else figures["mean_cosine"])


def nsr_drop(reference, test) -> float:
    """½·‖y − y′‖² / ‖y‖² over every value of every example (the output's noise-to-signal ratio,
    halved), averaged over the outputs; `reference` and `test` are ModelOutputs or {output: rows}.
    It is the allocation's measure (`--shift-terms auto`, with and without data): for an error
    unrelated to the output, as rounding gives, it equals 1 − cosine to first order (1 −
    cos(y, y + n) ≈ ½‖n‖²/‖y‖² for n ⟂ y), but unlike a per-example cosine it sees an error in a
    one-number output (a score, a probability) or in two class scores, and a change of scale."""
    ref = getattr(reference, "rows", reference)
    got = getattr(test, "rows", test)
    drops = []
    for name, rows in ref.items():
        signal = sum(float(np.sum(np.asarray(r, np.float64) ** 2)) for r in rows)
        noise = sum(float(np.sum((np.asarray(r, np.float64) - np.asarray(t, np.float64)) ** 2))
                    for r, t in zip(rows, got[name]))
        drops.append(0.5 * noise / signal if signal > 0 else float(noise > 0))
    return float(np.mean(drops)) if drops else 0.0


def _field_of(pass_name: str) -> str:
    return pass_name.replace("-", "_")


def _only(config: ConvertConfig, pass_name: str, node: str) -> ConvertConfig:
    """The config converting just `node` (a name its include matches) with `pass_name` (every
    other pass off)."""
    fields = {f.name: None for f in dataclasses.fields(ConvertConfig)}
    base = getattr(config, _field_of(pass_name))
    fields[_field_of(pass_name)] = dataclasses.replace(base, include=[f"^{re.escape(node)}$"], exclude=[])
    return ConvertConfig(**fields)


def only_unit(config: ConvertConfig, pass_name: str, target: str, terms: int | None = None) -> ConvertConfig:
    """The config converting just the unit `target` with `pass_name`, with `terms` powers of two
    per weight where given (calibrate/allocate.py measures each unit at each terms)."""
    cfg = _only(config, pass_name, target)
    if terms is not None:
        field = _field_of(pass_name)
        cfg = dataclasses.replace(cfg, **{field: dataclasses.replace(getattr(cfg, field), terms=terms,
                                                                     terms_by_node={})})
    return cfg


class Measurer:
    """Converts `original` with a config and measures the drop of its outputs on the examples
    against the original's (computed once)."""

    def __init__(self, original: onnx.ModelProto, examples: Examples, logits: bool = False, input_shapes=None,
                 outputs: list[str] | None = None, metric: str = "cosine"):
        """`metric`: 'cosine' (drop(): --max-drop's 1 − cosine or top-1 lost) or 'nsr' (nsr_drop:
        the allocation's)."""
        if metric not in ("cosine", "nsr"):
            raise ValueError(f"metric must be 'cosine' or 'nsr', got {metric!r}")
        self.original, self.examples, self.logits, self.input_shapes = original, examples, logits, input_shapes
        self.metric = metric
        self.reference = model_outputs(original, examples, outputs=outputs)
        # 'nsr': an output behind a Softmax also counts by its logits' error (calibrate/probe.py's
        # rule): a confident classifier's probabilities, (1, 0) for a two-class model such as
        # open_nsfw, hide an error its logits show (its --data auto chose one term everywhere).
        self.names = list(self.reference.names)
        self.logit_of: dict[str, str] = {}
        if metric == "nsr":
            from mfconvert.calibrate.probe import with_logits
            augmented, self.logit_of = with_logits(original, self.names)
            if self.logit_of:
                self.reference = model_outputs(augmented, examples,
                                               outputs=self.names + sorted(set(self.logit_of.values())))

    def measure(self, cfg: ConvertConfig, counts: bool = True) -> tuple[ConversionResult, float]:
        """(the conversion, its drop); `counts=False`: a conversion only measured (no report counts)."""
        result = convert_onnx(self.original, cfg, input_shapes=self.input_shapes, allow_unchanged=True,
                              counts=counts)
        return result, self.drop(result.model)

    def drop(self, model: onnx.ModelProto) -> float:
        if self.metric == "nsr":
            from mfconvert.calibrate.probe import head_drop, with_logits
            augmented, logit_of = with_logits(model, self.names)
            logit_of = {n: t for n, t in logit_of.items() if self.logit_of.get(n) == t}
            wanted = self.names + sorted(set(logit_of.values()))
            test = model_outputs(augmented, self.examples, outputs=wanted)
            return head_drop(self.reference, test, self.names, logit_of)
        test = model_outputs(model, self.examples, outputs=self.reference.names)
        return drop(self.reference, test, self.logits)


def _without(config: ConvertConfig, layers: list[LayerSensitivity]) -> ConvertConfig:
    """`config` with `layers` (their nodes and targets) added to every pass's exclude list: a
    layer kept float stays float, not taken by another pass (an MoE block's linears would fall
    to shift-linear)."""
    names = list(dict.fromkeys(f"^{re.escape(n)}$" for s in layers for n in (s.node, s.target) if n))
    changes = {}
    for spec in PASSES.values():
        cfg = getattr(config, _field_of(spec.name), None)
        if cfg is not None and names:
            changes[_field_of(spec.name)] = dataclasses.replace(cfg, exclude=list(cfg.exclude) + names)
    return dataclasses.replace(config, **changes)


def convert_within_budget(model_path, config: ConvertConfig, examples: Examples, max_drop: float,
                          logits: bool = False, input_shapes=None, progress=None,
                          outputs: list[str] | None = None) -> BudgetResult:
    """Convert with `config`, leaving the most sensitive layers float so the drop is ≤ max_drop
    on `outputs` (default: every float output)."""
    measurer = Measurer(onnx.load(model_path) if not isinstance(model_path, onnx.ModelProto) else model_path,
                        examples, logits, input_shapes, outputs)
    measure = measurer.measure
    full, full_error = measure(config)
    if full_error <= max_drop:   # nothing to keep float (e.g. the terms allocated already meet it)
        return BudgetResult(full, full_error, [], [])
    sensitivities = [LayerSensitivity(c.pass_name, c.node, 0.0, c.target) for c in full.report.changes]
    units = list(dict.fromkeys(s.unit for s in sensitivities))   # what converts, or stays float, as one
    errors = {}
    for i, (pass_name, target) in enumerate(units):
        if progress:
            progress(f"layer {i + 1}/{len(units)}: {target}")
        errors[pass_name, target] = measure(_only(config, pass_name, target))[1]
    for s in sensitivities:
        s.error = errors[s.unit]
    sensitivities.sort(key=lambda s: errors[s.unit], reverse=True)   # stable: a unit's layers stay together
    units.sort(key=lambda u: errors[u], reverse=True)

    def kept(k: int) -> list[LayerSensitivity]:
        return [s for s in sensitivities if s.unit in units[:k]]

    # Bisection for the fewest most-sensitive units to keep float.
    lo, hi = 0, len(units)          # lo fails the budget; hi (everything float) meets it
    best = None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        result, error = measure(_without(config, kept(mid)))
        if error <= max_drop:
            hi, best = mid, (result, error)
        else:
            lo = mid
    if best is None:
        best = measure(_without(config, kept(hi)))
    return BudgetResult(best[0], best[1], kept(hi), sensitivities)
