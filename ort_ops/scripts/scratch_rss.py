"""Memory of one ShiftLinear row at a large in_features, per ISA path (BENCHMARKS.md, RELIABILITY).

Each ISA runs in a fresh subprocess, which prints, in MiB: the resident memory the session adds
(packed weights), the peak the first run adds on top (scratch, output), the peak of both (packing
included) over the start, the memory still held
after the run, and after the session is deleted (relative to before it was created).
Peaks come from VmHWM, reset before each phase through /proc/self/clear_refs.

usage: python ort_ops/scripts/scratch_rss.py [--in-features N] [--out-features N]
       [--rows N] [--isa scalar,avx2,avx512] [--json]   (MFCONVERT_OPS_LIBRARY picks another build)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _status(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    raise KeyError(key)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(in_f: int, out_f: int, rows: int) -> dict:
    """Runs in the child: one session, one run, then the session deleted."""
    import importlib.util

    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    # mfconvert.ort_ops loaded from its file: importing the package would import torch (3 s).
    spec = importlib.util.spec_from_file_location("_ort_ops", os.path.join(HERE, "..", "__init__.py"))
    ort_ops = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ort_ops)
    DOMAIN = ort_ops.DOMAIN

    def session(blob, threads):
        opts = ort.SessionOptions()
        opts.register_custom_ops_library(ort_ops.library_path())
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        return ort.InferenceSession(blob, sess_options=opts, providers=["CPUExecutionProvider"])

    n_codes = (in_f * out_f * 5 + 7) // 8
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, n_codes, dtype=np.uint8)
    inits = [helper.make_tensor("W_codes", TensorProto.UINT8, [n_codes], codes.tobytes(), raw=True),
             helper.make_tensor("W_exponent", TensorProto.INT8, [out_f], np.zeros(out_f, np.int8).tobytes(), raw=True)]
    node = helper.make_node("ShiftLinear", ["X", "W_codes", "W_exponent"], ["Y"], name="big", domain=DOMAIN,
                            in_features=in_f, out_features=out_f)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["n", in_f])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    blob = model.SerializeToString()
    del model, graph, inits, codes
    x = rng.standard_normal((rows, in_f)).astype(np.float32)
    gc.collect()
    base = _status("VmRSS")
    _reset_peak()
    sess = session(blob, threads=2)
    del blob
    gc.collect()
    with_session = _status("VmRSS")
    peak_session = _status("VmHWM")
    _reset_peak()
    y = sess.run(None, {"X": x})[0]
    peak_run = _status("VmHWM")
    peak_all = max(peak_session, peak_run)
    after_run = _status("VmRSS")
    assert y.shape == (rows, out_f) and np.isfinite(y).all()
    del sess, y
    gc.collect()
    after_del = _status("VmRSS")
    return {"session": with_session - base, "run_peak": peak_run - with_session, "peak": peak_all - base,
            "held_after_run": after_run - with_session, "after_session_deleted": after_del - base}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--in-features", type=int, default=1 << 22)
    ap.add_argument("--out-features", type=int, default=8)
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--isa", default="scalar,avx2,avx512")
    ap.add_argument("--json", action="store_true", help="also print all results as one JSON line")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--one-process", action="store_true",
                    help="measure every ISA in this process, one after the other (faster; a later ISA "
                         "may reuse memory an earlier one freed, so its peaks can read low)")
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(measure(a.in_features, a.out_features, a.rows)))
        return 0
    if a.one_process:
        results = {}
        for isa in a.isa.split(","):
            os.environ["MFCONVERT_ISA"] = isa
            results[isa] = measure(a.in_features, a.out_features, a.rows)
        print(json.dumps(results))
        return 0
    results = {}
    for isa in a.isa.split(","):
        env = dict(os.environ, MFCONVERT_ISA=isa)
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child",
                              "--in-features", str(a.in_features), "--out-features", str(a.out_features),
                              "--rows", str(a.rows)], env=env, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{isa}: failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results[isa] = r
        print(f"{isa:7s} session +{r['session']:7.1f} MiB  run peak +{r['run_peak']:7.1f} MiB  "
              f"peak (session + run) +{r['peak']:7.1f} MiB  "
              f"held after run +{r['held_after_run']:7.1f} MiB  after session deleted +{r['after_session_deleted']:7.1f} MiB")
    if a.json:
        print(json.dumps(results))
    return 0 if len(results) == len(a.isa.split(",")) else 1


if __name__ == "__main__":
    sys.exit(main())
