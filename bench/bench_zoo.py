"""The public zoo through the user's commands (issue 11): for each model of zoo/public.py, the
default conversion, the conversion with `--data` (error-compensated rounding, `--shift-terms auto`
measured on the data) and a `mfconvert finetune --minutes 2` of the latter, all run through the
CLI as a user would, then judged in ORT on held-out examples none of them saw.

    nice .venv/bin/python bench/bench_zoo.py [--minutes 2] [--only NAME ...] [--work DIR] [--table]
                                             [--reuse] [--convert-args "--no-shift-conv"]

Data (train = the `--data` of both commands; held-out disjoint from it):
  - image models (open-nsfw, MobileNetV2): foolbox 3.3.4's 20 labelled ImageNet images, real;
    images 0–11 train (96 examples: random reflect-padded crops and flips), images 12–19 and their
    mirror images held out (16). open-nsfw gets them as its own preprocessing wants (BGR, 0–255
    minus [104, 117, 123], NHWC).
  - magika: real bytes — the first and last 1,024 bytes (whitespace-stripped, padded with 256) of
    files of this environment's site-packages (.py, .so, .json, .txt, …), train and held-out
    from disjoint files.
  - MiniLM: real English sentences (calibrate.text.corpus, stdlib docstrings; disjoint splits), its
    own tokenizer.json.
  - audio models (smart-turn, oww-melspectrogram, oww-alexa): synthetic, no package ships their
    input: smart-turn Whisper-range log-mel noise (zoo.public.sample), melspectrogram 16 kHz int16
    audio of 1–3 random tones plus noise, alexa unit-normal embeddings; held-out from other seeds.
Fidelity: SQNR (dB) and mean cosine of every float output against the original's in ORT
(calibrate.evaluate.fidelity), with top-1 agreement for class outputs. Each model's figures go to
WORK/NAME.json; `--table` prints BENCHMARKS.md's table from them (with the commit each ran at).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from mfconvert.calibrate.data import Examples, from_text
from mfconvert.calibrate.evaluate import fidelity, model_outputs
from mfconvert.zoo import public

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "mfconvert.cli.main"]
MINILM_SHAPES = {"input_ids": [1, 32], "attention_mask": [1, 32]}
N_SYNTH_TRAIN, N_SYNTH_HELD = 128, 32


# -- data -----------------------------------------------------------------------------------------
def _augment(images: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n random crops (reflect-padded by 16) with random horizontal flips of NCHW images."""
    rng = np.random.default_rng(seed)
    padded = np.pad(images, ((0, 0), (0, 0), (16, 16), (16, 16)), mode="reflect")
    out = []
    for _ in range(n):
        i, dy, dx = rng.integers(len(images)), rng.integers(33), rng.integers(33)
        x = padded[i, :, dy:dy + 224, dx:dx + 224]
        out.append(x[:, :, ::-1] if rng.random() < 0.5 else x)
    return np.stack(out).astype(np.float32)


def _image_splits(nsfw: bool):
    images, labels = public.imagenet_images()
    train = _augment(images[:12], 96, seed=0)
    held = np.concatenate([images[12:], images[12:, :, :, ::-1]]).astype(np.float32)
    held_labels = np.concatenate([labels[12:], labels[12:]])
    if nsfw:   # torchvision normalisation → open_nsfw's BGR 0–255 minus means, NHWC
        def convert(x):
            mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
            rgb = (x.transpose(0, 2, 3, 1) * std + mean) * 255.0
            return (rgb[..., ::-1] - np.array([104.0, 117.0, 123.0])).astype(np.float32)
        return {"input_0": convert(train)}, {"input_0": convert(held)}, None
    return {"image": train}, {"image": held}, held_labels


def _magika_bytes(count: int, skip: int) -> np.ndarray:
    """[count, 2048] int32: first and last 1,024 bytes of real files (stripped; 256 pads)."""
    site = Path(np.__file__).resolve().parents[1]
    files = sorted(p for p in site.rglob("*") if p.is_file() and p.stat().st_size >= 64
                   and "__pycache__" not in p.parts)
    picked = np.random.default_rng(0).permutation(len(files))[skip:skip + count]
    rows = []
    for i in picked:
        data = files[i].read_bytes().strip()
        beg, end = data[:1024], data[-1024:]
        row = np.full(2048, 256, np.int32)
        row[:len(beg)] = np.frombuffer(beg, np.uint8)
        row[2048 - len(end):] = np.frombuffer(end, np.uint8)
        rows.append(row)
    return np.stack(rows)


def _tones(count: int, seed: int) -> np.ndarray:
    """[count, 1280] float32 int16-scale audio at 16 kHz: 1–3 random tones plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(1280) / 16000.0
    out = []
    for _ in range(count):
        x = rng.normal(0, rng.uniform(50, 800), 1280)
        for _ in range(rng.integers(1, 4)):
            x += rng.uniform(500, 8000) * np.sin(2 * np.pi * rng.uniform(100, 4000) * t + rng.uniform(0, 6.3))
        out.append(x)
    return np.clip(np.stack(out), -32768, 32767).astype(np.float32)


def _samples(name: str, seeds) -> dict[str, np.ndarray]:
    feeds = [public.sample(name, seed=s) for s in seeds]
    return {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}   # batch axis = examples


# name -> (path getter, exporter, shapes, data kind, data(): (train arrays | sentences, held-out arrays, labels))
def _models():
    from mfconvert.calibrate.text import corpus

    def minilm(exporter):
        return (lambda: public.stock_minilm(exporter),
                f"transformers BertModel (sdpa), {exporter}, opset {17 if exporter == 'torchscript' else 18}",
                MINILM_SHAPES, "real: stdlib sentences (2,000 train, 128 held out)",
                lambda: (*corpus(2000, 128, seed=0), None))

    def zoo(name, kind, data):
        return (lambda: public.fetch(name), public.ZOO[name].exporter, public.input_shapes(name), kind, data)

    models = {
        "open-nsfw": zoo("open-nsfw", "real: foolbox ImageNet images (12 → 96 train crops, 8 + mirrors held out)",
                         lambda: _image_splits(nsfw=True)),
        "smart-turn": zoo("smart-turn", "synthetic: Whisper-range log-mel noise",
                          lambda: (_samples("smart-turn", range(1000, 1000 + 48)), _samples("smart-turn", range(16)), None)),
        "oww-melspectrogram": zoo("oww-melspectrogram", "synthetic: int16 audio, 1–3 tones + noise",
                                  lambda: ({"input": _tones(N_SYNTH_TRAIN, 1)}, {"input": _tones(N_SYNTH_HELD, 2)}, None)),
        "oww-embedding": zoo("oww-embedding", "—", None),
        "oww-alexa": zoo("oww-alexa", "synthetic: unit-normal embeddings",
                         lambda: (_samples("oww-alexa", range(1000, 1000 + N_SYNTH_TRAIN)),
                                  _samples("oww-alexa", range(N_SYNTH_HELD)), None)),
        "magika": zoo("magika", "real: bytes of site-packages files (128 train, 32 held-out files)",
                      lambda: ({"bytes": _magika_bytes(128, 0)}, {"bytes": _magika_bytes(32, 128)}, None)),
        "effword-resnet50": zoo("effword-resnet50", "—", None),
        "silero-vad": zoo("silero-vad", "—", None),
        "MiniLM (torchscript)": minilm("torchscript"),
        "MiniLM (dynamo)": minilm("dynamo"),
    }
    for exporter in public.MOBILENET_EXPORTERS:
        models[f"MobileNetV2 ({exporter})"] = (
            lambda e=exporter: public.mobilenet_v2(e),
            f"torchvision's, {exporter}, opset {17 if exporter == 'torchscript' else 18}",
            {"image": [1, 3, 224, 224]}, "real: foolbox ImageNet images (12 → 96 train crops, 8 + mirrors held out)",
            lambda: _image_splits(nsfw=False))
    return models


# -- running ----------------------------------------------------------------------------------------
def _cli(args: list[str], log) -> tuple[int, float, str]:
    start = time.monotonic()
    done = subprocess.run(CLI + args, capture_output=True, text=True, cwd=ROOT)
    seconds = time.monotonic() - start
    log.write(f"$ mfconvert {' '.join(args)}\n{done.stdout}{done.stderr}\n[exit {done.returncode}, {seconds:.0f} s]\n\n")
    log.flush()
    return done.returncode, seconds, (done.stderr.strip().splitlines() or [""])[-1]


def _reason(text: str) -> str:
    """A skip reason without its node-specific tail."""
    return text.split(" (at ")[0].split(":")[0][:70]


def _report(path: Path) -> dict:
    """Converted ops, skips, multiplications from a --report-json file."""
    data = json.loads(path.read_text())
    changes = [c for p in data["passes"] for c in p["converted"]]
    skips = [s for p in data["passes"] for s in p["skipped"]]
    macs = [c.get("macs_removed") for c in changes]
    return {"ops": dict(Counter(c["new_op"] for c in changes)),
            "skips": dict(Counter(_reason(s["reason"]) for s in skips)),
            "macs_removed": None if None in macs else int(sum(macs)),
            "mul_before": data["costs"]["before"]["multiplications"],
            "mul_after": data["costs"]["after"]["multiplications"],
            "terms": dict(Counter(str(n["terms"]) for n in (data.get("allocation") or {}).get("nodes", [])))}


def run_model(name: str, spec, work: Path, minutes: float, reuse: bool = False, convert_args: list[str] = ()) -> dict:
    path_of, exporter, shapes, kind, data = spec
    out = work / name.replace(" ", "_").replace("(", "").replace(")", "")
    out.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip() or os.environ.get("MFCONVERT_COMMIT", "?")   # a `git archive` copy
    row = {"model": name, "exporter": exporter, "data": kind, "commit": commit,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "minutes": minutes,
           "convert_args": list(convert_args)}
    model = str(path_of())
    shape_args = [a for k, v in shapes.items() for a in ("--input-shape", f"{k}={','.join(map(str, v))}")]
    shape_args += list(convert_args)   # both conversions take them
    reusing = reuse and (out / "data.json").is_file() and (out / "data.onnx").is_file()
    with open(out / "log.txt", "a" if reusing else "w") as log:
        rc, secs, err = (0, 0.0, "") if reusing else _cli(
            [model, "-o", str(out / "default.onnx"), "--force", "--report-json", str(out / "default.json"), *shape_args], log)
        row["default_seconds"] = secs
        if rc != 0:
            row["default_error"] = err
            return row
        row.update(_report(out / "default.json"))
        train, held, labels = data()
        if isinstance(train, list):   # sentences
            from mfconvert.zoo.minilm import model_dir
            tokenizer = model_dir() / "tokenizer.json"
            (out / "train.txt").write_text("\n".join(train) + "\n")
            data_args = ["--data", str(out / "train.txt"), "--tokenizer", str(tokenizer)]
            held_out = from_text(held, tokenizer, list(shapes))
            n_train, n_held = len(train), len(held)
        else:
            np.savez(out / "train.npz", **train)
            data_args = ["--data", str(out / "train.npz")]
            n_train, n_held = len(next(iter(train.values()))), len(next(iter(held.values())))
            held_out = Examples([{k: v[i] for k, v in held.items()} for i in range(n_held)])
        row.update(n_train=n_train, n_held=n_held)
        rc, secs, err = (0, 0.0, "") if reusing else _cli(
            [model, "-o", str(out / "data.onnx"), "--force", "--report-json", str(out / "data.json"), *shape_args,
             *data_args], log)
        row["data_seconds"] = secs
        if rc != 0:
            row["data_error"] = err
        else:
            row["data_report"] = _report(out / "data.json")
            rc, secs, err = _cli(["finetune", str(out / "data.onnx"), "--teacher", model, *data_args,
                                  "--minutes", str(minutes), "-o", str(out / "ft.onnx"), "--force",
                                  "--report-json", str(out / "ft.json")], log)
            row["ft_seconds"] = secs
            if rc != 0:
                row["ft_error"] = err
            else:
                ft = json.loads((out / "ft.json").read_text())
                row.update(ft_steps=ft["steps"], ft_kept=ft["kept"])
                if "start" in ft:   # where training started and how the time went (--minutes: training only)
                    start = {k: v for k, v in ft["start"].items() if k not in ("decisions", "record")}
                    row.update(ft_start=start, ft_stopped_by=ft["stopped_by"],
                               **{f"ft_{k}": round(ft[k], 1) for k in ("training_seconds", "rounding_seconds",
                                                                        "scoring_seconds")})
        reference = model_outputs(model, held_out, batch_size=16, threads=2)
        classes = all(np.ndim(r) == 1 and np.size(r) > 1 for r in next(iter(reference.rows.values())))
        for stage in ("default", "data", "ft"):
            if (out / f"{stage}.onnx").is_file() and f"{stage}_error" not in row:
                got = model_outputs(str(out / f"{stage}.onnx"), held_out, batch_size=16, threads=2)
                figures = fidelity(reference, got, logits=classes)
                figures.pop("per_output", None)
                if labels is not None:
                    first = next(iter(got.rows.values()))
                    figures["accuracy"] = float(np.mean([np.argmax(r) == y for r, y in zip(first, labels)]))
                row[f"{stage}_fidelity"] = figures
        if labels is not None:
            first = next(iter(reference.rows.values()))
            row["original_accuracy"] = float(np.mean([np.argmax(r) == y for r, y in zip(first, labels)]))
    return row


# -- table ----------------------------------------------------------------------------------------
def _terms(report: dict | None) -> str:
    """'2 terms' / '1–2 terms' of the shift layers `--shift-terms auto` chose."""
    chosen = sorted(int(t) for t in (report or {}).get("terms", {}))
    if not chosen:
        return ""
    return f" [{chosen[0]}{'–' + str(chosen[-1]) if chosen[-1] != chosen[0] else ''} term{'s' * (chosen[-1] > 1)}]"


def _fid(f: dict | None, report: dict | None = None) -> str:
    if not f:
        return "—"
    text = f"{f['sqnr_db']:.1f} dB, cos {f['mean_cosine']:.4f}"
    if "top1_agreement" in f:
        text += f", top-1 {f['top1_agreement']:.0%}"
    if "accuracy" in f:
        text += f", acc {f['accuracy']:.0%}"
    return text + _terms(report)


def table(work: Path, names) -> str:
    rows = ["| model | exporter, opset | data (train / held out) | converted / skipped (reasons) | default | `--data` "
            "| `--data` + finetune | multiplications removed (per inference) | commit |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        f = work / f"{name.replace(' ', '_').replace('(', '').replace(')', '')}.json"
        if not f.is_file():
            continue
        r = json.loads(f.read_text())
        if "default_error" in r:
            why = r["default_error"].split(": ")[-1].replace("|", "/")   # without 'mfconvert: error: FILE: '
            rows.append(f"| {name} | {r['exporter']} | — | {why} "
                        f"| — | — | — | 0 | {r['commit']} |")
            continue
        ops = " + ".join(f"{n} {op}" for op, n in r["ops"].items())
        skips = "; ".join(f"{n}× {_reason(why)}" for why, n in r["skips"].items())
        data = f"{r['data']}; {r['n_train']} / {r['n_held']}"
        if "original_accuracy" in r:
            data += f"; original acc {r['original_accuracy']:.0%}"
        ft = _fid(r.get("ft_fidelity")) if "ft_error" not in r else f"error: {r['ft_error'].split('error: ', 1)[-1]}"
        if "ft_start" in r:
            start = r["ft_start"]
            how = {"given": "start: its own codes", "nearest": "start: nearest",
                   "rounded": f"start: re-rounded, compensated kept in {start.get('kept')}/{start.get('layers')} "
                              f"layers ({r['ft_rounding_seconds']:.0f} s)"}.get(start["start"], start["start"])
            ft += (f" ({r['ft_steps']} steps in {r['ft_training_seconds']:.0f} s of training; {how}; "
                   f"kept {r['ft_kept']})")
        elif "ft_steps" in r:
            ft += f" ({r['ft_steps']} steps, kept {r['ft_kept']})"
        dat = _fid(r.get("data_fidelity"), r.get("data_report")) if "data_error" not in r else f"error: {r['data_error']}"
        macs = "unknown" if r["macs_removed"] is None else f"{r['macs_removed']:,}"
        macs += f" ({r['mul_before']:,} → {r['mul_after']:,} mul)"
        if r.get("convert_args"):
            ops = f"`{' '.join(r['convert_args'])}`: {ops}"
        rows.append(f"| {name} | {r['exporter']} | {data} | {ops} / {sum(r['skips'].values())}"
                    f"{' (' + skips + ')' if skips else ''} | {_fid(r.get('default_fidelity'), r)} | {dat} | {ft} "
                    f"| {macs} | {r['commit']} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=2.0, help="finetune budget per model")
    ap.add_argument("--only", nargs="*", help="model names (default: all)")
    ap.add_argument("--work", default="/tmp/mfconvert-bench-zoo", help="models, logs and figures")
    ap.add_argument("--table", action="store_true", help="only print the table from WORK")
    ap.add_argument("--reuse", action="store_true", help="keep the conversions already in WORK; finetune again")
    ap.add_argument("--convert-args", default="", help="more flags for both conversions, e.g. --convert-args=--no-shift-conv")
    args = ap.parse_args()
    models = _models()
    names = args.only or list(models)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if not args.table:
        for name in names:   # one at a time: each finetune uses the cores
            print(f"{name} …", file=sys.stderr, flush=True)
            row = run_model(name, models[name], work, args.minutes, args.reuse, args.convert_args.split())
            (work / f"{name.replace(' ', '_').replace('(', '').replace(')', '')}.json").write_text(
                json.dumps(row, indent=2) + "\n")
            print(json.dumps(row), file=sys.stderr, flush=True)
    print(table(work, names))


if __name__ == "__main__":
    main()
