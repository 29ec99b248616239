"""ONNX Runtime's dynamic int8 quantisation of all-MiniLM-L6-v2, judged exactly as
bench_finetune_minilm.py judges the shift models: the same 256 held-out sentences
(calibrate.text.corpus, seed 0), embeddings from ORT, mean cosine / nearest-neighbour agreement /
SQNR against the fp32 export. This is the "ORT's int8" reference point README.md and
BENCHMARKS.md quote.

    .venv/bin/python bench/bench_int8_minilm.py [--held-out 256] [--per-tensor]

quantize_dynamic with int8 weights (QInt8), per output channel unless --per-tensor; activations
are quantised to uint8 at run time (ORT's default for dynamic quantisation). No training data.
"""
from __future__ import annotations

import argparse
import tempfile

from onnxruntime.quantization import QuantType, quantize_dynamic

from mfconvert.calibrate.data import from_text
from mfconvert.calibrate.evaluate import fidelity, model_outputs
from mfconvert.calibrate.text import corpus
from mfconvert.zoo.minilm import INPUT_NAMES, minilm_onnx, model_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=6000, help="only to draw the same held-out split as the finetune bench")
    ap.add_argument("--held-out", type=int, default=256)
    ap.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor, not per channel")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        teacher = str(minilm_onnx(tmp))
        int8 = f"{tmp}/int8.onnx"
        quantize_dynamic(teacher, int8, per_channel=not args.per_tensor, weight_type=QuantType.QInt8)
        _, held_out = corpus(args.train, args.held_out, seed=0)
        evaluation = from_text(held_out, model_dir() / "tokenizer.json", list(INPUT_NAMES))
        reference = model_outputs(teacher, evaluation, threads=2)
        f = fidelity(reference, model_outputs(int8, evaluation, threads=2))
    scale = "per tensor" if args.per_tensor else "per channel"
    print(f"ORT dynamic int8 ({scale}), {len(held_out)} held-out sentences")
    print("| | mean cosine | NN agreement | SQNR dB |\n|---|---:|---:|---:|")
    print(f"| ORT int8 dynamic, {scale} | {f['mean_cosine']:.4f} | {f['nn_agreement']:.3f} | {f['sqnr_db']:.1f} |")


if __name__ == "__main__":
    main()
