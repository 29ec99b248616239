"""Whole-model speed in ONNX Runtime: converted models against the fp32 models they came from,
plus an ORT-profiler breakdown of where the converted model's time goes.

    .venv/bin/python bench/bench_model_speed.py [--threads 1 2] [--repeats 30] [--profile-runs 20]
        [--workdir out/bench_speed] [--models minilm vit]

Models (weights do not change the speed, so nothing is rounded or finetuned):
- all-MiniLM-L6-v2 (zoo/minilm.py), its 36 linear layers converted to ShiftLinear with one and
  with two powers of two per weight (`ConvertConfig(add_attention=None)`, Q16.16), inputs of
  batch 8 x 128 tokens and batch 1 x 128 tokens;
- the digit ViT (zoo/mnist_vit.py, trained once into --workdir), its linears converted the same
  way, batch 64 and batch 1.
Every session: --threads intra-op threads, spinning off (so interleaved sessions do not steal each
other's cores). A sample is the mean of enough runs to last >= 20 ms; the sessions take turns
sample by sample, and "speed vs fp32" is median(t_fp32) / median(t_ours) (> 1: ours is faster),
then the same ratio of the fastest samples (least disturbed by other work on the machine).

The profile (one session per model, --profile-runs runs, ORT's own profiler) sums the node
events by op type: ShiftLinear (our kernel, which includes quantising its float input to fixed
point and scaling the int32 sums back to float), MatMul/Gemm/FusedMatMul left in fp32, and the
rest (LayerNorm, Softmax, element-wise, shape ops).
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from mfconvert.convert import ConvertConfig, ShiftLinearConfig, convert_onnx
from mfconvert.runtime import session, session_options


def _session(path: str, threads: int, ours: bool, profile_prefix: str | None = None) -> ort.InferenceSession:
    opts = session_options(threads, spinning=False) if ours else ort.SessionOptions()
    if not ours:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])


def time_interleaved(runs: dict, repeats: int, sample_s: float = 0.02) -> dict:
    """runs: {name: callable}. Returns {name: (median, min) seconds per call} over `repeats` samples."""
    per_sample = {}
    for name, fn in runs.items():
        fn()
        t0 = time.perf_counter()
        fn()
        per_sample[name] = max(1, int(sample_s / max(time.perf_counter() - t0, 1e-6)))
    samples = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            k = per_sample[name]
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            samples[name].append((time.perf_counter() - t0) / k)
    return {name: (statistics.median(v), min(v)) for name, v in samples.items()}


def profile_breakdown(path: str, feeds: dict, threads: int, runs: int, prefix: str) -> dict:
    """{category: ms per run} from ORT's profiler over `runs` runs (after one warm-up run)."""
    sess = _session(path, threads, ours=True, profile_prefix=prefix)
    sess.run(None, feeds)
    for _ in range(runs):
        sess.run(None, feeds)
    trace = sess.end_profiling()
    with open(trace) as f:
        events = json.load(f)
    os.unlink(trace)
    totals = collections.Counter()
    model_us = []
    for e in events:
        if e.get("cat") == "Session" and e.get("name") == "model_run":
            model_us.append(e["dur"])
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        op = e.get("args", {}).get("op_name", "?")
        if op == "ShiftLinear":
            key = "ShiftLinear (ours)"
        elif op in ("MatMul", "Gemm", "FusedMatMul", "MatMulInteger", "DynamicQuantizeMatMul"):
            key = "MatMul/Gemm (fp32)"
        else:
            key = "rest"
        totals[key] += e["dur"]
    n = len(model_us[1:]) or 1  # the first model_run is the warm-up
    out = {k: v / 1e3 / (runs + 1) for k, v in totals.items()}
    out["model_run"] = sum(model_us[1:]) / 1e3 / n
    return out


def minilm_models(workdir: Path) -> tuple[dict, dict]:
    from mfconvert.zoo.minilm import minilm_onnx
    fp32 = str(minilm_onnx(workdir))
    models = {"fp32": fp32}
    for terms in (1, 2):
        out = workdir / f"minilm.shift{terms}.onnx"
        if not out.exists():
            convert_onnx(fp32, ConvertConfig(shift_linear=ShiftLinearConfig(terms=terms), add_attention=None),
                         output=str(out), force=True)
        models[f"shift, {terms} term{'s' if terms > 1 else ''}"] = str(out)
    rng = np.random.default_rng(0)
    feeds = {}
    for batch in (8, 1):
        ids = rng.integers(1000, 20000, size=(batch, 128)).astype(np.int64)
        ids[:, 0] = 101
        feeds[f"{batch} × 128"] = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    return models, feeds


def vit_models(workdir: Path) -> tuple[dict, dict]:
    from mfconvert.zoo.mnist_vit import digit_vit_onnx
    fp32 = str(digit_vit_onnx(workdir / "vit"))
    out = workdir / "vit.shift1.onnx"
    if not out.exists():
        convert_onnx(fp32, ConvertConfig(add_attention=None), output=str(out), force=True)
    rng = np.random.default_rng(0)
    feeds = {f"{b} images": {"image": rng.random((b, 1, 28, 28), dtype=np.float32)} for b in (64, 1)}
    return {"fp32": fp32, "shift, 1 term": str(out)}, feeds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--profile-runs", type=int, default=20)
    ap.add_argument("--workdir", default="out/bench_speed")
    ap.add_argument("--models", nargs="+", default=["minilm", "vit"], choices=["minilm", "vit"])
    args = ap.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit}, ORT {ort.__version__}, "
          f"library {os.environ.get('MFCONVERT_OPS_LIBRARY', 'ort_ops/libmfconvert_ops.so')}, load {os.getloadavg()[0]:.1f}")
    for name in args.models:
        models, feeds = minilm_models(workdir) if name == "minilm" else vit_models(workdir)
        ours = [k for k in models if k != "fp32"]
        print(f"\n### {name}: speed vs fp32 = t_fp32 / t_ours (median of {args.repeats} interleaved samples)\n")
        print("| input | threads | fp32 ms | " + " | ".join(f"{k} ms (speed vs fp32; at the fastest samples)" for k in ours) + " |")
        print("|---|---:|---:|" + "---:|" * len(ours))
        for feed_name, feed in feeds.items():
            for threads in args.threads:
                sessions = {k: _session(p, threads, ours=k != "fp32") for k, p in models.items()}
                runs = {k: (lambda s=s: s.run(None, feed)) for k, s in sessions.items()}
                t = time_interleaved(runs, args.repeats)
                cells = " | ".join(f"{t[k][0] * 1e3:.2f} ({t['fp32'][0] / t[k][0]:.2f}×; {t['fp32'][1] / t[k][1]:.2f}×)"
                                   for k in ours)
                print(f"| {feed_name} | {threads} | {t['fp32'][0] * 1e3:.2f} | {cells} |", flush=True)
        if args.profile_runs:
            print(f"\nORT profiler, {max(args.threads)} threads, ms per run (share of the node time):\n")
            print("| model | input | ShiftLinear (ours) | MatMul/Gemm (fp32) | rest | model_run |")
            print("|---|---|---:|---:|---:|---:|")
            for k in ours:
                for feed_name, feed in feeds.items():
                    b = profile_breakdown(models[k], feed, max(args.threads), args.profile_runs,
                                          str(workdir / "profile"))
                    node = sum(v for c, v in b.items() if c != "model_run") or 1.0
                    cells = " | ".join(f"{b.get(c, 0.0):.2f} ({100 * b.get(c, 0.0) / node:.0f} %)"
                                       for c in ("ShiftLinear (ours)", "MatMul/Gemm (fp32)", "rest"))
                    print(f"| {k} | {feed_name} | {cells} | {b['model_run']:.2f} |", flush=True)
    print(f"\nload at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
