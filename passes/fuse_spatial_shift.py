"""Fusion step `fuse-spatial-shift`, run last in the conversion pipeline (convert/pipeline.py),
after the calibration on --data, which reads the unfused form: a SpatialShift whose output only a
per-channel 1×1 Conv reads (the scale and bias the spatial-shift pass leaves when a ReLU6 sits
before the pointwise conv), and that Conv's sole Relu or Clip, become one SpatialShift with the
scale and bias as its inputs 2 and 3 and the activation as its attributes (docs/ops.md#spatialshift):
one pass over the data instead of three ops, and two intermediate tensors fewer.

y = clip(s_c·x + b_c) in float32 (two roundings; ORT's Conv may compute s·x + b with one fused
multiply-add, so the fused model can differ from the unfused one in the last bit of an element).
A Conv that is not float32 1×1, stride 1, unpadded, group = C with constant weight [C, 1, 1, 1]
and bias [C], a SpatialShift that already has a tail, or an intermediate tensor that is a graph
output or read twice, is left as it is.

Then the read-through (read_through_shift_convs; docs/ops.md#input-shift-read-through): a
SpatialShift (fused tail included) whose output only one 2-D ShiftConv reads, as its X, and that
is no graph output nor read by a subgraph, becomes that ShiftConv's input shift — its offsets,
scale and bias as the ShiftConv's inputs 4-6, its attributes as shift_* — so the shifted tensor
is never written: ShiftConv(X, …, shift_…) is ShiftConv(SpatialShift(X, …), …) bit for bit. A
ShiftConv that already reads through a shift is left as it is.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

from mfconvert.ort_ops import DOMAIN
from mfconvert.passes.cost import constant_array, initializers, node_attrs

NAME = "fuse-spatial-shift"
SHIFT_ATTRIBUTES = ("strides", "padding", "channel_shift", "activation", "clip_min", "clip_max", "sparsity")


def _scale_conv(node: onnx.NodeProto, constants: dict) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(scale [C], bias [C] or None) of a per-channel 1×1 Conv, else None."""
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return None
    a = node_attrs(node)
    auto_pad = a.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    w = constant_array(constants, node.input[1])
    b = constant_array(constants, node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if w is None or w.dtype != np.float32 or w.ndim != 4 or w.shape[1:] != (1, 1, 1):
        return None
    c = w.shape[0]
    if int(a.get("group", 1)) != c or list(a.get("kernel_shape", [1, 1])) != [1, 1] or auto_pad not in ("NOTSET", "VALID") \
            or any(a.get("pads", [0])) or any(s != 1 for s in a.get("strides", [1])) \
            or any(d != 1 for d in a.get("dilations", [1])):
        return None
    if len(node.input) > 2 and node.input[2] and (b is None or b.dtype != np.float32 or b.shape != (c,)):
        return None
    return w.reshape(c), b


def _activation(node: onnx.NodeProto, constants: dict, opset: int) -> dict | None:
    """SpatialShift's activation attributes for a Relu or a Clip with constant bounds, else None."""
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Relu":
        return {"activation": "Relu"}
    if node.op_type != "Clip":
        return None
    if opset < 11:
        a = node_attrs(node)
        lo, hi = a.get("min", -math.inf), a.get("max", math.inf)
    else:
        bounds = []
        for i, default in ((1, -math.inf), (2, math.inf)):
            if len(node.input) > i and node.input[i]:
                v = constant_array(constants, node.input[i])
                if v is None or v.size != 1 or v.dtype != np.float32:
                    return None
                bounds.append(float(v.reshape(-1)[0]))
            else:
                bounds.append(default)
        lo, hi = bounds
    if math.isnan(lo) or math.isnan(hi) or lo > hi:
        return None
    return {"activation": "Clip", "clip_min": float(lo), "clip_max": float(hi)}


def _subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name the subgraphs of `graph`'s nodes read (outer-scope reads included)."""
    found: set[str] = set()
    for node in graph.node:
        for a in node.attribute:
            subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
            for sub in subs:
                found.update(i for n in sub.node for i in n.input)
                found.update(o.name for o in sub.output)
                found |= _subgraph_reads(sub)
    return found


def _fresh(name: str, taken: set[str]) -> str:
    """`name`, or `name`.1, .2, … where it is taken; recorded as taken."""
    out, k = name, 0
    while out in taken:
        k += 1
        out = f"{name}.{k}"
    taken.add(out)
    return out


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def fuse_spatial_shifts(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of `model` with each SpatialShift → 1×1 per-channel Conv [→ Relu/Clip] chain fused
    (module docstring); the report's line (none when nothing was fused)."""
    if not any(n.op_type == "SpatialShift" and n.domain == DOMAIN for n in model.graph.node):
        return model, []
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    constants = initializers(out)
    opset = _opset(out)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in g.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    # a tensor a subgraph (If/Loop/Scan body) reads from the outer scope is read there too
    graph_outputs = {o.name for o in g.output} | _subgraph_reads(g)
    taken = {t.name for t in g.initializer} | {o for n in g.node for o in n.output} | {i.name for i in g.input}

    def sole_reader(tensor: str) -> onnx.NodeProto | None:
        r = readers.get(tensor, [])
        return r[0] if len(r) == 1 and tensor not in graph_outputs else None

    drop: set[tuple[str, str]] = set()   # (op, first output) of the nodes fused away
    orphaned: set[str] = set()           # their constant inputs (a Constant node's output then unread goes too)
    new_inits = []
    fused = with_act = 0
    for node in g.node:
        if node.op_type != "SpatialShift" or node.domain != DOMAIN or len([i for i in node.input if i]) > 2 \
                or any(a.name in ("activation", "clip_min", "clip_max") for a in node.attribute):
            continue
        conv = sole_reader(node.output[0])
        tail = _scale_conv(conv, constants) if conv is not None and conv.input[0] == node.output[0] else None
        if tail is None:
            continue
        scale, bias = tail
        act_node = sole_reader(conv.output[0])
        act = _activation(act_node, constants, opset) if act_node is not None else None
        if act is not None and act_node.input[0] != conv.output[0]:
            act = None
        last = act_node if act is not None else conv
        names = [_fresh(f"{node.name or node.output[0]}.{what}", taken) for what in ("scale", "bias")]
        new_inits.append(numpy_helper.from_array(np.ascontiguousarray(scale, np.float32), names[0]))
        inputs = [node.input[0], node.input[1], names[0]]
        if bias is not None:
            new_inits.append(numpy_helper.from_array(np.ascontiguousarray(bias, np.float32), names[1]))
            inputs.append(names[1])
        del node.input[:]
        node.input.extend(inputs)
        if act is not None:
            node.attribute.extend(helper.make_attribute(k, v) for k, v in act.items())
            with_act += 1
        node.output[0] = last.output[0]
        for n in (conv, act_node if act is not None else None):
            if n is not None:
                drop.add((n.op_type, n.output[0]))
                orphaned.update(n.input[1:])
        fused += 1
    if not fused:
        return model, []
    kept = [n for n in g.node if (n.op_type, n.output[0] if n.output else "") not in drop]
    used = {i for n in kept for i in n.input} | graph_outputs
    kept = [n for n in kept if not (n.op_type == "Constant" and n.output[0] in orphaned and n.output[0] not in used)]
    del g.node[:]
    g.node.extend(kept)
    g.initializer.extend(new_inits)
    kept_inits = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(kept_inits)
    _drop_dead_value_info(g)
    return out, [f"{NAME}: {fused} SpatialShift → per-channel 1×1 Conv chain(s) fused ({with_act} with their "
                 "Relu/Clip): scale, bias and activation in the shift's single pass"]


def _drop_dead_value_info(g: onnx.GraphProto) -> None:
    """Removes the value_info of tensors no node, graph input or initializer produces any more."""
    live = {o for n in g.node for o in n.output} | {i.name for i in g.input} | {t.name for t in g.initializer}
    kept_info = [v for v in g.value_info if v.name in live]
    del g.value_info[:]
    g.value_info.extend(kept_info)


def read_through_shift_convs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of `model` with each SpatialShift that only a ShiftConv's X reads folded into that
    ShiftConv (module docstring); the report's line naming the folded nodes (none when nothing
    was folded)."""
    shifts = [n for n in model.graph.node if n.op_type == "SpatialShift" and n.domain == DOMAIN]
    if not shifts or not any(n.op_type == "ShiftConv" and n.domain == DOMAIN for n in model.graph.node):
        return model, []
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in g.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in g.output} | _subgraph_reads(g) | {v.name for v in g.input}
    folded: list[tuple[str, str]] = []
    drop: set[int] = set()
    for i, node in enumerate(g.node):
        if node.op_type != "SpatialShift" or node.domain != DOMAIN or len(node.input) < 2 or not node.input[1]:
            continue
        y = node.output[0]
        r = readers.get(y, [])
        if len(r) != 1 or y in graph_outputs:
            continue
        conv = r[0]
        if conv.op_type != "ShiftConv" or conv.domain != DOMAIN or conv.input[0] != y \
                or any(name == y for name in conv.input[1:]) or any(conv.input[4:]) \
                or len(node_attrs(conv).get("kernel_shape", [])) != 2 \
                or any(a.name.startswith("shift_") for a in conv.attribute):
            continue
        shift_inputs = list(node.input[1:4])
        inputs = list(conv.input[:4]) + [""] * (4 - len(conv.input[:4])) + shift_inputs
        while inputs and not inputs[-1]:
            inputs.pop()
        del conv.input[:]
        conv.input.extend([node.input[0], *inputs[1:]])
        for a in node.attribute:
            if a.name in SHIFT_ATTRIBUTES:
                b = onnx.AttributeProto()
                b.CopyFrom(a)
                b.name = "shift_" + a.name
                conv.attribute.append(b)
        drop.add(i)
        folded.append((node.name or y, conv.name or conv.output[0]))
    if not folded:
        return model, []
    kept = [n for i, n in enumerate(g.node) if i not in drop]
    del g.node[:]
    g.node.extend(kept)
    _drop_dead_value_info(g)
    names = ", ".join(f"{s} → {c}" for s, c in folded[:6]) + (f", … ({len(folded) - 6} more)" if len(folded) > 6 else "")
    return out, [f"{NAME}: {len(folded)} SpatialShift(s) read through by the ShiftConv after them (its input shift; "
                 f"the shifted tensor is never written): {names}"]


def fuse_into(result, read_through: bool = False) -> list[str]:
    """The pipeline's hook: fuses result.model (a ConversionResult) in place; the report's lines.
    read_through=True also folds each SpatialShift only a ShiftConv reads into it (PipelineOptions.read_through;
    off by default: no end-to-end gain measured)."""
    result.model, lines = fuse_spatial_shifts(result.model)
    if read_through:
        result.model, more = read_through_shift_convs(result.model)
        lines += more
    return lines
