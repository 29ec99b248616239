"""Per-layer precision allocation (`--shift-terms auto`): how many powers of two (1–4) each
shift-weighted node gets, so that the model's output error meets a target at the least cost.

Cost. A node of [M, K] weights (a linear's [out, in]; a convolution's im2col view
[M, C/group·k]) that reads R activation rows per inference costs R·M·K additions and M·K·B/8
code bytes per term (docs/ops.md#two-or-more-terms). The two are normalised by the model's
totals and added: a node's cost per term is its share of the additions plus its share of the
bytes.

Error: the output's ½·‖y − y′‖²/‖y‖² over the examples (calibrate/sensitivity.nsr_drop: half the
output's noise-to-signal ratio, ≈ 1 − cosine for rounding noise, and meaningful for one-number
and few-class outputs, where a cosine is ~1 whatever the error), with and without data.

Error, without data (docs/ops.md#choosing-terms-per-layer). A node's weight noise-to-signal
ratio NSR_t = ‖W − Q_t(W)‖²/‖W‖² (1/SQNR) is its relative output error for inputs with no
preferred direction. What that error does on its way to the model's output (its fan-out:
attention softmaxes and LayerNorms attenuate it, a read-out layer passes it whole) is probed
(calibrate/probe.py): the original model runs in ONNX Runtime on a few inputs synthesised from its
input signature with this node alone rounded to one term (one run per node, no conversion), and
the output error measured is the node's share e_1; e_t = e_1·NSR_t/NSR_1. Errors of different
nodes are independent, so their powers add: the prediction is Σ e_t. Outputs behind a Softmax
count by the larger of their error and their logits' (random inputs can make a classifier
certain, which hides every error in its probabilities). Nodes the probe cannot rewrite (shift
convolutions, MoE experts) take ½·NSR_t, times the probed nodes' median e_1/(½·NSR_1) where
that is above 1 (a ratio measured on linears, e.g. a CNN's classifier head, says little about
its convolutions: taken below 1, MobileNetV2's data-free agreement fell from 97.5 to 92.0 %);
without any probe, ½·Σ NSR_t (0.8–57,000× of the measured error on the benched models).

Error, with data. Each unit's error at 1 and 2 terms is measured on the calibration examples:
by the same probe for shift linears (activations at --act-bits 32), else by converting the unit
alone and running it in ONNX Runtime against the original (calibrate/sensitivity.py); 3 and 4
terms follow the line e(t) = floor + c·NSR_t through the two measured points (the floor: error
no number of terms removes, e.g. a saturating activation format). The chosen allocation is then
converted and measured whole, and re-chosen at a tighter target while it misses (drops of
several layers are not quite additive).

Choice: start every node at one term and add a term where it removes the most error per cost
until the predicted error meets the target (greedy on convex-ish error curves: each term cuts a
node's error by about the same factor).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
import torch

from mfconvert.nn import pow2

MAX_TERMS = pow2.MAX_TERMS
# --shift-terms auto's default target: the outputs' ½·‖y − y′‖²/‖y‖² (≈ 1 − cosine; output SQNR
# 24 dB). ORT's int8 dynamic quantisation reaches 0.996–0.998 cosine on the models of issue 12.
DEFAULT_TARGET = 0.002
CHUNK_ELEMENTS = 1 << 22   # weights are rounded this many elements at a time


@dataclass
class ShiftWeighted:
    """One shift-weighted node of a converted model, with its float weight in [M, K] form."""
    node: str                   # the node's name in the converted graph (terms_by_node's key)
    op: str                     # ShiftLinear, ShiftConv, …
    weight: np.ndarray          # float [M, K] (a convolution: its im2col view)
    exponent: np.ndarray        # the node's exponent per row, int [M]
    weight_bits: int
    unit: tuple[str, str] = ("", "")   # (pass, the name include/exclude match): what converts as one
    rows: int | None = None     # activation rows per inference (None: unknown, taken as 1)
    nsr: list[float] = field(default_factory=list)   # NSR_t for t = 1…MAX_TERMS
    # The output error (½·NSR of the outputs) this node alone causes at t = 1…MAX_TERMS terms:
    # probed (calibrate/probe.py) and scaled by NSR_t/NSR_1, else ½·NSR_t times what the probed
    # nodes measured against their own ½·NSR (`probe_errors`); ½·NSR_t until then.
    share: list[float] | None = None
    probed: bool = False

    def error(self, terms: int) -> float:
        return self.share[terms - 1] if self.share is not None else 0.5 * self.nsr[terms - 1]

    @property
    def params(self) -> int:
        return int(self.weight.shape[0] * self.weight.shape[1])

    def sqnr_db(self, terms: int) -> float:
        e = self.nsr[terms - 1]
        return float("inf") if e <= 0 else float(-10 * np.log10(e))


def _shift_linear_weights(student: onnx.ModelProto, teacher) -> dict[str, np.ndarray]:
    """{ShiftLinear node: the float weight it was rounded from}: the teacher's linear of that name
    (a path is read lazily: large tensors stay on disk until their linear is read) and the MoE
    Shift experts' Mult twins."""
    import os

    import onnx_graphsurgeon as gs

    from mfconvert.convert.onnx_model import attach_external_data, read_model
    from mfconvert.moe import expert_latent_weights
    from mfconvert.passes.linear import match_linear
    names = {n.name for n in student.graph.node if n.op_type == "ShiftLinear"}
    model = read_model(teacher, lazy=True)[0]
    graph = gs.import_onnx(model)
    if not isinstance(teacher, onnx.ModelProto):
        attach_external_data(graph, os.path.dirname(os.path.abspath(os.fspath(teacher))))
    weights = {}
    for node in graph.nodes:
        if node.op in ("MatMul", "Gemm") and node.name in names:
            match = match_linear(graph, node)
            if not isinstance(match, str):
                weights[node.name] = match.weight
    return {**weights, **expert_latent_weights(student)}


def _shift_conv_weights(student: onnx.ModelProto, teacher) -> dict[str, np.ndarray]:
    """{ShiftConv node: its teacher conv's weight in im2col view [M, C/g·k], BatchNorm folded}."""
    from mfconvert.passes.conv import conv_latent_weights
    return conv_latent_weights(student, teacher if isinstance(teacher, onnx.ModelProto) else onnx.load(teacher))


# op type → fn(student, teacher: a ModelProto or a path) returning {node name: float weight
# [M, K]} for that op's nodes: the one place a shift-weighted op plugs in. The node's exponent
# per row is its input 2 and its B its weight_bits attribute, as ShiftLinear's.
FLOAT_WEIGHTS: dict[str, Callable[[onnx.ModelProto, object], dict[str, np.ndarray]]] = {
    "ShiftLinear": _shift_linear_weights,
    "ShiftConv": _shift_conv_weights,
}


def weight_nsr(weight: np.ndarray, exponent: np.ndarray, weight_bits: int) -> list[float]:
    """NSR_t = ‖W − Q_t(W)‖²/‖W‖² for t = 1…MAX_TERMS (greedy terms, docs/ops.md), rounded a few
    rows at a time."""
    m, k = weight.shape
    rows = max(1, CHUNK_ELEMENTS // max(k, 1))
    e = torch.from_numpy(np.asarray(exponent, dtype=np.int32)).to(torch.int8)
    signal, noise = 0.0, np.zeros(MAX_TERMS)
    for o in range(0, m, rows):
        w = torch.from_numpy(np.asarray(weight[o:o + rows], dtype=np.float32))
        parts = pow2.residual_terms(w, e[o:o + rows], weight_bits, MAX_TERMS + 1)
        signal += float((w.double() ** 2).sum())
        # part t+1 is what t terms leave over: W − Q_t(W)
        noise += (parts[1:].double() ** 2).sum(dim=(1, 2)).numpy()
    return [float(n / signal) if signal > 0 else 0.0 for n in noise]


def shift_weighted_nodes(student: onnx.ModelProto, teacher: onnx.ModelProto, changes=()) -> list[ShiftWeighted]:
    """The shift-weighted nodes a conversion of `teacher` wrote into `student`, with their float
    weights, NSR per terms, and (from the report's `changes`) their unit and rows."""
    from mfconvert.passes.linear import _constant, _initializers
    inits = _initializers(student)
    weights: dict[str, np.ndarray] = {}
    for op, fn in FLOAT_WEIGHTS.items():
        if any(n.op_type == op for n in student.graph.node):
            weights.update(fn(student, teacher))
    nodes = []
    for node in student.graph.node:
        if node.op_type not in FLOAT_WEIGHTS or node.name not in weights:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        exponent = _constant(student, inits, node.input[2])
        weight = weights[node.name]
        if exponent is None or exponent.size != weight.shape[0]:
            continue
        owner = _owner(node.name, changes)
        item = ShiftWeighted(node.name, node.op_type, weight, exponent.reshape(-1), int(attrs.get("weight_bits", 5)),
                             (owner.pass_name, owner.target or owner.node) if owner else ("", node.name),
                             owner.rows if owner else None)
        item.nsr = weight_nsr(weight, item.exponent, item.weight_bits)
        nodes.append(item)
    return nodes


def _owner(name: str, changes):
    """The report's change for node `name`: of that name, or the one it is named under (an MoE
    block's experts)."""
    exact = [c for c in changes if c.node == name]
    if exact:
        return exact[0]
    under = [c for c in changes if name.startswith(c.node + "/")]
    return max(under, key=lambda c: len(c.node)) if under else None


def costs(nodes: list[ShiftWeighted]) -> dict[str, float]:
    """Each node's cost per term: its share of the model's additions plus its share of the code
    bytes (module docstring)."""
    adds = {n.node: (n.rows or 1) * n.params for n in nodes}
    size = {n.node: n.params * n.weight_bits for n in nodes}
    total_adds, total_size = sum(adds.values()) or 1, sum(size.values()) or 1
    return {n.node: adds[n.node] / total_adds + size[n.node] / total_size for n in nodes}


def predicted_drop(nodes: list[ShiftWeighted], terms: dict[str, int]) -> float:
    """The data-free prediction of the output's ½·NSR: Σ of each node's share at its terms
    (ShiftWeighted.error; ½·Σ NSR before probe_errors)."""
    return sum(n.error(terms.get(n.node, 1)) for n in nodes)


def set_shares(nodes: list[ShiftWeighted], measured: dict[str, float]) -> float:
    """Each node's share of the output error at every terms from its measured one-term error
    (`measured`, by node): e_t = e_1·NSR_t/NSR_1. Nodes not measured get ½·NSR_t times the median
    ratio e_1/(½·NSR_1) of those measured where it is above 1, else ½·NSR_t (module docstring).
    The ratio used."""
    ratios = [measured[n.node] / (0.5 * n.nsr[0]) for n in nodes if n.node in measured and n.nsr[0] > 0]
    ratio = max(float(np.median(ratios)), 1.0) if ratios else 1.0
    for n in nodes:
        if n.node in measured and n.nsr[0] > 0:
            n.share = [measured[n.node] * e / n.nsr[0] for e in n.nsr]
            n.probed = True
        else:
            n.share = [ratio * 0.5 * e for e in n.nsr]
            n.probed = False
    return ratio


def probe_errors(nodes: list[ShiftWeighted], original: onnx.ModelProto, input_shapes=None, outputs=None,
                 progress=None) -> str:
    """Data-free: set each node's share of the output error (set_shares) from calibrate/probe.py's
    one-term errors on synthesised probe inputs, outputs compared before a saturating head too.
    A line for the report saying how (or why the ½·Σ NSR model stands in)."""
    from mfconvert.calibrate.probe import PROBE_EXAMPLES, LayerProbe, probe_examples
    try:
        probe = LayerProbe(original, nodes, terms=(1,), outputs=outputs, logits=True)
        measured = {k: v[0] for k, v in probe.errors(probe_examples(original, PROBE_EXAMPLES, input_shapes),
                                                     progress).items()}
    except Exception as err:   # an input no probe can be made for (a scalar), a graph ORT refuses
        set_shares(nodes, {})
        return (f"output error predicted as ½·Σ weight NSR (no probe: {str(err).splitlines()[0]}); "
                "it over-predicts deep models, --data measures instead")
    ratio = set_shares(nodes, measured)
    probed = sum(n.probed for n in nodes)
    rest = len(nodes) - probed
    return (f"each layer's share of the output error probed on {PROBE_EXAMPLES} synthesised inputs "
            f"({probed} layer(s), one run each)"
            + (f"; {rest} other(s) (not probed: convolutions, MoE experts) at ½·NSR × {ratio:.3g}" if rest else ""))


def greedy(errors: dict[str, list[float]], cost: dict[str, float], target: float,
           start: dict[str, int] | None = None) -> dict[str, int]:
    """Terms per item: from `start` (default 1 each), add the term that removes the most error
    per cost until Σ error ≤ target (plus what MAX_TERMS everywhere would leave) or every item has
    MAX_TERMS. errors[item][t−1]: its error with t terms."""
    terms = {k: 1 for k in errors} | dict(start or {})
    total = sum(errors[k][terms[k] - 1] for k in errors)
    # What MAX_TERMS everywhere leaves is out of reach: aim within `target` of it, so a floor that
    # terms cannot remove (measured with data) buys no terms.
    target += sum(errors[k][MAX_TERMS - 1] for k in errors)
    while total > target:
        best, gain = None, 0.0
        for k, t in terms.items():
            if t < MAX_TERMS:
                g = (errors[k][t - 1] - errors[k][t]) / max(cost[k], 1e-12)
                if g > gain:
                    best, gain = k, g
        if best is None:
            break
        total -= errors[best][terms[best] - 1] - errors[best][terms[best]]
        terms[best] += 1
    return terms


@dataclass
class Allocation:
    """What the allocation chose and why: terms per node, its predicted (and, with data,
    measured) output error, and the cost relative to one term everywhere."""
    terms: dict[str, int]
    nodes: list[ShiftWeighted]
    target: float
    predicted: float
    measured: float | None = None
    by_data: bool = False
    measurements: int = 0       # conversions measured on the data
    fixed: bool = False         # terms as configured (--shift-terms N): only the prediction is the allocation's
    probes: int = 0             # layers whose error was probed on the data (calibrate/probe.py), not converted
    note: str = ""              # how the data-free prediction was made (probe_errors)

    def additions(self, terms: dict[str, int] | None = None) -> int:
        terms = self.terms if terms is None else terms
        return sum((n.rows or 1) * n.params * terms.get(n.node, 1) for n in self.nodes)

    def code_bytes(self, terms: dict[str, int] | None = None) -> int:
        terms = self.terms if terms is None else terms
        return sum(-(-n.params * n.weight_bits * terms.get(n.node, 1) // 8) for n in self.nodes)

    def lines(self) -> list[str]:
        """The report's lines: terms and weight SQNR per node, the predicted error, the cost, and
        what to do when the measured error misses the target."""
        how = (f"measured on the data: output error {self.measured:.3g}" if self.measured is not None
               else f"predicted from the weights{' and probes' if any(n.probed for n in self.nodes) else ''}: "
                    f"output error ≈ {self.predicted:.3g}") + " (½·‖y − y′‖²/‖y‖², ≈ 1 − cosine)"
        counts = {t: sum(1 for n in self.nodes if self.terms.get(n.node, 1) == t) for t in range(1, MAX_TERMS + 1)}
        ones = {n.node: 1 for n in self.nodes}
        head = "fixed" if self.fixed else f"--shift-terms auto, target {self.target:g}"
        out = [f"shift terms ({head}): {how}; "
               + ", ".join(f"{c} node(s) × {t}" for t, c in counts.items() if c)
               + f"; additions {self.additions() / max(self.additions(ones), 1):.2f}× and code bytes "
                 f"{self.code_bytes() / max(self.code_bytes(ones), 1):.2f}× those of one term"]
        if self.note:
            out.append(f"  {self.note}")
        if self.measured is not None and self.measured > self.target:
            out.append(f"  target not met on the data: what is left does not fall with more terms (activation format, "
                       f"accumulators: see the warnings); --max-drop {self.target:g} keeps the layers causing it float")
        width = max((len(n.node) for n in self.nodes), default=4)
        for n in self.nodes:
            t = self.terms.get(n.node, 1)
            out.append(f"  {n.node.ljust(width)}  {t} term(s)  weight SQNR {n.sqnr_db(t):5.1f} dB "
                       f"(1 term: {n.sqnr_db(1):.1f} dB)  output error share {n.error(t):.2g}")
        return out

    def to_dict(self) -> dict:
        return {"fixed": self.fixed, "target": self.target, "predicted_drop": self.predicted, "measured_drop": self.measured,
                "by_data": self.by_data, "measurements": self.measurements, "probes": self.probes,
                "metric": "½·‖y − y′‖²/‖y‖² of the outputs (sensitivity.nsr_drop)", "note": self.note,
                "additions": self.additions(), "code_bytes": self.code_bytes(),
                "nodes": [{"node": n.node, "op": n.op, "terms": self.terms.get(n.node, 1),
                           "weight_sqnr_db": [round(n.sqnr_db(t), 2) for t in range(1, MAX_TERMS + 1)],
                           "predicted_share": [float(n.error(t)) for t in range(1, MAX_TERMS + 1)],
                           "probed": n.probed, "rows": n.rows, "params": n.params} for n in self.nodes]}


def allocate_from_weights(nodes: list[ShiftWeighted], target: float = DEFAULT_TARGET) -> Allocation:
    """Data-free: terms per node so that the predicted output error Σ share ≤ target at the least
    cost (the shares: probe_errors; ½·NSR without it)."""
    errors = {n.node: [n.error(t) for t in range(1, MAX_TERMS + 1)] for n in nodes}
    terms = greedy(errors, costs(nodes), target)
    return Allocation(terms, nodes, target, predicted_drop(nodes, terms))


def with_terms(config, terms: dict[str, int]):
    """`config` (a ConvertConfig) with terms_by_node set on every pass whose config is a
    ShiftFormat (shift-linear, the MoE's Shift expert, shift convolutions)."""
    from mfconvert.passes.shift_format import ShiftFormat
    changes = {}
    for f in dataclasses.fields(config):
        cfg = getattr(config, f.name)
        if isinstance(cfg, ShiftFormat):
            changes[f.name] = dataclasses.replace(cfg, terms_by_node={**cfg.terms_by_node, **terms})
    return dataclasses.replace(config, **changes)


def allocate_from_data(measurer, config, nodes: list[ShiftWeighted], target: float,
                       progress=None, rounds: int = 3) -> tuple[Allocation, object]:
    """With data: each unit's drop measured alone at 1 and 2 terms (`measurer`:
    calibrate/sensitivity.py's Measurer), 3 and 4 extrapolated by NSR; the allocation measured
    whole and re-chosen at a tighter target while it misses. (allocation, the measured
    ConversionResult of the config it chose)."""
    from mfconvert.calibrate.sensitivity import only_unit
    units: dict[tuple[str, str], list[ShiftWeighted]] = {}
    for n in nodes:
        units.setdefault(n.unit, []).append(n)
    cost_of = costs(nodes)
    errors: dict[tuple[str, str], list[float]] = {}
    probed = _probe_on_data(measurer, config, nodes, progress)
    count = 0
    for i, (unit, members) in enumerate(units.items()):
        if all(n.node in probed for n in members):
            measured = [sum(probed[n.node][t] for n in members) for t in (0, 1)]
        else:
            measured = []
            for t in (1, 2):
                if progress:
                    progress(f"terms {t}, unit {i + 1}/{len(units)}: {unit[1]}")
                cfg = only_unit(config, *unit, terms=t)
                measured.append(max(measurer.measure(cfg, counts=False)[1], 0.0))
            count += 2
        # e(t) = floor + c·NSR_t through the two measured points: the floor is what no number of
        # terms removes (a saturating activation format, say), so more terms buy nothing there.
        nsr = [sum(n.nsr[t] for n in members) for t in range(MAX_TERMS)]
        e1, e2 = measured[0], min(measured[1], measured[0])
        c = (e1 - e2) / (nsr[0] - nsr[1]) if nsr[0] > nsr[1] else 0.0
        floor = max(e2 - c * nsr[1], 0.0)
        errors[unit] = [e1, e2] + [min(floor + c * nsr[t], e2) for t in range(2, MAX_TERMS)]
    unit_cost = {u: sum(cost_of[n.node] for n in ms) for u, ms in units.items()}
    probes = len(probed)
    for unit, members in units.items():   # the report's shares: a unit's error split by its nodes' NSR
        total = [sum(n.nsr[t] for n in members) or 1.0 for t in range(MAX_TERMS)]
        for n in members:
            n.share = [errors[unit][t] * n.nsr[t] / total[t] for t in range(MAX_TERMS)]
            n.probed = n.node in probed
    goal, best, last = target, None, None
    reachable = sum(e[MAX_TERMS - 1] for e in errors.values())
    for _ in range(rounds):
        chosen = greedy(errors, unit_cost, goal)
        terms = {n.node: chosen[u] for u, ms in units.items() for n in ms}
        result, drop = measurer.measure(with_terms(config, terms))
        count += 1
        predicted = sum(errors[u][chosen[u] - 1] for u in units)
        last = (terms, result, drop, predicted)
        if drop <= target:
            best = last
            break
        if all(t == MAX_TERMS for t in chosen.values()) or reachable >= target:
            break   # no more terms can help: the floor is out of reach
        goal = goal * max(min(target / max(drop, 1e-12), 0.9), 0.1)   # tighten by how far it missed
    terms, result, drop, predicted = best or last
    return Allocation(terms, nodes, target, predicted, drop, True, count, probes=probes), result


def _probe_on_data(measurer, config, nodes: list[ShiftWeighted], progress=None) -> dict[str, list[float]]:
    """{node: [its output error alone at 1 and 2 terms]} measured on the measurer's examples by
    calibrate/probe.py (one run per node and terms, no conversion), for the shift linears it can
    probe; none with --act-bits < 32, whose activation format only a conversion measures."""
    from mfconvert.calibrate.probe import LayerProbe
    shift = getattr(config, "shift_linear", None)
    if shift is None or shift.act_bits < 32 or getattr(measurer, "metric", "cosine") != "nsr":
        return {}
    try:
        probe = LayerProbe(measurer.original, nodes, terms=(1, 2), outputs=measurer.names, logits=True)
    except Exception:   # a graph the probe cannot rewrite: every unit is converted and measured instead
        return {}
    return probe.errors(measurer.examples, progress)
