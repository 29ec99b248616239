"""Spatial shifts calibrated on data (`--spatial-shift --data`, issue 15): the least-squares choice of
each channel's offset and scale, then a least-squares refit of the pointwise conv that reads the
shifted channels, layer by layer on the converted model's own activations.

One tap of a 3×3 kernel is far from MobileNetV2's depthwise kernels, and a data-free conversion of
every layer agrees with the original on no image (BENCHMARKS.md). On data, per converted layer in
graph order:

1. **Offset and scale per channel.** With x the depthwise conv's input as the *converted* model
   computes it (earlier layers already calibrated) and y the depthwise output (BatchNormalization
   folded) as the *original* computes it, each channel c takes, of the kernel's taps (the
   candidate offsets), the one whose shifted input z = shift(x_c) fits y_c best by the affine least
   squares min_{s,β} ‖y_c − s·z − β‖² (so the scale and bias are the folded BatchNormalization
   re-estimated for the shift: the statistics stay consistent with what the layer now computes).
2. **Pointwise refit.** The 1×1 conv after it (through its ReLU6, if any) mixes the channels, so
   its weights and bias are refit by ridge regression from the features the converted layer now
   gives to the original block's output: the original conv's output, plus (where an Add follows)
   the original residual minus the converted one, so each block also absorbs the error it inherits
   on the skip path. Before step 1, the expansion 1×1 conv that feeds the layer (if any) is refit
   the same way towards the original's expansion output. The ridge λ (relative to the features'
   mean energy) is chosen among a few on held-out examples, against keeping the weights as they
   are (step 1's scale folded); the winner is fit again on all examples.

3. **Block-wise reconstruction** (`reconstruct_blocks`, BRECQ/AdaRound-style): each layer's block
   (expansion 1×1 conv → shift → scale → pointwise 1×1 conv, and the Add after it) extracted,
   fed its input as the converted model computes it and trained by Adam towards the original's
   block output, kept where the held-out error falls.

Convs already made ShiftConv (codes, not floats) are not refit: such a layer keeps its data-free
form and the notes say so. The pipeline (convert/pipeline.py spatial_shift_first) therefore runs
all of this before shift-conv, on the model with only the shifts converted.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from mfconvert.calibrate.data import Examples

RIDGES = (1e-4, 1e-3, 1e-2, 1e-1)      # λ / mean diag(FᵀF) tried for the pointwise refit
HELD_OUT = 0.25                        # share of the examples judging the ridge
MAX_EXAMPLES = 64                      # the calibration runs at most this many examples
ELEMENTWISE = ("Relu", "Clip", "LeakyRelu", "HardSwish", "HardSigmoid", "Identity")


def shift_plane(x: torch.Tensor, dy: int, dx: int, strides=(1, 1), padding: str = "zeros") -> torch.Tensor:
    """Every channel of x [N, C, H, W] moved by one offset, as SpatialShift does:
    Y[n, c, i, j] = X[n, c, i·sh + dy, j·sw + dx], zeros (or the nearest pixel, 'edge') outside."""
    _, _, h, w = x.shape
    sh, sw = strides
    rows = torch.arange(-(-h // sh)) * sh + dy
    cols = torch.arange(-(-w // sw)) * sw + dx
    out = x[:, :, rows.clamp(0, h - 1)][:, :, :, cols.clamp(0, w - 1)]
    if padding == "zeros":
        mask = ((rows >= 0) & (rows < h))[:, None] & ((cols >= 0) & (cols < w))[None, :]
        out = out * mask.to(out.dtype)
    return out


@dataclass
class ChannelFit:
    """Per channel: the chosen offset [C, 2], scale, bias, and the residual ‖y − s·z − β‖² and
    ‖y − ȳ‖² (so 1 − residual / spread is the share of y's variance the shift explains)."""
    offsets: np.ndarray
    scale: np.ndarray
    bias: np.ndarray
    residual: np.ndarray
    spread: np.ndarray

    @property
    def explained(self) -> np.ndarray:
        return 1.0 - self.residual / np.maximum(self.spread, 1e-300)


def fit_channels(pairs, candidates, strides=(1, 1), padding: str = "zeros") -> ChannelFit:
    """The least-squares offset, scale and bias of every channel (module docstring, step 1).
    `pairs`: (x [N, C, H, W], y [N, C, OH, OW]) batches; `candidates`: the offsets [dy, dx]."""
    sums = None
    for x, y in pairs:
        x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
        per = []
        for dy, dx in candidates:
            z = shift_plane(x, int(dy), int(dx), strides, padding)
            per.append(torch.stack([z.sum((0, 2, 3)), (z * z).sum((0, 2, 3)), (z * y).sum((0, 2, 3))]))
        part = (torch.stack(per), torch.stack([y.sum((0, 2, 3)), (y * y).sum((0, 2, 3))]),
                y.shape[0] * y.shape[2] * y.shape[3])
        sums = part if sums is None else tuple(a + b for a, b in zip(sums, part))
    (sz, szz, szy), (sy, syy), n = sums[0].permute(1, 0, 2).numpy(), sums[1].numpy(), sums[2]
    var_z = szz - sz * sz / n                      # [K, C]
    cov = szy - sz * sy / n
    spread = np.maximum(syy - sy * sy / n, 0.0)    # [C]
    ok = var_z > 1e-12 * np.maximum(szz, 1e-300)
    scale = np.where(ok, cov / np.where(ok, var_z, 1.0), 0.0)
    residual = np.maximum(spread - scale * cov, 0.0)
    best = residual.argmin(axis=0)
    cols = np.arange(best.size)
    s = scale[best, cols]
    return ChannelFit(np.asarray(candidates, np.int64)[best], s, (sy - s * sz[best, cols]) / n,
                      residual[best, cols], spread)


class Normal:
    """The normal equations of a least-squares fit of targets T [rows, M] from features F [rows, C]
    plus a bias column, accumulated over batches in float64."""

    def __init__(self):
        self.g = self.ft = None
        self.tt = 0.0

    def add(self, f: np.ndarray, t: np.ndarray) -> None:
        """f [N, C, H, W], t [N, M, H, W]."""
        f = torch.as_tensor(f, dtype=torch.float64).permute(0, 2, 3, 1).reshape(-1, f.shape[1])
        t = torch.as_tensor(t, dtype=torch.float64).permute(0, 2, 3, 1).reshape(-1, t.shape[1])
        f = torch.cat([f, torch.ones(f.shape[0], 1, dtype=f.dtype)], 1)
        g, ft = f.T @ f, f.T @ t
        self.g = g if self.g is None else self.g + g
        self.ft = ft if self.ft is None else self.ft + ft
        self.tt += float((t * t).sum())

    def solve(self, ridge: float) -> np.ndarray:
        """[C + 1, M]: the ridge solution (λ = ridge · mean diag of the features' Gram, the bias
        column not penalised)."""
        c = self.g.shape[0] - 1
        lam = ridge * float(torch.diagonal(self.g)[:c].mean())
        reg = torch.diag(torch.cat([torch.full((c,), lam, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)]))
        return torch.linalg.solve(self.g + reg, self.ft).numpy()

    def error(self, wb: np.ndarray) -> float:
        """‖T − [F, 1]·wb‖² on the accumulated rows."""
        wb = torch.as_tensor(wb, dtype=torch.float64)
        return float(self.tt - 2 * (wb * self.ft).sum() + (wb * (self.g @ wb)).sum())


def refit_pointwise(train: Normal, held: Normal, start: np.ndarray) -> tuple[np.ndarray, dict]:
    """The pointwise conv's [C + 1, M] weights and bias (module docstring, step 2): the ridge
    among RIDGES, or `start` (the weights as they are), whichever has the least held-out error,
    fit again on train + held-out. Figures: held-out relative errors of start and of the pick."""
    scores = {"keep": held.error(start)}
    for r in RIDGES:
        scores[r] = held.error(train.solve(r))
    pick = min(scores, key=scores.get)
    norm = max(held.tt, 1e-300)
    figures = {"held_out_error_before": scores["keep"] / norm, "held_out_error_after": scores[pick] / norm,
               "ridge": None if pick == "keep" else pick}
    if pick == "keep":
        return start, figures
    both = Normal()
    both.g, both.ft, both.tt = train.g + held.g, train.ft + held.ft, train.tt + held.tt
    return both.solve(pick), figures


# -- the converted model ------------------------------------------------------------------------

@dataclass
class _Layer:
    change: object                    # passes.spatial_shift.ShiftChange
    shift: onnx.NodeProto
    shifted: np.ndarray               # channel indices the SpatialShift moves
    scale: onnx.NodeProto | None      # the 1×1 depthwise Conv of the scales (None: folded into pointwise)
    pointwise: onnx.NodeProto | None  # the 1×1 conv that reads the layer (through elementwise ops)
    residual: str | None              # the other input of the Add after the pointwise conv
    expand: onnx.NodeProto | None     # the float 1×1 conv that gives the layer its input, if any


def _consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def _float_conv(node, inits) -> bool:
    return node is not None and node.op_type == "Conv" and node.domain in ("", "ai.onnx") and node.input[1] in inits


def _pointwise_conv(node, inits) -> bool:
    """A float 1×1 group-1 Conv, stride 1, no padding (one row of features per output pixel)."""
    if not _float_conv(node, inits):
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return (int(attrs.get("group", 1)) == 1 and numpy_helper.to_array(inits[node.input[1]]).shape[2:] == (1, 1)
            and not any(attrs.get("pads", [0])) and all(v == 1 for v in attrs.get("strides", [1])))


def _layers(student: onnx.ModelProto, changes) -> tuple[list[_Layer], list[str]]:
    inits = {i.name: i for i in student.graph.initializer}
    consumers = _consumers(student)
    sole = lambda name: consumers[name][0] if len(consumers.get(name, [])) == 1 else None   # noqa: E731
    by_name = {n.name: n for n in student.graph.node if n.op_type == "SpatialShift"}
    producer = {o: n for n in student.graph.node for o in n.output}
    layers, skipped = [], []
    for change in changes:
        node = by_name.get(change.node)
        if node is None or not change.output or not change.candidates:
            skipped.append(f"{change.node}: not found as a SpatialShift in the converted model")
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("channel_shift", 0):
            skipped.append(f"{change.node}: channel_shift set")
            continue
        gather = f"{change.node}.shift_index"
        shifted = (numpy_helper.to_array(inits[gather]) if gather in inits
                   else np.arange(change.out_features)).astype(np.int64)
        nxt = sole(node.output[0])
        scale = nxt if nxt is not None and nxt.name == f"{change.node}.scale" else None
        if scale is not None and not _float_conv(scale, inits):
            skipped.append(f"{change.node}: its scale is a {scale.op_type} (shift-conv ran; --no-shift-conv keeps "
                           "it float for the calibration)")
            continue
        # the pointwise conv: the folded one, or past elementwise ops after the layer's output
        pw = nxt if scale is None else None
        if pw is None:
            t = change.output
            while (n := sole(t)) is not None and n.op_type in ELEMENTWISE:
                t = n.output[0]
            pw = n
        if not _pointwise_conv(pw, inits):
            if scale is None:
                skipped.append(f"{change.node}: the conv its scale folds into is not a float 1×1 conv")
                continue
            pw = None
        residual = None
        if pw is not None and (add := sole(pw.output[0])) is not None and add.op_type == "Add" and len(add.input) == 2:
            residual = add.input[1] if add.input[0] == pw.output[0] else add.input[0]
        # the expansion before it: a 1×1 conv whose output reaches the layer through elementwise ops
        t, expand = change.shift_input, None
        while (n := producer.get(t)) is not None and sole(t) is not None:
            if n.op_type in ELEMENTWISE:
                t = n.input[0]
                continue
            if _pointwise_conv(n, inits):
                expand = n
            break
        layers.append(_Layer(change, node, shifted, scale, pw, residual, expand))
    return layers, skipped


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> bytes:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    for name in names:
        if name not in have:
            probe.graph.output.append(helper.make_empty_tensor_value_info(name))
    return probe.SerializeToString()


def _run(model: onnx.ModelProto, names: list[str], feeds: list[dict], session_fn) -> list[list[np.ndarray]]:
    """Per feed batch, the tensors `names`."""
    sess = session_fn(_with_outputs(model, names))
    return [sess.run(names, feed) for feed in feeds]


def _set(inits: dict, name: str, value: np.ndarray) -> None:
    old = inits[name]
    dtype = numpy_helper.to_array(old).dtype
    old.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value.astype(dtype)), name))


def calibrate_shifts(student: onnx.ModelProto, original: onnx.ModelProto, data: Examples, changes,
                     session_fn=None, batch: int = 16, max_examples: int = MAX_EXAMPLES,
                     refit: bool = True, progress=None) -> tuple[onnx.ModelProto, list[str]]:
    """The student with every SpatialShift layer of `changes` (passes.spatial_shift.ShiftChange)
    calibrated on `data` (module docstring); each change's `calibration` holds its figures, and
    the lines say what was done. `refit=False` stops after step 1 (offsets, scales and biases)."""
    if session_fn is None:
        from mfconvert.runtime import session

        session_fn = lambda b: session(b, spinning=False)   # noqa: E731
    out = onnx.ModelProto()
    out.CopyFrom(student)
    layers, skipped = _layers(out, changes)
    inits = {i.name: i for i in out.graph.initializer}
    items = data.items[:max_examples]
    n_held = max(1, int(round(len(items) * HELD_OUT))) if len(items) > 1 else 0
    train_ex, held_ex = Examples(items[:len(items) - n_held], data.pad_values), Examples(items[len(items) - n_held:], data.pad_values)
    feeds = list(train_ex.batches(batch)) + list(held_ex.batches(batch))
    n_train_batches = len(list(train_ex.batches(batch)))
    refits = 0
    for layer in layers:
        ch = layer.change
        if progress:
            progress(ch.node)
        pw = layer.pointwise
        figures = {"examples": len(items)}
        if refit and layer.expand is not None:   # the expansion: its output as the original computes it
            ex = layer.expand
            o_ex = _run(original, [ex.output[0]], feeds, session_fn)
            m_ex = _run(out, [ex.input[0]], feeds, session_fn)
            train, held = _normals([m[0] for m in m_ex], [o[0] for o in o_ex], n_train_batches)
            wb, f = refit_pointwise(train, held, _conv_weights(inits, ex))
            _write_conv(out, inits, ex, wb)
            figures["expand"] = {"node": ex.name, **f}
            refits += f["ridge"] is not None
            del o_ex, m_ex
        targets = [ch.output] + ([pw.output[0]] if pw is not None else []) + ([layer.residual] if layer.residual else [])
        orig = _run(original, targets, feeds, session_fn)
        mine = _run(out, [ch.shift_input] + ([layer.residual] if layer.residual else []), feeds, session_fn)
        attrs = {a.name: helper.get_attribute_value(a) for a in layer.shift.attribute}
        strides = list(attrs.get("strides", [1, 1]))
        padding = attrs.get("padding", b"zeros")
        padding = padding.decode() if isinstance(padding, bytes) else padding
        idx = layer.shifted
        fit = fit_channels(((m[0][:, idx], o[0][:, idx]) for m, o in zip(mine, orig)), ch.candidates, strides, padding)
        old_offsets = numpy_helper.to_array(inits[layer.shift.input[1]])
        _set(inits, layer.shift.input[1], fit.offsets)
        figures.update({"offsets_changed": int((old_offsets != fit.offsets).any(axis=1).sum()),
                   "moved": int((fit.offsets != 0).any(axis=1).sum()),
                   "explained_variance_median": float(np.median(fit.explained))})
        if layer.scale is not None:
            _set(inits, layer.scale.input[1], fit.scale.reshape(-1, 1, 1, 1))
            _set(inits, layer.scale.input[2], fit.bias)
        if pw is not None:
            w_orig = _original_weights(original, pw.output[0]) if layer.scale is None else None
            if w_orig is not None:   # folded: the start is the original pointwise conv with step 1's affine
                w, b = w_orig
                start_w = w * fit.scale[None, :]
                start_b = (np.zeros(w.shape[0]) if b is None else b) + w @ fit.bias
                start = np.concatenate([start_w.T, start_b[None, :]], 0)
            else:
                start = _conv_weights(inits, pw)
            if refit:
                features = _run(out, [pw.input[0]], feeds, session_fn)
                targets = [o[1] + o[2] - m[1] if layer.residual else o[1] for o, m in zip(orig, mine)]
                # with a residual: the block's output, the original's, less the skip this model gives it
                train, held = _normals([f[0] for f in features], targets, n_train_batches)
                wb, refit_figures = refit_pointwise(train, held, start)
                figures.update(refit_figures)
                refits += refit_figures["ridge"] is not None
            else:
                wb = start
            _write_conv(out, inits, pw, wb)
        ch.calibration = figures
        ch.moved = figures["moved"]
        ch.detail += (f"; on data: {figures['offsets_changed']} offsets changed, {figures['moved']} moved, shift explains "
                      f"{figures['explained_variance_median']:.0%} of a channel's variance (median)"
                      + (f", block error {figures['held_out_error_before']:.0%} → {figures['held_out_error_after']:.0%} "
                         "held out" if "held_out_error_after" in figures else ""))
    lines = [] if not layers else [f"spatial-shift: {len(layers)} layer(s) calibrated on {len(items)} examples (least-squares offset and "
             f"scale per channel" + (f"; {refits} 1×1 conv(s) around them refit by ridge regression, the "
                                     "others kept: no held-out gain" if refit else "") + ")"]
    if skipped:
        lines.append(f"spatial-shift: {len(skipped)} layer(s) not calibrated (first: {skipped[0]})")
    return out, lines


def channels_to_keep(original: onnx.ModelProto, data: Examples, changes, fidelity: float,
                     session_fn=None, batch: int = 16, max_examples: int = MAX_EXAMPLES) -> tuple[dict, dict]:
    """{node: [channels]} whose best single shift explains less than `fidelity` of their depthwise
    output's variance on `data`, measured on the original model's own activations (the
    `keep_channels` of SpatialShiftConfig), and per node the explained shares."""
    if session_fn is None:
        from mfconvert.runtime import session

        session_fn = lambda b: session(b, spinning=False)   # noqa: E731
    changes = [c for c in changes if c.shift_input and c.output and c.candidates]
    names = [n for c in changes for n in (c.shift_input, c.output)]
    feeds = list(Examples(data.items[:max_examples], data.pad_values).batches(batch))
    runs = _run(original, names, feeds, session_fn)
    keep, explained = {}, {}
    for k, c in enumerate(changes):
        stride = [int(-(-x.shape[2] // y.shape[2])), int(-(-x.shape[3] // y.shape[3]))] if (x := runs[0][2 * k]) is not None \
            and (y := runs[0][2 * k + 1]) is not None else [1, 1]
        fit = fit_channels(((r[2 * k], r[2 * k + 1]) for r in runs), c.candidates, stride)
        explained[c.node] = fit.explained
        keep[c.node] = [int(i) for i in np.flatnonzero(fit.explained < fidelity)]
    return keep, explained


def _normals(features: list[np.ndarray], targets: list[np.ndarray], n_train: int) -> tuple[Normal, Normal]:
    """The normal equations of the first n_train batches and of the rest (the same when none rest)."""
    train, held = Normal(), Normal()
    for k, (f, t) in enumerate(zip(features, targets)):
        (train if k < n_train else held).add(f, t)
    return train, (held if held.g is not None else train)


def _conv_weights(inits: dict, node: onnx.NodeProto) -> np.ndarray:
    """A 1×1 conv's weights and bias as [C + 1, M]."""
    w = numpy_helper.to_array(inits[node.input[1]])[:, :, 0, 0].astype(np.float64)
    b = (numpy_helper.to_array(inits[node.input[2]]).astype(np.float64) if len(node.input) > 2 and node.input[2]
         else np.zeros(w.shape[0]))
    return np.concatenate([w.T, b[None, :]], 0)


def _write_conv(model: onnx.ModelProto, inits: dict, node: onnx.NodeProto, wb: np.ndarray) -> None:
    """Write [C + 1, M] weights and bias into a 1×1 conv (a bias input added where it had none)."""
    shape = numpy_helper.to_array(inits[node.input[1]]).shape
    _set(inits, node.input[1], wb[:-1].T.reshape(shape))
    if len(node.input) > 2 and node.input[2]:
        _set(inits, node.input[2], wb[-1])
    else:
        name = f"{node.name}.bias_calibrated"
        model.graph.initializer.append(numpy_helper.from_array(wb[-1].astype(np.float32), name))
        inits[name] = model.graph.initializer[-1]
        node.input.append(name)


def _original_weights(original: onnx.ModelProto, output: str) -> tuple[np.ndarray, np.ndarray | None] | None:
    """The [M, C] weight and bias of the original model's conv writing `output` (None: not a
    conv with initializer weights there; the start is then the converted model's weights)."""
    inits = {i.name: i for i in original.graph.initializer}
    node = next((n for n in original.graph.node if output in n.output), None)
    if node is None or node.op_type != "Conv" or node.input[1] not in inits or \
            (len(node.input) > 2 and node.input[2] and node.input[2] not in inits):
        return None
    w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)[:, :, 0, 0]
    b = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64) if len(node.input) > 2 and node.input[2] else None
    return w, b


# -- block-wise reconstruction (BRECQ/AdaRound-style) -------------------------------------------

@dataclass
class Reconstruction:
    """How each converted block is trained after the least-squares calibration (`reconstruct_blocks`):
    a training-time budget for all blocks (split evenly over the blocks still to come, so a block
    that stops early leaves its time to the next; running the models for each block's inputs and
    targets comes on top), a step cap per block, Adam's lr (cosine-decayed to 0 over
    the block's steps or its time, whichever runs out first), the batch, how often the held-out error is measured (the best state is
    kept), and whether the offsets train as continuous ones (Active Shift, rounded for export)."""
    minutes: float = 2.0
    steps: int = 2000
    lr: float = 1e-3
    batch: int = 8
    check_every: int = 50
    offsets: bool = False
    offset_lr: float = 1e-2           # pixels per Adam step, at the start (offset mode only)

    def __post_init__(self):
        if self.minutes < 0 or self.steps < 0 or self.lr <= 0 or self.batch < 1 or self.check_every < 1 \
                or self.offset_lr <= 0:
            raise ValueError(f"reconstruction: minutes and steps must be >= 0, lr and offset_lr > 0, batch and "
                             f"check_every >= 1 (got {self})")


def block_of(layer: _Layer, consumers: dict) -> tuple[list[str], str]:
    """A converted layer's block: its inputs (where the expansion 1×1 conv reads, else where the
    shift reads; the skip tensor of the Add after the pointwise conv, if other) and its output
    (that Add's, else the pointwise conv's, else the layer's own)."""
    start = layer.expand.input[0] if layer.expand is not None else layer.change.shift_input
    inputs = [start] + ([layer.residual] if layer.residual and layer.residual != start else [])
    if layer.pointwise is None:
        return inputs, layer.change.output
    end = layer.pointwise.output[0]
    if layer.residual:
        end = consumers[end][0].output[0]
    return inputs, end


def extract_block(model: onnx.ModelProto, inputs: list[str], output: str) -> onnx.ModelProto | str:
    """The subgraph of `model` computing `output` from `inputs` (and initializers): its nodes in
    the model's order, the initializers they read; or why not (a tensor it needs comes from neither)."""
    producer = {o: k for k, n in enumerate(model.graph.node) for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    wanted, seen, stack = set(), set(inputs), [output]
    while stack:
        t = stack.pop()
        if t in seen or t in inits or not t:
            continue
        seen.add(t)
        if t not in producer:
            return f"'{t}' is neither an input of the block nor computed inside it"
        k = producer[t]
        if k not in wanted:
            wanted.add(k)
            stack.extend(model.graph.node[k].input)
    nodes = [model.graph.node[k] for k in sorted(wanted)]
    used = {i for n in nodes for i in n.input}
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                                               for t in inputs],
                              [helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None)],
                              [inits[t] for t in sorted(used & set(inits))])
    block = helper.make_model(graph, opset_imports=list(model.opset_import))
    block.ir_version = model.ir_version
    return block


def _relative_error(module, xs: list[np.ndarray], target: np.ndarray, names: list[str], batch: int) -> float:
    """‖block(xs) − target‖² / ‖target‖² over the rows, in eval mode (offsets rounded)."""
    module.eval()
    err = 0.0
    with torch.no_grad():
        for i in range(0, len(target), batch):
            got = module(**{n: torch.from_numpy(x[i:i + batch]) for n, x in zip(names, xs)})[0]
            err += float(((got.double() - torch.from_numpy(target[i:i + batch]).double()) ** 2).sum())
    module.train()
    return err / max(float((target.astype(np.float64) ** 2).sum()), 1e-300)


def train_block(block: onnx.ModelProto, xs_train: list[np.ndarray], t_train: np.ndarray, xs_held: list[np.ndarray],
                t_held: np.ndarray, cfg: Reconstruction, seconds: float, seed: int = 0) -> tuple[onnx.ModelProto | None, dict]:
    """Adam on the block's mean squared error to the target (float initializers; the SpatialShift
    offsets too with cfg.offsets, continuous, Active Shift), at most cfg.steps steps and `seconds`;
    the held-out error measured at the start, every cfg.check_every steps and at the end. Returns
    the block with the best state if it beats the start on the held-out rows (else None) and the
    figures."""
    from mfconvert.nn.onnx_module import OnnxModule
    from mfconvert.nn.spatial_shift import OFFSET_UNIT, SpatialShift

    torch.manual_seed(seed)
    module = OnnxModule(block).train()
    names = module.input_names
    shifts = [m for m in module.modules() if isinstance(m, SpatialShift)]
    offset_params = {id(m.offset_p) for m in shifts}
    for m in shifts:
        m.offset_p.requires_grad_(cfg.offsets)
        m.mode = "active" if cfg.offsets else "ste"
    weights = [p for p in module.parameters() if p.requires_grad and id(p) not in offset_params]
    groups = [{"params": weights, "lr": cfg.lr}]
    if cfg.offsets and shifts:
        groups.append({"params": [m.offset_p for m in shifts], "lr": cfg.offset_lr / OFFSET_UNIT})
    figures = {"steps": 0, "seconds": 0.0}
    if not weights:
        return None, {**figures, "why": "nothing to train"}
    opt = torch.optim.Adam(groups)
    peak = [g["lr"] for g in opt.param_groups]
    start = best = _relative_error(module, xs_held, t_held, names, max(cfg.batch, 16))
    best_state, best_step = None, 0
    rng = np.random.default_rng(seed)
    n = len(t_train)
    t0 = _now()
    order, at = rng.permutation(n), 0
    step = 0
    while step < cfg.steps and _now() - t0 < seconds:
        if at >= n:
            order, at = rng.permutation(n), 0
        idx = np.sort(order[at:at + cfg.batch])
        at += cfg.batch
        done = max(step / cfg.steps, (_now() - t0) / max(seconds, 1e-9))   # of the steps or of the time
        for g, lr in zip(opt.param_groups, peak):   # cosine to 0 over whichever runs out first
            g["lr"] = lr * 0.5 * (1 + np.cos(np.pi * min(done, 1.0)))
        got = module(**{nm: torch.from_numpy(x[idx]) for nm, x in zip(names, xs_train)})[0]
        loss = ((got - torch.from_numpy(t_train[idx])) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % cfg.check_every == 0 or step >= cfg.steps or _now() - t0 >= seconds:
            err = _relative_error(module, xs_held, t_held, names, max(cfg.batch, 16))
            if err < best:
                best, best_step = err, step
                best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    figures.update(steps=step, seconds=_now() - t0, held_out_error_before=start, held_out_error_after=best,
                   best_step=best_step)
    if best_state is None:
        return None, figures
    module.load_state_dict(best_state)
    return module.to_onnx(), figures


def _now() -> float:
    import time

    return time.monotonic()


def _output_error(got: list[list[np.ndarray]], want: list[list[np.ndarray]]) -> float:
    """Mean over the float outputs of ‖got − want‖² / ‖want‖², summed over the batches."""
    errors = []
    for k in range(len(want[0])):
        if not np.issubdtype(np.asarray(want[0][k]).dtype, np.floating):
            continue
        num = sum(float(((np.asarray(g[k], np.float64) - np.asarray(w[k], np.float64)) ** 2).sum()) for g, w in zip(got, want))
        den = sum(float((np.asarray(w[k], np.float64) ** 2).sum()) for w in want)
        errors.append(num / max(den, 1e-300))
    return float(np.mean(errors)) if errors else 0.0


def reconstruct_blocks(student: onnx.ModelProto, original: onnx.ModelProto, data: Examples, changes,
                       cfg: Reconstruction | None = None, session_fn=None, batch: int = 16,
                       max_examples: int = MAX_EXAMPLES, progress=None) -> tuple[onnx.ModelProto, list[str]]:
    """Block-wise reconstruction after the least-squares calibration (BRECQ/AdaRound-style): per
    converted layer in graph order, its block (`block_of`: expansion 1×1 conv → shift → scale →
    pointwise 1×1 conv, the Add where there is one) is extracted, fed its input as the *converted*
    model computes it (earlier blocks already trained), and trained towards the block's output as
    the *original* computes it on the same examples (`train_block`); the trained values are kept
    only where the held-out examples' error falls, and all of them only if the model's outputs on
    the held-out examples come closer to the original's. Each change's `calibration['reconstruction']`
    holds the figures; the lines say what was done."""
    cfg = cfg or Reconstruction()
    if session_fn is None:
        from mfconvert.runtime import session

        session_fn = lambda b: session(b, spinning=False)   # noqa: E731
    out = onnx.ModelProto()
    out.CopyFrom(student)
    layers, _ = _layers(out, changes)
    if not layers or cfg.minutes <= 0 or cfg.steps <= 0:
        return out, []
    inits = {i.name: i for i in out.graph.initializer}
    items = data.items[:max_examples]
    n_held = max(1, int(round(len(items) * HELD_OUT))) if len(items) > 1 else 0
    if n_held == 0:
        return out, ["spatial-shift: blocks not reconstructed (one example: nothing to hold out)"]
    feeds = list(Examples(items, data.pad_values).batches(batch))
    n_train = len(items) - n_held
    budget, spent = 60.0 * cfg.minutes, 0.0   # of training: the inputs' and targets' runs come on top
    t0 = _now()
    kept, steps, befores, afters, skipped = 0, 0, [], [], []
    for k, layer in enumerate(layers):
        inputs, end = block_of(layer, _consumers(out))
        block = extract_block(out, inputs, end)
        if isinstance(block, str):
            skipped.append(f"{layer.change.node}: {block}")
            continue
        if progress:
            progress(layer.change.node)
        xs = [np.concatenate(v) for v in zip(*_run(out, inputs, feeds, session_fn))]
        target = np.concatenate([r[0] for r in _run(original, [end], feeds, session_fn)])
        seconds = max(0.0, budget - spent) / (len(layers) - k)
        trained, figures = train_block(block, [x[:n_train] for x in xs], target[:n_train],
                                       [x[n_train:] for x in xs], target[n_train:], cfg, seconds, seed=k)
        spent += figures["seconds"]
        figures["kept"] = trained is not None
        if trained is not None:
            new = {i.name: i for i in trained.graph.initializer}
            for name in new:
                if name in inits:
                    inits[name].CopyFrom(new[name])
            kept += 1
        steps += figures["steps"]
        if "held_out_error_before" in figures:
            befores.append(figures["held_out_error_before"])
            afters.append(figures["held_out_error_after"])
        layer.change.calibration = {**(layer.change.calibration or {}), "reconstruction": figures}
        if "held_out_error_before" in figures:
            layer.change.detail += (f"; block trained {figures['steps']} steps: held-out error "
                                    f"{figures['held_out_error_before']:.0%} → {figures['held_out_error_after']:.0%}"
                                    + ("" if trained is not None else " (kept as calibrated)"))
        del xs, target
    lines = [f"spatial-shift: {len(layers) - len(skipped)} block(s) trained on their output error (Adam, {steps} steps in "
             f"{spent:.0f} s of {_now() - t0:.0f} s, {n_train} examples, {n_held} held out), kept where the held-out error fell: {kept}"
             + (f"; median held-out block error {np.median(befores):.0%} → {np.median(afters):.0%}" if befores else "")]
    if kept:   # each kept block fell on the held-out examples; the model's outputs must fall too, or none is kept
        names = [o.name for o in original.graph.output]
        held = list(Examples(items[n_train:], data.pad_values).batches(batch))
        want = _run(original, names, held, session_fn)
        before, after = (_output_error(_run(m, names, held, session_fn), want) for m in (student, out))
        if not after < before:
            out = onnx.ModelProto()
            out.CopyFrom(student)
            for layer in layers:
                if layer.change.calibration and "reconstruction" in layer.change.calibration:
                    layer.change.calibration["reconstruction"]["kept"] = False
            lines[0] += (f"; none kept: the model's held-out output error rose {before:.3g} → {after:.3g} "
                         "(relative squared error)")
        else:
            lines[0] += f"; the model's held-out output error {before:.3g} → {after:.3g} (relative squared error)"
    if skipped:
        lines.append(f"spatial-shift: {len(skipped)} block(s) not trained (first: {skipped[0]})")
    return out, lines
