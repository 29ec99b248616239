"""Shift terms per layer: one term / two / three everywhere against `--shift-terms auto` from the
weights alone and with calibration data, on MiniLM, the public zoo's models with linears and the
digit ViT (shift linears only: add attention and MoE routers need finetuning, a separate story).

    .venv/bin/python bench/bench_terms.py [--models minilm,vit,smart-turn,magika,oww-alexa]
        [--threads 2] [--repeats 20] [--json out/bench/terms.json] [--plot out/bench/terms.png]

Per model and choice: fidelity on held-out inputs against the fp32 model in ONNX Runtime: the
output error ½·‖y − y′‖²/‖y‖² over the examples (sensitivity.nsr_drop, what `--shift-terms auto`
targets; `predicted`: the allocation's data-free prediction of it, probed layer by layer), 1 − mean
cosine per example (for one-number outputs, of the outputs stacked over examples), output SQNR,
top-1 agreement for class scores; additions per inference (Σ rows ·
in · out · terms over the shift layers, at the stated input shapes), shift-code bytes, and the
median ORT latency of one batch; the ORT int8 dynamic quantisation (MatMul, per channel) of the
same model for reference. `auto+data` converts with the calibration examples (the CLI's --data:
allocation measured on 64 of them, compensated rounding judged on held-out ones). A plot of
fidelity against additions (PNG with matplotlib, else SVG) shows where auto sits against the
fixed choices' frontier (mixing them layer by layer interpolates error and additions linearly).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx

from mfconvert.calibrate.data import Examples, from_text, model_fixed_batch
from mfconvert.calibrate.evaluate import fidelity, model_outputs
from mfconvert.calibrate.allocate import DEFAULT_TARGET
from mfconvert.calibrate.sensitivity import drop, nsr_drop
from mfconvert.convert import ConvertConfig, ShiftLinearConfig
from mfconvert.convert.pipeline import PipelineOptions, convert_model
from mfconvert.runtime import session

CHOICES = ("1 term", "2 terms", "3 terms", "auto", "auto+data")


def _minilm():
    from mfconvert.calibrate.text import corpus
    from mfconvert.zoo.minilm import INPUT_NAMES, minilm_onnx, model_dir
    path = minilm_onnx("out/demo")
    train, held = corpus(320, 128, seed=0)
    tok = model_dir() / "tokenizer.json"
    return dict(path=str(path), calib=from_text(train, tok, list(INPUT_NAMES)),
                eval=from_text(held, tok, list(INPUT_NAMES)), logits=False,
                shapes={"input_ids": [1, 128], "attention_mask": [1, 128]}, metric="embedding cosine")


def _vit():
    from mfconvert.zoo.mnist_vit import digit_vit_onnx, mnist_digits
    (train_x, _), (test_x, _) = mnist_digits()
    return dict(path=str(digit_vit_onnx("out/demo/vit")), calib=Examples([{"image": x} for x in train_x[:320]], {}),
                eval=Examples([{"image": x} for x in test_x[:500]], {}), logits=True,
                shapes={"image": [1, 1, 28, 28]}, metric="logit cosine; top-1 agreement")


def _zoo(name):
    from mfconvert.zoo import public

    def load():
        def examples(seeds):
            items = []
            for s in seeds:
                feed = public.sample(name, seed=s)
                items.append({k: v[0] if v.ndim and v.shape[0] == 1 else v for k, v in feed.items()})
            return Examples(items, {})
        logits = name == "magika"
        return dict(path=str(public.fetch(name)), calib=examples(range(1000, 1080)), eval=examples(range(32)),
                    logits=logits, shapes=public.input_shapes(name),
                    metric="score cosine; top-1 agreement" if logits else "output cosine")
    return load


MODELS = {"minilm": _minilm, "vit": _vit, "smart-turn": _zoo("smart-turn"), "magika": _zoo("magika"),
          "oww-alexa": _zoo("oww-alexa")}


def _terms(model: onnx.ModelProto) -> dict[str, int]:
    return {n.name: next((a.i for a in n.attribute if a.name == "terms"), 1)
            for n in model.graph.node if n.op_type == "ShiftLinear"}


def _code_bytes(model: onnx.ModelProto) -> int:
    inits = {i.name: i for i in model.graph.initializer}
    return sum(len(inits[n.input[1]].raw_data) for n in model.graph.node
               if n.op_type == "ShiftLinear" and n.input[1] in inits)


def _latency(model, feed: dict, threads: int, repeats: int) -> float:
    sess = session(model if isinstance(model, str) else model.SerializeToString(), threads=threads)
    sess.run(None, feed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _int8(path: str) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "q.onnx")
        quantize_dynamic(path, out, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"])
        return onnx.load(out)


def measure(name: str, spec: dict, threads: int, repeats: int, say, choices=CHOICES, n_eval: int | None = None,
            n_calib: int | None = None) -> dict:
    path = spec["path"]
    if n_eval is not None:
        spec["eval"] = Examples(spec["eval"].items[:n_eval], spec["eval"].pad_values)
    if n_calib is not None:
        spec["calib"] = Examples(spec["calib"].items[:n_calib], spec["calib"].pad_values)
    reference = model_outputs(path, spec["eval"])
    feed = next(iter(spec["eval"].batches(model_fixed_batch(onnx.load(path, load_external_data=False)) or 8)))
    rows: dict[str, dict] = {}

    def figures(model) -> dict:
        out = model_outputs(model if isinstance(model, str) else model.SerializeToString(), spec["eval"])
        f = fidelity(reference, out, spec["logits"])
        got = {"drop": drop(reference, out, False), "error": nsr_drop(reference, out), "sqnr_db": f["sqnr_db"],
               "latency_ms": _latency(model, feed, threads, repeats)}
        if spec["logits"]:
            got["top1_agreement"] = f["top1_agreement"]
        return got

    rows["fp32"] = figures(path)
    adds_per_term = None
    for choice in choices:
        t0 = time.perf_counter()
        terms = "auto" if choice.startswith("auto") else int(choice[0])
        cfg = ConvertConfig(shift_linear=ShiftLinearConfig(terms=1 if terms == "auto" else terms), add_attention=None,
                            shift_conv=None)   # linears only (convolutions: bench/bench_conv.py)
        opts = PipelineOptions(shift_terms=terms, input_shapes=spec["shapes"],
                               data=spec["calib"] if choice == "auto+data" else None)
        done = convert_model(path, cfg, opts)
        seconds = time.perf_counter() - t0
        model = done.result.model
        if adds_per_term is None:   # rows · in · out per ShiftLinear node, from the report
            adds_per_term = {c.node: (c.rows or 1) * c.params for c in done.result.report.changes}
        per_node = _terms(model)
        row = figures(model)
        row.update(additions=sum(adds_per_term.get(n, 0) * t for n, t in per_node.items()),
                   code_bytes=_code_bytes(model), layers=len(per_node), seconds=seconds,
                   terms_histogram={str(t): sum(1 for v in per_node.values() if v == t) for t in range(1, 5)})
        if done.allocation is not None:
            row.update(predicted_drop=done.allocation.predicted, measured_drop_calibration=done.allocation.measured,
                       measurements=done.allocation.measurements, probes=done.allocation.probes,
                       note=done.allocation.note)
        if done.rounding is not None:
            row["compensated_layers"] = sum(d["compensated"] for d in done.rounding["layers"].values())
        rows[choice] = row
        say(f"{name} {choice}: error {row['error']:.3g} (predicted {row.get('predicted_drop', float('nan')):.3g}), "
            f"1 − cos {row['drop']:.5f}, additions {row['additions']:.4g}, "
            f"{row['code_bytes']} code bytes, {row['latency_ms']:.2f} ms ({seconds:.0f} s)")
    try:
        rows["int8 (ORT dynamic, MatMul)"] = figures(_int8(path))
    except Exception as err:   # a model quantize_dynamic cannot take: say so
        rows["int8 (ORT dynamic, MatMul)"] = {"failed": str(err).splitlines()[0]}
    return {"model": name, "metric": spec["metric"], "rows": rows}


def table(results: list[dict]) -> str:
    lines = ["| model | choice | output error ½NSR | predicted | 1 − cosine | top-1 agr. | SQNR dB | additions (× 1 term) | "
             "code bytes | terms 1/2/3/4 | ORT ms |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        base = r["rows"].get("1 term", {}).get("additions") or 1
        for choice, row in r["rows"].items():
            if "failed" in row or isinstance(row.get("error"), str):
                lines.append(f"| {r['model']} | {choice} | {row.get('failed', row.get('error'))} | | | | | | | | |")
                continue
            hist = "/".join(row["terms_histogram"][k] .__str__() for k in "1234") if "terms_histogram" in row else ""
            lines.append(
                f"| {r['model']} | {choice} | {row['error']:.2g} | "
                + (f"{row['predicted_drop']:.2g}" if row.get("predicted_drop") is not None else "") + " | "
                f"{row['drop']:.5f} | "
                + (f"{row['top1_agreement']:.3f}" if "top1_agreement" in row else "") + " | "
                f"{row['sqnr_db']:.1f} | " + (f"{row['additions'] / base:.2f}" if "additions" in row else "") + " | "
                + (f"{row['code_bytes']:,}" if "code_bytes" in row else "") + f" | {hist} | {row['latency_ms']:.2f} |")
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> str:
    """Fidelity (the output's ½·NSR, log) against additions relative to one term, one panel per model;
    PNG with matplotlib, else an SVG written here."""
    points = []
    for r in results:
        base = r["rows"]["1 term"]["additions"] or 1
        points.append((r["model"], [(c, r["rows"][c]["additions"] / base, max(r["rows"][c]["error"], 1e-9))
                                    for c in CHOICES if c in r["rows"]]))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        path = os.path.splitext(path)[0] + ".svg"
        Path(path).write_text(_svg(points))
        return path
    fig, axes = plt.subplots(1, len(points), figsize=(4 * len(points), 3.6), squeeze=False)
    for ax, (model, pts) in zip(axes[0], points):
        fixed = [p for p in pts if not p[0].startswith("auto")]
        # The fixed choices' frontier: mixing them layer by layer adds errors and additions
        # linearly, so it is the straight line between them (a curve on the log axis).
        xs = np.linspace(fixed[0][1], fixed[-1][1], 200)
        ax.plot(xs, np.interp(xs, [p[1] for p in fixed], [p[2] for p in fixed]), "-", color="lightgrey",
                label="fixed terms, mixed")
        ax.plot([p[1] for p in fixed], [p[2] for p in fixed], "o", color="grey", label="fixed terms")
        for c, x, y in pts:
            if c.startswith("auto"):
                ax.plot([x], [y], "s" if c == "auto" else "D", label=c, markersize=8)
            ax.annotate(c, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.axhline(DEFAULT_TARGET, ls="--", lw=0.8, color="tab:red", label=f"default target {DEFAULT_TARGET:g}")
        ax.set_yscale("log")
        ax.set_title(model)
        ax.set_xlabel("additions (× one term)")
        ax.set_ylabel("output error ½‖y − y′‖²/‖y‖²")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _svg(points) -> str:
    w, h, pad = 300, 240, 40
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w * len(points)}" height="{h}" font-size="9">']
    for i, (model, pts) in enumerate(points):
        xs = [p[1] for p in pts]
        ys = [np.log10(p[2]) for p in pts]
        x0, x1, y0, y1 = 0.8, max(xs) + 0.2, min(ys) - 0.2, max(ys) + 0.2

        def px(x, y):
            return (i * w + pad + (x - x0) / (x1 - x0) * (w - 2 * pad), h - pad - (y - y0) / (y1 - y0) * (h - 2 * pad))
        parts.append(f'<text x="{i * w + w / 2}" y="14" text-anchor="middle">{model}: ½NSR (log) vs additions</text>')
        for c, x, y in pts:
            cx, cy = px(x, np.log10(y))
            parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="3" fill="{"red" if c.startswith("auto") else "grey"}"/>'
                         f'<text x="{cx + 4:.1f}" y="{cy - 4:.1f}">{c}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", default="out/bench/terms.json")
    ap.add_argument("--plot", default="out/bench/terms.png")
    ap.add_argument("--no-data", default="", help="models measured without auto+data (comma-separated)")
    ap.add_argument("--eval", type=int, default=None, help="held-out examples per model (default: all)")
    ap.add_argument("--calib", type=int, default=None, help="calibration examples per model for auto+data "
                    "(default: all; the allocation measures at most 64 of them)")
    ap.add_argument("--choices", default=",".join(CHOICES), help="the choices to run (comma-separated)")
    ap.add_argument("--merge", default=None, help="a JSON of this script's earlier results to add to the table")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(1)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.models.split(","):
        spec = MODELS[name]()
        choices = tuple(c for c in CHOICES if (c != "auto+data" or name not in args.no_data.split(","))
                        and c in args.choices.split(","))
        results.append(measure(name, spec, args.threads, args.repeats, lambda s: print(s, flush=True), choices,
                               args.eval, args.calib))
        Path(args.json).write_text(json.dumps({"results": results}, indent=2))   # what is done so far
    if args.merge:
        earlier = json.loads(Path(args.merge).read_text())
        results = earlier["results"] + results
        print(f"merged: {args.merge} ({earlier.get('date')}, commit {earlier.get('commit')})")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit,
            "command": " ".join(sys.argv), "threads": args.threads}
    Path(args.json).write_text(json.dumps({**meta, "results": results}, indent=2))
    print(f"\n{meta['date']}, commit {commit}: {meta['command']}\n")
    print(table(results))
    print(f"\nplot: {plot(results, args.plot)}")


if __name__ == "__main__":
    main()
