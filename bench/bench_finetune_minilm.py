"""all-MiniLM-L6-v2 with shift linears only, finetuned by distillation for a time budget on real
sentences, judged on held-out sentences the finetune never saw (embeddings from ORT).

    .venv/bin/python bench/bench_finetune_minilm.py [--train 4000] [--minutes 10] [--lr 5e-5] [--shift-lr 5e-4]

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
from mfconvert.calibrate.text import corpus
from mfconvert.convert import ConvertConfig, convert_onnx
from mfconvert.zoo.minilm import INPUT_NAMES, minilm_onnx, model_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=4000, help="training sentences")
    ap.add_argument("--held-out", type=int, default=256)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--lr", type=float, default=5e-5, help="peak lr of norms, biases and other float weights")
    ap.add_argument("--shift-lr", type=float, default=5e-4, help="peak lr of the shift layers' latent weights")
    ap.add_argument("--feature-weight", type=float, default=0.0)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        teacher = str(minilm_onnx(tmp))
        student = f"{tmp}/student.onnx"
        convert_onnx(teacher, ConvertConfig(add_attention=None), output=student)
        train, held_out = corpus(args.train, args.held_out, seed=0)
        tokenizer_json = model_dir() / "tokenizer.json"
        data = from_text(train, tokenizer_json, list(INPUT_NAMES))
        evaluation = from_text(held_out, tokenizer_json, list(INPUT_NAMES))
        reference = model_outputs(teacher, evaluation, threads=2)
        before = fidelity(reference, model_outputs(student, evaluation, threads=2))
        cfg = FinetuneConfig(steps=None, minutes=args.minutes, lr=args.lr, shift_lr=args.shift_lr,
                             feature_weight=args.feature_weight, batch_size=args.batch_size, progress=False)
        t0 = time.monotonic()
        result = finetune(onnx.load(student), onnx.load(teacher), data, cfg, output=f"{tmp}/tuned.onnx")
        after = fidelity(reference, model_outputs(f"{tmp}/tuned.onnx", evaluation, threads=2))
    print(f"{len(train)} training / {len(held_out)} held-out sentences; {result.steps} steps in "
          f"{time.monotonic() - t0:.0f} s; loss {np.mean(result.losses[:5]):.2e} → {np.mean(result.losses[-20:]):.2e}")
    print("| | mean cosine | NN agreement | SQNR dB |\n|---|---:|---:|---:|")
    for name, f in (("rounded, no finetuning", before), ("finetuned", after)):
        print(f"| {name} | {f['mean_cosine']:.4f} | {f['nn_agreement']:.3f} | {f['sqnr_db']:.1f} |")


if __name__ == "__main__":
    main()
