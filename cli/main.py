"""The `mfconvert` command: `mfconvert MODEL.onnx [options]` converts a model (a thin layer over
mfconvert.convert.pipeline.convert_model: flags → ConvertConfig and PipelineOptions, one field each;
everything here is one call in Python)."""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import List, Optional

import typer
import typer.core
from tqdm import tqdm

from mfconvert.calibrate.allocate import DEFAULT_TARGET
from mfconvert.calibrate.data import DataError
from mfconvert.calibrate.finetune import FinetuneConfig
from mfconvert.calibrate.rounding import check_rounding
from mfconvert.cli import finetune as finetune_cli
from mfconvert.cli.finetune import load_data, run_finetune
from mfconvert.convert import ConversionError, ConvertConfig
from mfconvert.convert.files import check_outputs, write_text_atomic
from mfconvert.convert.onnx_model import check_serializable, external_data_reads, load_model, output_path_for
from mfconvert.convert.pipeline import TERMS_AUTO, PipelineOptions, convert_model
from mfconvert.passes.add_attention import AddAttentionConfig
from mfconvert.passes.adder_conv import AdderConvConfig, ShiftAddConvConfig
from mfconvert.passes.conv import ShiftConvConfig
from mfconvert.passes.moe_mlp import MoEMLPConfig
from mfconvert.passes.report_html import render as render_html
from mfconvert.passes.shift_linear import ShiftLinearConfig
from mfconvert.passes.spatial_shift import SpatialShiftConfig

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Convert an ONNX model into a multiplication-free model for ONNX Runtime. "
                       "`mfconvert finetune --help` for finetuning by distillation.")


def fail(message: str) -> None:
    typer.echo(f"mfconvert: error: {message}", err=True)
    raise typer.Exit(code=1)


def as_flags(message: str) -> str:
    """Config errors name fields (weight_bits); on the command line say the flag (--weight-bits)."""
    return re.sub(r"\b(weight_bits|weight_scale|act_bits|act_frac_bits|min_params|terms)\b",
                  lambda m: "--shift-terms" if m.group(1) == "terms" else "--" + m.group(1).replace("_", "-"),
                  message)


MAX_ELEMENTS = 1 << 40   # --input-shape: at most 2^40 values per input (4 TiB of float32)


def parse_input_shapes(specs: list[str]) -> dict[str, list[int]]:
    """'input_ids=1,128' → {'input_ids': [1, 128]}."""
    shapes = {}
    for spec in specs:
        name, sep, dims = spec.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = [int(d) for d in dims.replace("x", ",").split(",") if d.strip()]
            if any(d < 0 for d in shapes[name]):
                raise ValueError
        except ValueError:
            fail(f"--input-shape {spec!r}: expected NAME=D0,D1,... with non-negative integers")
        if math.prod(shapes[name]) > MAX_ELEMENTS or max(shapes[name], default=0) > MAX_ELEMENTS:
            fail(f"--input-shape {spec!r}: at most 2^40 values per input, got {math.prod(shapes[name]):.3g}")
    return shapes


def read_config(path: Path) -> ConvertConfig:
    """--config: a JSON object of known, typed keys; errors name the file and the key."""
    try:
        data = json.loads(path.read_bytes())
    except OSError as err:
        fail(f"--config {path}: cannot read ({err.strerror or err})")
    except ValueError as err:   # JSONDecodeError, UnicodeDecodeError
        fail(f"--config {path}: not valid JSON ({str(err).splitlines()[0]})")
    try:
        return ConvertConfig.from_dict(data)
    except (ValueError, TypeError) as err:
        fail(f"--config {path}: {str(err).splitlines()[0]}")


try:
    from typer._click.exceptions import NoArgsIsHelpError, UsageError   # typer vendors click
except ImportError:
    from click.exceptions import NoArgsIsHelpError, UsageError


class OneLineUsageErrors(typer.core.TyperCommand):
    """A bad flag or value exits 1 with one `mfconvert: error:` line, as every other error does
    (click's way: exit 2 and a framed usage message)."""

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except UsageError as err:
            if isinstance(err, NoArgsIsHelpError):
                raise
            fail(" ".join(err.format_message().split()))


@app.command(cls=OneLineUsageErrors)
def convert(
    model: Path = typer.Argument(..., help="Input ONNX model (never modified)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Output path [default: MODEL.mf.onnx]."),
    shift_linear: bool = typer.Option(True, "--shift-linear/--no-shift-linear",
                                      help="Linear layers → power-of-two ShiftLinear."),
    add_attention: bool = typer.Option(True, "--add-attention/--no-add-attention",
                                       help="Softmax attention cores → AddLinearAttention (binary Q/K, additions)."),
    moe_mlp: bool = typer.Option(False, "--moe-mlp", help="MLP blocks → router + float expert + ShiftLinear "
                                 "expert (same format flags); other linears follow --shift-linear."),
    shift_conv: bool = typer.Option(True, "--shift-conv/--no-shift-conv",
                                    help="Convolutions → power-of-two ShiftConv (BatchNorm, bias Add and Pad folded "
                                    "in; Relu/ReLU6 fused)."),
    adder_conv: bool = typer.Option(False, "--adder-conv", help="Convolutions → AdderConv (AdderNet: y = −Σ|x − w|) "
                                    "+ BatchNormalization; the first conv stays. Finetune after (with --data: a "
                                    "calibrated start)."),
    shift_add_conv: bool = typer.Option(False, "--shift-add-conv", help="Convolutions → ShiftConv + 1×1 AdderConv "
                                        "+ BatchNormalization (ShiftAddNet), starting as the shift conv."),
    spatial_shift: bool = typer.Option(False, "--spatial-shift", help="Depthwise convs → SpatialShift (one tap per "
                                       "channel, zero FLOPs) + per-channel scale folded into the next 1×1 conv "
                                       "(a 1×1 depthwise conv where a ReLU6 sits between); fidelity/sparsity via --config."),
    freeze_shift: bool = typer.Option(False, "--freeze-shift", help="With --finetune-*: keep the shift layers' "
                                      "weights as converted (ShiftAddNet's fixed-shift training)."),
    weight_bits: int = typer.Option(5, help="Bits per shift weight code (sign + shift), 2–5."),
    shift_terms: str = typer.Option("auto", "--shift-terms", help="Powers of two per shift weight (MoE Shift "
                                    "experts too): 'auto' chooses 1–4 per layer to meet --target-drop at the least "
                                    "additions and bytes (each layer probed on synthesised inputs, or on --data); 1 is DeepShift "
                                    "(w = ±2^p); 2–4 everywhere (w = ±2^p1 ± 2^p2 …; each term costs one more add)."),
    target_drop: float = typer.Option(DEFAULT_TARGET, "--target-drop", help="--shift-terms auto's output error "
                                      "target: ½·‖y − y′‖²/‖y‖² of the outputs over the examples (≈ 1 − cosine; "
                                      "0.002 is an output SQNR of 24 dB); --max-drop's value when given."),
    weight_scale: str = typer.Option("channel", help="Weight exponent per 'channel', per 'tensor', or 'none'."),
    act_bits: int = typer.Option(32, help="Bits of the fixed-point activations (Q format), 2–32."),
    act_frac_bits: int = typer.Option(16, help="Fractional bits of the fixed-point activations "
                                      "(with --act-bits < 32: per layer instead, from --data or, without, from the "
                                      "bounds of the op producing the input: LayerNorm, Softmax, Clip …)."),
    act_percentile: Optional[float] = typer.Option(None, help="Calibrate activation ranges at this percentile "
                                                   "of |x| instead of the maximum."),
    include: List[str] = typer.Option([], "--include", help="Only convert nodes whose name matches (regex; repeatable)."),
    exclude: List[str] = typer.Option([], "--exclude", help="Leave nodes whose name matches alone (regex; repeatable)."),
    min_params: int = typer.Option(1024, help="Skip linear layers with fewer weights than this."),
    input_shape: List[str] = typer.Option([], "--input-shape",
                                          help="NAME=D0,D1,... for the report's per-inference counts (repeatable)."),
    config_file: Optional[Path] = typer.Option(None, "--config", help="Read the conversion config from JSON (flags "
                                               "above are ignored; its terms and terms_by_node as they are)."),
    save_config: Optional[Path] = typer.Option(None, "--save-config", help="Write the resolved config as JSON."),
    report_json: Optional[Path] = typer.Option(None, "--report-json", help="Write the report as JSON."),
    report_html: Optional[Path] = typer.Option(None, "--report-html", help="Write the report as one self-contained "
                                               "HTML page: fidelity against cost per layer (docs/report.md)."),
    data: Optional[str] = typer.Option(None, "--data", help="Calibration data (text file with --tokenizer, "
                                       ".npz/.npy, image folder): shift weights get error-compensated rounding "
                                       "on it; also the data of --finetune-*, --max-drop and --act-bits < 32."),
    rounding: str = typer.Option("compensated", "--rounding", help="With --data: 'compensated' (GPTQ-style, "
                                 "keeps each layer's output on the data) or 'nearest' power of two."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="tokenizer.json for text --data."),
    image_preset: str = typer.Option("imagenet", help="Preprocessing preset for an image folder --data."),
    finetune_steps: Optional[int] = typer.Option(None, "--finetune-steps", help="Distillation steps with --data."),
    finetune_minutes: Optional[float] = typer.Option(None, "--finetune-minutes", help="Time budget with --data."),
    finetune_loss: str = typer.Option("mse", "--finetune-loss", help="mse, cosine or kl (logits)."),
    outputs: Optional[str] = typer.Option(None, "--outputs", help="With --data: the outputs --finetune-* "
                                          "distils and --max-drop measures, 'NAME,NAME…' (default: every "
                                          "float output)."),
    max_drop: Optional[float] = typer.Option(None, "--max-drop", help="Keep the most sensitive layers float "
                                             "until the output error on --data is at most this (1 − cosine, "
                                             "or top-1 agreement lost with --finetune-loss kl)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Convert and report, write no model."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file."),
):
    """Convert MODEL.onnx; prints what was converted, what was skipped and why."""
    terms = parse_shift_terms(shift_terms)
    try:
        if config_file is not None:
            cfg = read_config(config_file)
        else:
            fmt = dict(weight_bits=weight_bits, act_bits=act_bits, act_frac_bits=act_frac_bits,
                       terms=1 if terms == TERMS_AUTO else terms, weight_scale=weight_scale)
            cfg = ConvertConfig(
                shift_linear=ShiftLinearConfig(**fmt, include=include, exclude=exclude, min_params=min_params)
                if shift_linear else None,
                moe_mlp=MoEMLPConfig(**fmt, include=include, exclude=exclude) if moe_mlp else None,
                add_attention=AddAttentionConfig(include=include, exclude=exclude) if add_attention else None,
                adder_conv=AdderConvConfig(act_bits=act_bits, act_frac_bits=act_frac_bits, include=include,
                                           exclude=exclude) if adder_conv else None,
                shift_add_conv=ShiftAddConvConfig(**fmt, include=include, exclude=exclude) if shift_add_conv else None,
                shift_conv=ShiftConvConfig(**fmt, include=include, exclude=exclude) if shift_conv else None,
                spatial_shift=SpatialShiftConfig(include=include, exclude=exclude) if spatial_shift else None)
    except (ValueError, TypeError) as err:
        fail(as_flags(str(err).splitlines()[0]))
    if adder_conv and shift_add_conv:
        fail("--adder-conv and --shift-add-conv convert the same convolutions; choose one")
    if freeze_shift and finetune_steps is None and finetune_minutes is None:
        fail("--freeze-shift is for --finetune-steps/--finetune-minutes")
    if not cfg.enabled():
        fail("every pass is turned off; nothing to do")
    if not 0 < target_drop < 1:
        fail(f"--target-drop must be in (0, 1), got {target_drop}")
    out = None if dry_run else str(output or output_path_for(str(model)))
    try:   # every file written, checked before any work: never a file read, never one another
        check_outputs({"-o": out, "--save-config": save_config, "--report-json": report_json,
                       "--report-html": report_html},
                      {"the input model": model, "the --config file": config_file, "the --data file": data,
                       "the --tokenizer file": tokenizer, **external_data_reads(model)}, force)
    except ConversionError as err:
        fail(str(err))
    shapes = parse_input_shapes(input_shape)
    finetuning = finetune_steps is not None or finetune_minutes is not None
    calibrating = cfg.shift_linear is not None and cfg.shift_linear.act_bits < 32
    if data is None and (finetuning or max_drop is not None):
        fail("--finetune-steps/--finetune-minutes/--max-drop need --data")
    if max_drop is not None and not 0 <= max_drop < 1:   # before reading --data
        fail(f"--max-drop must be in [0, 1), got {max_drop}")
    if outputs is not None and not (finetuning or max_drop is not None):
        fail("--outputs is for --finetune-steps/--finetune-minutes/--max-drop")
    try:
        check_rounding(rounding)
    except ValueError as err:
        fail(str(err))
    if data is not None and rounding == "nearest" and not (finetuning or max_drop is not None or calibrating):
        fail("--data with --rounding nearest is for --finetune-steps/--finetune-minutes, --max-drop "
             "or calibrating --act-bits < 32")
    examples = distilled = None
    if data is not None:   # read once: calibration, allocation, --max-drop and finetuning share it
        try:
            original, _, _ = load_model(str(model))
            check_serializable(original, str(model), "--data")
            distilled = finetune_cli.parse_outputs(outputs)
            finetune_cli.output_names(finetune_cli.model_float_outputs(original), distilled)   # before any work
            examples = load_data(data, original, tokenizer, 128, image_preset)
        except (ValueError, ConversionError, DataError, OSError) as err:
            fail(str(err).splitlines()[0])
    if finetuning and dry_run:
        fail("finetuning trains the converted model, which --dry-run does not write")
    if finetuning:
        try:
            ft_cfg = FinetuneConfig(steps=finetune_steps, minutes=finetune_minutes, loss=finetune_loss,
                                    rounding=rounding, outputs=distilled, freeze_shift=freeze_shift)
        except ValueError as err:
            fail(str(err))
    options = PipelineOptions(
        shift_terms=TERMS_AUTO if terms == TERMS_AUTO and config_file is None else None,
        target=target_drop, data=examples, rounding="nearest" if dry_run else rounding, finetuning=finetuning,
        max_drop=max_drop, logits=finetune_loss == "kl", outputs=distilled, act_percentile=act_percentile,
        input_shapes=shapes)

    bar = tqdm(total=len(cfg.enabled()), desc="converting", unit="pass", file=sys.stderr, leave=False,
               disable=None)  # no bar when stderr is not a terminal

    def progress(name: str) -> None:
        bar.set_postfix_str(name)
        bar.update(1)

    try:
        done = convert_model(str(model), cfg, options, output=out, force=force, progress=progress)
    except (ConversionError, DataError, ValueError, OSError) as err:   # OSError: a WriteError naming the output
        bar.close()
        fail(str(err).splitlines()[0])
    bar.close()
    result = done.result
    typer.echo(result.report.table())
    if done.allocation is not None:
        typer.echo("")
        for line in done.allocation.lines():
            typer.echo(line)
    for line in done.budget_lines:
        typer.echo(line)
    if done.rounding is not None:
        layers = done.rounding["layers"]
        kept = sum(1 for d in layers.values() if d["compensated"])
        n, fit, held = done.rounding["calibration"], done.rounding["examples"], done.rounding["held_out"]
        where = f"{held} of them held out" if fit < n else f"{held} held-out examples past them"
        typer.echo(f"\nshift weights re-rounded by error-compensated rounding on {n} examples, kept in {kept} of "
                   f"{len(layers)} layer(s): where it beat nearest rounding on {where}")
    for line in done.notes:
        typer.echo(line)
    typer.echo((f"\nwrote {out}" + (f" (+ {result.data_file})" if result.data_file else "")) if out
               else "\ndry run: no model written")
    if finetuning:
        try:
            run_finetune(out, str(model), examples, ft_cfg, out, held_out=0.1, logits=finetune_loss == "kl")
        except (ValueError, ConversionError, OSError) as err:
            fail(str(err).splitlines()[0])
    for path, text in ((save_config, json.dumps(done.config.to_dict(), indent=2) + "\n"),
                       (report_json, json.dumps(done.to_dict(), indent=2) + "\n"),
                       (report_html, render_html(done.to_dict()) if report_html else "")):
        if path:
            try:
                write_text_atomic(path, text)
            except OSError as err:   # the model stays: say where it is
                fail(f"{err}; the model was written to {out}" if out else str(err))


def parse_shift_terms(text: str) -> int | str:
    """--shift-terms: 'auto' or an integer 1–4 (the range is the config's check)."""
    if text.strip().lower() == TERMS_AUTO:
        return TERMS_AUTO
    try:
        return int(text)
    except ValueError:
        fail(f"--shift-terms must be auto or an integer in [1, 4], got {text!r}")


def main() -> None:
    """`mfconvert MODEL.onnx …` converts; `mfconvert finetune …` finetunes (cli/finetune.py)."""
    if len(sys.argv) > 1 and sys.argv[1] == "finetune":
        finetune_cli.app(args=sys.argv[2:], prog_name="mfconvert finetune")
    else:
        app()


if __name__ == "__main__":
    main()
