"""Issue 15's figures: MobileNetV2 (torchvision ImageNet weights, zoo/public.py) with every
depthwise 3×3 conv turned into SpatialShift (--spatial-shift alone: the other convs stay float, so
the figures are the shifts' own), judged against the original in ONNX Runtime:

- top-1 agreement with the original on crops of foolbox's ImageNet images none of the finetuning
  saw (train: crops of images 0–9; judged: crops of images 10–19), before and after finetuning
  (calibrate.finetune, what `mfconvert finetune` runs: KL on the logits), with and without the
  Sparse Shift penalty; the share of channels left unshifted (offset (0, 0)); with --fidelity also
  the converted model that keeps non-shift-like channels depthwise;
- the SpatialShift kernel against ORT's depthwise Conv (3×3, bias) on every depthwise shape of
  MobileNetV2 (batch 1), and end-to-end latency of the converted model against the original:
  medians of interleaved runs, their ratio; sessions with spinning off (the machine is shared).

    nice .venv/bin/python bench/bench_spatial_shift.py --minutes 10 --json out/bench_spatial_shift.json

--data rows: calibrate/spatial_shift.py on crops of images 0–9, every layer shifted, then with the
channels no single shift explains (--keep-below) kept depthwise; with --reconstruct-minutes each
row's blocks are then trained on their output error (reconstruct_blocks), agreement before and after.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from mfconvert.calibrate.data import Examples
from mfconvert.calibrate.finetune import FinetuneConfig, finetune
from mfconvert.calibrate.spatial_shift import Reconstruction, calibrate_shifts, channels_to_keep, reconstruct_blocks
from mfconvert.convert import ConvertConfig, convert_onnx
from mfconvert.ort_ops import DOMAIN
from mfconvert.passes.spatial_shift import SpatialShiftConfig
from mfconvert.runtime import session
from mfconvert.zoo.public import imagenet_images, mobilenet_v2, natural_images


def crops(images: np.ndarray, per_image: int, seed: int) -> np.ndarray:
    """Random crops (side 60–100 % of the 224 image, any position), resized back to 224
    (bilinear), half of them flipped: [len(images)·per_image, 3, 224, 224]."""
    rng = np.random.default_rng(seed)
    out = []
    for img in torch.from_numpy(images):
        for _ in range(per_image):
            side = int(rng.integers(134, 225))
            top, left = (int(rng.integers(0, 225 - side)) for _ in range(2))
            crop = img[:, top:top + side, left:left + side][None]
            crop = F.interpolate(crop, size=(224, 224), mode="bilinear", align_corners=False)[0]
            out.append((crop.flip(-1) if rng.random() < 0.5 else crop).numpy())
    return np.stack(out).astype(np.float32)


def logits(model: onnx.ModelProto, x: np.ndarray, batch: int = 16) -> np.ndarray:
    sess = session(model.SerializeToString(), threads=2, spinning=False)
    return np.concatenate([sess.run(None, {"image": x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def offsets_of(model: onnx.ModelProto) -> list[np.ndarray]:
    inits = {i.name: i for i in model.graph.initializer}
    return [numpy_helper.to_array(inits[n.input[1]]) for n in model.graph.node if n.op_type == "SpatialShift"]


def unshifted_share(model: onnx.ModelProto) -> float:
    off = np.concatenate(offsets_of(model))
    return float((off == 0).all(axis=1).mean())


def convert(teacher: onnx.ModelProto, **cfg):
    return convert_onnx(teacher, ConvertConfig(shift_linear=None, add_attention=None, shift_conv=None,
                                               spatial_shift=SpatialShiftConfig(**cfg)),
                        input_shapes={"image": [1, 3, 224, 224]})


def interleaved(runs: dict, repeats: int) -> dict:
    """{name: median seconds} of `repeats` rounds, each running every callable once in turn."""
    times = {k: [] for k in runs}
    for f in runs.values():
        f()                                           # warm-up
    for _ in range(repeats):
        for k, f in runs.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def timing_session(model: onnx.ModelProto, threads: int, level: str):
    """A session with spinning off at ORT's optimisation level 'all' (the default) or 'extended'."""
    import onnxruntime as ort

    from mfconvert.runtime import session_options
    opts = session_options(threads, spinning=False)
    if level == "extended":
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    return ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])


def one_node(node: onnx.NodeProto, x_shape, inits) -> bytes:
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    model.ir_version = 8
    return model.SerializeToString()


def kernel_vs_conv(teacher: onnx.ModelProto, threads: int, repeats: int) -> list[dict]:
    """Per depthwise shape of the model (batch 1): SpatialShift vs a 3×3 depthwise Conv + bias."""
    inferred = onnx.shape_inference.infer_shapes(teacher)
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    rows, seen = [], set()
    rng = np.random.default_rng(0)
    for node in teacher.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "Conv" or attrs.get("group", 1) == 1:
            continue
        _, c, h, w = dims[node.input[0]]
        s = attrs.get("strides", [1, 1])[0]
        if (c, h, s) in seen:
            continue
        seen.add((c, h, s))
        shape = [1, c, h, w]
        x = rng.normal(size=shape).astype(np.float32)
        offsets = rng.integers(-1, 2, size=(c, 2)).astype(np.int64)
        shift = one_node(helper.make_node("SpatialShift", ["X", "off"], ["Y"], domain=DOMAIN, strides=[s, s]),
                         shape, [numpy_helper.from_array(offsets, "off")])
        conv = one_node(helper.make_node("Conv", ["X", "W", "B"], ["Y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                                         strides=[s, s], group=c), shape,
                        [numpy_helper.from_array(rng.normal(size=(c, 1, 3, 3)).astype(np.float32), "W"),
                         numpy_helper.from_array(rng.normal(size=c).astype(np.float32), "B")])
        sessions = {k: session(m, threads=threads, spinning=False) for k, m in (("shift", shift), ("conv", conv))}
        med = interleaved({k: (lambda s_=s_: s_.run(None, {"X": x})) for k, s_ in sessions.items()}, repeats)
        rows.append({"C": c, "H": h, "W": w, "stride": s, "shift_us": med["shift"] * 1e6, "conv_us": med["conv"] * 1e6,
                     "speedup": med["conv"] / med["shift"]})
        print(f"  dw {c}×{h}×{w} s{s}: SpatialShift {med['shift'] * 1e6:.1f} µs, Conv {med['conv'] * 1e6:.1f} µs "
              f"({med['conv'] / med['shift']:.1f}×)", flush=True)
    return rows


def probe():
    """Top-1 agreement with one depthwise layer converted, by scale choice (neighbour_correlation)."""
    teacher = onnx.load(str(mobilenet_v2("torchscript")))
    images, _ = imagenet_images()
    judged = crops(images[10:], 3, seed=1)
    t = logits(teacher, judged).argmax(1)
    for rho in (0.0, 1.0):
        m = convert(teacher, neighbour_correlation=rho).model
        print(f"every layer, ρ {rho}: {float((logits(m, judged).argmax(1) == t).mean()):.3f}", flush=True)
    for layer in ("features.17/", "features.9/", "features.2/"):
        for rho in (0.0, 1.0):
            m = convert(teacher, include=[layer], neighbour_correlation=rho).model
            print(f"{layer} alone, ρ {rho}: {float((logits(m, judged).argmax(1) == t).mean()):.3f}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=3.0, help="finetuning budget per run")
    ap.add_argument("--per-image", type=int, default=24, help="judged crops per held-out image (10 images)")
    ap.add_argument("--train-per-image", type=int, default=32)
    ap.add_argument("--sparsity", type=float, default=0.05, help="Sparse Shift L1 coefficient of the penalised run (0: no penalised run)")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--fidelity", type=float, default=None, help="also the data-free conversion keeping channels "
                    "whose dominant tap holds less of the kernel's energy depthwise")
    ap.add_argument("--keep-below", type=float, nargs="*", default=[0.5, 0.7, 0.8, 0.9], help="--data rows keeping "
                    "depthwise the channels whose best shift explains less than this share of their output's variance")
    ap.add_argument("--calib-per-image", type=int, default=3, help="--data: calibration crops per image 0–9")
    ap.add_argument("--reconstruct-minutes", type=float, default=0.0, help="--data rows: then train each block on "
                    "its output error (calibrate/spatial_shift.py:reconstruct_blocks) for this many minutes in all "
                    "(0: not; the row gives the agreement before and after)")
    ap.add_argument("--reconstruct-steps", type=int, default=2000, help="the reconstruction's step cap per block")
    ap.add_argument("--reconstruct-lr", type=float, default=1e-3)
    ap.add_argument("--reconstruct-offsets", action="store_true", help="the reconstruction also trains the offsets "
                    "(continuous, Active Shift; rounded at the end)")
    ap.add_argument("--skip-free", action="store_true", help="no data-free row")
    ap.add_argument("--skip-timing", action="store_true", help="accuracy only (no kernel or end-to-end timing)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--skip-finetune", action="store_true")
    ap.add_argument("--extra-train", choices=("natural",), default=None, help="finetune also on crops of "
                    "scikit-image's 20 sample photographs (zoo/public.py natural_images), as many per image")
    ap.add_argument("--extra-calib", choices=("natural",), default=None, help="--data: calibrate also on "
                    "crops of scikit-image's 20 sample photographs, as many per image")
    ap.add_argument("--judge-seen", action="store_true", help="also the agreement on other crops of the "
                    "images finetuning saw (0-9): memorising those shows there, not on images 10-19")
    ap.add_argument("--finetune-keep-below", type=float, nargs="*", default=[], help="also finetune these "
                    "--keep-below rows, with and without the Sparse Shift penalty (the all-shifted row always is)")
    ap.add_argument("--probe", action="store_true", help="only: one layer converted at a time (features.17, .9, .2), "
                    "scale from the dominant tap (ρ 0) or the kernel's sum (ρ 1), on 3 crops per held-out image")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.probe:
        probe()
        return
    torch.set_num_threads(1)   # training one thread at a time: the machine is shared
    out: dict = {"args": vars(args)}
    teacher = onnx.load(str(mobilenet_v2("torchscript")))
    images, _ = imagenet_images()
    judged = crops(images[10:], args.per_image, seed=1)
    t_logits = logits(teacher, judged)
    agree = lambda m: float((logits(m, judged).argmax(1) == t_logits.argmax(1)).mean())
    if args.judge_seen:   # crops of the finetuning images, other than those it trained on
        seen = crops(images[:10], args.per_image, seed=4)
        s_logits = logits(teacher, seen)
        agree_seen = lambda m: float((logits(m, seen).argmax(1) == s_logits.argmax(1)).mean())
    print(f"{len(judged)} judged crops of 10 held-out images", flush=True)

    calib_pool = crops(images[:10], args.calib_per_image, seed=3)
    if args.extra_calib == "natural":   # interleaved, so that the held-out last quarter has both kinds
        extra = crops(natural_images(), args.calib_per_image, seed=6)
        mixed = np.empty((len(calib_pool) + len(extra),) + calib_pool.shape[1:], np.float32)
        order = np.random.default_rng(7).permutation(len(mixed))
        mixed[order[:len(calib_pool)]], mixed[order[len(calib_pool):]] = calib_pool, extra
        calib_pool = mixed
    out["calibration_examples"] = len(calib_pool)
    calib = Examples([{"image": x} for x in calib_pool])
    students = {}
    rows = ([] if args.skip_free else [("shift", {}, False)]) + [("shift, --data", {}, True)]
    explained = None
    for threshold in args.keep_below:
        rows.append((f"shift, --data, kept depthwise below {threshold:.0%} explained", {"keep_below": threshold}, True))
    if args.fidelity is not None:
        rows.append((f"fidelity {args.fidelity}", {"fidelity": args.fidelity}, False))
    for name, cfg, with_data in rows:
        t0 = time.monotonic()
        if "keep_below" in cfg:   # the channels no single shift explains stay depthwise
            if explained is None:   # measured once on the original's activations
                _, explained = channels_to_keep(teacher, calib, convert(teacher).report.changes, 0.0)
                out["explained_median"] = {k: float(np.median(v)) for k, v in explained.items()}
            cfg = {"keep_channels": {k: [int(i) for i in np.flatnonzero(v < cfg["keep_below"])]
                                     for k, v in explained.items()}}
        result = convert(teacher, **cfg)
        changes = result.report.changes
        model = result.model
        calibration = None
        reconstruction = None
        if with_data:
            model, lines = calibrate_shifts(model, teacher, calib, changes)
            if args.reconstruct_minutes > 0:   # the block-wise training after the least-squares fit
                least_squares = {"agreement": agree(model), "unshifted": unshifted_share(model),
                                 "seconds": time.monotonic() - t0}
                print(f"  least squares: {least_squares}", flush=True)
                model, more = reconstruct_blocks(model, teacher, calib, changes, Reconstruction(
                    minutes=args.reconstruct_minutes, steps=args.reconstruct_steps, lr=args.reconstruct_lr,
                    offsets=args.reconstruct_offsets))
                lines = lines + more
                reconstruction = {"least_squares": least_squares, "seconds": time.monotonic() - t0 - least_squares["seconds"]}
            calibration = {"lines": lines, "layers": {c.node: c.calibration for c in changes}}
        kept = sum(c.kept_depthwise for c in changes)
        channels = sum(c.out_features for c in changes)
        students[name] = model
        row = {"layers": len(changes), "channels": channels, "kept_depthwise": kept,
               "macs_removed": sum(c.macs_removed or 0 for c in changes),
               "unshifted": unshifted_share(model), "agreement": agree(model),
               "seconds": time.monotonic() - t0, "reconstruction": reconstruction, "calibration": calibration}
        out[name] = {"before": row}
        print(f"{name}: { {k: v for k, v in row.items() if k != 'calibration'} }", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
        if calibration:
            print("  " + "; ".join(calibration["lines"]), flush=True)
            for layer, fig in calibration["layers"].items():
                print(f"  {layer}: {fig}", flush=True)
    # Sparse Shift: each finetuned model with the penalty on its offsets (the pass writes it as an attribute)
    tuned = ["shift, --data"] + [f"shift, --data, kept depthwise below {t:.0%} explained" for t in args.finetune_keep_below]
    for name in tuned:
        if args.sparsity == 0:   # no penalised copies
            break
        if name not in students:
            raise SystemExit(f"--finetune-keep-below: no row {name!r} (give the threshold to --keep-below too)")
        sparse = onnx.ModelProto()
        sparse.CopyFrom(students[name])
        for node in sparse.graph.node:
            if node.op_type == "SpatialShift":
                node.attribute.append(helper.make_attribute("sparsity", float(args.sparsity)))
        students[name + " + sparse"] = sparse
        out[name + " + sparse"] = {"before": dict(out[name]["before"], calibration=None)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)

    if not args.skip_finetune:
        pool = crops(images[:10], args.train_per_image, seed=2)
        if args.extra_train == "natural":
            pool = np.concatenate([pool, crops(natural_images(), args.train_per_image, seed=5)])
        train = Examples([{"image": x} for x in pool])
        out["train_examples"] = len(pool)
        for name in [n for t in tuned for n in ((t,) if args.sparsity == 0 else (t, t + " + sparse"))]:
            cfg = FinetuneConfig(steps=None, minutes=args.minutes, batch_size=args.batch_size, lr=args.lr, loss="kl",
                                 rounding="nearest", keep_best=False, progress=False)
            t0 = time.monotonic()
            result = finetune(students[name], teacher, train, cfg)
            row = {"steps": result.steps, "seconds": time.monotonic() - t0, "loss": [result.losses[0], result.losses[-1]],
                   "unshifted": unshifted_share(result.model), "agreement": agree(result.model),
                   **({"agreement_seen": agree_seen(result.model), "agreement_seen_before": agree_seen(students[name])}
                      if args.judge_seen else {}),
                   "offsets_changed": int(sum((a != b).any(axis=1).sum() for a, b in
                                              zip(offsets_of(students[name]), offsets_of(result.model))))}
            out[name]["after"] = row
            students[name + " finetuned"] = result.model
            print(f"{name} finetuned: {row}", flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(out, f, indent=1)
    if args.skip_timing:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
        return

    print("kernel vs depthwise Conv (batch 1):", flush=True)
    out["kernel"] = kernel_vs_conv(teacher, args.threads, args.repeats)
    x = judged[:1]
    out["end_to_end"] = {}
    for level in ("all", "extended"):   # ORT's default (NCHWc layout for convs) and without layout changes
        sessions = {"original": timing_session(teacher, args.threads, level),
                    "converted": timing_session(students["shift"], args.threads, level)}
        med = interleaved({k: (lambda s=s: s.run(None, {"image": x})) for k, s in sessions.items()}, args.repeats)
        out["end_to_end"][level] = {**{k: v * 1e3 for k, v in med.items()}, "ratio": med["converted"] / med["original"]}
        print(f"end to end (batch 1, {args.threads} threads, optimisation {level}): original "
              f"{med['original'] * 1e3:.2f} ms, converted {med['converted'] * 1e3:.2f} ms, converted/original "
              f"{med['converted'] / med['original']:.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
