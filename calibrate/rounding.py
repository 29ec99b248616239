"""Error-compensated rounding of shift-layer weights (GPTQ with a power-of-two grid).

Rounding each weight to its nearest ±2^p on its own leaves a relative error of up to ~40 % per
weight, and the errors of a row add up in its output. GPTQ (Frantar et al., 2022, after Optimal
Brain Surgeon) rounds the input columns one at a time and moves each column's rounding error onto
the columns not yet rounded, in the proportion that best keeps the layer's output on calibration
data: with H = Σ x xᵀ over the layer's inputs, rounding column i by e_i changes the remaining
columns F by -e_i · [H_F⁻¹]_{:,i} / [H_F⁻¹]_{ii}. The grid does not matter to the method, so
the power-of-two codes of docs/ops.md#shiftlinear work as they are; only which codes are chosen
changes. Layers are rounded in execution order, each on the inputs that the already-rounded
layers before it produce, as in the paper.

The result also leaves in each layer's latent weight (DeepShift-Q) the compensated value each
weight had when it was rounded, so finetuning continues from exactly these codes.
"""
from __future__ import annotations

import json
from collections.abc import Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch

from mfconvert.calibrate.conv import ConvStats, correct_conv_bias, round_conv_layer
from mfconvert.calibrate.data import Examples, chunks, model_fixed_batch
from mfconvert.moe import expert_latent_weights
from mfconvert.nn import pow2, registry
from mfconvert.nn.onnx_module import OnnxModule, _run_node
from mfconvert.nn.shift_conv import ShiftConv
from mfconvert.nn.shift_linear import ShiftLinear
from mfconvert.passes.conv import conv_latent_weights
from mfconvert.passes.shift_linear import match_linear

ROUNDINGS = ("compensated", "nearest")   # the --rounding choices: this module's method, or none
DAMPING = 0.01      # λ = DAMPING · mean(diag H) added to H's diagonal: keeps H⁻¹ well conditioned
BLOCK = 128         # columns whose updates are applied lazily together (the result is the same)


def check_rounding(rounding: str) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"--rounding must be compensated or nearest, got {rounding!r}")


def compensated_rounding(weight: torch.Tensor, hessian: torch.Tensor, round_column, damping: float = DAMPING,
                         act_order: bool = True, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(rounded [out, in], latent [out, in]) for a weight and its input Hessian H [in, in].

    `round_column(w, i)` rounds column i (float64 [out]) to the grid. `latent` holds the value
    each weight had, after the compensation it received, when it was rounded. With `act_order`
    columns are rounded in order of decreasing H_ii (most-used inputs first, while the most
    columns remain to absorb their error)."""
    w = weight.detach().to(torch.float64).clone()
    h = hessian.detach().to(torch.float64).clone()
    n = w.shape[1]
    dead = torch.diagonal(h) == 0                  # inputs that were always zero: weight unused
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else torch.arange(n)
    w, h = w[:, order], h[order][:, order]
    h += damping * torch.diagonal(h).mean() * torch.eye(n, dtype=torch.float64)
    # Row i of the upper Cholesky factor U of H⁻¹, divided by U_ii, is the update direction of the
    # remaining columns [H_F⁻¹]_{i,F} / [H_F⁻¹]_{ii} once columns before i are rounded.
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    rounded, latent = torch.zeros_like(w), torch.zeros_like(w)
    for start in range(0, n, block):
        end = min(start + block, n)
        errors = torch.zeros(w.shape[0], end - start, dtype=torch.float64)
        for j in range(start, end):
            column = w[:, j]
            q = round_column(column, int(order[j]))
            rounded[:, j], latent[:, j] = q, column
            err = (column - q) / u[j, j]
            w[:, j:end] -= err[:, None] * u[j, j:end][None, :]
            errors[:, j - start] = err
        w[:, end:] -= errors @ u[start:end, end:]
    inverse = torch.argsort(order)
    return rounded[:, inverse], latent[:, inverse]


def round_layer(layer: ShiftLinear, hessian: torch.Tensor, damping: float = DAMPING, act_order: bool = True) -> None:
    """Re-round a DeepShift-Q ShiftLinear's latent weight by compensated rounding, in place.
    With terms > 1 the grid is that of the greedy sums of `terms` powers of two."""
    if isinstance(layer, ShiftConv):   # per group over its im2col rows (calibrate/conv.py)
        return round_conv_layer(layer, hessian, damping, act_order, correct_bias=False)   # after the choice below
    if layer.mode != "Q":
        raise ValueError("compensated rounding needs a ShiftLinear in mode 'Q' (latent float weights)")

    def quantize(w32: torch.Tensor) -> torch.Tensor:
        parts = pow2.residual_terms(w32, layer.exponent, layer.weight_bits, layer.terms)
        return pow2.round_weight(parts, layer.exponent, layer.weight_bits).sum(0)

    def round_column(column: torch.Tensor, _index: int) -> torch.Tensor:
        return quantize(column.to(torch.float32)[:, None])[:, 0].to(torch.float64)

    rounded, latent = compensated_rounding(layer.float_weight(), hessian, round_column, damping, act_order)
    # The float32 latent must round to the chosen value; a value that float32 moves across a
    # rounding boundary is replaced by the chosen value itself.
    latent32, rounded32 = latent.to(torch.float32), rounded.to(torch.float32)
    layer.set_latent_weight(torch.where(quantize(latent32) == rounded32, latent32, rounded32))


def latent_start_weights(student: onnx.ModelProto, teacher: onnx.ModelProto) -> dict[str, np.ndarray]:
    """{ShiftLinear node: float weight [out, in]} the student's shift layers start from: the
    teacher's linear layer of the same node name, and for MoE Shift experts the Mult expert's
    weights of the same block (the original MLP's)."""
    graph = gs.import_onnx(teacher)
    weights = {}
    for node in graph.nodes:
        if node.op in ("MatMul", "Gemm") and node.name:
            match = match_linear(graph, node)
            if not isinstance(match, str):
                weights[node.name] = match.weight
    return {**weights, **expert_latent_weights(student), **conv_latent_weights(student, teacher)}


def shift_layer_groups(module: OnnxModule) -> list[list[ShiftLinear]]:
    """The module's DeepShift-Q ShiftLinear layers in execution order, grouped by input tensor
    (Q, K and V projections read the same tensor, so one pass collects their H together)."""
    groups: dict[str, list[ShiftLinear]] = {}
    for key, node, _ in module.nodes:
        layer = module.layers[key] if key in module.layers else None
        if isinstance(layer, ShiftLinear) and layer.mode == "Q":
            groups.setdefault(node.input[0], []).append(layer)
    return list(groups.values())


def output_error(weight: torch.Tensor, rounded: torch.Tensor, hessian: torch.Tensor) -> float:
    """Σ‖(W − Q)x‖² over the inputs whose H = Σ x xᵀ is given: tr((W − Q) H (W − Q)ᵀ)."""
    if isinstance(hessian, ConvStats):   # per group over a ShiftConv's im2col rows
        return hessian.output_error(weight, rounded)
    d = (weight.to(torch.float64) - rounded.to(torch.float64))
    return float(((d @ hessian.to(torch.float64)) * d).sum())


def _batches(module: OnnxModule, batches) -> list:
    limit = model_fixed_batch(module.model)
    return [({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in piece.items()}, real)
            for b in batches for piece, real in chunks({k: np.asarray(v) for k, v in b.items()}, limit)]


@torch.no_grad()
def compensate_rounding(module: OnnxModule, batches: Iterable[dict[str, np.ndarray]],
                        damping: float = DAMPING, act_order: bool = True, progress=None,
                        held_out: Iterable[dict[str, np.ndarray]] | None = None) -> dict[str, dict]:
    """Re-round every DeepShift-Q ShiftLinear of `module` in place, layer group by layer group,
    each on the inputs the calibration `batches` give it with the groups before it rounded.
    With `held_out` batches, a layer keeps the compensated rounding only where it beats nearest
    rounding on them (output_error), else goes back to nearest. {layer name: {"compensated": kept,
    "held_out_error": {"compensated": …, "nearest": …}}}. `progress(done, total)` is called per
    group. A model that fixes its batch size (inputs [1, …]) takes each batch piece by piece."""
    batches = _batches(module, batches)
    held = _batches(module, held_out) if held_out is not None else None
    names = {id(module.layers[key]): node.name or key for key, node, _ in module.nodes if key in module.layers}
    groups = shift_layer_groups(module)
    decisions: dict[str, dict] = {}
    was_training = module.training
    module.train()     # the float emulation of the shift layers: the same codes, much faster
    fit_run = _Runner(module, batches)
    held_run = _Runner(module, held) if held else None
    try:
        for done, group in enumerate(groups):
            hessians = fit_run.statistics(group)
            checks = held_run.statistics(group) if held_run else [None] * len(group)
            for layer, hessian, check in zip(group, hessians, checks):
                weight = layer.float_weight()
                nearest = layer.rounded_weight().detach().clone()
                round_layer(layer, hessian, damping, act_order)
                if check is None:
                    if isinstance(layer, ShiftConv):
                        correct_conv_bias(layer, hessian, weight)
                    continue
                errors = {"compensated": output_error(weight, layer.rounded_weight().detach(), check),
                          "nearest": output_error(weight, nearest, check)}
                kept = errors["compensated"] < errors["nearest"]
                if not kept:
                    layer.set_latent_weight(weight)   # back to the nearest codes
                if isinstance(layer, ShiftConv):
                    correct_conv_bias(layer, hessian, weight)
                decisions[names.get(id(layer), str(len(decisions)))] = {"compensated": kept,
                                                                        "held_out_error": errors}
            if progress is not None:
                progress(done + 1, len(groups))
    finally:
        module.train(was_training)
    return decisions


def _reads(node: onnx.NodeProto) -> set[str]:
    """The tensor names a node reads, those its subgraphs read from the outer scope included."""
    names = {n for n in node.input if n}
    for attr in node.attribute:
        for graph in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            for sub in graph.node:
                names |= _reads(sub)
    return names


def _new_stats(layer: ShiftLinear):
    return ConvStats(layer) if isinstance(layer, ShiftConv) else \
        torch.zeros(layer.in_features, layer.in_features, dtype=torch.float64)


def _add_stats(stats, layer: ShiftLinear, x: torch.Tensor) -> None:
    if isinstance(layer, ShiftConv):
        stats.add(layer, x)                                     # over its im2col rows
    else:
        x = x.reshape(-1, layer.in_features).to(torch.float32)
        stats.add_((x.T @ x).to(torch.float64))                 # float32 products, float64 sum


class _Runner:
    """The module's graph run node by node over fixed batches, each batch's live tensors kept
    between calls, so that rounding layer group after layer group costs one forward pass in all.
    (Running the model from its inputs again for every group cost a pass per group: quadratic in
    depth, 40 of the 48 s of a 16-image MobileNetV2 conversion.) The values are those a forward
    pass from the inputs gives with the groups before rounded: the same ops on the same tensors."""

    def __init__(self, module: OnnxModule, batches: list):
        self.module, self.position = module, 0
        self.envs = [(dict(feeds), len(next(iter(feeds.values()))), real) for feeds, real in batches]
        self.index = {id(module.layers[key]): i for i, (key, _, _) in enumerate(module.nodes) if key in module.layers}
        last: dict[str, int] = {}
        for i, (_, node, _) in enumerate(module.nodes):
            for name in _reads(node):
                last[name] = i
        self.free_after: dict[int, list[str]] = {}   # tensors no later node reads (outputs kept)
        for name, i in last.items():
            if name not in module.output_names:
                self.free_after.setdefault(i, []).append(name)

    def run_to(self, stop: int) -> None:
        """Run the nodes before index `stop` not run yet, on every batch."""
        module = self.module
        for env, _, _ in self.envs:
            for i in range(self.position, stop):
                key, node, attrs = module.nodes[i]
                if key in module.layers:
                    op = registry.entry(node)
                    flow = [env[n] if n else None for n in node.input[:op.flow_inputs]]
                    for name, value in zip(node.output, op.call(module.layers[key], flow)):
                        if name:
                            env[name] = value
                else:
                    _run_node(node, attrs, env, module._value)
                for name in self.free_after.get(i, ()):
                    env.pop(name, None)
        self.position = max(self.position, stop)

    def statistics(self, group: list[ShiftLinear]) -> list:
        """H = Σ x xᵀ (float64; a ShiftConv's ConvStats) of the group's input over the batches, the
        graph run up to the group's first layer (the layers before it as they are now). Fill rows
        of a fixed-batch model past the real ones do not count. Groups come in execution order."""
        first = min(self.index[id(layer)] for layer in group)
        if first < self.position:
            raise ValueError("layer groups must be taken in execution order")
        self.run_to(first)
        name = self.module.nodes[first][1].input[0]
        stats = [_new_stats(layer) for layer in group]
        for env, rows, real in self.envs:
            x = (env[name] if name in env else self.module._value(name)).detach()
            if x.dim() > 1 and x.shape[0] == rows and real < rows:
                x = x[:real]
            for layer, s in zip(group, stats):
                _add_stats(s, layer, x)
        return stats


def calibration_batches(examples: Examples, n_examples: int, batch_size: int, seed: int = 0) -> list[dict]:
    """Batches of `n_examples` examples: the first of a seeded shuffle, bucketed by length (pad
    tokens would otherwise weigh in H as much as real ones)."""
    n = min(n_examples, len(examples))
    chosen = Examples([examples.items[i] for i in np.random.default_rng(seed).permutation(len(examples))[:n]],
                      examples.pad_values)
    return list(chosen.batches(batch_size, by_length=True))


HELD_OUT = 0.25   # of the rounding examples, the share kept to judge each layer's rounding (when no others)
# Model metadata written by round_model when each layer's compensated rounding was kept only where
# it beat nearest rounding on held-out examples: finetuning starts from these codes, not re-rounding.
ROUNDING_KEY = "mfconvert.rounding"


def rounding_record(model: onnx.ModelProto) -> dict | None:
    """What ROUNDING_KEY says of how `model`'s shift codes were chosen, or None."""
    text = {p.key: p.value for p in model.metadata_props}.get(ROUNDING_KEY)
    return json.loads(text) if text else None


def mark_rounding(model: onnx.ModelProto, record: dict) -> None:
    """Record in `model`'s metadata how its shift codes were chosen (ROUNDING_KEY), in place."""
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                        ROUNDING_KEY: json.dumps(record)})


def round_model(student: onnx.ModelProto, teacher: onnx.ModelProto, examples: Examples, n_examples: int = 256,
                batch_size: int = 32, seed: int = 0, progress=None, held_out: float | Examples = 0.0,
                with_decisions: bool = False):
    """The converted `student` with its shift layers re-rounded by compensated rounding on
    `n_examples` of the examples; latent weights start from the `teacher`'s. With `held_out`
    examples, or a share > 0 of the examples kept out of the rounding (at least one), each layer
    keeps the compensated rounding only where it beats nearest rounding on them
    (compensate_rounding). With `with_decisions`: (model, {"examples": rounded on, "held_out":
    judged on, "layers": {name: decision}})."""
    module = OnnxModule(student, latent_weights=latent_start_weights(student, teacher))
    n = min(n_examples, len(examples))
    if isinstance(held_out, Examples):
        fit, check = examples, held_out
    else:
        order = np.random.default_rng(seed).permutation(len(examples))[:n]
        n_held = min(max(1, round(held_out * n)), n - 1) if held_out > 0 and n > 1 else 0
        fit = Examples([examples.items[i] for i in order[n_held:]], examples.pad_values)
        check = Examples([examples.items[i] for i in order[:n_held]], examples.pad_values)
        n = len(fit)
    decisions = compensate_rounding(module, calibration_batches(fit, n, batch_size, seed), progress=progress,
                                    held_out=list(check.batches(batch_size, by_length=True)) if len(check) else None)
    model = module.to_onnx()
    if len(check):
        mark_rounding(model, {"by": "compensated rounding", "examples": min(n, len(fit)), "held_out": len(check),
                              "kept": sum(1 for d in decisions.values() if d["compensated"]),
                              "layers": len(decisions)})
    if not with_decisions:
        return model
    return model, {"examples": min(n, len(fit)), "held_out": len(check), "layers": decisions}
