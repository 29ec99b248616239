"""ShiftLinear from two builds of the op library (before / after a change) against ORT fp32 and
int8 in one process: each session registers its own copy of the library (it exports only
RegisterCustomOps, so two copies coexist); single calls interleaved, the fastest of each kept
(a loaded machine preempts most calls; the fastest is the least disturbed).

    .venv/bin/python bench/bench_shift_linear_ab.py BEFORE.so AFTER.so THREADS TERMS CALLS [SHAPES]

SHAPES: comma-separated TOKENSxINxOUT (default: bench_shift_linear.py's four), e.g. 1x384x1536.
The load average is printed before and after (the machine may be shared).
"""
import logging
import os
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_shift_linear import shift_model, fp32_model, plain_session, SHAPES
from onnxruntime.quantization import QuantType, quantize_dynamic
logging.getLogger().setLevel(logging.ERROR)
before_lib, after_lib = sys.argv[1], sys.argv[2]
threads, terms, n = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
shapes = [tuple(int(v) for v in sh.split("x")) for sh in sys.argv[6].split(",")] if len(sys.argv) > 6 else SHAPES
def ours(model, lib):
    o = ort.SessionOptions(); o.register_custom_ops_library(lib); o.intra_op_num_threads = threads; o.inter_op_num_threads = 1
    o.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), sess_options=o, providers=["CPUExecutionProvider"])
rng = np.random.default_rng(0)
print(f"{before_lib} → {after_lib}: threads {threads}, terms {terms}, fastest of {n} interleaved single calls, µs; load {os.getloadavg()[0]:.1f}")
print("| tokens × in × out | before µs | after µs | fp32 µs | int8 µs | after/before speed-up | vs fp32 before → after | vs int8 after |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
with tempfile.TemporaryDirectory() as tmp:
    for tokens, i, o in shapes:
        w = (rng.standard_normal((o, i)) * 0.05).astype(np.float32); b = (rng.standard_normal(o) * 0.05).astype(np.float32)
        x = {"X": rng.standard_normal((tokens, i)).astype(np.float32)}
        m = shift_model(w, b, terms=terms)
        onnx.save(fp32_model(w, b), f"{tmp}/f.onnx"); quantize_dynamic(f"{tmp}/f.onnx", f"{tmp}/q.onnx", per_channel=True, weight_type=QuantType.QInt8)
        s = {"before": ours(m, before_lib), "after": ours(m, after_lib),
             "fp32": plain_session(f"{tmp}/f.onnx", threads), "int8": plain_session(f"{tmp}/q.onnx", threads)}
        best = {k: 1e9 for k in s}
        for _ in range(n):
            for k, sess in s.items():
                t0 = time.perf_counter(); sess.run(None, x); best[k] = min(best[k], time.perf_counter() - t0)
        u = {k: v * 1e6 for k, v in best.items()}
        print(f"| {tokens} × {i} × {o} | {u['before']:.1f} | {u['after']:.1f} | {u['fp32']:.1f} | {u['int8']:.1f} | {u['before']/u['after']:.2f}× "
              f"| {u['fp32']/u['before']:.2f}× → {u['fp32']/u['after']:.2f}× | {u['int8']/u['after']:.2f}× |", flush=True)
print(f"load after: {os.getloadavg()[0]:.1f}")
