"""Benchmark the AddLinearAttention op against the softmax attention core it replaces, both in
ONNX Runtime fp32.

    .venv/bin/python bench/bench_add_attention.py [--threads 2] [--repeats 30] [--runs 5] [--tokens 197 785 3137]

Both models take Q, K, V [1, T, C] (the projection outputs) and produce the merged context
[1, T, C]. The original is the core as exporters write it: head Reshape/Transpose, Q·Kᵀ, scale,
Softmax, ·V, Transpose/Reshape. Ours is one AddLinearAttention node (sign binariser, 9-tap token
conv per head: the faithful configuration). Both sessions run with thread spinning off. A run
times the two interleaved (warm-up, then `repeats` samples, each the mean of enough calls to last
>= 2 ms) and takes medians; `runs` runs cycle over the token counts, so that load from other
processes spreads over all of them. "speed-up" = t_softmax / t_ours of one run's medians (> 1:
ours is faster), given as min / median / max over the runs; times are the median over runs of
each run's median, per-token times the median and the fastest sample of all runs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_shift_linear import cpu_name, plain_session  # noqa: E402

from mfconvert.ort_ops import DOMAIN  # noqa: E402
from mfconvert.runtime import session  # noqa: E402

TOKENS = (197, 785, 3137)


def _io(c):
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, "t", c]) for n in "QKV"]
    return ins, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, "t", c])]


def softmax_core(c, heads, opsets=()):
    d = c // heads
    heads_shape = numpy_helper.from_array(np.array([1, -1, heads, d], np.int64), "heads_shape")
    merged_shape = numpy_helper.from_array(np.array([1, -1, c], np.int64), "merged_shape")
    scale = numpy_helper.from_array(np.array(d ** -0.5, np.float32), "scale")
    n = helper.make_node
    nodes = [n("Reshape", ["Q", "heads_shape"], ["q4"]), n("Transpose", ["q4"], ["qh"], perm=[0, 2, 1, 3]),
             n("Reshape", ["K", "heads_shape"], ["k4"]), n("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),
             n("Reshape", ["V", "heads_shape"], ["v4"]), n("Transpose", ["v4"], ["vh"], perm=[0, 2, 1, 3]),
             n("MatMul", ["qh", "kt"], ["s"]), n("Mul", ["s", "scale"], ["ss"]), n("Softmax", ["ss"], ["p"], axis=-1),
             n("MatMul", ["p", "vh"], ["o"]), n("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]),
             n("Reshape", ["ot", "merged_shape"], ["Y"])]
    ins, outs = _io(c)
    graph = helper.make_graph(nodes, "softmax_attention", ins, outs, [heads_shape, merged_shape, scale])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def add_attention(c, heads, rng):
    conv = numpy_helper.from_array((rng.standard_normal((heads, 9)) * 0.1).astype(np.float32), "conv")
    node = helper.make_node("AddLinearAttention", ["Q", "K", "V", "", "conv"], ["Y"], domain=DOMAIN,
                            num_heads=heads, binarizer="sign")
    ins, outs = _io(c)
    graph = helper.make_graph([node], "add_attention", ins, outs, [conv])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    model.ir_version = 8
    return model


def time_interleaved(runs, repeats, warmup_s=0.3, sample_s=0.002):
    """runs: {name: callable} → {name: (median, min) seconds per call}, samples interleaved."""
    per_sample = {}
    for name, fn in runs.items():
        fn()
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < warmup_s / len(runs):
            fn()
            n += 1
        per_sample[name] = max(1, int(sample_s / ((time.perf_counter() - t0) / max(n, 1))))
    samples = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            for _ in range(per_sample[name]):
                fn()
            samples[name].append((time.perf_counter() - t0) / per_sample[name])
    return {name: (statistics.median(v), min(v)) for name, v in samples.items()}


def spread(values):
    return min(values), statistics.median(values), max(values)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--runs", type=int, default=5, help="interleaved runs; the speed-up's spread is over these")
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS), help="token counts (default: %(default)s)")
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    ours = session(add_attention(args.dim, args.heads, rng).SerializeToString(), threads=args.threads, spinning=False)
    base = plain_session(softmax_core(args.dim, args.heads).SerializeToString(), args.threads)
    feeds = {t: {k: rng.standard_normal((1, t, args.dim)).astype(np.float32) for k in "QKV"} for t in args.tokens}
    results = {t: [] for t in args.tokens}
    for _ in range(args.runs):
        for t in args.tokens:
            runs = {"ours": lambda: ours.run(None, feeds[t]), "softmax": lambda: base.run(None, feeds[t])}
            results[t].append(time_interleaved(runs, args.repeats))
    print(f"AddLinearAttention vs softmax attention core, ONNX Runtime {ort.__version__} fp32 on {cpu_name()}, "
          f"dim {args.dim}, {args.heads} heads, batch 1, {args.threads} threads, spinning off, "
          f"{args.runs} runs of {args.repeats} interleaved samples\n")
    print("| tokens | AddLinearAttention µs | softmax attention µs | speed-up (t_softmax/t_ours) min / median / max "
          "| ours ns/token (median / min) | softmax ns/token (median / min) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for t, rs in results.items():
        om = statistics.median(r["ours"][0] for r in rs)
        sm = statistics.median(r["softmax"][0] for r in rs)
        omin, smin = min(r["ours"][1] for r in rs), min(r["softmax"][1] for r in rs)
        lo, mid, hi = spread([r["softmax"][0] / r["ours"][0] for r in rs])
        print(f"| {t} | {om * 1e6:.1f} | {sm * 1e6:.1f} | {lo:.2f}× / {mid:.2f}× / {hi:.2f}× "
              f"| {om / t * 1e9:.0f} / {omin / t * 1e9:.0f} | {sm / t * 1e9:.0f} / {smin / t * 1e9:.0f} |")


if __name__ == "__main__":
    main()
