"""What a conversion changed and why it skipped: the records every pass returns."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LayerChange:
    """One rewritten layer: where it was, what it became and what it costs now."""
    pass_name: str
    node: str
    new_op: str
    in_features: int
    out_features: int
    bytes_before: int
    bytes_after: int
    activation: str = ""          # name of the activation tensor, to count rows later
    rows: int | None = None       # rows per inference at the stated input shapes
    detail: str = ""
    # Numeric problems found in converting it (weights clamped or zeroed, an accumulator that can
    # wrap around), one line each with the fix; the report prints them under "warnings:".
    warnings: list[str] = field(default_factory=list)
    # Per ShiftLinear node it became, its accumulator's range (passes/linear.py): safe_abs_input
    # (None: no input can wrap it), input_bound and bound_source (what the inputs are known or seen
    # to reach), worst_row_sum (the largest |acc| they can give) and the warning, if any.
    accumulator: dict | None = None
    # The name --include/--exclude match to convert or keep this layer, where it is not `node`: an
    # MoE block's fc2 converts with its block, which they name by its fc1.
    target: str = ""
    # Fidelity (docs/report.md): the SQNR of its rounded weights against the float ones (None:
    # no weights, or not readable), and with --data the output error measured when this layer
    # alone is converted (--max-drop's sensitivity), where known.
    weight_sqnr_db: float | None = None
    output_error: float | None = None
    # Operations per inference before and after, energy (passes/cost.py:summary), set by
    # ConversionReport.count_costs.
    cost: dict | None = None

    @property
    def params(self) -> int:
        return self.in_features * self.out_features

    @property
    def macs_removed(self) -> int | None:
        return None if self.rows is None else self.rows * self.params

    def figures(self) -> dict:
        """A pass's own per-layer figures for the JSON report (derived ones: not fields)."""
        return {}


@dataclass
class Skip:
    """A candidate a pass looked at and left alone, with the reason."""
    pass_name: str
    node: str
    reason: str


@dataclass
class PassResult:
    """What one pass did to the graph."""
    pass_name: str
    changes: list[LayerChange] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)   # written to the model's metadata_props
    # Nodes the pass emitted that later passes must leave alone (an MoE block's float experts are
    # plain Gemms shift-linear would take): convert_onnx records them for the passes after it.
    claims: list = field(default_factory=list)

    def skip(self, node: str, reason: str) -> None:
        self.skips.append(Skip(self.pass_name, node, reason))


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def human_energy(pj: float | None) -> str:
    if pj is None:
        return "?"
    for unit, size in (("mJ", 1e9), ("µJ", 1e6), ("nJ", 1e3)):
        if pj >= size:
            return f"{pj / size:.3g} {unit}"
    return f"{pj:.3g} pJ"


TABLE_LAYERS = 10   # layers the CLI table shows when a model has many


def _energy(change: "LayerChange", side: str) -> float | None:
    figures = (change.cost or {}).get(side)
    return None if figures is None else figures["energy_pj"]


def cost_lines(costs: dict) -> list[str]:
    """Totals of passes/cost.py:model_costs as report lines."""
    before, after = costs.get("before"), costs.get("after")
    lines = []
    if before and after:
        def ops_text(f):
            return (f"{human_count(f['multiplications'])} mul, {human_count(f['additions'])} add, "
                    f"{human_count(f['shifts'])} shift" + (f", {human_count(f['absolute_values'])} abs"
                                                          if f["absolute_values"] else ""))
        lines += [f"operations per inference (MatMul/Gemm/Conv/Softmax/BN and ours): {ops_text(before)} → {ops_text(after)}",
                  f"energy estimate (45 nm per-operation costs, docs/report.md): {human_energy(before['energy_pj'])} → "
                  f"{human_energy(after['energy_pj'])}" + (f" ({before['energy_pj'] / after['energy_pj']:.1f}× less)"
                                                            if after["energy_pj"] else "")]
    lines += [f"  {note}" for note in costs.get("notes", [])]
    return lines


def skip_lines(skips: list[Skip], spelled_out: int = 3) -> list[str]:
    """One line per skip; a reason shared by more than `spelled_out` nodes becomes one line
    naming the first few (the JSON report keeps every node)."""
    groups: dict[tuple[str, str], list[str]] = {}
    for s in skips:
        groups.setdefault((s.pass_name, s.reason), []).append(s.node)
    lines = []
    for (pass_name, reason), nodes in groups.items():
        if len(nodes) <= spelled_out:
            lines.extend(f"  {node} ({pass_name}): {reason}" for node in nodes)
        else:
            shown = ", ".join(nodes[:2])
            lines.append(f"  {len(nodes)} nodes ({pass_name}): {reason} — {shown}, … (+{len(nodes) - 2} more)")
    return lines


@dataclass
class ConversionReport:
    """All passes' results plus whole-model figures, printable as the CLI's table."""
    results: list[PassResult]
    input_shapes: dict[str, list[int]]
    file_bytes_before: int
    file_bytes_after: int
    # Why a figure is missing, e.g. the shape inference that counts rows failed (one line).
    notes: list[str] = field(default_factory=list)
    # Whole-model operation counts and energy before and after (passes/cost.py:model_costs),
    # computed on first use from the models given to attach_models.
    _models: tuple | None = field(default=None, repr=False, compare=False)
    _costs: tuple | None = field(default=None, repr=False, compare=False)   # (converted model, figures)
    moe_shift_fraction: float | dict | None = field(default=None, repr=False, compare=False)

    def attach_models(self, original, converted) -> None:
        """The original ModelProto and the converted one (or a function returning it, read each
        time the figures are asked: a step that replaces the model, e.g. compensated rounding,
        which changes which codes are zero, is then counted) that the cost figures count."""
        self._models, self._costs = (original, converted), None

    def set_output_errors(self, errors: dict[str, float]) -> None:
        """Per-layer output errors measured on data, {layer (its node, or its target: an MoE
        block's fc1) : error}, e.g. --max-drop's sensitivities; each layer's fidelity on data."""
        for c in self.changes:
            found = errors.get(c.node, errors.get(c.target) if c.target else None)
            if found is not None:
                c.output_error = float(found)

    @property
    def costs(self) -> dict | None:
        if self._models is None:
            return None
        original, converted = self._models
        converted = converted() if callable(converted) else converted
        if self._costs is None or self._costs[0] is not converted:
            from mfconvert.passes.cost import model_costs
            for c in self.changes:
                c.cost = None
            try:
                self._costs = converted, model_costs(original, converted, self.input_shapes, self.changes,
                                                     self.moe_shift_fraction)
            except Exception as err:   # a report figure never fails the conversion: say why it is missing
                first = next((ln for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
                self._costs = converted, {"notes": [f"operation counts failed: {type(err).__name__}: {first}"]}
        return self._costs[1]

    @property
    def changes(self) -> list[LayerChange]:
        return [c for r in self.results for c in r.changes]

    @property
    def skips(self) -> list[Skip]:
        return [s for r in self.results for s in r.skips]

    def to_dict(self) -> dict:
        costs = self.costs   # sets each change's cost and weight SQNR first
        return {
            "input_shapes": self.input_shapes,
            "file_bytes_before": self.file_bytes_before,
            "file_bytes_after": self.file_bytes_after,
            "passes": [{
                "pass": r.pass_name,
                "converted": [{**c.__dict__, "macs_removed": c.macs_removed, **c.figures()} for c in r.changes],
                "skipped": [s.__dict__ for s in r.skips],
            } for r in self.results],
            "warnings": [{"node": c.node, "pass": c.pass_name, "warning": w} for c, w in self.warnings],
            "notes": list(self.notes),
            **({"costs": costs} if costs is not None else {}),
        }

    @property
    def warnings(self) -> list[tuple[LayerChange, str]]:
        return [(c, w) for c in self.changes for w in c.warnings]

    def table(self, top: int = TABLE_LAYERS) -> str:
        """The CLI's report: the `top` most costly layers after conversion (every layer when
        there are few), totals, skips and warnings; the full per-layer figures are in to_dict()."""
        costs = self.costs or {}
        shown = self.changes
        if len(shown) > top + 2:   # by energy after conversion, unknown last
            shown = sorted(shown, key=lambda c: -(_energy(c, "after") or -1.0))[:top]
        rows = [("layer", "pass", "became", "in→out", "rows", "MACs removed", "bytes before→after",
                 "weight SQNR", "energy before→after")]
        for c in shown:
            rows.append((c.node, c.pass_name, c.new_op, f"{c.in_features}→{c.out_features}",
                         "?" if c.rows is None else str(c.rows),
                         "?" if c.macs_removed is None else human_count(c.macs_removed),
                         f"{human_bytes(c.bytes_before)}→{human_bytes(c.bytes_after)}",
                         "-" if c.weight_sqnr_db is None else f"{c.weight_sqnr_db:.1f} dB",
                         f"{human_energy(_energy(c, 'before'))}→{human_energy(_energy(c, 'after'))}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        if len(shown) < len(self.changes):
            lines.append(f"… {len(self.changes) - len(shown)} more layer(s), the {len(shown)} costliest after "
                         "conversion shown (--report-json/--report-html have every layer)")
        if self.skips:
            lines.append("")
            lines.append("skipped:")
            lines.extend(skip_lines(self.skips))
        changes = self.changes
        params = sum(c.params for c in changes)
        before = sum(c.bytes_before for c in changes)
        after = sum(c.bytes_after for c in changes)
        macs = [c.macs_removed for c in changes]
        shapes = ", ".join(f"{k}={v}" for k, v in self.input_shapes.items())
        lines += [
            "",
            f"layers converted: {len(changes)}   skipped: {len(self.skips)}",
            f"parameters converted: {human_count(params)}",
            f"converted weights: {human_bytes(before)} → {human_bytes(after)}"
            + (f" ({before / after:.1f}× smaller)" if after else ""),
            f"model file: {human_bytes(self.file_bytes_before)} → {human_bytes(self.file_bytes_after)}",
            "multiplications removed per inference"
            + (f" at {shapes}" if shapes else "") + ": "
            + ("unknown (shapes not inferable)" if None in macs else human_count(sum(macs))),
        ]
        lines += [f"  {note}" for note in self.notes]
        lines += cost_lines(costs)
        stored: dict[str, int] = {}   # layers converted from integer weights (passes/linear.py)
        for c in changes:
            for part in c.detail.split("; "):
                if part.startswith("weights dequantised from "):
                    key = part.removeprefix("weights dequantised from ")
                    stored[key] = stored.get(key, 0) + 1
        lines += [f"weights dequantised from {k} (q − zero point)·scale, then rounded: {n} layer(s)"
                  for k, n in stored.items()]
        unknown = [(v["safe_abs_input"], name) for c in changes for name, v in (c.accumulator or {}).items()
                   if v["input_bound"] is None and v["safe_abs_input"] is not None]
        if unknown:
            limit, name = min(unknown)
            lines.append(f"int32 accumulators of the {len(unknown)} layer(s) with inputs of unknown range: no wrap "
                         f"for |x| ≤ {limit:.4g} (lowest: {name}; --data checks them)")
        if self.warnings:
            lines += ["", "warnings:"] + [f"  {c.node}: {w}" for c, w in self.warnings]
        return "\n".join(lines)
