"""Short finetuning by distillation: the converted model (student) learns to reproduce the
original (teacher) on the user's unlabelled data, then is written back as ONNX.

The teacher runs in ONNX Runtime without gradients, once per batch (its outputs are cached when
batches repeat across epochs); the student runs as an OnnxModule whose shift layers train with
DeepShift's straight-through rules (DeepShift-Q keeps float weights and rounds them in every
forward pass). Training starts from codes chosen as the conversion chooses them with --data: the
student's own when they were (its metadata says so: calibrate/rounding.py ROUNDING_KEY, e.g. a
`--data` conversion or an earlier finetune), else the conversion's error-compensated rounding
(calibrate/rounding.py:round_model) on a few hundred examples, each layer keeping it only where it
beats nearest rounding on held-out ones; the latent weights are the teacher's where they round to
those codes. AdamW with linear warm-up and cosine decay, a seeded run, checkpoints to resume from,
CUDA when present, and data parallelism over torch.distributed processes (torchrun; gloo on CPU,
NCCL on GPUs). `minutes` is the training's budget: the re-rounding and the scoring of the start
are timed and reported apart (FinetuneResult.steps_line).
"""
from __future__ import annotations

import copy
import math
import os
import re
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from mfconvert.calibrate.data import Examples, chunks, model_fixed_batch, run_chunked
from mfconvert.calibrate.evaluate import (fidelity, is_token_level, mask_of, model_float_outputs, model_outputs,
                                          output_names)
from mfconvert.calibrate.rounding import (check_rounding, latent_start_weights, mark_rounding, round_model,
                                          rounding_record)
from mfconvert.convert.files import WriteError, atomic_file, check_outputs
from mfconvert.convert.onnx_model import ConversionError, save_model_atomic
from mfconvert.moe import router_logits
from mfconvert.nn.adder_conv import AdderConv
from mfconvert.nn.moe_mlp import BALANCE_COEF, DEFAULT_LATENCY, balance_loss_from_logits
from mfconvert.nn.onnx_module import OnnxModule
from mfconvert.nn.shift_linear import ShiftLinear


TEACHER_CACHE_BYTES = 4 << 30
# A checkpoint is a dict of tensors and plain values read with torch.load(weights_only=True)
# (nothing in it can run code) and carrying this marker; anything else is refused.
CHECKPOINT_FORMAT, CHECKPOINT_VERSION = "mfconvert-finetune-checkpoint", 2


@dataclass
class FinetuneConfig:
    steps: int | None = 200
    minutes: float | None = None          # a time budget instead of (or on top of) steps
    batch_size: int = 32
    lr: float = 1e-4
    shift_lr: float | None = None          # peak lr of the shift layers' latent weights (default: lr)
    weight_decay: float = 0.0
    warmup_fraction: float = 0.05
    loss: str = "mse"                      # "mse" on outputs, "cosine" (1 - cos per row), or "kl" on logits
    feature_weight: float = 0.0            # weight of per-block feature matching (LayerNorm outputs)
    seed: int = 0
    checkpoint: str | None = None          # path; saved every `checkpoint_every` steps and at the end
    checkpoint_every: int = 100
    resume: bool = False
    device: str = "auto"
    progress: bool = True
    # MoE MLP blocks (--moe-mlp): weight α of the latency-aware load-balancing loss and the expert
    # latencies (τ_mult, τ_shift) it balances (docs/ops.md#shiftmoemlp; 0 turns it off).
    balance_coef: float = BALANCE_COEF
    expert_latency: tuple[float, float] = DEFAULT_LATENCY
    # Add attention: give AddLinearAttention nodes without a conv a zero-initialised depthwise conv
    # on V that finetuning trains: None, "tokens" (kernel 9 over the token axis) or
    # "grid:HxW+P" (3×3 over an H×W token grid after P prefix tokens, e.g. "grid:14x14+1").
    attention_conv: str | None = None
    # Where training starts: "compensated" (the student's codes where its metadata says they were
    # chosen with a held-out check, else error-compensated rounding, GPTQ with the power-of-two
    # grid, on `rounding_examples` examples, kept per layer only where it beats nearest rounding on
    # held-out examples of the data: calibrate/rounding.py:round_model, as the conversion does), or
    # "nearest" (the teacher's weights to the nearest power). Its time is not part of `minutes`.
    rounding: str = "compensated"
    rounding_examples: int = 256
    # With validation data: return whichever scores the highest output SQNR on it of the student
    # as given, the student after rounding (where training starts, when it differs) and the
    # trained student.
    keep_best: bool = True
    # The outputs distilled and scored (--outputs); None: every float output.
    outputs: list[str] | None = None
    # AdderConv weights (--adder-conv, --shift-add-conv) train by SGD with momentum 0.9, AdderNet's
    # optimiser, at this peak rate: their gradients come scaled to the adaptive rate η·√k/‖ΔW‖₂
    # (nn/adder_conv.py), so a step moves a layer's weights by adder_lr·η·√k in norm.
    adder_lr: float = 0.002
    # Keep the shift layers' weights as converted (ShiftAddNet's fixed-shift training).
    freeze_shift: bool = False

    def __post_init__(self):
        if self.steps is None and self.minutes is None:
            raise ValueError("finetuning needs --steps or --minutes")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")
        if self.minutes is not None and self.minutes <= 0:
            raise ValueError(f"--minutes must be > 0, got {self.minutes}")
        if self.loss not in ("mse", "cosine", "kl"):
            raise ValueError(f"--loss must be mse, cosine or kl, got {self.loss!r}")
        if self.balance_coef < 0 or len(self.expert_latency) != 2 or min(self.expert_latency) <= 0:
            raise ValueError(f"--balance-coef must be >= 0 and --expert-latency two positive numbers, "
                             f"got {self.balance_coef}, {self.expert_latency}")
        parse_attention_conv(self.attention_conv)
        check_rounding(self.rounding)
        if self.rounding_examples < 1:
            raise ValueError(f"--rounding-examples must be >= 1, got {self.rounding_examples}")
        if not self.adder_lr > 0:
            raise ValueError(f"--adder-lr must be > 0, got {self.adder_lr}")
        if self.batch_size < 1 or self.lr <= 0:
            raise ValueError("--batch-size and --lr must be positive")


@dataclass
class FinetuneResult:
    model: onnx.ModelProto
    steps: int
    seconds: float                         # the whole call (rounding, scoring, training)
    losses: list[float] = field(default_factory=list)
    rounding_seconds: float = 0.0          # of `seconds`, spent on compensated rounding (not in `minutes`)
    # Of the steps this call ran (a resumed run: since the checkpoint): the losses without the
    # balancing term, and each MoE block's share of tokens sent to Shift.
    distill_losses: list[float] = field(default_factory=list)
    shift_fractions: list[dict[str, float]] = field(default_factory=list)
    # With validation data and keep_best: calibrate.evaluate.fidelity on it (its sqnr_db decides)
    # of the "given" student, the "rounded" one and the "trained" one, and which of them `model` is.
    validation_fidelity: dict[str, dict[str, float]] = field(default_factory=dict)
    kept: str = "trained"
    # Where training started (start_line): {"start": "rounded" (round_model ran: "examples",
    # "held_out", "kept", "layers" and per layer "decisions"), "given" (the student's codes,
    # "record": its ROUNDING_KEY), "nearest" or "checkpoint"}.
    rounding: dict = field(default_factory=dict)
    training_seconds: float = 0.0          # of `seconds`, the training steps: what `minutes` bounds
    scoring_seconds: float = 0.0           # of `seconds`, keep-best's scoring of the start in ORT
    steps_asked: int | None = None         # FinetuneConfig.steps
    minutes: float | None = None           # FinetuneConfig.minutes
    stopped_by: str = "steps"              # "steps" or "minutes": what ended training

    def loss_summary(self) -> str:
        """'loss first → last', or why there is none."""
        if not self.losses:
            return "loss: none, no training step ran"
        return f"loss {self.losses[0]:.3e} → {self.losses[-1]:.3e}"

    def start_line(self) -> str:
        """Where training started and what that cost, in one line."""
        r = self.rounding
        if r.get("start") == "rounded":
            return (f"start: error-compensated rounding on {r['examples']} examples, kept in {r['kept']} of "
                    f"{r['layers']} shift layer(s) where it beat nearest rounding on {r['held_out']} held-out "
                    f"examples, the rest nearest ({self.rounding_seconds:.0f} s, not counted in --minutes)")
        if r.get("start") == "given":
            return (f"start: the student's own codes, chosen on data by {r['record'].get('by', 'an earlier run')} "
                    "(its metadata says so); not re-rounded")
        if r.get("start") == "nearest":
            return "start: the teacher's weights rounded to the nearest power (--rounding nearest)"
        return "start: the checkpoint's state (--resume)"

    def steps_line(self) -> str:
        """How many steps ran, in how long, and what stopped them: never fewer than asked unsaid."""
        text = f"finetuned {self.steps} step{'s' * (self.steps != 1)} in {self.training_seconds:.0f} s of training"
        if self.stopped_by == "minutes":
            text += f" (the --minutes {self.minutes:g} budget"
            text += f"; {self.steps} of --steps {self.steps_asked})" if self.steps_asked else ")"
        else:
            text += f" (--steps {self.steps_asked})"
        besides = [f"{what} {secs:.0f} s" for what, secs in (("rounding", self.rounding_seconds),
                                                             ("scoring the start", self.scoring_seconds)) if secs]
        if besides:
            text += f", {' and '.join(besides)} besides"
        return f"{text}; {self.loss_summary()}"


def parse_attention_conv(spec: str | None) -> dict | None:
    """FinetuneConfig.attention_conv → AddLinearAttention.add_conv keywords (None: no conv)."""
    if spec is None:
        return None
    if spec == "tokens":
        return {"kind": "tokens"}
    match = re.fullmatch(r"grid:(\d+)x(\d+)(?:\+(\d+))?", spec)
    if not match:
        raise ValueError(f"--attention-conv must be 'tokens' or 'grid:HxW+P', got {spec!r}")
    h, w, prefix = match.groups()
    return {"kind": "grid", "grid": (int(h), int(w)), "prefix_tokens": int(prefix or 0)}


def block_outputs(student: onnx.ModelProto, teacher: onnx.ModelProto) -> list[str]:
    """Tensors to match per block: LayerNormalization outputs present in both models."""
    theirs = {o for n in teacher.graph.node for o in n.output}
    return [n.output[0] for n in student.graph.node if n.op_type == "LayerNormalization" and n.output[0] in theirs]


class Teacher:
    """The original model in ORT: outputs (and block features) per batch, cached by batch id
    until the cache holds `cache_bytes` (block features of 50,000 sentences would fill the RAM;
    past the budget the teacher simply runs again). `outputs`: those returned (default: all).
    A model that fixes its batch size runs piece by piece."""

    def __init__(self, model: onnx.ModelProto, features: list[str], threads: int | None = None,
                 cache_bytes: int = TEACHER_CACHE_BYTES, outputs: list[str] | None = None):
        from mfconvert.runtime import session

        model = onnx.ModelProto.FromString(model.SerializeToString())
        names = list(outputs) if outputs is not None else [o.name for o in model.graph.output]
        self.limit = model_fixed_batch(model)
        model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(f) for f in features if f not in names)
        self.output_names = names
        self.features = features
        self.session = session(model.SerializeToString(), threads=threads, spinning=False)
        self.cache: dict[int, tuple[list[np.ndarray], dict[str, np.ndarray]]] = {}
        self.cache_bytes, self.cached_bytes = cache_bytes, 0

    def __call__(self, batch_id: int, feeds: dict[str, np.ndarray]):
        if batch_id in self.cache:
            return self.cache[batch_id]
        wanted = self.output_names + [f for f in self.features if f not in self.output_names]
        values = run_chunked(lambda piece: self.session.run(wanted, piece), feeds, self.limit)
        result = (values[: len(self.output_names)], dict(zip(self.features, values[len(self.output_names):])))
        size = sum(v.nbytes for v in values)
        if self.cached_bytes + size <= self.cache_bytes:
            self.cache[batch_id] = result
            self.cached_bytes += size
        return result


def distillation_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, kind: str,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of one output; with the batch's [B, T] attention `mask` and a token-level
    output, on the real tokens only."""
    if mask is not None and is_token_level(tuple(student_out.shape), tuple(mask.shape)):
        student_out, teacher_out = student_out[mask], teacher_out[mask]
    if kind == "kl":
        return F.kl_div(F.log_softmax(student_out, -1), F.log_softmax(teacher_out, -1),
                        log_target=True, reduction="batchmean")
    if kind == "cosine":
        return (1 - F.cosine_similarity(student_out, teacher_out, dim=-1)).mean()
    return F.mse_loss(student_out, teacher_out)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def lr_factor(progress: float, warmup_fraction: float) -> float:
    """Linear warm-up over the first `warmup_fraction` of the run, then cosine decay to 0.
    `progress` in [0, 1] is the fraction of steps or of the time budget used, whichever is more."""
    if progress < warmup_fraction:
        return (progress + 1e-3) / (warmup_fraction + 1e-3)
    rest = (progress - warmup_fraction) / max(1e-9, 1 - warmup_fraction)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, rest)))


def _distributed() -> tuple[int, int]:
    """(rank, world size); starts the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def finetune(student: onnx.ModelProto, teacher: onnx.ModelProto, data: Examples,
             config: FinetuneConfig | None = None, output: str | None = None,
             validation: Examples | None = None) -> FinetuneResult:
    """Distil `teacher` into `student` on `data`; write the trained student to `output`.
    Training starts from the codes FinetuneConfig.rounding says (start_codes). With `validation`
    (held-out examples) and `keep_best`, the result is whichever of the given student, the rounded
    student and the trained one has the highest output SQNR on them, so finetuning never hands
    back a model that does worse there than the one it was given (a resumed run has no rounded
    start to go back to and skips the check). The result's model carries ROUNDING_KEY, so a
    later finetune continues from its codes."""
    cfg = config or FinetuneConfig()
    # Before any work: both files can be written (existing ones are replaced, as asked).
    check_outputs({"output": output, "checkpoint": cfg.checkpoint}, {}, force=True)
    rank, world = _distributed()
    torch.manual_seed(cfg.seed)
    device = _device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))

    selected = output_names(model_float_outputs(teacher), cfg.outputs)
    output_names(model_float_outputs(student), selected)   # the student has them too
    features = block_outputs(student, teacher) if cfg.feature_weight > 0 else []
    teach = Teacher(teacher, features, outputs=selected)
    called = time.monotonic()
    module = OnnxModule(student, latent_weights=latent_start_weights(student, teacher)).train()
    check_trainable(module, data, selected)   # before minutes of rounding
    resuming = bool(cfg.resume and cfg.checkpoint and os.path.exists(cfg.checkpoint))
    start_model, rounding = start_codes(student, teacher, data, cfg, "checkpoint" if resuming else cfg.rounding,
                                        progress=cfg.progress and rank == 0)
    rounding_seconds = rounding.pop("seconds", 0.0)
    if start_model is not student:
        module = OnnxModule(start_model, latent_weights=latent_start_weights(start_model, teacher)).train()
    if rounding["start"] in ("rounded", "given"):
        keep_codes(module, OnnxModule(start_model))
    module = module.to(device)
    conv = parse_attention_conv(cfg.attention_conv)
    for layer in module.attention_layers().values() if conv else ():
        layer.add_conv(**conv)
    logits_of = router_logits(student)                # {MoE block: router logits tensor}
    latency = torch.tensor(cfg.expert_latency, dtype=torch.float32)
    selected_at = [module.output_names.index(n) for n in selected]
    student_batch = model_fixed_batch(student)
    checking = validation is not None and len(validation) > 0 and cfg.keep_best and not resuming
    scoring_seconds = 0.0
    if checking:   # the starting point, scored in ORT like the result will be; timed apart from the budget
        t0 = time.monotonic()
        reference = model_outputs(teacher, validation, cfg.batch_size, outputs=selected)
        candidates = {"given": student}
        if rounding["start"] == "rounded":
            candidates["rounded"] = start_model
        elif rounding["start"] == "nearest":
            candidates["rounded"] = _snapshot(module)
        scores = {name: fidelity(reference, model_outputs(m, validation, cfg.batch_size, outputs=selected),
                                 cfg.loss == "kl")
                  for name, m in candidates.items()}
        scoring_seconds = time.monotonic() - t0
    model = torch.nn.parallel.DistributedDataParallel(module) if world > 1 else module
    # Latent shift weights move only when they cross a rounding boundary, so they may want a
    # larger step than the float parameters (norms, biases) around them.
    latent = {id(layer.weight) for layer in module.modules() if isinstance(layer, ShiftLinear) and layer.mode == "Q"}
    groups = [{"params": [p for p in module.parameters() if p.requires_grad and id(p) in latent],
               "peak_lr": cfg.shift_lr or cfg.lr},
              {"params": [p for p in module.parameters() if p.requires_grad and id(p) not in latent],
               "peak_lr": cfg.lr}]
    if cfg.freeze_shift:
        for layer in module.modules():
            if isinstance(layer, ShiftLinear):
                for p in (layer.weight,) if layer.mode == "Q" else (layer.shift, layer.sign):
                    p.requires_grad_(False)
    adders = {id(layer.weight) for layer in module.modules() if isinstance(layer, AdderConv)}
    groups = [{**g, "params": [p for p in g["params"] if p.requires_grad and id(p) not in adders]} for g in groups]
    adder_weights = [p for p in module.parameters() if id(p) in adders and p.requires_grad]
    groups = [g for g in groups if g["params"]]
    optimizer = _Optimizers(([torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)] if groups else [])
                            + ([torch.optim.SGD([{"params": adder_weights, "peak_lr": cfg.adder_lr}], lr=cfg.adder_lr,
                                                momentum=0.9)] if adder_weights else []))
    # Batches are fixed once (a seeded shuffle, then bucketed by length) so the teacher's outputs
    # can be cached; each epoch visits them in a new order. Rank r takes every world-th batch.
    batches = list(data.batches(cfg.batch_size, shuffle=True, seed=cfg.seed, by_length=True))
    budget = cfg.minutes * 60 if cfg.minutes else None
    step, losses, elapsed_before = 0, [], 0.0   # elapsed: training time, what `minutes` bounds
    distill_losses, shift_fractions = [], []
    if resuming:
        state = load_checkpoint(cfg.checkpoint, device)
        mine, theirs = module.state_dict(), state["student"]
        differ = sorted(set(mine) ^ set(theirs)) or [k for k in mine if getattr(theirs[k], "shape", None) != mine[k].shape]
        if differ:
            raise ConversionError(f"{cfg.checkpoint}: a checkpoint of another model (it differs at {differ[0]!r}; "
                                  "same student and --attention-conv?)")
        try:
            module.load_state_dict(state["student"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise ConversionError(f"{cfg.checkpoint}: a checkpoint of another model "
                                  f"({str(err).strip().splitlines()[0]})") from None
        step, losses, elapsed_before = state["step"], list(state["losses"]), state["elapsed"]
        torch.set_rng_state(state["rng"])

    start = time.monotonic() - elapsed_before
    bar = tqdm(total=cfg.steps, initial=step, desc="finetuning", unit="step",
               disable=True if not cfg.progress or rank != 0 else None)  # None: only on a terminal
    order = np.random.default_rng(cfg.seed + 1)
    epoch_batches: list[int] = []
    for _ in range(step):   # replay the batch order so a resumed run sees what an unbroken one would
        epoch_batches = epoch_batches or _epoch(order, len(batches), rank, world)
        epoch_batches.pop()
    stopped_by = "steps"
    while True:
        by_steps = step / cfg.steps if cfg.steps else 0.0
        by_time = (time.monotonic() - start) / budget if budget else 0.0
        progress = max(by_steps, by_time)
        if progress >= 1.0:   # the budget is checked between steps
            stopped_by = "steps" if by_steps >= 1.0 else "minutes"
            break
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * lr_factor(progress, cfg.warmup_fraction)
        if not epoch_batches:
            epoch_batches = _epoch(order, len(batches), rank, world)
        batch_id = epoch_batches.pop()
        feeds = batches[batch_id]
        t_out, t_feat = teach(batch_id, feeds)
        optimizer.zero_grad(set_to_none=True)
        n_rows = len(next(iter(feeds.values())))
        total = distill = 0.0
        shifted = {b: [0.0, 0] for b in logits_of}
        # A model that fixes its batch size (inputs [1, …]) takes the batch piece by piece: each
        # piece's loss, weighted by its share of the rows, is back-propagated on its own and the
        # gradients add up to the whole batch's (the losses are means over rows).
        offset = 0
        for piece, real in chunks(feeds, student_batch):
            loss, piece_distill, s_feat = _piece_loss(model, piece, real, offset, n_rows, t_out, t_feat,
                                                      selected_at, features, logits_of, latency, cfg, device)
            offset += real
            weight = real / n_rows
            if not getattr(loss, "requires_grad", False):   # check_trainable saw one example; not expected
                raise ConversionError(_NOTHING_TO_TRAIN.format(", ".join(selected)))
            (loss * weight).backward()
            total += loss.item() * weight
            distill += piece_distill * weight
            for b, t in logits_of.items():
                routed = s_feat[t].detach().argmax(-1)
                shifted[b][0] += float((routed == 1).sum())
                shifted[b][1] += routed.numel()
        optimizer.step()
        step += 1
        losses.append(total)
        distill_losses.append(distill)
        if logits_of:
            shift_fractions.append({b: s / max(n, 1) for b, (s, n) in shifted.items()})
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3e}")
        if rank == 0 and cfg.checkpoint and step % cfg.checkpoint_every == 0:
            _save_checkpoint(cfg.checkpoint, module, optimizer, step, losses, time.monotonic() - start)
    bar.close()
    training_seconds = time.monotonic() - start
    unsaved = None   # a failed last checkpoint must not cost the trained model: written first
    if rank == 0 and cfg.checkpoint:
        try:
            _save_checkpoint(cfg.checkpoint, module, optimizer, step, losses, time.monotonic() - start)
        except WriteError as err:
            unsaved = err
    trained = module.cpu().to_onnx()
    kept = "trained"
    if checking:
        candidates["trained"] = trained
        scores["trained"] = fidelity(reference, model_outputs(trained, validation, cfg.batch_size, outputs=selected),
                                     cfg.loss == "kl")
        kept = max(candidates, key=lambda name: scores[name]["sqnr_db"])  # ties: the later step
        trained = candidates[kept]
    if kept != "given":   # codes chosen on data (and trained): a later finetune continues from them
        trained = copy.deepcopy(trained)
        mark_rounding(trained, {"by": "mfconvert finetune", "kept": kept, "steps": step})
    if output is not None and rank == 0:
        save_model_atomic(trained, output)
    if unsaved is not None:
        unsaved.note = f"the finetuned model was written to {output}" if output is not None else ""
        raise unsaved
    return FinetuneResult(trained, step, time.monotonic() - called, losses, rounding_seconds, distill_losses,
                          shift_fractions, scores if checking else {}, kept, rounding, training_seconds,
                          scoring_seconds, cfg.steps, cfg.minutes, stopped_by)


_NOTHING_TO_TRAIN = ("nothing to train: {} depend(s) on no trainable weight (every path to them passes through an op "
                     "without a gradient, such as integers from a QuantizeLinear read by an op other than DequantizeLinear)")


def check_trainable(module: OnnxModule, data: Examples, selected: list[str]) -> None:
    """A ConversionError unless some distilled output has a gradient on the first example (a QDQ
    QuantizeLinear's integers pass none unless a DequantizeLinear reads them directly)."""
    first = next(iter(chunks(next(data.batches(1)), model_fixed_batch(module.model))))[0]
    outputs = module(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in first.items()})
    if not any(outputs[module.output_names.index(n)].requires_grad for n in selected):
        raise ConversionError(_NOTHING_TO_TRAIN.format(", ".join(selected)))


def start_codes(student: onnx.ModelProto, teacher: onnx.ModelProto, data: Examples, cfg: FinetuneConfig,
                how: str, progress: bool = False) -> tuple[onnx.ModelProto, dict]:
    """(the model whose shift codes training starts from, FinetuneResult.rounding + "seconds").
    `how`: "compensated" (the student as given when its metadata says its codes were chosen on data
    with a held-out check, else the conversion's compensated rounding, rounding_split's examples),
    "nearest" or "checkpoint" (the student: its codes are replaced by the teacher's nearest ones or
    by the checkpoint's)."""
    if how in ("nearest", "checkpoint"):
        return student, {"start": how}
    record = rounding_record(student)
    if record is not None:
        return student, {"start": "given", "record": record}
    t0 = time.monotonic()
    calibration, held_out = rounding_split(data, cfg.rounding_examples, cfg.seed)
    with tqdm(desc="rounding", unit="group", disable=None if progress else True) as bar:
        model, decisions = round_model(student, teacher, calibration, len(calibration), cfg.batch_size, cfg.seed,
                                       progress=lambda done, total: (setattr(bar, "total", total), bar.update(1)),
                                       held_out=held_out, with_decisions=True)
    layers = decisions["layers"]
    return model, {"start": "rounded", "examples": decisions["examples"], "held_out": decisions["held_out"],
                   "kept": sum(1 for d in layers.values() if d["compensated"]), "layers": len(layers),
                   "decisions": layers, "seconds": time.monotonic() - t0}


def rounding_split(data: Examples, n_examples: int, seed: int = 0) -> tuple[Examples, Examples | float]:
    """(calibration examples, what judges each layer's rounding) as the conversion chooses them
    (convert/pipeline.py:held_out_examples), on a seeded shuffle of `data`: the first
    `n_examples` calibrate; held-out examples come from the rest, or, with too few left, as a share
    of the calibration ones (a float, which round_model splits off)."""
    from mfconvert.convert.pipeline import held_out_examples

    shuffled = Examples([data.items[i] for i in np.random.default_rng(seed).permutation(len(data))], data.pad_values)
    n = min(n_examples, len(shuffled))
    return Examples(shuffled.items[:n], data.pad_values), held_out_examples(shuffled, n, seed)


@torch.no_grad()
def keep_codes(module: OnnxModule, codes: OnnxModule) -> None:
    """Make every DeepShift-Q shift layer of `module` (latent weights from the teacher) round to
    the codes of the same layer in `codes` (built from the model that holds them): a weight keeps
    its latent where that rounds to the wanted code in every term, else takes the code's own value."""
    for key, layer in module.layers.items():
        if not (isinstance(layer, ShiftLinear) and layer.mode == "Q"):
            continue
        want = codes.layers[key].codes()
        have = layer.codes()
        if torch.equal(have, want):
            continue
        same = have == want if layer.terms == 1 else (have == want).all(0)
        layer.weight.copy_(torch.where(same, layer.weight, codes.layers[key].weight))
        if not torch.equal(layer.codes(), want):   # not expected: then the codes' values throughout
            layer.weight.copy_(codes.layers[key].weight)


def _piece_loss(model, piece: dict, real: int, offset: int, n_rows: int, t_out: list, t_feat: dict,
                selected_at: list[int], features: list[str], logits_of: dict, latency: torch.Tensor,
                cfg: FinetuneConfig, device):
    """(loss, distillation part, captured tensors) of the student on rows [offset, offset + real)
    of a batch of `n_rows` (the teacher's values are the whole batch's): `piece` holds them
    (then fill rows up to the model's fixed batch size). A value whose first dim is k per row
    (k = 1, or T for tokens flattened to [B·T, C]) is cut at k·rows."""
    inputs = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in piece.items()}
    captured = tuple(features) + tuple(logits_of.values())
    s_out, s_feat = model(capture=captured, **inputs) if captured else (model(**inputs), {})
    piece_rows = len(next(iter(piece.values())))
    mask = mask_of(piece)
    mask = torch.from_numpy(mask[:real]).to(device) if mask is not None else None

    def teacher_rows(value: np.ndarray) -> torch.Tensor:
        value = np.asarray(value)
        if value.ndim and real < n_rows and value.shape[0] % n_rows == 0:
            k = value.shape[0] // n_rows
            value = value[offset * k:(offset + real) * k]
        return torch.from_numpy(np.ascontiguousarray(value)).to(device)

    def student_rows(value: torch.Tensor) -> torch.Tensor:
        if value.dim() and real < piece_rows and value.shape[0] % piece_rows == 0:
            return value[:value.shape[0] // piece_rows * real]
        return value

    loss = 0.0
    for index, t in zip(selected_at, t_out):
        t = teacher_rows(t)
        loss = loss + distillation_loss(student_rows(s_out[index]).to(t.dtype), t, cfg.loss, mask)
    for name in features:
        t = teacher_rows(t_feat[name])
        loss = loss + cfg.feature_weight * F.mse_loss(student_rows(s_feat[name]), t)
    distill = loss.item() if isinstance(loss, torch.Tensor) else float(loss)
    if logits_of and cfg.balance_coef > 0:
        loss = loss + cfg.balance_coef * sum(balance_loss_from_logits(s_feat[t], latency) for t in logits_of.values())
    return loss, distill, s_feat


class _Optimizers:
    """AdamW, and for AdderConv weights SGD with momentum, stepped as one optimiser (the lr schedule
    sets every group's lr from its peak_lr); a checkpoint holds a list of their states."""

    def __init__(self, parts: list):
        if not parts:
            raise ConversionError("nothing to train: every parameter of the student is frozen")
        self.parts = parts

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.parts for g in o.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.parts:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.parts:
            o.step()

    def state_dict(self) -> dict:
        return self.parts[0].state_dict() if len(self.parts) == 1 else {"parts": [o.state_dict() for o in self.parts]}

    def load_state_dict(self, state: dict) -> None:
        states = state.get("parts", [state])
        if len(states) != len(self.parts):
            raise ValueError(f"the checkpoint has {len(states)} optimiser state(s), this student needs {len(self.parts)}")
        for o, s in zip(self.parts, states):
            o.load_state_dict(s)


def _snapshot(module: OnnxModule) -> onnx.ModelProto:
    """The module as ONNX now, without moving it off its device."""
    on_cpu = all(p.device.type == "cpu" for p in module.parameters())
    return (module if on_cpu else copy.deepcopy(module).cpu()).to_onnx()


def _epoch(order: np.random.Generator, n_batches: int, rank: int, world: int) -> list[int]:
    """This rank's share of a fresh permutation of the batches (every rank draws the same one)."""
    ids = order.permutation(n_batches)
    return [int(i) for i in ids[rank::world]] or [int(ids[0])]


def _save_checkpoint(path, module, optimizer, step, losses, elapsed) -> None:
    state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "student": module.state_dict(),
             "optimizer": optimizer.state_dict(), "step": int(step), "losses": [float(v) for v in losses],
             "elapsed": float(elapsed), "rng": torch.get_rng_state()}
    with atomic_file(path) as f:   # an exclusive temporary file beside `path`, then a rename
        torch.save(state, f)


def load_checkpoint(path: str, device: torch.device | str = "cpu") -> dict:
    """A checkpoint _save_checkpoint wrote, read without unpickling anything but tensors and plain
    values; any other file is a ConversionError."""
    try:
        with warnings.catch_warnings():   # e.g. "Detected pickle protocol 4": the error says enough
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:   # UnpicklingError (a forbidden global), a zip or pickle error, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        why = ("it holds objects other than tensors and plain values; not unpickled"
               if first.startswith("Weights only load failed") else first)
        raise ConversionError(f"{path}: not an mfconvert checkpoint ({why})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ConversionError(f"{path}: not an mfconvert checkpoint (no {CHECKPOINT_FORMAT!r} format marker)")
    if state.get("version") != CHECKPOINT_VERSION:
        raise ConversionError(f"{path}: checkpoint version {state.get('version')!r} is not supported "
                              f"(this mfconvert reads {CHECKPOINT_VERSION})")
    kinds = {"student": dict, "optimizer": dict, "step": int, "losses": list, "elapsed": float,
             "rng": torch.Tensor}
    for key, kind in kinds.items():
        if not isinstance(state.get(key), kind):
            raise ConversionError(f"{path}: not an mfconvert checkpoint ({key!r} is not a {kind.__name__})")
    return state
