"""Benchmark the ShiftLinear kernel against ONNX Runtime's fp32 MatMul+Add and its dynamic
int8 quantisation (per channel) of the same layer.

    .venv/bin/python bench/bench_shift_linear.py [--threads 2] [--repeats 50] [--terms 1]

For each (tokens, in, out) it builds three single-layer models with the same random weights
(normal, std 0.05) and bias, runs them interleaved (warm-up, then `repeats` samples, each the
mean of enough runs to last >= 2 ms) and prints a markdown table of medians. "speed vs X" is
t_X / t_ShiftLinear (> 1: ShiftLinear is faster); the last column is the same ratio of the
fastest samples, which a machine shared with other work disturbs least.
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from mfconvert.nn import pow2
from mfconvert.runtime import session

SHAPES = [(197, 192, 768), (197, 768, 192), (128, 384, 1536), (1, 384, 1536)]


def _model(nodes, inits, in_f, out_f, extra_opsets=()):
    graph = helper.make_graph(
        nodes, "layer", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["n", in_f])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["n", out_f])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), *extra_opsets])
    model.ir_version = 8
    return model


def fp32_model(w, b):
    out_f, in_f = w.shape
    inits = [numpy_helper.from_array(np.ascontiguousarray(w.T), "W"), numpy_helper.from_array(b, "b")]
    nodes = [helper.make_node("MatMul", ["X", "W"], ["XW"]), helper.make_node("Add", ["XW", "b"], ["Y"])]
    return _model(nodes, inits, in_f, out_f)


def shift_model(w, b, weight_bits=5, terms=1):
    out_f, in_f = w.shape
    wt = torch.from_numpy(w)
    e = pow2.channel_exponents(wt)
    codes = pow2.round_to_term_codes(wt, e, weight_bits, terms).numpy()
    inits = [numpy_helper.from_array(pow2.pack_codes(codes, weight_bits), "W_codes"),
             numpy_helper.from_array(e.numpy(), "W_exponent"), numpy_helper.from_array(b, "B")]
    node = helper.make_node("ShiftLinear", ["X", "W_codes", "W_exponent", "B"], ["Y"],
                            domain="ai.mfconvert", in_features=in_f, out_features=out_f,
                            weight_bits=weight_bits, terms=terms)
    return _model([node], inits, in_f, out_f, [helper.make_opsetid("ai.mfconvert", 1)])


def plain_session(model_bytes, threads):
    """ORT's own kernels, same threading as ours: spinning off, since interleaved sessions'
    idle spinning threads would otherwise steal the cores from the one that runs."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model_bytes, sess_options=opts, providers=["CPUExecutionProvider"])


def time_interleaved(runs, repeats, warmup_s=0.3, sample_s=0.002):
    """runs: {name: callable}. Returns {name: median seconds per call}."""
    return {name: statistics.median(v) for name, v in interleaved_samples(runs, repeats, warmup_s, sample_s).items()}


def interleaved_samples(runs, repeats, warmup_s=0.3, sample_s=0.002):
    """runs: {name: callable}. Returns {name: [seconds per call of each sample]}."""
    per_sample = {}
    for name, fn in runs.items():
        fn()
        t0 = time.perf_counter()
        n = 0
        while time.perf_counter() - t0 < warmup_s / len(runs):
            fn()
            n += 1
        per_call = (time.perf_counter() - t0) / max(n, 1)
        per_sample[name] = max(1, int(sample_s / per_call))
    samples = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            k = per_sample[name]
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            samples[name].append((time.perf_counter() - t0) / k)
    return samples


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--terms", type=int, default=1, help="powers of two per weight (docs/ops.md)")
    ap.add_argument("--single-runs", type=int, default=0,
                    help="instead of samples: this many interleaved single calls per session, and the "
                         "fastest of each (a loaded machine preempts most samples; a single call often escapes)")
    args = ap.parse_args()
    logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic's pre-processing hint

    rng = np.random.default_rng(args.seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for tokens, in_f, out_f in SHAPES:
            w = (rng.standard_normal((out_f, in_f)) * 0.05).astype(np.float32)
            b = (rng.standard_normal(out_f) * 0.05).astype(np.float32)
            x = rng.standard_normal((tokens, in_f)).astype(np.float32)
            fp32 = fp32_model(w, b)
            fp32_path = os.path.join(tmp, "fp32.onnx")
            int8_path = os.path.join(tmp, "int8.onnx")
            onnx.save(fp32, fp32_path)
            quantize_dynamic(fp32_path, int8_path, per_channel=True, weight_type=QuantType.QInt8)
            sessions = {
                "shift": session(shift_model(w, b, terms=args.terms).SerializeToString(), threads=args.threads,
                                 spinning=False),
                "fp32": plain_session(fp32.SerializeToString(), args.threads),
                "int8": plain_session(int8_path, args.threads),
            }
            feeds = {"X": x}
            runs = {k: (lambda s=s: s.run(None, feeds)) for k, s in sessions.items()}
            if args.single_runs:
                samples = {k: [] for k in runs}
                for _ in range(args.single_runs):
                    for k, fn in runs.items():
                        t0 = time.perf_counter()
                        fn()
                        samples[k].append(time.perf_counter() - t0)
            else:
                samples = interleaved_samples(runs, args.repeats)
            t = {k: statistics.median(v) for k, v in samples.items()}
            t["fast"] = {k: min(v) for k, v in samples.items()}
            macs = tokens * in_f * out_f
            rows.append((tokens, in_f, out_f, t, macs))

    print(f"ShiftLinear (weight_bits=5, terms={args.terms}, Q16.16) vs ONNX Runtime {ort.__version__} on {cpu_name()}, "
          f"{args.threads} threads, median of {args.repeats} interleaved samples\n")
    print("| tokens × in × out | ShiftLinear µs | fp32 MatMul+Add µs | int8 dynamic µs "
          "| speed vs fp32 (t_fp32/t_ours) | speed vs int8 (t_int8/t_ours) "
          "| GMAC/s ours / fp32 / int8 | speed vs fp32 / int8 at the fastest samples |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for tokens, in_f, out_f, t, macs in rows:
        g = {k: macs / v / 1e9 for k, v in t.items() if k != "fast"}
        f = t["fast"]
        print(f"| {tokens} × {in_f} × {out_f} | {t['shift'] * 1e6:.1f} | {t['fp32'] * 1e6:.1f} "
              f"| {t['int8'] * 1e6:.1f} | {t['fp32'] / t['shift']:.2f}× | {t['int8'] / t['shift']:.2f}× "
              f"| {g['shift']:.1f} / {g['fp32']:.1f} / {g['int8']:.1f} "
              f"| {f['fp32'] / f['shift']:.2f}× / {f['int8'] / f['shift']:.2f}× |")


if __name__ == "__main__":
    main()
