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

--profile N: also ORT's profiler on 'off' and 'on' at 1 thread, N alternating sessions of 40 runs
after 3, per node the smallest of the N medians: per block the SpatialShift + projection ('off')
against the projection reading through ('on'), and the other nodes that moved most.
--layers: also single layers (random codes, tests/test_shift_conv_read_through.py's models): the
two-node graph SpatialShift (ReLU6 tail) → 1x1 ShiftConv against the fused node, MobileNetV2's
projection shapes, 1 thread, medians of 200 interleaved runs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter, defaultdict

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


def node_medians(model: onnx.ModelProto, x: np.ndarray, runs: int = 40, warmup: int = 3) -> dict[str, float]:
    """{node name: median kernel µs} over `runs` profiled runs at 1 thread (spinning off)."""
    with tempfile.TemporaryDirectory() as tmp:
        sess = make_session(model, 1, profile_prefix=os.path.join(tmp, "prof"))
        for _ in range(warmup + runs):
            sess.run(None, {"image": x})
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    t0 = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")[warmup]
    per: dict[str, list] = defaultdict(list)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= t0:
            per[e["name"][:-len("_kernel_time")]].append(e["dur"])
    return {k: float(np.median(v)) for k, v in per.items()}


def profile(off: onnx.ModelProto, on: onnx.ModelProto, x: np.ndarray, rounds: int) -> dict:
    got: dict[str, list] = {"off": [], "on": []}
    for r in range(rounds):
        for k in (("off", "on") if r % 2 == 0 else ("on", "off")):
            got[k].append(node_medians(off if k == "off" else on, x))
    best = {k: {n: min(d[n] for d in v) for n in v[0]} for k, v in got.items()}
    shift_of = {n.output[0]: n.name for n in off.graph.node if n.op_type == "SpatialShift"}
    blocks = []
    for n in off.graph.node:
        if n.op_type == "ShiftConv" and n.input[0] in shift_of:
            a = {at.name: onnx.helper.get_attribute_value(at) for at in n.attribute}
            row = {"node": n.name, "out_channels": a["out_channels"], "terms": a.get("terms", 1),
                   "shift_off": best["off"][shift_of[n.input[0]]], "conv_off": best["off"][n.name],
                   "on": best["on"][n.name]}
            blocks.append(row)
            print(f"{n.name}: M={row['out_channels']}, {row['terms']} terms: off shift {row['shift_off']:.0f} + conv "
                  f"{row['conv_off']:.0f} µs, on {row['on']:.0f} µs ({row['on'] / (row['shift_off'] + row['conv_off']):.2f}×)",
                  flush=True)
    skip = {b["node"] for b in blocks} | set(shift_of.values())
    others = sorted(((best["on"].get(k, 0.0) - v, k) for k, v in best["off"].items() if k not in skip), reverse=True)
    out = {"blocks": blocks, "blocks_off_us": sum(b["shift_off"] + b["conv_off"] for b in blocks),
           "blocks_on_us": sum(b["on"] for b in blocks),
           "others_off_us": sum(v for k, v in best["off"].items() if k not in skip),
           "others_on_us": sum(v for k, v in best["on"].items() if k not in skip),
           "others_moved": [{"node": k, "off": best["off"][k], "on": best["on"].get(k, 0.0)} for _, k in others[:4] + others[-3:]]}
    print(f"blocks: off {out['blocks_off_us']:.0f} µs, on {out['blocks_on_us']:.0f} µs; other nodes: off "
          f"{out['others_off_us']:.0f}, on {out['others_on_us']:.0f}; moved most: " + ", ".join(
              f"{o['node']} {o['off']:.0f} → {o['on']:.0f}" for o in out["others_moved"]), flush=True)
    return out


def layers() -> list[dict]:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.test_shift_conv_read_through import case   # the kernel test's model builder
    rng = np.random.default_rng(0)
    rows = []
    for c, hw, m, terms, strides in [(32, 112, 16, 4, 1), (96, 112, 24, 4, 2), (144, 56, 24, 4, 1), (192, 28, 32, 4, 1),
                                     (576, 14, 96, 3, 1), (960, 7, 320, 3, 1)]:
        fused, two, feeds, _ = case(rng, 1, c, (hw, hw), m, (1, 1), tail="sb", terms=terms, special=False,
                                    shift=dict(strides=[strides] * 2, activation="Clip", clip_min=0.0, clip_max=6.0))
        sessions = {"two nodes": make_session(two, 1), "read-through": make_session(fused, 1)}
        med = interleaved({k: (lambda s=s: s.run(None, feeds)) for k, s in sessions.items()}, 200)
        row = {"shape": f"{c}x{hw}x{hw} s{strides} -> {m}, {terms} terms", **{k: v * 1e6 for k, v in med.items()}}
        row["ratio"] = med["read-through"] / med["two nodes"]
        rows.append(row)
        print(f"layer {row['shape']}: two nodes {row['two nodes']:.0f} µs, read-through {row['read-through']:.0f} µs "
              f"({row['ratio']:.3f}×)", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=100, help="interleaved rounds per thread count")
    ap.add_argument("--rounds", type=int, default=4, help="separate interleaved runs per thread count (fresh sessions, "
                    "the order within a round reversed every other round)")
    ap.add_argument("--shift-terms", default="auto", help="as --shift-terms ('auto' or an integer)")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="also ORT's profiler, N alternating sessions")
    ap.add_argument("--layers", action="store_true", help="also single layers, two nodes against the fused one")
    ap.add_argument("--no-e2e", action="store_true", help="skip the end-to-end timing")
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
    for threads in (() if args.no_e2e else (1, 2)):
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
    for threads in (() if args.no_e2e else (1, 2)):
        ratios = [v["on/off"] for k, v in out["end_to_end"].items() if k.startswith(f"{threads}t")]
        print(f"{threads} thread(s): on/off over {len(ratios)} rounds: median {np.median(ratios):.3f}, "
              f"range {min(ratios):.3f}-{max(ratios):.3f}", flush=True)
    if args.profile:
        out["profile"] = profile(off, on, x, args.profile)
    if args.layers:
        out["layers"] = layers()
    out["load_end"] = os.getloadavg()
    out["utc_end"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
