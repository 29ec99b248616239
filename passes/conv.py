"""Pass `shift-conv`: convolutions (Conv with a constant weight) become ShiftConv ops whose weights
are signed powers of two (DeepShift's shift convolutions; docs/ops.md#shiftconv).

Before rounding, a BatchNormalization reading the conv's output alone is folded into its weight and
bias, a constant per-channel Add after it becomes its bias, a zero-valued constant Pad before it
(TF-style explicit padding) is absorbed into its pads, and auto_pad is resolved into explicit pads.
The weight [M, C/group, k...] is rounded as the matrix [M, C/group·prod(k)] (conv_weight_matrix),
so everything ShiftLinear does to a weight — channel exponents, codes, terms, their checks — holds.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import onnx_graphsurgeon as gs

from mfconvert.nn import pow2
from mfconvert.ort_ops import DOMAIN
from mfconvert.passes.graph import (NotConstant, claimant, constant_value, dequantised_from, graph_opset,
                                    node_label, sole_consumer, tensor_dtype)
from mfconvert.passes.linear import shift_linear_node, weight_warnings
from mfconvert.passes.registry import register
from mfconvert.passes.report import LayerChange, PassResult
from mfconvert.passes.shift_format import ShiftFormat
from mfconvert.passes.targeting import Targeting, exclusion_reason

NAME = "shift-conv"
OP = "ShiftConv"


@dataclass
class ShiftConvConfig(ShiftFormat, Targeting):
    """The ShiftConv format (the ShiftLinear one: weight_bits, act_bits, act_frac_bits,
    weight_scale, terms) and which convolutions to convert (include/exclude: Targeting)."""
    # Every conv by default: a CNN's stem (3·32·9 = 864 weights) and its depthwise convs (C·9) are
    # small but run at the largest resolutions.
    min_params: int = 0
    # Fractional bits per activation tensor name, from calibration (like ShiftLinearConfig's).
    act_frac_bits_by_input: dict[str, int] = field(default_factory=dict)
    fold_batchnorm: bool = True
    # A Relu or a constant Clip (ReLU6) reading the conv alone runs inside the op (docs/ops.md,
    # fused activation): one pass over the output fewer.
    fuse_activation: bool = True

    def __post_init__(self):
        super().__post_init__()
        for frac_bits in self.act_frac_bits_by_input.values():
            pow2.check_format(self.weight_bits, self.act_bits, frac_bits)
        self.check_targeting()


@dataclass
class ConvChange(LayerChange):
    """A converted conv: in_features = C/group·prod(k) (one output's taps), out_features = M.
    `activation` names its output [N, M, …, W]; `rows` (set by convert_onnx) is then N·M·(spatial
    dims but the last), so the multiplications removed are rows · last · in_features, with `last`
    the output's last spatial dim."""
    last: int | None = None

    @property
    def macs_removed(self) -> int | None:
        if self.rows is None or self.last is None:
            return None
        return self.rows * self.last * self.in_features


@dataclass
class ConvMatch:
    """A convolution found in the graph, with what folds into it."""
    nodes: list[gs.Node]            # Conv [, BatchNormalization] [, Add]: the nodes the rewrite replaces
    activation: gs.Tensor           # the conv's input (before an absorbed Pad)
    output: gs.Tensor
    weight: np.ndarray              # [M, C/group, k...], BN folded in, float32 or float64
    bias: np.ndarray | None         # [M]
    in_channels: int
    kernel_shape: list[int]
    strides: list[int]
    pads: list[int]                 # [begin..., end...], auto_pad and an absorbed Pad included
    dilations: list[int]
    group: int
    folded: list[str] = field(default_factory=list)   # what was folded, for the report
    dequantised: str | None = None
    weight_itemsize: int = 4

    @property
    def matrix(self) -> np.ndarray:
        return conv_weight_matrix(self.weight)


def conv_weight_matrix(weight: np.ndarray) -> np.ndarray:
    """A conv weight [M, C/group, k...] as the matrix [M, C/group·prod(k)] that ShiftConv rounds
    row by row (the layout of its codes): the adapter for passes that treat shift weights as
    [out, in] matrices (per-layer term allocation, weight checks)."""
    return np.ascontiguousarray(weight.reshape(weight.shape[0], -1))


def _ints(node: gs.Node, name: str, default):
    value = node.attrs.get(name)
    return default if value is None else [int(v) for v in value]


def _dims(tensor: gs.Tensor) -> list | None:
    return None if tensor.shape is None else list(tensor.shape)


def _same_pads(auto_pad: str, sizes: list, kernel: list[int], strides: list[int], dilations: list[int]) -> list[int]:
    """Explicit pads for SAME_UPPER/SAME_LOWER (ONNX Conv: output = ceil(in / stride), the odd
    pad at the end for SAME_UPPER, at the beginning for SAME_LOWER)."""
    begin, end = [], []
    for size, k, s, d in zip(sizes, kernel, strides, dilations):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small = total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else total - small)
        end.append(total - begin[-1])
    return begin + end


def _absorbable_pad(pad: gs.Node, rank: int, opset: int) -> list[int] | str:
    """The spatial pads [begin..., end...] of a constant zero Pad on a [N, C, spatial…] tensor,
    or why it cannot be absorbed."""
    mode = pad.attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "constant":
        return f"the Pad before it is in mode '{mode}' (only zero padding folds into a conv)"
    try:
        if opset < 11 or "pads" in pad.attrs:
            pads = [int(v) for v in pad.attrs.get("pads", [])]
            value = float(pad.attrs.get("value", 0.0))
        else:
            pads = [int(v) for v in constant_value(pad.inputs[1], opset).reshape(-1)]
            value = 0.0
            if len(pad.inputs) > 2 and pad.inputs[2].name:
                value = float(np.asarray(constant_value(pad.inputs[2], opset)).reshape(-1)[0])
            if len(pad.inputs) > 3 and pad.inputs[3].name:
                axes = [int(a) % rank for a in constant_value(pad.inputs[3], opset).reshape(-1)]
                full = [0] * (2 * rank)
                for i, a in enumerate(axes):
                    full[a], full[rank + a] = pads[i], pads[len(axes) + i]
                pads = full
    except NotConstant as err:
        return f"the Pad before it has non-constant pads ({err})"
    if value != 0.0:
        return f"the Pad before it pads with {value}, not 0"
    if len(pads) != 2 * rank or any(p < 0 for p in pads) or pads[0] or pads[1] or pads[rank] or pads[rank + 1]:
        return f"the Pad before it has pads {pads} (only non-negative spatial pads fold into a conv)"
    return pads[2:rank] + pads[rank + 2:]


def match_conv(graph: gs.Graph, node: gs.Node, fold_batchnorm: bool = True) -> ConvMatch | str:
    """Pattern and check: the convolution at a Conv node with what folds into it, or why it is
    not one ShiftConv can replace."""
    opset = graph_opset(graph)
    x, w_tensor = node.inputs[0], node.inputs[1]
    if isinstance(x, gs.Constant):
        return "activation input is constant (fold the graph instead)"
    try:
        w = constant_value(w_tensor, opset)
    except NotConstant as err:
        return f"no constant weight: {err}"
    if not np.issubdtype(w.dtype, np.floating):
        return f"weight dtype {w.dtype} is not floating point"
    if w.ndim not in (3, 4):
        return f"{w.ndim - 2}-D convolution (weight of rank {w.ndim}); ShiftConv takes 1-D and 2-D"
    x_dtype = tensor_dtype(x)
    if x_dtype is not None and x_dtype != np.float32:
        return f"activation dtype {np.dtype(x_dtype).name}; ShiftConv takes float32"
    spatial = w.ndim - 2
    kernel = _ints(node, "kernel_shape", list(w.shape[2:]))
    if kernel != list(w.shape[2:]):
        return f"kernel_shape {kernel} does not match the weight's {list(w.shape[2:])}"
    strides = _ints(node, "strides", [1] * spatial)
    dilations = _ints(node, "dilations", [1] * spatial)
    group = int(node.attrs.get("group", 1))
    m = w.shape[0]
    if group < 1 or m % group:
        return f"group {group} does not divide the {m} output channels"
    in_channels = w.shape[1] * group
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad == "NOTSET":
        pads = _ints(node, "pads", [0] * (2 * spatial))
    elif auto_pad == "VALID":
        pads = [0] * (2 * spatial)
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        dims = _dims(x)
        sizes = dims[2:] if dims is not None and len(dims) == spatial + 2 else None
        if sizes is None or not all(isinstance(s, (int, np.integer)) and s > 0 for s in sizes):
            return f"auto_pad {auto_pad} with input spatial dims unknown ({dims}); the pads depend on them"
        pads = _same_pads(auto_pad, [int(s) for s in sizes], kernel, strides, dilations)
    else:
        return f"auto_pad '{auto_pad}' is not an ONNX value"
    folded = []
    # A TF-style explicit Pad: the conv reads the Pad's input and pads itself (the Pad stays for
    # any other reader); SAME pads above were computed on the padded size, so they add.
    producer = x.inputs[0] if x.inputs else None
    if producer is not None and producer.op == "Pad" and (producer.domain or "") in ("", "ai.onnx"):
        extra = _absorbable_pad(producer, spatial + 2, opset)
        if isinstance(extra, list):
            pads = [a + b for a, b in zip(pads, extra)]
            x = producer.inputs[0]
            folded.append("Pad")
    bias = None
    if len(node.inputs) > 2 and node.inputs[2].name:
        try:
            bias = np.asarray(constant_value(node.inputs[2], opset), dtype=np.float64).reshape(-1)
        except NotConstant as err:
            return f"bias is not constant: {err}"
        if bias.size != m:
            return f"bias of {bias.size} values for {m} output channels"
    nodes, output = [node], node.outputs[0]
    weight = np.asarray(w)
    if fold_batchnorm:
        bn = sole_consumer(graph, output)
        if bn is not None and bn.op == "BatchNormalization" and (bn.domain or "") in ("", "ai.onnx") \
                and not int(bn.attrs.get("training_mode", 0)) and all(not o.outputs for o in bn.outputs[1:]):
            try:
                scale, beta, mean, var = (np.asarray(constant_value(t, opset), np.float64).reshape(-1)
                                          for t in bn.inputs[1:5])
            except NotConstant:
                scale = None
            if scale is not None and all(v.size == m for v in (scale, beta, mean, var)):
                # y = (conv + b − mean)·s + β with s = γ / √(var + ε), per output channel.
                s = scale / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
                weight = weight.astype(np.float64) * s.reshape(-1, *[1] * (w.ndim - 1))
                bias = ((bias if bias is not None else 0.0) - mean) * s + beta
                nodes.append(bn)
                output = bn.outputs[0]
                folded.append("BatchNormalization")
    add = sole_consumer(graph, output)
    if add is not None and add.op == "Add" and (add.domain or "") in ("", "ai.onnx"):
        other = add.inputs[1] if add.inputs[0] is output else add.inputs[0]
        try:
            b = np.asarray(constant_value(other, opset), np.float64)
        except NotConstant:
            b = None
        # per channel: [M, 1, …] or [1, M, 1, …], not broadcasting the output to a higher rank
        if b is not None and b.ndim in (spatial + 1, spatial + 2) and b.shape[-spatial - 1] == m \
                and all(d == 1 for d in b.shape[-spatial:]) and (b.ndim == spatial + 1 or b.shape[0] == 1):
            bias = (bias if bias is not None else 0.0) + b.reshape(-1)
            nodes.append(add)
            output = add.outputs[0]
            folded.append("bias Add")
    if not np.isfinite(weight).all():
        return "weight has NaN or Inf values (after folding)" if folded else "weight has NaN or Inf values"
    stored = dequantised_from(w_tensor)
    return ConvMatch(nodes, x, output, weight, bias, in_channels, kernel, strides, pads, dilations, group, folded,
                     *(stored or (None, 4)))


def shift_conv_node(name: str, match: ConvMatch, cfg) -> tuple[gs.Node, int]:
    """The ShiftConv node for a matched conv, its weight matrix rounded to codes in the format of
    `cfg` (ShiftLinear's: passes/linear.py), and the bytes its constants take."""
    matrix = match.matrix
    linear, nbytes = shift_linear_node(name, match.activation, match.output, matrix, match.bias, cfg)
    linear.outputs.clear()
    attrs = {"out_channels": matrix.shape[0], "kernel_shape": match.kernel_shape, "strides": match.strides,
             "pads": match.pads, "dilations": match.dilations, "group": match.group,
             "weight_bits": cfg.weight_bits, "act_bits": cfg.act_bits, "act_frac_bits": cfg.act_frac_bits}
    terms = getattr(cfg, "terms", 1)
    if terms > 1:
        attrs["terms"] = terms
    node = gs.Node(op=OP, name=name, domain=DOMAIN, inputs=list(linear.inputs), outputs=[match.output], attrs=attrs)
    linear.inputs.clear()
    return node, nbytes


def fusable_activation(graph: gs.Graph, output: gs.Tensor) -> tuple[gs.Node, dict] | None:
    """(node, attributes) when `output`'s only reader is a Relu or a Clip with constant bounds
    (ShiftConv's fused activation), else None."""
    node = sole_consumer(graph, output)
    if node is None or (node.domain or "") not in ("", "ai.onnx") or len(node.outputs) != 1:
        return None
    if node.op == "Relu":
        return node, {"activation": "Relu"}
    if node.op != "Clip":
        return None
    opset = graph_opset(graph)
    bounds = [float(node.attrs.get("min", -np.inf)), float(node.attrs.get("max", np.inf))]
    for index in (1, 2):
        if len(node.inputs) > index and node.inputs[index].name:
            try:
                value = np.asarray(constant_value(node.inputs[index], opset), np.float64)
            except NotConstant:
                return None
            if value.size != 1:
                return None
            bounds[index - 1] = float(value.reshape(-1)[0])
    if np.isnan(bounds).any() or bounds[0] > bounds[1]:
        return None
    return node, {"activation": "Clip", "clip_min": bounds[0], "clip_max": bounds[1]}


def _last_dim(tensor: gs.Tensor) -> int | None:
    dims = _dims(tensor)
    return int(dims[-1]) if dims and isinstance(dims[-1], (int, np.integer)) and dims[-1] >= 0 else None


def shift_scale_reason(node: gs.Node) -> str | None:
    """Why a conv pass leaves `node`, if it is the per-channel 1×1 Conv (group = C, weight
    [C, 1, 1, 1]) right after a SpatialShift: the shift's scale, kept float32 so that the pipeline's
    last step (passes/fuse_spatial_shift.py) folds it, and its Relu/Clip, into the shift's single
    pass; as a ShiftConv it would be a second pass with a power-of-two scale, and as an AdderConv
    not a scale at all."""
    x = node.inputs[0] if node.inputs else None
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if x is None or len(x.inputs) != 1 or not isinstance(w, gs.Constant):
        return None
    shift = x.inputs[0]
    if shift.op != "SpatialShift" or (shift.domain or "") != DOMAIN:
        return None
    shape = tuple(w.shape)
    if len(shape) != 4 or shape[1:] != (1, 1, 1) or int(node.attrs.get("group", 1)) != shape[0]:
        return None
    return (f"the per-channel scale of SpatialShift {node_label(shift)!r}: kept float32 for fuse-spatial-shift, "
            "which makes it, and its Relu/Clip, part of the shift's single pass (docs/ops.md#spatialshift)")


@register(NAME, ShiftConvConfig, "Conv with constant weights (BN, bias Add and Pad folded) → ShiftConv (w = ±2^p)")
def run(graph: gs.Graph, cfg: ShiftConvConfig) -> PassResult:
    result = PassResult(NAME)
    for node in [n for n in graph.nodes if (n.domain or "") in ("", "ai.onnx") and claimant(graph, n) is None
                 and n.op in ("Conv", "ConvInteger", "QLinearConv")]:
        label = node_label(node)
        if node.op != "Conv":
            result.skip(label, f"{node.op} convolves integer activations; ShiftConv takes and gives float32, "
                               "so it is left as it is (a QDQ model's DequantizeLinear → Conv converts)")
            continue
        reason = exclusion_reason(label, cfg.include, cfg.exclude) or shift_scale_reason(node)
        if reason:
            result.skip(label, reason)
            continue
        match = match_conv(graph, node, cfg.fold_batchnorm)
        if isinstance(match, str):
            result.skip(label, match)
            continue
        matrix = match.matrix
        if matrix.size < cfg.min_params:
            result.skip(label, f"tiny conv: {matrix.size} weights < min_params={cfg.min_params}")
            continue
        frac_bits = cfg.act_frac_bits_by_input.get(match.activation.name, cfg.act_frac_bits)
        terms = cfg.terms_for(label) if hasattr(cfg, "terms_for") else cfg.terms   # per-layer allocation
        layer_cfg = replace(cfg, act_frac_bits=frac_bits, terms=terms)
        fused = fusable_activation(graph, match.output) if cfg.fuse_activation else None
        if fused is not None:
            match.nodes.append(fused[0])
            match.output = fused[0].outputs[0]
        new, nbytes = shift_conv_node(label, match, layer_cfg)
        if fused is not None:
            new.attrs.update(fused[1])
            match.folded.append(fused[0].op)
        warnings = weight_warnings(label, matrix, new.inputs[2].values, layer_cfg)
        for old in match.nodes:
            old.outputs.clear()
        graph.nodes.append(new)
        m, k = matrix.shape
        before = m * k * match.weight_itemsize + (0 if match.bias is None else m * 4)
        shape = "×".join(map(str, match.kernel_shape))
        kind = "depthwise " if match.group == match.in_channels == m and match.group > 1 else \
            (f"group {match.group}, " if match.group > 1 else "")
        result.changes.append(ConvChange(
            NAME, label, OP, k, m, before, nbytes, activation=match.output.name, last=_last_dim(match.output),
            detail=f"{kind}{shape} conv, stride {'×'.join(map(str, match.strides))}"
                   + "".join(f" + {f}" for f in match.folded if f not in ("Pad", "Relu", "Clip"))
                   + "".join(f", {f} fused" for f in match.folded if f in ("Relu", "Clip"))
                   + (", Pad absorbed" if "Pad" in match.folded else "")
                   + f", {cfg.weight_bits}-bit codes" + (f" × {terms} terms" if terms > 1 else "")
                   + (f"; weights dequantised from {match.dequantised}" if match.dequantised else ""),
            warnings=warnings))
    graph.cleanup().toposort()
    return result



def conv_latent_weights(student, teacher) -> dict[str, np.ndarray]:
    """{ShiftConv node name: float weight [M, C/g·prod(k)]} of `student` (onnx.ModelProto): the
    teacher's conv of the same name with what the pass folds into it (BatchNormalization), the
    weights shift layers start from (compensated rounding, finetuning, per-layer terms)."""
    names = {n.name for n in student.graph.node if n.op_type == OP and n.domain == DOMAIN}
    graph = gs.import_onnx(teacher)
    weights = {}
    for node in graph.nodes:
        if node.op == "Conv" and node_label(node) in names:
            match = match_conv(graph, node)
            if not isinstance(match, str):
                weights[node_label(node)] = match.matrix
    return weights
