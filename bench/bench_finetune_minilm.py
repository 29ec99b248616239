"""all-MiniLM-L6-v2 with shift linears only (or, with --full, fully converted: shift linears, add
attention and --moe-mlp), finetuned by distillation for a time budget on real sentences, judged on
held-out sentences the finetune never saw (embeddings from ORT).

    .venv/bin/python bench/bench_finetune_minilm.py [--train 6000] [--minutes 10] [--lr 3e-4] [--shift-lr 1e-4]
    .venv/bin/python bench/bench_finetune_minilm.py --full --minutes 30 --lr 1e-4 --attention-conv tokens
    .venv/bin/python bench/bench_finetune_minilm.py --shift-terms 2   (w = ±2^p1 ± 2^p2)

Train and held-out sentences come from calibrate.text.corpus (stdlib docstrings; disjoint, the
256 held-out ones fixed by the seed). Prints the figures before and after finetuning.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import onnx

from mfconvert.calibrate.data import from_text
from mfconvert.calibrate.evaluate import fidelity, model_outputs
from mfconvert.calibrate.finetune import FinetuneConfig, finetune
from mfconvert.calibrate.rounding import round_model
from mfconvert.calibrate.text import corpus
from mfconvert.convert import ConvertConfig, MoEMLPConfig, ShiftLinearConfig, convert_onnx
from mfconvert.moe import routes, routing_split, split_table
from mfconvert.zoo.minilm import INPUT_NAMES, minilm_onnx, model_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=6000, help="training sentences")
    ap.add_argument("--held-out", type=int, default=256)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--lr", type=float, default=3e-4, help="peak lr of norms, biases and other float weights")
    ap.add_argument("--shift-lr", type=float, default=1e-4, help="peak lr of the shift layers' latent weights")
    ap.add_argument("--feature-weight", type=float, default=1.0, help="per-block feature matching")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--loss", default="mse", choices=("mse", "cosine"))
    ap.add_argument("--rounding", default="compensated", choices=("compensated", "nearest"))
    ap.add_argument("--rounding-examples", type=int, default=512)
    ap.add_argument("--shift-terms", type=int, default=1, help="powers of two per shift-linear weight")
    ap.add_argument("--full", action="store_true", help="also add attention and --moe-mlp")
    ap.add_argument("--attention-conv", default=None, help="with --full: 'tokens' trains a conv on V")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        teacher = str(minilm_onnx(tmp))
        student = f"{tmp}/student.onnx"
        shift = ShiftLinearConfig(terms=args.shift_terms)
        convert_onnx(teacher, ConvertConfig(shift_linear=shift, moe_mlp=MoEMLPConfig()) if args.full
                     else ConvertConfig(shift_linear=shift, add_attention=None), output=student)
        train, held_out = corpus(args.train, args.held_out, seed=0)
        tokenizer_json = model_dir() / "tokenizer.json"
        data = from_text(train, tokenizer_json, list(INPUT_NAMES))
        evaluation = from_text(held_out, tokenizer_json, list(INPUT_NAMES))
        reference = model_outputs(teacher, evaluation, threads=2)
        before = fidelity(reference, model_outputs(student, evaluation, threads=2))
        # Compensated rounding alone (the finetune below starts with the same step, timed in its budget).
        rounded = round_model(onnx.load(student), onnx.load(teacher), data, args.rounding_examples, args.batch_size)
        rounded_only = fidelity(reference, model_outputs(rounded, evaluation, threads=2))
        cfg = FinetuneConfig(steps=None, minutes=args.minutes, lr=args.lr, shift_lr=args.shift_lr,
                             feature_weight=args.feature_weight, batch_size=args.batch_size, loss=args.loss,
                             rounding=args.rounding, rounding_examples=args.rounding_examples,
                             attention_conv=args.attention_conv, progress=False)
        t0 = time.monotonic()
        result = finetune(onnx.load(student), onnx.load(teacher), data, cfg, output=f"{tmp}/tuned.onnx")
        after = fidelity(reference, model_outputs(f"{tmp}/tuned.onnx", evaluation, threads=2))
        splits = routing_split(result.model, evaluation.batches(64)) if routes(result.model) else None
    print(f"{len(train)} training / {len(held_out)} held-out sentences; {result.steps} steps in "
          f"{time.monotonic() - t0:.0f} s ({result.rounding_seconds:.0f} s of it compensated rounding); "
          f"loss {np.mean(result.losses[:5]):.2e} → {np.mean(result.losses[-20:]):.2e}")
    print("| | mean cosine | NN agreement | SQNR dB |\n|---|---:|---:|---:|")
    rows = ((f"nearest powers of two ({args.shift_terms} per weight), no finetuning", before),
            ("error-compensated rounding, no finetuning", rounded_only),
            (f"finetuned {args.minutes:g} min (rounding included)", after))
    for name, f in rows:
        print(f"| {name} | {f['mean_cosine']:.4f} | {f['nn_agreement']:.3f} | {f['sqnr_db']:.1f} |")
    if splits:
        print("MoE routing on the held-out sentences after finetuning:\n" + split_table(splits))


if __name__ == "__main__":
    main()
