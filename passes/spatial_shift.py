"""Pass `spatial-shift`: depthwise convolutions become SpatialShift ops (docs/ops.md#spatialshift;
Shift, Wu et al. 2018): each channel keeps one tap of its k×k kernel, the dominant one (largest
|w| after folding BatchNormalization as passes/conv.py does), so it becomes a move of the channel
by that tap's offset times a per-channel scale plus the bias.

The scale and bias fold into the following pointwise conv's input channels when it reads the
depthwise output alone (W'[:, c] = W[:, c]·a_c, b' = b + W·β: no multiplication left); otherwise
(MobileNetV2: a ReLU6 sits between) they stay as a 1×1 depthwise Conv, one multiplication per output
element instead of k² (ORT fuses the ReLU6 into it; the shift-conv pass, which runs after, rounds
it to powers of two). With `fidelity` set, channels whose dominant tap holds less than that
share of the kernel's energy (w_dom² / Σ w²) stay in a depthwise conv of their own (the channels
split by Gather, joined by Concat and a Gather back to the original order). Runs before the conv
passes, so the pointwise conv they convert already carries the scales.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from mfconvert.ort_ops import DOMAIN
from mfconvert.passes.conv import ConvChange, ConvMatch, match_conv
from mfconvert.passes.graph import NotConstant, claimant, constant_value, graph_opset, node_label, sole_consumer
from mfconvert.passes.registry import register
from mfconvert.passes.report import PassResult
from mfconvert.passes.targeting import Targeting, exclusion_reason

NAME = "spatial-shift"
OP = "SpatialShift"


@dataclass
class SpatialShiftConfig(Targeting):
    """Which depthwise convs become shifts (include/exclude: Targeting) and how."""
    # None: every channel shifts. Else the least share of its kernel's energy the dominant tap must
    # hold for a channel to shift; the others stay depthwise (reported per layer).
    fidelity: float | None = None
    padding: str = "zeros"
    # The L1 coefficient on the offsets for finetuning (Sparse Shift), written to the nodes.
    sparsity: float = 0.0
    fold_batchnorm: bool = True
    fold_pointwise: bool = True
    # The scale per channel: 0 takes the dominant tap's weight; ρ > 0 the least-squares scale
    # Σ_k w_k·ρ^|k − tap|₁ under inputs whose correlation decays as ρ per pixel of distance
    # (1: smooth inputs, the kernel's sum), data-free.
    neighbour_correlation: float = 0.0
    # Channels that stay depthwise, by node: {label: [channel, …]} (what --data chose:
    # calibrate/spatial_shift.py:channels_to_keep), on top of `fidelity`'s.
    keep_channels: dict[str, list[int]] = field(default_factory=dict)
    # With --data, after the least-squares calibration: each block (expansion 1×1 conv → shift →
    # pointwise 1×1 conv, its Add) trained on its output error against the original's
    # (calibrate/spatial_shift.py:reconstruct_blocks), all blocks within this many minutes (0: none),
    # at most reconstruct_steps Adam steps each at reconstruct_lr; reconstruct_offsets also trains
    # the offsets as continuous ones (Active Shift), rounded at the end.
    reconstruct_minutes: float = 2.0
    reconstruct_steps: int = 2000
    reconstruct_lr: float = 1e-3
    reconstruct_offsets: bool = False

    def __post_init__(self):
        if self.reconstruct_minutes < 0 or self.reconstruct_steps < 0 or not self.reconstruct_lr > 0:
            raise ValueError(f"reconstruct_minutes and reconstruct_steps must be >= 0 and reconstruct_lr > 0, got "
                             f"{self.reconstruct_minutes}, {self.reconstruct_steps}, {self.reconstruct_lr}")
        if not 0.0 <= self.neighbour_correlation <= 1.0:
            raise ValueError(f"neighbour_correlation must be in [0, 1], got {self.neighbour_correlation}")
        if self.fidelity is not None and not 0.0 <= self.fidelity <= 1.0:
            raise ValueError(f"fidelity must be in [0, 1], got {self.fidelity}")
        if self.padding not in ("zeros", "edge"):
            raise ValueError(f"padding must be 'zeros' or 'edge', got {self.padding!r}")
        if self.sparsity < 0:
            raise ValueError(f"sparsity must be >= 0, got {self.sparsity}")
        self.check_targeting()


@dataclass
class ShiftChange(ConvChange):
    """A depthwise conv that became a shift: in_features = k² (taps), out_features = C. Per output
    element `removed_taps / C` multiplications go on average (k² per shifted channel, less the
    one of a 1×1 scale that stays); `moved` channels have a non-zero offset."""
    removed_taps: int = 0
    moved: int = 0
    kept_depthwise: int = 0
    # For the calibration on --data (calibrate/spatial_shift.py): the depthwise input and output
    # tensors (names shared by the original and the converted model), the offsets each channel may
    # take (the kernel's taps, [dy, dx]), and, after it ran, its per-layer figures.
    shift_input: str = ""
    output: str = ""
    candidates: list = field(default_factory=list)
    calibration: dict | None = None

    @property
    def macs_removed(self) -> int | None:
        if self.rows is None or self.last is None:
            return None
        return self.rows // self.out_features * self.last * self.removed_taps

    @property
    def bytes_moved(self) -> int | None:
        """Bytes the SpatialShift writes per inference (float32 outputs of its shifted channels,
        each read once from X or written as padding): the data it moves instead of computing."""
        if self.rows is None or self.last is None:
            return None
        return self.rows // self.out_features * self.last * (self.out_features - self.kept_depthwise) * 4

    def figures(self) -> dict:
        """The report's per-layer figures (issue 15 item 4): parameters and multiplications removed
        per inference, channels shifted and moved, bytes moved."""
        shifted = self.out_features - self.kept_depthwise
        return {"channels_shifted": shifted, "channels_moved": self.moved, "channels_kept_depthwise": self.kept_depthwise,
                "params_removed": self.removed_taps,   # k² taps per shifted channel, less a scale that stays
                "macs_removed": self.macs_removed, "bytes_moved": self.bytes_moved}


def depthwise_reason(match: ConvMatch) -> str | None:
    """Why a matched conv cannot become a SpatialShift, or None."""
    c = match.in_channels
    if not (match.group == c == match.weight.shape[0] and c > 1):
        return f"not depthwise (group {match.group}, {c} in, {match.weight.shape[0]} out channels)"
    if len(match.kernel_shape) != 2:
        return f"{len(match.kernel_shape)}-D conv; SpatialShift takes 2-D images"
    for axis in range(2):
        k, d, s = match.kernel_shape[axis], match.dilations[axis], match.strides[axis]
        if match.pads[axis] + match.pads[axis + 2] != d * (k - 1):
            return (f"pads {match.pads} are not 'same' on axis {axis} (pads sum {d * (k - 1)} = dilation·(k − 1) "
                    f"makes the output ceil(H / {s}), SpatialShift's size)")
    return None


def dominant_taps(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per channel of a depthwise weight [C, 1, kh, kw]: the dominant tap's (u, v), its weight,
    and its share of the kernel's energy."""
    flat = weight.reshape(weight.shape[0], -1).astype(np.float64)
    tap = np.abs(flat).argmax(axis=1)
    u, v = np.divmod(tap, weight.shape[3])
    w = flat[np.arange(flat.shape[0]), tap]
    energy = (flat ** 2).sum(axis=1)
    share = np.where(energy > 0, w ** 2 / np.where(energy > 0, energy, 1), 1.0)
    return u, v, w, share


def least_squares_scale(weight: np.ndarray, u: np.ndarray, v: np.ndarray, rho: float) -> np.ndarray:
    """Per channel, argmin_a E[(Σ_k w_k x_k − a·x_tap)²] with E[x_k x_j] = ρ^|k − j|₁ (unit
    variance): a = Σ_k w_k ρ^|k − tap|₁."""
    c, _, kh, kw = weight.shape
    rows, cols = np.arange(kh)[None, :, None], np.arange(kw)[None, None, :]
    dist = np.abs(rows - u[:, None, None]) + np.abs(cols - v[:, None, None])
    return (weight.reshape(c, kh, kw).astype(np.float64) * rho ** dist).sum(axis=(1, 2))


def _const(name: str, value: np.ndarray) -> gs.Constant:
    return gs.Constant(name, np.ascontiguousarray(value))


def _pointwise(graph: gs.Graph, output: gs.Tensor, channels: int) -> tuple[gs.Node, np.ndarray, np.ndarray | None] | None:
    """The 1×1 group-1 Conv reading `output` alone, with its constant weight and bias."""
    node = sole_consumer(graph, output)
    if node is None or node.op != "Conv" or (node.domain or "") not in ("", "ai.onnx") or node.inputs[0] is not output:
        return None
    if claimant(graph, node) is not None or int(node.attrs.get("group", 1)) != 1:
        return None
    opset = graph_opset(graph)
    try:
        w = np.asarray(constant_value(node.inputs[1], opset))
        b = np.asarray(constant_value(node.inputs[2], opset)) if len(node.inputs) > 2 and node.inputs[2].name else None
    except NotConstant:
        return None
    if w.ndim != 4 or w.shape[1] != channels or w.shape[2:] != (1, 1) or not np.issubdtype(w.dtype, np.floating):
        return None
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    if (auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad) not in ("NOTSET", "VALID") \
            or any(node.attrs.get("pads", [0])) or any(s != 1 for s in node.attrs.get("strides", [1, 1])):
        return None
    return node, w, b


@register(NAME, SpatialShiftConfig, "depthwise Conv (BN folded) → SpatialShift + per-channel scale (zero-FLOP shifts)")
def run(graph: gs.Graph, cfg: SpatialShiftConfig) -> PassResult:
    result = PassResult(NAME)
    for node in [n for n in graph.nodes if n.op == "Conv" and (n.domain or "") in ("", "ai.onnx")
                 and claimant(graph, n) is None and int(n.attrs.get("group", 1)) > 1]:
        label = node_label(node)
        reason = exclusion_reason(label, cfg.include, cfg.exclude)
        if reason:
            result.skip(label, reason)
            continue
        match = match_conv(graph, node, cfg.fold_batchnorm)
        if isinstance(match, str):
            result.skip(label, match)
            continue
        reason = depthwise_reason(match)
        if reason:
            result.skip(label, reason)
            continue
        c, (kh, kw) = match.in_channels, match.kernel_shape
        u, v, scale, share = dominant_taps(match.weight)
        if cfg.neighbour_correlation > 0:
            scale = least_squares_scale(match.weight, u, v, cfg.neighbour_correlation)
        shifted = np.ones(c, bool) if cfg.fidelity is None else share >= cfg.fidelity
        chosen = [int(i) for i in cfg.keep_channels.get(label, []) if 0 <= int(i) < c]
        shifted[chosen] = False
        if not shifted.any():
            result.skip(label, f"no channel's dominant tap holds {cfg.fidelity:.0%} of its kernel's energy "
                               f"(best {share.max():.0%}); stays depthwise" if not chosen else
                               "every channel kept depthwise (keep_channels: the data's choice)")
            continue
        offsets = np.stack([u * match.dilations[0] - match.pads[0], v * match.dilations[1] - match.pads[1]], 1)
        offsets = offsets.astype(np.int64)
        bias = np.zeros(c) if match.bias is None else np.asarray(match.bias, np.float64)
        attrs = {"strides": list(match.strides)}
        if cfg.padding != "zeros":
            attrs["padding"] = cfg.padding
        if cfg.sparsity:
            attrs["sparsity"] = float(cfg.sparsity)
        x, out = match.activation, match.output
        conv_out = node.outputs[0].name     # [N, C, OH, OW] in the original model: the report's rows
        new_nodes: list[gs.Node] = []
        idx = np.flatnonzero(shifted)
        keep = np.flatnonzero(~shifted)
        pw = _pointwise(graph, out, c) if cfg.fold_pointwise and not keep.size else None
        src = x
        if keep.size:
            src = gs.Variable(f"{label}.shift_in", np.float32)
            new_nodes.append(gs.Node("Gather", f"{label}.shift_channels", {"axis": 1},
                                     [x, _const(f"{label}.shift_index", idx.astype(np.int64))], [src]))
        moved_out = gs.Variable(f"{label}.shifted", np.float32)
        new_nodes.append(gs.Node(OP, label, attrs, [src, _const(f"{label}.offsets", offsets[idx])], [moved_out],
                                 domain=DOMAIN))
        if pw is not None:
            pw_node, w, b = pw
            w64 = w.astype(np.float64)
            new_b = (np.zeros(w.shape[0]) if b is None else b.astype(np.float64)) + w64[:, :, 0, 0] @ bias
            pw_node.inputs[1] = _const(f"{node_label(pw_node)}.weight_scaled", (w64 * scale.reshape(1, -1, 1, 1)).astype(w.dtype))
            bias_const = _const(f"{node_label(pw_node)}.bias_shifted", new_b.astype(w.dtype))
            if len(pw_node.inputs) > 2:
                pw_node.inputs[2] = bias_const
            else:
                pw_node.inputs.append(bias_const)
            pw_node.inputs[0] = moved_out
            mults_left = 0
        else:
            # a 1×1 depthwise Conv: ORT fuses the Relu/Clip after it, shift-conv may take it (w = ±2^p)
            last = gs.Variable(f"{label}.scaled", np.float32)
            new_nodes.append(gs.Node("Conv", f"{label}.scale", {"kernel_shape": [1, 1], "group": int(idx.size)}, [
                moved_out, _const(f"{label}.scale_c", scale[idx].astype(np.float32).reshape(-1, 1, 1, 1)),
                _const(f"{label}.bias_c", bias[idx].astype(np.float32))], [last]))
            if keep.size:
                kept_in, kept_out = gs.Variable(f"{label}.kept_in", np.float32), gs.Variable(f"{label}.kept", np.float32)
                new_nodes.append(gs.Node("Gather", f"{label}.kept_channels", {"axis": 1},
                                         [x, _const(f"{label}.kept_index", keep.astype(np.int64))], [kept_in]))
                conv_attrs = {"kernel_shape": [kh, kw], "strides": match.strides, "pads": match.pads,
                              "dilations": match.dilations, "group": int(keep.size)}
                new_nodes.append(gs.Node("Conv", f"{label}.kept_depthwise", conv_attrs, [
                    kept_in, _const(f"{label}.kept_weight", match.weight[keep].astype(np.float32)),
                    _const(f"{label}.kept_bias", bias[keep].astype(np.float32))], [kept_out]))
                joined = gs.Variable(f"{label}.joined", np.float32)
                new_nodes.append(gs.Node("Concat", f"{label}.join", {"axis": 1}, [last, kept_out], [joined]))
                order = np.argsort(np.concatenate([idx, keep])).astype(np.int64)
                new_nodes.append(gs.Node("Gather", f"{label}.reorder", {"axis": 1},
                                         [joined, _const(f"{label}.order", order)], [out]))
            else:
                new_nodes[-1].outputs = [out]
            mults_left = 1
        for old in match.nodes:
            old.outputs.clear()
        graph.nodes.extend(new_nodes)
        k = kh * kw
        moved = int((offsets[idx] != 0).any(axis=1).sum())
        before = match.weight.size * match.weight_itemsize + (0 if match.bias is None else c * 4)
        after = idx.size * 2 * 8 + (0 if pw is not None else idx.size * 8) + keep.size * (k + 1) * 4
        result.changes.append(ShiftChange(
            NAME, label, OP, k, c, before, after, activation=conv_out,
            last=_last(match.output),
            detail=f"depthwise {kh}×{kw}, stride {'×'.join(map(str, match.strides))}"
                   + "".join(f" + {f}" for f in match.folded if f != "Pad")
                   + f": {idx.size}/{c} channels shifted ({moved} moved, {idx.size - moved} offset 0)"
                   + (f", {keep.size} kept depthwise ("
                      + (f"dominant tap < {cfg.fidelity:.0%} of the energy" if cfg.fidelity is not None else "")
                      + (", " if cfg.fidelity is not None and chosen else "")
                      + (f"{len(chosen)} chosen on data" if chosen else "") + ")" if keep.size else "")
                   + (f"; scale folded into {node_label(pw[0])}" if pw is not None else
                      "; per-channel scale left as a 1×1 depthwise Conv (no pointwise conv reads it alone)")
                   + f"; energy kept {float((scale[idx] ** 2).sum() / max((match.weight.astype(np.float64) ** 2)[idx].sum(), 1e-300)):.0%}",
            removed_taps=int(idx.size * (k - mults_left)), moved=moved, kept_depthwise=int(keep.size),
            shift_input=x.name, output=out.name,
            candidates=[[int(a * match.dilations[0] - match.pads[0]), int(b * match.dilations[1] - match.pads[1])]
                        for a in range(kh) for b in range(kw)]))
    graph.cleanup().toposort()
    return result


def _last(tensor: gs.Tensor) -> int | None:
    dims = None if tensor.shape is None else list(tensor.shape)
    return int(dims[-1]) if dims and isinstance(dims[-1], (int, np.integer)) and dims[-1] >= 0 else None
