"""--report-html: the conversion report as one self-contained HTML page (inline SVG and CSS, no
script, nothing fetched): fidelity against cost per layer, so the layers that cost accuracy
stand out, then the totals and every layer's figures (docs/report.md)."""
from __future__ import annotations

import math
from html import escape

from mfconvert.passes.report import human_bytes, human_count, human_energy

# Below this weight SQNR a layer is marked: one power of two per weight gives ~14 dB on trained
# transformers' linears, two terms ~28 dB (docs/ops.md#two-or-more-terms).
LOW_SQNR_DB = 20.0
COLORS = {"shift-linear": "#1f77b4", "add-attention": "#ff7f0e", "moe-mlp": "#2ca02c", "shift-conv": "#9467bd",
          "adder-conv": "#d62728", "shift-add-conv": "#8c564b"}
W, H, LEFT, BOTTOM, TOP, RIGHT = 720, 380, 70, 50, 20, 20


def _layers(report: dict) -> list[dict]:
    return [c for p in report.get("passes", []) for c in p.get("converted", [])]


def _energy(layer: dict, side: str) -> float | None:
    figures = (layer.get("cost") or {}).get(side)
    return None if figures is None else figures["energy_pj"]


def _ticks(lo: float, hi: float) -> list[float]:
    return [10.0 ** e for e in range(math.floor(lo), math.ceil(hi) + 1)]


def scatter(layers: list[dict], y_key: str, y_label: str, log_y: bool = False) -> str:
    """An SVG scatter of energy after conversion (x, log) against `y_key` per layer; layers
    without the figure are listed under the plot, not drawn."""
    points = [(c, _energy(c, "after"), c.get(y_key)) for c in layers]
    drawn = [(c, x, y) for c, x, y in points if x is not None and x > 0 and y is not None and (y > 0 or not log_y)]
    if not drawn:
        return f"<p>No layer has both an energy figure and a {escape(y_label)}.</p>"
    xs = [math.log10(x) for _, x, _ in drawn]
    ys = [math.log10(y) if log_y else y for _, _, y in drawn]
    x0, x1 = math.floor(min(xs)), math.ceil(max(xs))
    x1 = x1 if x1 > x0 else x0 + 1
    if log_y:
        y0, y1 = math.floor(min(ys)), math.ceil(max(ys))
        y1 = y1 if y1 > y0 else y0 + 1
    else:   # round ticks: a step of 1, 2 or 5 × 10^k, about five of them
        y0 = min(0.0, min(ys))
        span = (max(ys) - y0) or 1.0
        step = min((m * 10.0 ** math.floor(math.log10(span / 5)) for m in (1, 2, 5, 10)),
                   key=lambda v: abs(span / v - 5))
        y0 = math.floor(y0 / step) * step
        y1 = max(math.ceil(max(ys) / step), math.floor(y0 / step) + 1) * step

    def px(v):
        return LEFT + (v - x0) / (x1 - x0) * (W - LEFT - RIGHT)

    def py(v):
        return H - BOTTOM - (v - y0) / (y1 - y0) * (H - BOTTOM - TOP)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           f'role="img" aria-label="{escape(y_label)} against energy per layer">',
           f'<line x1="{LEFT}" y1="{H - BOTTOM}" x2="{W - RIGHT}" y2="{H - BOTTOM}" stroke="#444"/>',
           f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{H - BOTTOM}" stroke="#444"/>']
    marks = (1, 2, 5) if x1 - x0 <= 2 else (1,)   # a decade or two: 1-2-5 ticks
    for e in range(x0, x1 + 1):
        for m in marks:
            v = e + math.log10(m)
            if v > x1:
                break
            x = px(v)
            out.append(f'<line x1="{x:.1f}" y1="{H - BOTTOM}" x2="{x:.1f}" y2="{H - BOTTOM + 5}" stroke="#444"/>'
                       f'<text x="{x:.1f}" y="{H - BOTTOM + 18}" text-anchor="middle" font-size="11">'
                       f'{escape(human_energy(m * 10.0 ** e))}</text>')
    y_ticks = range(y0, y1 + 1) if log_y else [y0 + step * i for i in range(round((y1 - y0) / step) + 1)]
    for v in y_ticks:
        y = py(v)
        text = f"{10.0 ** v:.0e}" if log_y else f"{v:g}"
        out.append(f'<line x1="{LEFT - 5}" y1="{y:.1f}" x2="{W - RIGHT}" y2="{y:.1f}" stroke="#ddd"/>'
                   f'<text x="{LEFT - 8}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{text}</text>')
    if not log_y and y0 <= LOW_SQNR_DB <= y1:
        y = py(LOW_SQNR_DB)
        out.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{W - RIGHT}" y2="{y:.1f}" stroke="#d62728" '
                   f'stroke-dasharray="4 3"/><text x="{W - RIGHT - 4}" y="{y - 4:.1f}" text-anchor="end" '
                   f'font-size="11" fill="#d62728">{LOW_SQNR_DB:.0f} dB</text>')
    out.append(f'<text x="{(LEFT + W - RIGHT) / 2}" y="{H - 10}" text-anchor="middle" font-size="12">'
               'energy per inference after conversion (45 nm estimate)</text>'
               f'<text x="16" y="{(TOP + H - BOTTOM) / 2}" text-anchor="middle" font-size="12" '
               f'transform="rotate(-90 16 {(TOP + H - BOTTOM) / 2})">{escape(y_label)}</text>')
    for (c, x, y), lx, ly in zip(drawn, xs, ys):
        color = COLORS.get(c.get("pass_name", ""), "#7f7f7f")
        low = y_key == "weight_sqnr_db" and y < LOW_SQNR_DB
        tip = (f"{c.get('node')} ({c.get('new_op')}): {y_label} {y:.4g}; energy "
               f"{human_energy(_energy(c, 'before'))} → {human_energy(x)}")
        out.append(f'<circle cx="{px(lx):.1f}" cy="{py(ly):.1f}" r="{6 if low else 4}" fill="{color}" '
                   f'fill-opacity="0.75" stroke="{"#d62728" if low else "none"}" stroke-width="2">'
                   f'<title>{escape(tip)}</title></circle>')
    out.append("</svg>")
    legend = " ".join(f'<span style="color:{col}">●</span> {escape(name)}' for name, col in COLORS.items()
                      if any(c.get("pass_name") == name for c, _, _ in drawn))
    kept = {id(c) for c, _, _ in drawn}
    missing = [c.get("node", "?") for c, _, _ in points if id(c) not in kept]
    note = (f"<p class=note>Not drawn (no {escape(y_label)} or energy): "
            + escape(", ".join(missing[:8])) + (f" … (+{len(missing) - 8})" if len(missing) > 8 else "") + "</p>"
            if missing else "")
    return "".join(out) + f"<p>{legend}</p>" + note


def _ops_cell(figures: dict | None) -> str:
    if figures is None:
        return "?"
    parts = [f"{human_count(figures['multiplications'])} mul", f"{human_count(figures['additions'])} add",
             f"{human_count(figures['shifts'])} shift"]
    if figures["absolute_values"]:
        parts.append(f"{human_count(figures['absolute_values'])} abs")
    return ", ".join(parts)


def render(report: dict, title: str = "mfconvert conversion report") -> str:
    """The page for a ConversionReport.to_dict()."""
    layers = sorted((dict(c) for c in _layers(report)), key=lambda c: -(_energy(c, "after") or -1.0))
    # --shift-terms auto (convert/pipeline.py's report): each node's terms and its SQNR at 1–4 terms
    allocated = {n["node"]: n for n in ((report.get("allocation") or {}).get("nodes") or [])}
    for c in layers:   # the allocation's SQNR where the report could not read the original weights
        a = allocated.get(c.get("node"))
        if c.get("weight_sqnr_db") is None and a is not None and 1 <= a["terms"] <= len(a["weight_sqnr_db"]):
            c["weight_sqnr_db"] = a["weight_sqnr_db"][a["terms"] - 1]
    costs = report.get("costs") or {}
    body = [f"<h1>{escape(title)}</h1>"]
    shapes = ", ".join(f"{k}={v}" for k, v in (report.get("input_shapes") or {}).items())
    body.append(f"<p>Counts per inference{' at ' + escape(shapes) if shapes else ''}. "
                "Fidelity against cost per layer: layers low on the left plot (low weight SQNR) lose the "
                "most accuracy; layers far right still cost the most energy.</p>")
    body.append("<h2>Weight SQNR against energy, per layer</h2>")
    body.append(scatter(layers, "weight_sqnr_db", "weight SQNR (dB)"))
    if any(c.get("output_error") is not None for c in layers):
        body.append("<h2>Measured output error against energy, per layer (--data)</h2>")
        body.append(scatter(layers, "output_error", "output error when converted alone", log_y=True))
    before, after = costs.get("before"), costs.get("after")
    if before and after:
        rows = "".join(f"<tr><td>{escape(k)}</td><td>{human_count(before['by_kind'][k])}</td>"
                       f"<td>{human_count(after['by_kind'][k])}</td><td>{costs['energy_pj_per_op'].get(k, '—')}</td></tr>"
                       for k in before["by_kind"])
        wb = costs.get("weight_bytes", {})
        body.append("<h2>Totals</h2><table><tr><th>operation</th><th>before</th><th>after</th><th>pJ each</th></tr>"
                    + rows + f"<tr><th>energy</th><th>{human_energy(before['energy_pj'])}</th>"
                    f"<th>{human_energy(after['energy_pj'])}</th><th></th></tr>"
                    f"<tr><td>converted weights</td><td>{human_bytes(wb.get('before', 0))}</td>"
                    f"<td>{human_bytes(wb.get('after', 0))}</td><td></td></tr>"
                    f"<tr><td>model file</td><td>{human_bytes(report.get('file_bytes_before', 0))}</td>"
                    f"<td>{human_bytes(report.get('file_bytes_after', 0))}</td><td></td></tr></table>")
        body.append(f"<p class=note>Energy per operation: {escape(costs.get('energy_source', ''))}.</p>")
        by_op = costs.get("by_op") or {}
        ops_names = list(dict.fromkeys([*by_op.get("before", {}), *by_op.get("after", {})]))
        if ops_names:
            def cell(side, op):
                f = by_op.get(side, {}).get(op)
                return "—" if f is None else f"{_ops_cell(f)}; {human_energy(f['energy_pj'])}"
            body.append("<h2>By op type</h2><table><tr><th>op</th><th>before</th><th>after</th></tr>"
                        + "".join(f"<tr><td>{escape(op)}</td><td>{cell('before', op)}</td><td>{cell('after', op)}</td></tr>"
                                  for op in ops_names) + "</table>")
    for note in costs.get("notes", []) + report.get("notes", []):
        body.append(f"<p class=note>{escape(note)}</p>")
    def sqnr_cell(c):
        sqnr, a = c.get("weight_sqnr_db"), allocated.get(c.get("node"))
        text = "—" if sqnr is None else f"{sqnr:.1f} dB"
        if a is not None:
            text += (f" ({a['terms']} term(s); 1–4 terms: "
                     + " / ".join(f"{v:.0f}" for v in a["weight_sqnr_db"]) + " dB)")
        return text

    head = ("<tr><th>layer</th><th>pass</th><th>became</th><th>in→out</th><th>weight SQNR</th><th>output error</th>"
            "<th>operations before</th><th>operations after</th><th>energy before → after</th>"
            "<th>bytes before → after</th><th>detail</th></tr>")
    rows = []
    for c in layers:
        sqnr = c.get("weight_sqnr_db")
        err = c.get("output_error")
        cost = c.get("cost") or {}
        rows.append(f"<tr{' class=low' if sqnr is not None and sqnr < LOW_SQNR_DB else ''}>"
                    f"<td>{escape(str(c.get('node')))}</td><td>{escape(str(c.get('pass_name')))}</td>"
                    f"<td>{escape(str(c.get('new_op')))}</td><td>{c.get('in_features')}→{c.get('out_features')}</td>"
                    f"<td>{escape(sqnr_cell(c))}</td><td>{'—' if err is None else f'{err:.4g}'}</td>"
                    f"<td>{_ops_cell(cost.get('before'))}</td><td>{_ops_cell(cost.get('after'))}</td>"
                    f"<td>{human_energy(_energy(c, 'before'))} → {human_energy(_energy(c, 'after'))}</td>"
                    f"<td>{human_bytes(c.get('bytes_before', 0))} → {human_bytes(c.get('bytes_after', 0))}</td>"
                    f"<td>{escape(str(c.get('detail', '')))}</td></tr>")
    body.append(f"<h2>Layers ({len(layers)}, costliest after conversion first)</h2><table>{head}{''.join(rows)}</table>")
    skips = [s for p in report.get("passes", []) for s in p.get("skipped", [])]
    if skips:
        body.append(f"<h2>Skipped ({len(skips)})</h2><table><tr><th>node</th><th>pass</th><th>reason</th></tr>"
                    + "".join(f"<tr><td>{escape(str(s.get('node')))}</td><td>{escape(str(s.get('pass_name')))}</td>"
                              f"<td>{escape(str(s.get('reason')))}</td></tr>" for s in skips) + "</table>")
    warnings = report.get("warnings", [])
    if warnings:
        body.append("<h2>Warnings</h2><ul>" + "".join(
            f"<li>{escape(str(w.get('node')))}: {escape(str(w.get('warning')))}</li>" for w in warnings) + "</ul>")
    style = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}tr.low td{background:#fde2e1}"
             ".note{color:#555;font-size:13px}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
