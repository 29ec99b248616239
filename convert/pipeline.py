"""The conversion pipeline as one library call, the same for the CLI and Python users:

    load → canonicalise → passes → calibrate → allocate → round → save

`convert_model(path, config, options, output)` reads the model, calibrates the activation format
(from --data, else from the bounds of the ops that produce each linear's input), chooses each
shift-weighted node's terms (`--shift-terms auto`: calibrate/allocate.py), runs the passes
(canonicalisation and shape inference are convert_onnx's first steps), keeps layers float for
`max_drop` (calibrate/sensitivity.py), re-rounds shift weights by compensated rounding where it
beats nearest rounding on held-out data (calibrate/rounding.py), and writes the model once,
atomically (convert/files.py). With --spatial-shift and --data the depthwise convs are shifted,
calibrated and their blocks trained first, every other conv still float (spatial_shift_first);
the rest then converts that model as its original.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import numpy as np
import onnx

from mfconvert.calibrate import allocate
from mfconvert.calibrate.activation_stats import (bounded_frac_bits, calibrated_frac_bits, column_ranges,
                                                  format_overflows)
from mfconvert.calibrate.data import Examples
from mfconvert.convert.config import ConvertConfig
from mfconvert.convert.files import check_outputs
from mfconvert.convert.onnx_entry import ConversionResult, convert_onnx, save_result
from mfconvert.convert.onnx_model import (PROTO_LIMIT, check_output_path, check_serializable, data_path_for,
                                          load_model, read_model)
from mfconvert.passes import fuse_spatial_shift
from mfconvert.passes.linear import accumulator_checks, annotate_accumulators
from mfconvert.passes.shift_format import ShiftFormat

CALIBRATION_EXAMPLES = 256   # examples calibration and rounding use (the first of --data)
ALLOCATION_EXAMPLES = 64     # of them, those each allocation measurement runs
PROBE_BYTES = 512 << 20      # models up to this size are probed without data (allocate.probe_errors)
TERMS_AUTO = "auto"


@dataclass
class PipelineOptions:
    """What the pipeline does beyond the passes' config (each a CLI flag)."""
    shift_terms: int | str | None = TERMS_AUTO   # 'auto' (calibrate/allocate.py); an integer: that many terms on
    #   every shift-weighted pass (terms_by_node entries kept); None: the config's terms as they are
    target: float = allocate.DEFAULT_TARGET   # auto's output error target: ½·‖y − y′‖²/‖y‖² (≈ 1 − cosine)
    data: Examples | None = None          # calibration data (--data)
    rounding: str = "compensated"         # with data: 'compensated' or 'nearest'
    finetuning: bool = False              # finetuning follows: it does its own rounding, no finetune note
    max_drop: float | None = None         # with data: keep the most sensitive layers float
    logits: bool = False                  # errors as top-1 agreement lost (else 1 − cosine)
    outputs: list[str] | None = None      # the outputs compared (default: every float output)
    act_percentile: float | None = None   # activation ranges at this percentile of |x|
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    predict: bool = True                  # fixed terms: the report still predicts their output error
    # fuse step: a ShiftConv reads through the SpatialShift before it (no shifted tensor written). Off by
    # default: on MobileNetV2 it measured 1.00–1.02× the unfused model's time (BENCHMARKS.md, "Read-through").
    read_through: bool = False
    #   (docs/ops.md#input-shift-read-through; no CLI flag, as the scale-conv fusion has none)


@dataclass
class PipelineResult:
    result: ConversionResult
    config: ConvertConfig                 # the resolved config (calibrated formats, allocated terms)
    allocation: allocate.Allocation | None = None
    budget_lines: list[str] = field(default_factory=list)
    rounding: dict | None = None          # {node: kept compensated?} and the held-out figures
    notes: list[str] = field(default_factory=list)   # the report's lines after its table

    def to_dict(self) -> dict:
        """The report as JSON, with the allocation and rounding decisions."""
        return {**self.result.report.to_dict(),
                "allocation": None if self.allocation is None else self.allocation.to_dict(),
                "rounding": self.rounding, "pipeline_notes": self.notes}


def _node_terms(model: onnx.ModelProto, nodes) -> list[int]:
    attrs = {n.name: {a.name: a.i for a in n.attribute if a.name == "terms"} for n in model.graph.node}
    return [attrs.get(n.node, {}).get("terms", 1) for n in nodes]


def _shift_configs(config: ConvertConfig) -> dict[str, ShiftFormat]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if isinstance(getattr(config, f.name), ShiftFormat)}


def allocating(config: ConvertConfig, options: PipelineOptions) -> bool:
    """auto, for a config that has shift passes and no terms allocated yet (a --config saved
    from an allocation keeps its terms_by_node)."""
    shift = _shift_configs(config)
    return options.shift_terms == TERMS_AUTO and bool(shift) and not any(c.terms_by_node for c in shift.values())


def needs_finetuning(result: ConversionResult, model_path: str, with_data: bool = False) -> str | None:
    """One line when the converted model's output needs finetuning to be usable: binarised
    attention and MoE routers are untrained after conversion."""
    passes = {c.pass_name for c in result.report.changes}
    what = [w for p, w in (("add-attention", "add attention"), ("moe-mlp", "the MoE routers"),
                           ("adder-conv", "adder convs (their data-free start)")) if p in passes
            and not (with_data and p == "adder-conv")]
    if not what:
        return None
    return (f"note: {' and '.join(what)} are untrained after conversion, so the output is not yet usable; "
            f"finetune it: mfconvert finetune {result.output or 'MODEL.mf.onnx'} --teacher {model_path} --data DATA "
            f"(or convert with --data DATA --finetune-minutes 10)")


def calibrate_formats(original: onnx.ModelProto, config: ConvertConfig, options: PipelineOptions,
                      calibration: Examples | None) -> tuple[ConvertConfig, list[str]]:
    """Fractional bits per linear input for act_bits < 32: from the calibration data, else from
    the bounds of their producers; lines for inputs that saturate their format."""
    notes = []
    shift = config.shift_linear
    if shift is not None and shift.act_bits < 32 and not shift.act_frac_bits_by_input:
        by_input = (calibrated_frac_bits(original, calibration, shift.act_bits, options.act_percentile)
                    if calibration is not None else bounded_frac_bits(original, shift.act_bits))
        if by_input:
            config = dataclasses.replace(config, shift_linear=dataclasses.replace(shift, act_frac_bits_by_input=by_input))
            if calibration is None:
                notes.append(f"activation format of {len(by_input)} linear input(s) from their producers' bounds "
                             "(LayerNorm, Softmax, Tanh-like, Clip); others at --act-frac-bits (--data "
                             "calibrates them all)")
    return config, notes


HELD_OUT_EXAMPLES = 64   # at most this many examples judge each layer's compensated rounding
MIN_HELD_OUT = 16        # fewer examples past the calibration ones: hold out a share of those instead


def held_out_examples(data: Examples, n_calibration: int, seed: int = 0):
    """What judges compensated rounding (calibrate/rounding.py): examples of --data past the
    calibration ones, drawn across all of them (a file sorted by kind or length puts unlike
    inputs there), else the rounding's share (HELD_OUT) of the calibration examples."""
    from mfconvert.calibrate.rounding import HELD_OUT
    rest = data.items[n_calibration:]
    if len(rest) < MIN_HELD_OUT:
        return HELD_OUT
    pick = np.sort(np.random.default_rng(seed).permutation(len(rest))[:HELD_OUT_EXAMPLES])
    return Examples([rest[i] for i in pick], data.pad_values)


def _probe(nodes, model_path, original, size: int, options: PipelineOptions, progress=None) -> str:
    """Each node's share of the output error without data (allocate.probe_errors), for a model of
    up to PROBE_BYTES (the probe holds it, each probed weight's rounding error beside it, and their
    serialized graph in memory at once); larger ones keep the ½·Σ NSR model. The report's line."""
    if size > PROBE_BYTES:
        allocate.set_shares(nodes, {})
        return (f"output error predicted as ½·Σ weight NSR (a model of {size >> 20} MiB, over "
                f"{PROBE_BYTES >> 20} MiB, is not probed); it over-predicts deep models, --data measures instead")
    return allocate.probe_errors(nodes, original if original is not None else load_model(model_path)[0],
                                 options.input_shapes, options.outputs, progress)


_AFTER_SPATIAL_SHIFT = ("adder-conv", "shift-add-conv", "shift-conv")   # passes/registry.py ORDER


@dataclass
class ShiftStage:
    model: onnx.ModelProto                # the original with its depthwise convs shifted and calibrated
    report: object                        # its conversion's report (the spatial-shift rows)
    lines: list[str]                      # the calibration's lines for the notes


def spatial_shift_first(model_path: str, original: onnx.ModelProto, calibration: Examples, cfg, options: PipelineOptions,
                        progress=None) -> ShiftStage:
    """--spatial-shift with --data: the depthwise convs become shifts with every other conv float,
    their offsets and scales fit and the 1×1 convs around them refit by least squares, then each
    block trained on its output error (calibrate/spatial_shift.py: calibrate_shifts,
    reconstruct_blocks, with cfg's reconstruct_* budget)."""
    from mfconvert.calibrate.spatial_shift import Reconstruction, calibrate_shifts, reconstruct_blocks

    only = ConvertConfig(**{f.name: None for f in dataclasses.fields(ConvertConfig)})
    stage = convert_onnx(model_path, dataclasses.replace(only, spatial_shift=cfg), input_shapes=options.input_shapes,
                         progress=progress)
    changes = [c for c in stage.report.changes if c.pass_name == "spatial-shift"]
    model, lines = calibrate_shifts(stage.model, original, calibration, changes)
    model, more = reconstruct_blocks(model, original, calibration, changes, Reconstruction(
        minutes=cfg.reconstruct_minutes, steps=cfg.reconstruct_steps, lr=cfg.reconstruct_lr,
        offsets=cfg.reconstruct_offsets))
    return ShiftStage(model, stage.report, lines + more)


def with_fixed_terms(config: ConvertConfig, terms) -> ConvertConfig:
    """`config` with `terms` (PipelineOptions.shift_terms) set on every shift-weighted pass when it
    is an integer; 'auto' and None leave it as it is. Raises ValueError naming the option."""
    if terms is None or terms == TERMS_AUTO:
        return config
    if isinstance(terms, bool) or not isinstance(terms, int):
        raise ValueError(f"shift_terms must be 'auto', None or an integer, got {terms!r}")
    changes = {}
    for f in dataclasses.fields(config):
        cfg = getattr(config, f.name)
        if isinstance(cfg, ShiftFormat):
            try:
                changes[f.name] = dataclasses.replace(cfg, terms=terms)
            except ValueError as err:
                raise ValueError(f"shift_terms: {err}") from None
    return dataclasses.replace(config, **changes)


def convert_model(model_path: str, config: ConvertConfig | None = None, options: PipelineOptions | None = None,
                  output: str | None = None, force: bool = False, progress=None) -> PipelineResult:
    """Convert `model_path` by the pipeline (module docstring); write `output` once, atomically."""
    from mfconvert.calibrate.rounding import check_rounding, round_model
    from mfconvert.calibrate.sensitivity import Measurer, convert_within_budget
    config = config or ConvertConfig()
    options = options or PipelineOptions()
    check_rounding(options.rounding)
    config = with_fixed_terms(config, options.shift_terms)
    # load: large tensors stay in their files until a pass reads them
    light, label, size, data_files = read_model(model_path, lazy=True)
    if output is not None:   # checked before any work (convert/files.py): never a file read
        check_output_path(output, model_path, force)
        reads = {"the input model": model_path, **{f"the input's external data {f}": f for f in data_files}}
        external = bool(data_files) or size > PROTO_LIMIT // 2
        for path in [output] + ([data_path_for(output)] if external else []):
            check_outputs({"": path}, reads, force)
    data = options.data
    original = calibration = ranges = None
    if data is not None:   # the steps that run the model in ONNX Runtime hold it in memory
        original, label, _ = load_model(model_path)
        check_serializable(original, label, "--data")
        calibration = Examples(data.items[:CALIBRATION_EXAMPLES], data.pad_values)
    shifted = teacher = None
    if calibration is not None and config.spatial_shift is not None:
        # spatial shifts on data come first, while every conv is float: converted, calibrated and
        # their blocks trained (spatial_shift_first); the rest of the pipeline then converts that
        # model as its original, so shift-conv quantises the refit 1×1 convs on its own data
        shifted = spatial_shift_first(model_path, original, calibration, config.spatial_shift, options, progress)
        teacher, original = original, shifted.model
        full_config, config = config, dataclasses.replace(config, spatial_shift=None)
    if calibration is not None:
        ranges = column_ranges(original, calibration)   # the report checks accumulators on them
    # calibrate
    config, notes = calibrate_formats(original or light, config, options, calibration)
    shift = config.shift_linear
    if shift is not None:
        notes += format_overflows(original or light, shift.act_bits, shift.act_frac_bits,
                                  shift.act_frac_bits_by_input, ranges)
    # passes (canonicalised and shape-inferred inside), allocate
    allocation = None
    source = model_path if shifted is None else shifted.model   # read again, lazily: labels and external data as the file has them
    first = convert_onnx(source, config, input_shapes=options.input_shapes, progress=progress, input_ranges=ranges,
                         allow_unchanged=shifted is not None)
    result = first
    if allocating(config, options):
        nodes = allocate.shift_weighted_nodes(first.model, original if original is not None else source,
                                              first.report.changes)
        if nodes and calibration is not None:
            sample = Examples(calibration.items[:ALLOCATION_EXAMPLES], calibration.pad_values)
            measurer = Measurer(original, sample, options.logits, options.input_shapes, options.outputs, metric="nsr")
            target = options.max_drop if options.max_drop is not None else options.target
            allocation, _ = allocate.allocate_from_data(measurer, config, nodes, target, progress=progress)
        elif nodes:
            note = _probe(nodes, model_path, original, size, options, progress)
            allocation = allocate.allocate_from_weights(nodes, options.target)
            allocation.note = note
        if allocation is not None:
            config = allocate.with_terms(config, allocation.terms)
            if any(t > 1 for t in allocation.terms.values()):
                result = convert_onnx(source, config, input_shapes=options.input_shapes, input_ranges=ranges,
                                      allow_unchanged=shifted is not None)
    elif options.predict and _shift_configs(config):   # terms as configured: say what they are predicted to cost
        nodes = allocate.shift_weighted_nodes(first.model, original if original is not None else source,
                                              first.report.changes)
        if nodes:
            note = _probe(nodes, model_path, original, size, options, progress)
            terms = {n.node: t for n, t in zip(nodes, _node_terms(first.model, nodes))}
            allocation = allocate.Allocation(terms, nodes, options.target, allocate.predicted_drop(nodes, terms),
                                             fixed=True, note=note)
    budget_lines: list[str] = []
    if options.max_drop is not None:
        if calibration is None:
            raise ValueError("max_drop needs data")
        budget = convert_within_budget(source, config, calibration, options.max_drop, options.logits,
                                       input_shapes=options.input_shapes, outputs=options.outputs)
        result, budget_lines = budget.result, budget.lines()
        if ranges is not None:   # the budget's conversions had no data to check on
            annotate_accumulators(result.report.changes, accumulator_checks(result.model, ranges))
    if shifted is not None:   # one report, one config: the spatial shifts' rows among the passes' in their order
        results = result.report.results
        at = next((i for i, r in enumerate(results) if r.pass_name in _AFTER_SPATIAL_SHIFT), len(results))
        results[at:at] = shifted.report.results
        result.report.file_bytes_before = shifted.report.file_bytes_before
        result.report.notes[:0] = shifted.report.notes
        result.report.attach_models(teacher, lambda: result.model)
        config = dataclasses.replace(config, spatial_shift=full_config.spatial_shift)
        onnx.helper.set_model_props(result.model, {**{p.key: p.value for p in result.model.metadata_props},
                                                   "mfconvert.config": json.dumps(config.to_dict())})
        notes[:0] = shifted.lines
    # round
    rounding = None
    if calibration is not None and options.rounding == "compensated" and not options.finetuning:
        rounded, rounding = round_model(result.model, original, calibration, with_decisions=True,
                                        held_out=held_out_examples(data, CALIBRATION_EXAMPLES))
        rounding["calibration"] = len(calibration)
        annotate_accumulators(result.report.changes, accumulator_checks(rounded, ranges))   # the codes written
        result.model = rounded
    # adder layers (--adder-conv, --shift-add-conv): their weights' scale and BatchNormalization from the data
    if calibration is not None and any(c.pass_name in ("adder-conv", "shift-add-conv") for c in result.report.changes):
        from mfconvert.passes.adder_conv import calibrate_adders

        result.model, adder_lines = calibrate_adders(result.model, original, calibration)
        notes += adder_lines
    # shift convs: a BatchNormalization the pass kept (not right after a conv) takes its statistics
    # on the data as the converted model computes them (calibrate/conv.py)
    if calibration is not None and any(c.pass_name == "shift-conv" for c in result.report.changes):
        from mfconvert.calibrate.conv import reestimate_batchnorm
        from mfconvert.runtime import session

        feeds = list(calibration.batches(32))
        result.model, kept_bn = reestimate_batchnorm(result.model, feeds, lambda data: session(data))
        if kept_bn:
            notes.append(f"BatchNormalization statistics of {len(kept_bn)} node(s) the shift-conv pass kept "
                         f"re-estimated on {len(calibration)} examples")
    # last, after everything that reads the unfused form: SpatialShift + its 1×1 scale conv (+ Relu/Clip) → one op
    # and a SpatialShift only a ShiftConv reads → that ShiftConv's input shift (options.read_through)
    notes += fuse_spatial_shift.fuse_into(result, options.read_through)
    # save
    if output is not None:
        save_result(result, output)
    finetune = None if options.finetuning else needs_finetuning(result, model_path, calibration is not None)
    if finetune:
        notes.append(finetune)
    return PipelineResult(result, config, allocation, budget_lines, rounding, notes)
