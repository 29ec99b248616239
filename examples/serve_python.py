"""Serve a converted model from Python.

    python examples/serve_python.py MODEL.mf.onnx INPUT.npy [-o OUTPUT.npy] [--threads 2] [--repeats 20]

`mfconvert.runtime.session` is an `onnxruntime.InferenceSession` (CPU) with our custom-op library
registered; the same by hand, in any program that has onnxruntime:

    opts = onnxruntime.SessionOptions()
    opts.register_custom_ops_library(mfconvert.ort_ops.library_path())
    sess = onnxruntime.InferenceSession("MODEL.mf.onnx", opts, providers=["CPUExecutionProvider"])

INPUT.npy feeds the model's first input (np.save of an array of its dtype and shape); the first
output is printed (argmax per row for [N, classes] logits) and, with -o, saved.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

from mfconvert.runtime import session


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("input", help=".npy for the model's first input")
    ap.add_argument("-o", "--output", help="write the first output here (.npy)")
    ap.add_argument("--threads", type=int, default=1, help="ORT intra-op threads")
    ap.add_argument("--repeats", type=int, default=0, help="timed runs after the first (median printed)")
    args = ap.parse_args(argv)

    sess = session(args.model, threads=args.threads)
    first_in, first_out = sess.get_inputs()[0], sess.get_outputs()[0]
    feeds = {first_in.name: np.load(args.input)}
    out = sess.run([first_out.name], feeds)[0]
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        sess.run([first_out.name], feeds)
        times.append(time.perf_counter() - t0)

    print(f"{first_in.name} {list(feeds[first_in.name].shape)} -> {first_out.name} {list(out.shape)}"
          + (f", median {1e3 * statistics.median(times):.3f} ms over {len(times)} runs" if times else ""))
    if out.ndim == 2:
        print("argmax per row:", out.argmax(1).tolist())
    if args.output:                     # atomically: a temporary file beside it, then renamed
        tmp = f"{args.output}.tmp"
        with open(tmp, "wb") as f:
            np.save(f, out)
        os.replace(tmp, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
