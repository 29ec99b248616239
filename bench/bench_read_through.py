"""Read-through (issue 15, docs/ops.md#input-shift-read-through): MobileNetV2 (torchvision ImageNet
weights, zoo/public.py) through the default pipeline with `--spatial-shift` (shift-conv on, so every
block is expansion ShiftConv → SpatialShift with its fused scale, bias and ReLU6 → projection
ShiftConv), with the read-through fold off (`PipelineOptions(read_through=False)`: the SpatialShift
writes Y, the projection reads it back) and on (the projection ShiftConv reads through the shift's
offsets: no shifted tensor). End-to-end batch-1 latency, medians of interleaved runs (spinning off
in every session, as bench/bench_spatial_shift_speed.py), at 1 and 2 threads, with the original
fp32 model in the same rounds; the logits of 'on' and 'off' must be bit-identical (checked at
both thread counts before timing).

'on' is the pipeline's model with its last step, passes/fuse_spatial_shift.read_through_shift_convs,
applied — what convert_model(read_through=True) saves (that step is the pipeline's last and
deterministic; tests/test_shift_conv_read_through.py checks the pipeline with the flag both ways).

    nice .venv/bin/python bench/bench_read_through.py --json out/read_through.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter

import numpy as np
import onnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_spatial_shift import crops, interleaved  # noqa: E402
from bench_spatial_shift_speed import make_session  # noqa: E402

from mfconvert.convert import ConvertConfig  # noqa: E402
from mfconvert.convert.pipeline import PipelineOptions, convert_model  # noqa: E402
from mfconvert.passes.fuse_spatial_shift import read_through_shift_convs  # noqa: E402
from mfconvert.passes.spatial_shift import SpatialShiftConfig  # noqa: E402
from mfconvert.zoo.public import imagenet_images, mobilenet_v2  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=100, help="interleaved rounds per thread count")
    ap.add_argument("--rounds", type=int, default=4, help="separate interleaved runs per thread count (fresh sessions, "
                    "the order within a round reversed every other round)")
    ap.add_argument("--shift-terms", default="auto", help="as --shift-terms ('auto' or an integer)")
    ap.add_argument("--json")
    args = ap.parse_args()
    out: dict = {"args": vars(args), "load_start": os.getloadavg(),
                 "utc_start": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    path = str(mobilenet_v2("torchscript"))
    teacher = onnx.load(path)
    images, _ = imagenet_images()
    x = crops(images[10:11], 1, seed=1)
    terms = args.shift_terms if args.shift_terms == "auto" else int(args.shift_terms)
    t0 = time.time()
    done = convert_model(path, ConvertConfig(spatial_shift=SpatialShiftConfig()),
                         PipelineOptions(shift_terms=terms, read_through=False, input_shapes={"image": [1, 3, 224, 224]}))
    print(f"converted in {time.time() - t0:.0f} s", flush=True)
    off = done.result.model
    on, lines = read_through_shift_convs(off)
    print("\n".join(lines), flush=True)
    named = {"original": teacher, "read-through off": off, "read-through on": on}
    for k, m in named.items():
        ops = Counter(n.op_type for n in m.graph.node)
        through = sum(n.op_type == "ShiftConv" and len(n.input) > 4 for n in m.graph.node)
        print(f"{k}: {len(m.graph.node)} nodes, {dict(ops)}, ShiftConv reading through {through}", flush=True)
        out.setdefault("nodes", {})[k] = {**ops, "read_through": through}
    # logits: bit-identical between on and off, at both thread counts
    for threads in (1, 2):
        ys = {k: make_session(named[k], threads).run(None, {"image": x})[0] for k in ("read-through off", "read-through on")}
        same = np.array_equal(ys["read-through off"].view(np.uint32), ys["read-through on"].view(np.uint32))
        out[f"logits_bit_identical_{threads}t"] = bool(same)
        print(f"{threads} thread(s): logits bit-identical: {same}", flush=True)
        if not same:
            sys.exit("read-through changed the logits")
    out["end_to_end"] = {}
    for threads in (1, 2):
        for r in range(args.rounds):
            order = list(named) if r % 2 == 0 else list(reversed(named))   # who runs after whom alternates
            sessions = {k: make_session(named[k], threads) for k in order}
            med = interleaved({k: (lambda s=s: s.run(None, {"image": x})) for k, s in sessions.items()}, args.repeats)
            row = {k: v * 1e3 for k, v in med.items()}
            row["on/off"] = row["read-through on"] / row["read-through off"]
            out["end_to_end"][f"{threads}t round {r}"] = row
            print(f"{threads} thread(s), round {r}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in row.items() if k != "on/off")
                  + f"; on/off {row['on/off']:.3f}, off/original {row['read-through off'] / row['original']:.3f}, "
                    f"on/original {row['read-through on'] / row['original']:.3f}", flush=True)
    for threads in (1, 2):
        ratios = [v["on/off"] for k, v in out["end_to_end"].items() if k.startswith(f"{threads}t")]
        print(f"{threads} thread(s): on/off over {len(ratios)} rounds: median {np.median(ratios):.3f}, "
              f"range {min(ratios):.3f}-{max(ratios):.3f}", flush=True)
    out["load_end"] = os.getloadavg()
    out["utc_end"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
