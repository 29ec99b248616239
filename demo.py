"""End-to-end demo on a real model: all-MiniLM-L6-v2 -> multiplication-free ONNX.

    python -m mfconvert.demo [--workdir out/demo] [--sentences 256] [--batch-size 32] [--finetune-minutes 2]
                             [--no-two-terms]

Exports the pretrained sentence encoder to ONNX, converts it with mfconvert, runs both in ONNX
Runtime (2 threads) on held-out English sentences found on this machine, and reports file
sizes, latency, embedding fidelity and what the conversion changed; then re-rounds the shift
weights by error-compensated rounding and finetunes them for a couple of minutes (both counted in
the budget) by distillation on other sentences, and reports fidelity again. Last, the same model
with two powers of two per weight (--shift-terms 2), calibrated by compensated rounding only: the
accuracy that twice the additions buy.
"""
from __future__ import annotations

import argparse
import statistics
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


def _latencies(sessions, batches, repeats: int) -> list[list[float]]:
    """Seconds per batch for each session, interleaved so both see the same machine load."""
    times = [[] for _ in sessions]
    for _ in range(repeats):
        for b in batches:
            for i, sess in enumerate(sessions):
                t0 = time.perf_counter()
                sess.run(["sentence_embedding"], b)
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


def run(workdir: Path, n_sentences: int, batch_size: int, repeats: int, finetune_minutes: float = 2.0,
        two_terms: bool = True, out=sys.stdout) -> dict:
    """Run the demo, print the report to ``out`` and return the numbers."""
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mfconvert.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("out/demo"),
                        help="where the ONNX files go (default: ./out/demo)")
    parser.add_argument("--sentences", type=int, default=256, help="held-out sentences")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="timed passes over the batches")
    parser.add_argument("--finetune-minutes", type=float, default=2.0,
                        help="distillation time budget for the shift layers (0: skip)")
    parser.add_argument("--no-two-terms", action="store_true", help="skip the two-terms step")
    args = parser.parse_args(argv)
    if args.sentences < 2 or args.batch_size < 1 or args.repeats < 1:
        parser.error("--sentences must be >= 2, --batch-size and --repeats >= 1")
    run(args.workdir, args.sentences, args.batch_size, args.repeats, args.finetune_minutes, not args.no_two_terms)
    return 0


if __name__ == "__main__":
    sys.exit(main())
