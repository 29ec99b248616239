"""What the report counts on real models (docs/report.md): multiplications, additions, shifts and
absolute values per inference before and after conversion, the 45 nm energy estimate, and the
time the counting takes. all-MiniLM-L6-v2 at 128 tokens (one and two terms, attention float or
AddLinearAttention) and torchvision's MobileNetV2 at 224×224 (shift-conv, adder-conv).

    .venv/bin/python bench/bench_report_energy.py
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from mfconvert.convert import ConvertConfig, convert_onnx
from mfconvert.passes.adder_conv import AdderConvConfig
from mfconvert.passes.conv import ShiftConvConfig
from mfconvert.passes.report import human_count, human_energy
from mfconvert.passes.shift_linear import ShiftLinearConfig


def row(model: str, setting: str, source, cfg: ConvertConfig, shapes: dict) -> str:
    result = convert_onnx(str(source), cfg, input_shapes=shapes)
    t0 = time.perf_counter()
    costs = result.report.costs
    took = time.perf_counter() - t0
    b, a = costs["before"], costs["after"]

    def ops(f):
        return (f"{human_count(f['multiplications'])} / {human_count(f['additions'])} / {human_count(f['shifts'])}"
                + (f" / {human_count(f['absolute_values'])}" if f["absolute_values"] else ""))
    return (f"| {model} | {setting} | {ops(b)} | {ops(a)} | {human_energy(b['energy_pj'])} → "
            f"{human_energy(a['energy_pj'])} ({b['energy_pj'] / a['energy_pj']:.1f}×) | {took:.1f} s |")


def main() -> None:
    from mfconvert.zoo.minilm import load_minilm, minilm_onnx
    from mfconvert.zoo.public import mobilenet_v2

    with tempfile.TemporaryDirectory() as tmp:
        minilm = minilm_onnx(Path(tmp), model=load_minilm())
        tokens = {"input_ids": [1, 128], "attention_mask": [1, 128]}
        print("| model | conversion | before: mul / add / shift | after: mul / add / shift (/ abs) | energy | counting |")
        print("|---|---|---|---|---|---|")
        for terms in (1, 2):
            print(row("all-MiniLM-L6-v2, 128 tokens", f"shift linears, {terms} term(s), attention float", minilm,
                      ConvertConfig(shift_linear=ShiftLinearConfig(terms=terms), add_attention=None), tokens))
        print(row("all-MiniLM-L6-v2, 128 tokens", "shift linears, 1 term + AddLinearAttention", minilm,
                  ConvertConfig(shift_linear=ShiftLinearConfig(terms=1)), tokens))
        mnv2 = mobilenet_v2("torchscript")
        image = None   # static 1×3×224×224
        print(row("MobileNetV2, 224×224", "shift-conv + shift linear, 1 term", mnv2,
                  ConvertConfig(shift_conv=ShiftConvConfig(), add_attention=None), image))
        print(row("MobileNetV2, 224×224", "adder-conv (stem float) + shift linear", mnv2,
                  ConvertConfig(adder_conv=AdderConvConfig(), add_attention=None), image))


if __name__ == "__main__":
    main()
