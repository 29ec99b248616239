"""`mfconvert finetune STUDENT.onnx --teacher ORIGINAL.onnx --data PATH`: distil the original into
the converted model on the user's data, report held-out fidelity before and after, write ONNX."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import onnx
import typer

from mfconvert.calibrate.data import DataError, Examples, check_against_model, load_examples
from mfconvert.calibrate.evaluate import fidelity, model_float_outputs, model_outputs, output_names
from mfconvert.calibrate.finetune import FinetuneConfig, finetune
from mfconvert.convert.files import check_outputs, write_text_atomic
from mfconvert.convert.onnx_model import ConversionError, check_serializable, external_data_reads, load_model
from mfconvert.moe import routes, routing_split, split_table
from mfconvert.nn.moe_mlp import BALANCE_COEF, DEFAULT_LATENCY

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Finetune a converted model by distillation from the original.")


def fail(message: str) -> None:
    typer.echo(f"mfconvert finetune: error: {message}", err=True)
    raise typer.Exit(code=1)


def graph_inputs(model: onnx.ModelProto) -> list[str]:
    initializers = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in initializers]


def load_data(path: str, model: onnx.ModelProto, tokenizer: Optional[Path], max_length: int,
              image_preset: str) -> Examples:
    from mfconvert.calibrate.images import image_spec
    examples = load_examples(path, graph_inputs(model), tokenizer=str(tokenizer) if tokenizer else None,
                             max_length=max_length, image_spec=image_spec(image_preset))
    return check_against_model(examples, model, path)


def format_figures(figures: dict) -> str:
    """The headline figures (with several outputs, their means; per output in --report-json)."""
    return "  ".join(f"{k}={v:.4f}" for k, v in figures.items() if not isinstance(v, dict))


def parse_outputs(text: str | None) -> list[str] | None:
    """--outputs 'NAME[,NAME…]' → the names (None: every float output)."""
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(f"--outputs must name one or more outputs, got {text!r}")
    return names


def run_finetune(student_path: str, teacher_path: str, data: Examples, cfg: FinetuneConfig, output: str,
                 held_out: float, logits: bool) -> dict:
    """Split, train, evaluate before and after on the held-out part; returns the figures (also
    printed)."""
    train, evaluation = data.split(held_out, seed=cfg.seed)
    if not len(train):
        raise DataError("no training examples left after the held-out split")
    student, _, _ = load_model(student_path)
    teacher, _, _ = load_model(teacher_path)
    distilled = output_names(model_float_outputs(teacher), cfg.outputs)
    typer.echo(f"training on {len(train)} examples, {len(evaluation)} held out")
    typer.echo(f"distilling output{'s' * (len(distilled) > 1)} {', '.join(distilled)}")
    result = finetune(student, teacher, train, cfg, output=output, validation=evaluation)
    scored = result.validation_fidelity       # keep-best has already scored both ends
    if scored:
        before, after = scored["given"], scored[result.kept]
    elif len(evaluation):
        reference = model_outputs(teacher, evaluation, outputs=cfg.outputs)
        before = fidelity(reference, model_outputs(student, evaluation, outputs=reference.names), logits)
        after = fidelity(reference, model_outputs(result.model, evaluation, outputs=reference.names), logits)
    else:
        before = after = {}
    typer.echo(result.start_line())
    typer.echo(result.steps_line())
    if result.kept != "trained":
        kept = {"given": "the student as given", "rounded": "the student after rounding, before training"}
        scores = ", ".join(f"{name} {v['sqnr_db']:.1f} dB" for name, v in scored.items())
        typer.echo(f"held-out SQNR: {scores}; wrote {kept[result.kept]} (--keep-last writes the trained one); "
                   "a lower --lr / --shift-lr may let training help")
    if before:
        typer.echo(f"held-out before: {format_figures(before)}")
        typer.echo(f"held-out after:  {format_figures(after)}")
    figures = {"steps": result.steps, "steps_asked": result.steps_asked, "minutes": result.minutes,
               "stopped_by": result.stopped_by, "seconds": result.seconds, "training_seconds": result.training_seconds,
               "rounding_seconds": result.rounding_seconds, "scoring_seconds": result.scoring_seconds,
               "start": result.rounding, "before": before, "after": after, "kept": result.kept}
    if routes(result.model):
        # The routing the trained routers make, in ORT on the held-out data (else the training data).
        splits = routing_split(result.model, (evaluation if len(evaluation) else train).batches(cfg.batch_size))
        typer.echo(f"MoE routing after finetuning (balanced target: "
                   f"{100 * cfg.expert_latency[0] / sum(cfg.expert_latency):.1f} % to Shift):")
        typer.echo(split_table(splits))
        figures["routing"] = {b: {"mult": s.mult, "shift": s.shift} for b, s in splits.items()}
    typer.echo(f"wrote {output}")
    return figures


def parse_latency(text: str) -> tuple[float, float]:
    try:
        mult, shift = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--expert-latency must be 'MULT,SHIFT', got {text!r}") from None
    return mult, shift


@app.command()
def main(
    student: Path = typer.Argument(..., help="The converted model (e.g. MODEL.mf.onnx); never modified."),
    teacher: Path = typer.Option(..., "--teacher", help="The original model."),
    data: str = typer.Option(..., "--data", help="Text file (with --tokenizer), .npz/.npy, or an image folder."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="tokenizer.json for text data."),
    max_length: int = typer.Option(128, help="Token limit per text example."),
    image_preset: str = typer.Option("imagenet", help="Image preprocessing preset: imagenet, vit, digits."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Training steps (default: 200 unless --minutes)."),
    minutes: Optional[float] = typer.Option(None, "--minutes", help="Time budget of the training steps in minutes "
                                            "(the rounding before them and the scoring are timed apart)."),
    batch_size: int = typer.Option(32, "--batch-size"),
    lr: float = typer.Option(1e-4, "--lr", help="Peak learning rate (AdamW, warm-up then cosine)."),
    shift_lr: Optional[float] = typer.Option(None, "--shift-lr", help="Peak learning rate of the shift layers' "
                                             "latent weights (default: --lr)."),
    rounding: str = typer.Option("compensated", "--rounding", help="Where training starts: 'compensated' (STUDENT's "
                                 "codes when a --data conversion chose them, else error-compensated rounding on "
                                 "--rounding-examples examples, per layer only where it beats nearest rounding on "
                                 "held-out ones) or 'nearest' (the teacher's weights to the nearest power)."),
    rounding_examples: int = typer.Option(256, "--rounding-examples"),
    outputs: Optional[str] = typer.Option(None, "--outputs", help="Distil and score these outputs, "
                                          "'NAME,NAME…' (default: every float output)."),
    loss: str = typer.Option("mse", "--loss", help="mse (embeddings, hidden states), cosine, or kl (logits)."),
    feature_weight: float = typer.Option(0.0, "--feature-weight", help="Weight of per-block feature matching."),
    balance_coef: float = typer.Option(BALANCE_COEF, "--balance-coef",
                                       help="Weight of the MoE latency-aware load-balancing loss."),
    expert_latency: str = typer.Option(",".join(map(str, DEFAULT_LATENCY)), "--expert-latency",
                                       help="MoE expert latencies 'MULT,SHIFT' (any unit; only the ratio matters)."),
    attention_conv: Optional[str] = typer.Option(None, "--attention-conv",
                                                 help="Train a depthwise conv on V in add attention: "
                                                      "'tokens' or 'grid:HxW+P'."),
    adder_lr: float = typer.Option(0.002, "--adder-lr", help="Peak learning rate of AdderConv weights (SGD with "
                                   "momentum; their gradients come at AdderNet's adaptive rate η·√k/‖ΔW‖)."),
    freeze_shift: bool = typer.Option(False, "--freeze-shift", help="Keep the shift layers' weights as given "
                                      "(ShiftAddNet's fixed-shift training)."),
    held_out: float = typer.Option(0.1, "--held-out", help="Fraction of the data kept for evaluation."),
    keep_best: bool = typer.Option(True, "--keep-best/--keep-last", help="Write whichever of STUDENT, STUDENT "
                                   "after rounding, and the trained one scores best on the held-out data."),
    seed: int = typer.Option(0, "--seed"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Save training state here."),
    resume: bool = typer.Option(False, "--resume", help="Continue from --checkpoint."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Output (default: STUDENT.ft.onnx)."),
    report_json: Optional[Path] = typer.Option(None, "--report-json", help="Write the figures as JSON."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file."),
):
    """Distil TEACHER into STUDENT on --data and write the finetuned model."""
    root, ext = os.path.splitext(str(student))
    out = str(output or f"{root}.ft{ext or '.onnx'}")
    try:
        cfg = FinetuneConfig(steps=steps if steps is not None or minutes is not None else 200, minutes=minutes,
                             batch_size=batch_size, lr=lr, shift_lr=shift_lr, loss=loss,
                             feature_weight=feature_weight, seed=seed,
                             checkpoint=str(checkpoint) if checkpoint else None, resume=resume,
                             balance_coef=balance_coef, expert_latency=parse_latency(expert_latency),
                             attention_conv=attention_conv, rounding=rounding,
                             rounding_examples=rounding_examples, keep_best=keep_best,
                             outputs=parse_outputs(outputs), adder_lr=adder_lr, freeze_shift=freeze_shift)
        if resume and checkpoint is None:
            raise ValueError("--resume needs --checkpoint")
        # Every file written, checked before the data is read: never a file read, never one
        # another; existing ones only with --force (a checkpoint to --resume is read, then rewritten).
        check_outputs({"-o": out, "--report-json": report_json, "--checkpoint": checkpoint},
                      {"the input model": student, "the teacher model": teacher, "the --data file": data,
                       "the --tokenizer file": tokenizer, **external_data_reads(student, teacher)}, force,
                      reused=("--checkpoint",) if resume else ())
        model, _, _ = load_model(str(student))
        check_serializable(model, str(student), "finetuning")
        output_names(model_float_outputs(model), cfg.outputs)   # an unknown name: before any work
        examples = load_data(data, model, tokenizer, max_length, image_preset)
        figures = run_finetune(str(student), str(teacher), examples, cfg, out, held_out, logits=loss == "kl")
    except (ValueError, ConversionError, DataError, OSError) as err:
        fail(str(err).splitlines()[0])
    if report_json:
        try:
            write_text_atomic(report_json, json.dumps(figures, indent=2) + "\n")
        except OSError as err:
            fail(f"{err}; the finetuned model was written to {out}")
