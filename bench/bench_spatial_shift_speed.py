"""SpatialShift's speed (issue 15): MobileNetV2 (torchvision ImageNet weights, zoo/public.py)
converted with `--spatial-shift --no-shift-conv` (every depthwise 3×3 → SpatialShift + a 1×1
depthwise scale conv, the block's ReLU6 after it), against the original in ONNX Runtime:

- end to end, batch 1, 1 and 2 threads, ORT's default optimisation level ('all': the NCHWc
  layout pass) and ORT_ENABLE_EXTENDED: medians of interleaved runs, spinning off (the machine is
  shared), for the original, the converted model as the pass and calibration leave it
  ('unfused'), and after passes/fuse_spatial_shift.py ('fused': the scale, bias and ReLU6 inside
  the SpatialShift); at 'all' also the fused model with ORT's NchwcTransformer disabled;
- where the time goes (--profile): ORT's profiler on each model, the kernel time summed by kind
  (SpatialShift, the 1×1 scale convs, NCHWc reorders, the other convs, the rest);
- the kernel (--only kernel): SpatialShift (plain, and fused with scale, bias and Clip 0..6)
  against ORT's depthwise 3×3 Conv (+ bias, + Clip, which ORT fuses) on MobileNetV2's shapes:
  session runs (call overhead and, for the conv, ORT's NCHWc reorders in and out included) and
  the kernel alone (ORT's profiler, reorders excluded: inside the network the depthwise conv
  sits in a chain of NCHWc convs).

    nice .venv/bin/python bench/bench_spatial_shift_speed.py --before OLD_LIB --json out/ss_speed.json

--before OLD_LIB (a build of the ops library from before a change): the unfused model and the
plain kernel also as that build runs them, interleaved with the rest.

Helpers (crops, interleaved, convert, one_node) are bench/bench_spatial_shift.py's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_spatial_shift import convert, crops, interleaved, one_node  # noqa: E402

from mfconvert.ort_ops import DOMAIN  # noqa: E402
from mfconvert.zoo.public import imagenet_images, mobilenet_v2  # noqa: E402


def make_session(model, threads: int, level: str = "all", lib: str | None = None, profile_prefix: str | None = None,
                 disabled: tuple[str, ...] = ()):
    """Spinning off, ORT's level 'all' (default) or 'extended', our ops from `lib` (default: the
    library mfconvert.ort_ops finds, MFCONVERT_OPS_LIBRARY included), ORT optimizers `disabled`."""
    import onnxruntime as ort

    from mfconvert.ort_ops import library_path
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(lib or library_path())
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    if level == "extended":
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    if profile_prefix:
        opts.enable_profiling, opts.profile_file_prefix = True, profile_prefix
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(disabled))


def fused(model: onnx.ModelProto) -> onnx.ModelProto:
    from mfconvert.passes.fuse_spatial_shift import fuse_spatial_shifts
    out, _ = fuse_spatial_shifts(model)
    return out


def models(teacher: onnx.ModelProto, with_fused: bool = True) -> dict[str, onnx.ModelProto]:
    converted = convert(teacher).model
    out = {"original": teacher, "unfused": converted}
    if with_fused:
        out["fused"] = fused(converted)
    return out


def kind(op: str, after_shift: bool) -> str:
    """A profiled node's kind; `after_shift`: the first Conv after a SpatialShift in a model that
    has 1×1 scale convs (ORT names it after the ReLU6 it fuses, not by our label)."""
    if op == "SpatialShift":
        return "SpatialShift"
    if op.startswith("Reorder"):
        return "NCHWc reorders"
    if op in ("Conv", "FusedConv"):
        return "1×1 scale conv" if after_shift else "other convs"
    return "other ops"


def profile(model: onnx.ModelProto, x: np.ndarray, threads: int, level: str, runs: int, warmup: int = 3,
            lib: str | None = None) -> dict:
    """ORT's profiler over `runs` runs after `warmup`: milliseconds per run by kind (kernel time,
    summed over the nodes), node counts by op, and the median run."""
    with tempfile.TemporaryDirectory() as tmp:
        sess = make_session(model, threads, level, lib, os.path.join(tmp, "prof"))
        for _ in range(warmup + runs):
            sess.run(None, {"image": x})
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    model_runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                        key=lambda e: e["ts"])[warmup:]
    t_first = model_runs[0]["ts"]
    has_scale = any(n.op_type == "Conv" and n.name.endswith(".scale") for n in model.graph.node)
    total: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    pending = False   # a SpatialShift ran and its scale conv has not yet
    for e in sorted(events, key=lambda e: e["ts"]):
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < t_first:
            continue
        op = e.get("args", {}).get("op_name", "")
        k = kind(op, pending)
        pending = (pending or op == "SpatialShift") and has_scale and k != "1×1 scale conv"
        total[k] += e["dur"] / 1e3 / len(model_runs)
        count[op] += 1
    return {"ms_per_run_by_kind": dict(total), "nodes_by_op": {k: v // len(model_runs) for k, v in count.items()},
            "model_run_ms_median": float(np.median([e["dur"] / 1e3 for e in model_runs]))}


def end_to_end(named: dict, x: np.ndarray, repeats: int, libs: dict) -> dict:
    """Medians of interleaved runs, 1 and 2 threads, ORT levels 'all' and 'extended'; ms."""
    out = {}
    for threads in (1, 2):
        for level in ("all", "extended"):
            sessions = {k: make_session(m, threads, level, libs.get(k)) for k, m in named.items()}
            if level == "all" and "fused" in named:   # the default level without the NCHWc layout pass
                sessions["fused, NchwcTransformer off"] = make_session(named["fused"], threads, level,
                                                                       disabled=("NchwcTransformer",))
            med = interleaved({k: (lambda s=s: s.run(None, {"image": x})) for k, s in sessions.items()}, repeats)
            row = {k: v * 1e3 for k, v in med.items()}
            out[f"{threads}t {level}"] = row
            print(f"end to end, {threads} thread(s), {level}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in row.items())
                  + "; " + ", ".join(f"{k}/original {row[k] / row['original']:.3f}" for k in row if k != "original"),
                  flush=True)
    return out


def mobilenet_shapes(teacher: onnx.ModelProto) -> list[tuple[int, int, int]]:
    inferred = onnx.shape_inference.infer_shapes(teacher)
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    seen = []
    for node in teacher.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv" and attrs.get("group", 1) > 1:
            _, c, h, _ = dims[node.input[0]]
            key = (c, h, attrs.get("strides", [1, 1])[0])
            if key not in seen:
                seen.append(key)
    return seen


def kernel_time(sess) -> float:
    """Median over the profiled runs (the first dropped) of the kernel time of the session's
    compute nodes, NCHWc reorders excluded (inside a network the depthwise conv sits in a chain
    of NCHWc convs and has none of its own), µs."""
    with open(sess.end_profiling()) as f:
        events = json.load(f)
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    per_run = []
    for a, b in zip(runs[1:], runs[2:] + [None]):
        end = b["ts"] if b else float("inf")
        per_run.append(sum(e["dur"] for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
                           and a["ts"] <= e["ts"] < end
                           and not e.get("args", {}).get("op_name", "").startswith("Reorder")))
    return float(np.median(per_run))


def kernel_table(teacher: onnx.ModelProto, threads: int, repeats: int, before: str | None) -> list[dict]:
    """SpatialShift, plain and fused (scale, bias, Clip 0..6), against depthwise 3×3 Conv + bias
    (+ Clip, fused by ORT), batch 1: medians of interleaved session runs (ORT's and Python's call
    overhead included) and of the kernel alone (ORT's profiler); with `before` (a library) also the
    plain shift as that build runs it."""
    rng = np.random.default_rng(0)
    rows = []
    for c, h, s in mobilenet_shapes(teacher):
        shape = [1, c, h, h]
        x = rng.normal(size=shape).astype(np.float32)
        offsets = numpy_helper.from_array(rng.integers(-1, 2, size=(c, 2)).astype(np.int64), "off")
        scale = numpy_helper.from_array(rng.normal(size=c).astype(np.float32), "S")
        bias = numpy_helper.from_array(rng.normal(size=c).astype(np.float32), "B")
        lo, hi = numpy_helper.from_array(np.float32(0), "lo"), numpy_helper.from_array(np.float32(6), "hi")
        weight = numpy_helper.from_array(rng.normal(size=(c, 1, 3, 3)).astype(np.float32), "W")
        conv_attrs = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[s, s], group=c)
        models_ = {
            "shift": one_node(helper.make_node("SpatialShift", ["X", "off"], ["Y"], domain=DOMAIN, strides=[s, s]),
                              shape, [offsets]),
            "fused shift": one_node(helper.make_node("SpatialShift", ["X", "off", "S", "B"], ["Y"], domain=DOMAIN,
                                                     strides=[s, s], clip=[0.0, 6.0]), shape, [offsets, scale, bias]),
            "conv": one_node(helper.make_node("Conv", ["X", "W", "B"], ["Y"], **conv_attrs), shape, [weight, bias]),
        }
        g = helper.make_graph([helper.make_node("Conv", ["X", "W", "B"], ["Z"], **conv_attrs),
                               helper.make_node("Clip", ["Z", "lo", "hi"], ["Y"])], "g",
                              [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, None)],
                              [weight, bias, lo, hi])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        models_["conv+clip"] = m.SerializeToString()
        tmp = tempfile.mkdtemp()
        sessions = {k: make_session(v, threads, profile_prefix=os.path.join(tmp, k.replace(" ", "_")))
                    for k, v in models_.items()}
        if before:
            sessions["shift before"] = make_session(models_["shift"], threads, lib=before,
                                                    profile_prefix=os.path.join(tmp, "before"))
        med = interleaved({k: (lambda s_=s_: s_.run(None, {"X": x})) for k, s_ in sessions.items()}, repeats)
        kernel = {k: kernel_time(s_) for k, s_ in sessions.items()}
        row = {"C": c, "H": h, "stride": s, **{f"{k}_us": v * 1e6 for k, v in med.items()},
               **{f"{k}_kernel_us": v for k, v in kernel.items()}}
        rows.append(row)
        print(f"  {c}×{h}×{h} s{s} (run / kernel alone, µs): " + ", ".join(
            f"{k} {row[k + '_us']:.1f} / {row[k + '_kernel_us']:.1f}" for k in sessions)
            + f"; conv/shift {row['conv_kernel_us'] / row['shift_kernel_us']:.2f}×, conv+clip/fused shift "
              f"{row['conv+clip_kernel_us'] / row['fused shift_kernel_us']:.2f}×", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=60)
    ap.add_argument("--kernel-repeats", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2, help="the kernel table's threads")
    ap.add_argument("--profile-runs", type=int, default=30)
    ap.add_argument("--no-fused", action="store_true", help="the original and the unfused model only")
    ap.add_argument("--before", help="an ops library built before the change: also the unfused model and the "
                    "plain kernel run by it ('unfused, before')")
    ap.add_argument("--only", choices=("e2e", "profile", "kernel"), nargs="*", default=["e2e", "profile", "kernel"])
    ap.add_argument("--json")
    args = ap.parse_args()
    out: dict = {"args": vars(args), "load_start": os.getloadavg(),
                 "utc_start": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    teacher = onnx.load(str(mobilenet_v2("torchscript")))
    images, _ = imagenet_images()
    x = crops(images[10:11], 1, seed=1)
    named = models(teacher, with_fused=not args.no_fused)
    libs = {}
    if args.before:
        named = {"original": named["original"], "unfused, before": named["unfused"], **{
            k: v for k, v in named.items() if k != "original"}}
        libs["unfused, before"] = args.before
    for k, m in named.items():
        print(f"{k}: {len(m.graph.node)} nodes, " + ", ".join(
            f"{op} {sum(n.op_type == op for n in m.graph.node)}" for op in ("SpatialShift", "Conv", "Clip")), flush=True)
    if "fused" in named:   # the fused model gives the unfused one's outputs (within float rounding)
        ys = {k: make_session(named[k], 2).run(None, {"image": x})[0] for k in ("unfused", "fused")}
        out["fused_vs_unfused_max_abs"] = float(np.abs(ys["fused"] - ys["unfused"]).max())
        print(f"fused vs unfused logits: max |Δ| {out['fused_vs_unfused_max_abs']:.3g}", flush=True)
    if "e2e" in args.only:
        out["end_to_end"] = end_to_end(named, x, args.repeats, libs)
    if "profile" in args.only:
        out["profile"] = {}
        for threads in (1, 2):
            for level in ("all", "extended"):
                for k, m in named.items():
                    p = profile(m, x, threads, level, args.profile_runs, lib=libs.get(k))
                    out["profile"][f"{k} {threads}t {level}"] = p
                    print(f"profile {k}, {threads} thread(s), {level}: run {p['model_run_ms_median']:.2f} ms; "
                          + ", ".join(f"{kk} {v:.2f} ms" for kk, v in sorted(p["ms_per_run_by_kind"].items()))
                          + f"; nodes {p['nodes_by_op']}", flush=True)
    if "kernel" in args.only and not args.no_fused:
        print(f"kernel vs depthwise Conv (batch 1, {args.threads} threads):", flush=True)
        out["kernel"] = kernel_table(teacher, args.threads, args.kernel_repeats, args.before)
    out["load_end"] = os.getloadavg()
    out["utc_end"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
