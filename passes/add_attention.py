"""Pass `add-attention`: the core of multi-head self-attention (from the Q/K/V projection outputs
to the output projection's input: head split, scale, mask, Softmax, the two MatMuls, head merge)
becomes one AddLinearAttention op (docs/ops.md#addlinearattention). The projections stay linear
layers for the shift-linear pass.

Matched by meaning (docs/ops.md, "The pass"): every Softmax whose input is Q·Kᵀ [× / ÷ scale]
[+ mask] and whose output feeds MatMul(·, V); each of Q, K, V is traced back through layout ops
(Transpose, Reshape, Squeeze/Unsqueeze, Gather/Split/Slice of a fused qkv, positive scalar
scales, activation fake quantisation) with labelled axes to a projection output in [B, T, C],
[T, B, C] or flattened [B·T, C] layout (C or a fused 3C); the mask is per key, or query × key
built from per-key and per-query factors (the kernel checks its rows); the context merges back
through Transpose + Reshape; no intermediate tensor is read elsewhere. Fused ops (ONNX
Attention-23, com.microsoft Attention / MultiHeadAttention) are rewritten from their inputs. A miss
is a MatchResult (passes/match.py) with the reason and the node; the report shows it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from mfconvert.ort_ops import DOMAIN
from mfconvert.passes.match import MatchResult, Miss, failed, fake_quant_source, fake_quant_user, matched
from mfconvert.passes.graph import (NotConstant, constant_value, graph_opset, is_graph_output, node_label,
                                    tensor_dtype)
from mfconvert.passes.registry import register
from mfconvert.passes.report import LayerChange, PassResult
from mfconvert.passes.targeting import Targeting, exclusion_reason

NAME = "add-attention"
OP = "AddLinearAttention"


@dataclass
class AddAttentionConfig(Targeting):
    binarizer: str = "sign"

    def __post_init__(self):
        if self.binarizer != "sign":
            raise ValueError(f"binarizer must be 'sign' for the ONNX pass (got {self.binarizer!r}); the "
                             "'ksh' hash is fitted on data by mfconvert.nn.AddLinearAttention")
        self.check_targeting()


NoMatch = Miss   # the subgraph is not an attention core we can rewrite; the message is the reason

# ---------------------------------------------------------------------------------------------
# Tracing a head-layout tensor back to its [B, T, C] source. Axis labels are strings; a merged
# axis is labels joined by "*" ("H*D" is the channel axis of a projection output).
def _dims(t: gs.Tensor) -> list | None:
    return None if t.shape is None else list(t.shape)


def _reshape_target(node: gs.Node, opset: int) -> list | None:
    """The Reshape's target shape, with None for entries computed at run time (TorchScript
    builds it as Concat(Unsqueeze(Gather(Shape(x))), ..., constant H, constant D))."""
    try:
        return [int(v) for v in constant_value(node.inputs[1], opset).reshape(-1)]
    except NotConstant:
        pass
    shape = node.inputs[1]
    if not shape.inputs or shape.inputs[0].op != "Concat":
        return None
    out = []
    for piece in shape.inputs[0].inputs:
        try:
            out += [int(v) for v in constant_value(piece, opset).reshape(-1)]
        except NotConstant:
            dims = _dims(piece)
            if (dims is None or len(dims) != 1) and _unsqueezed_scalar(piece, opset):
                dims = [1]
            if dims is None or len(dims) != 1 or not isinstance(dims[0], (int, np.integer)):
                return None
            out += [None] * int(dims[0])
    return out


def _unsqueezed_scalar(t: gs.Tensor, opset: int) -> bool:
    """Whether t is Unsqueeze(Gather(v, scalar index)) — one entry of a shape, when shape inference
    did not reach it (after contrib ops it cannot type)."""
    node = t.inputs[0] if t.inputs else None
    if node is None or node.op != "Unsqueeze" or not node.inputs[0].inputs:
        return False
    gather = node.inputs[0].inputs[0]
    try:
        return gather.op == "Gather" and np.asarray(constant_value(gather.inputs[1], opset)).ndim == 0
    except NotConstant:
        return False


def _static(t: gs.Tensor, node: gs.Node | None, opset: int, axis: int):
    """A static dim of t (shape inference, else the Reshape target that produced t)."""
    dims = _dims(t)
    if dims is not None and axis < len(dims) and isinstance(dims[axis], (int, np.integer)) and dims[axis] > 0:
        return int(dims[axis])
    if node is not None and node.op == "Reshape":
        target = _reshape_target(node, opset)
        if target is not None and axis < len(target) and target[axis] is not None and target[axis] > 0:
            return target[axis]
    return None


def _scalar_positive(t: gs.Tensor, opset: int) -> bool:
    if t.inputs and t.inputs[0].op == "Sqrt":       # torch's SDPA export: sqrt(1/sqrt(D)) from Shape
        return True
    try:
        v = constant_value(t, opset)
    except NotConstant:
        return False
    return v.size == 1 and float(v.reshape(-1)[0]) > 0


@dataclass
class Traced:
    source: gs.Tensor             # the projection output: tokens (B, T in any order, or flattened) × C or 3C
    labels: list[str]             # its axis labels, e.g. ["B", "T", "H*D"], ["B*T", "S*H*D"], ["T", "B", "H*D"]
    select: int | None            # which third of a fused qkv (None: not fused)
    nodes: list[gs.Node]          # nodes passed on the way (the rewrite removes them)
    head_dims: dict               # label -> static size ("H", "D", "S")
    # Flattened tokens ([B·T, C]): the Reshape target that unflattens them and the positions of
    # its first and second token axis, from which the rewrite rebuilds [B, T, C].
    unflatten: tuple | None = None


# Ops that only move elements (the trace follows them and relabels the axes).
LAYOUT_OPS = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Gather", "Split", "Slice", "Mul", "Div")
_NATURAL = ("B*T", "T*B", "B*H", "H*D", "S*H*D")
TOKEN_LAYOUTS = (["B", "T"], ["T", "B"], ["B*T"], ["T*B"])


def _atoms(labels: list[str]) -> list[str]:
    return [a for lab in labels for a in lab.split("*") if a != "1?"]


def _groupings(atoms: list[str], rank: int):
    """Every way to cut `atoms` into `rank` non-empty contiguous groups."""
    if rank == 1:
        yield ["*".join(atoms)]
        return
    for i in range(1, len(atoms) - rank + 2):
        for rest in _groupings(atoms[i:], rank - 1):
            yield ["*".join(atoms[:i])] + rest


def _group_fits(group: str, dim, sizes: dict, out_dims: dict) -> bool:
    """False only when what is known of the group's size contradicts the input dim: static sizes
    whose product differs (or does not divide it), or one axis whose symbol differs."""
    atoms = group.split("*")
    known = [sizes.get(a) or out_dims.get(a) for a in atoms]
    if isinstance(dim, (int, np.integer)) and dim > 0:
        part = int(np.prod([k for k in known if k] or [1]))
        return part == int(dim) if all(known) else int(dim) % part == 0
    return True     # a symbol: different names may still be equal sizes


def _rank(t: gs.Tensor, opset: int, depth: int = 0) -> int | None:
    """t's rank where shape inference lost it, from the layout ops that made it."""
    if _dims(t) is not None:
        return len(_dims(t))
    node = t.inputs[0] if t.inputs else None
    if node is None or depth > 8:
        return None
    if node.op == "Transpose" and node.attrs.get("perm") is not None:
        return len(node.attrs["perm"])
    if node.op == "Reshape":
        d = _dims(node.inputs[1])
        return int(d[0]) if d and isinstance(d[0], (int, np.integer)) else None
    inner = _rank(node.inputs[0], opset, depth + 1) if node.inputs else None
    if inner is None:
        return None
    if node.op == "Gather":
        try:
            return inner - 1 + np.asarray(constant_value(node.inputs[1], opset)).ndim
        except NotConstant:
            return None
    if node.op in ("Squeeze", "Unsqueeze"):
        axes = node.attrs.get("axes")
        if axes is None and len(node.inputs) > 1:
            try:
                axes = list(constant_value(node.inputs[1], opset).reshape(-1))
            except NotConstant:
                return None
        return None if axes is None else inner + (len(axes) if node.op == "Unsqueeze" else -len(axes))
    if node.op in ("Slice", "Split", "QuantizeLinear", "DequantizeLinear"):
        return inner
    return None


def _regroup(node: gs.Node, t: gs.Tensor, labels: list[str], sizes: dict, opset: int) -> list[str]:
    """The labels of a Reshape's input given those of its output: the one cut of the output's axis
    atoms into the input's rank that agrees with every known size; raise NoMatch when none or
    several do."""
    src = node.inputs[0]
    in_dims = _dims(src)
    if in_dims is None and (rank := _rank(src, opset)) is not None:
        in_dims = [None] * rank
    if in_dims is None and labels[-2:] == ["H", "D"]:
        # Rank unknown to shape inference (old-opset LayerNorm decompositions, contrib ops): a head
        # split must start from [B, T, C]; the kernel checks the rank at run time.
        in_dims = [None] * (len(labels) - (2 if len(labels) > 2 and labels[-3] == "S" else 1))
    if in_dims is None:
        raise NoMatch(f"Reshape '{node.name}': input rank unknown")
    out_dims, rout = {}, len(labels)
    for ax, lab in enumerate(labels):
        if "*" not in lab and lab != "1?":
            v = _static(t, node, opset, ax)
            if v is not None:
                out_dims[lab] = v
                if lab in ("S", "H", "D"):
                    sizes.setdefault(lab, v)
            d = _dims(t)
            if d is not None and ax < len(d) and isinstance(d[ax], str) and d[ax]:
                out_dims[lab + "?"] = d[ax]
    atoms = _atoms(labels)
    if len(set(atoms)) != len(atoms) or len(atoms) < len(in_dims):
        raise NoMatch(f"Reshape '{node.name}' from rank {len(in_dims)} to {rout} does not only split or merge axes")
    fits = [g for g in _groupings(atoms, len(in_dims))
            if all(_group_fits(grp, d, sizes, out_dims) for grp, d in zip(g, in_dims))]
    if len(fits) > 1:   # unknown sizes: merges a layout makes (tokens, batch × heads, heads × depth)
        natural = [g for g in fits if all("*" not in grp or grp in _NATURAL for grp in g)]
        fits = natural or fits
    if len(fits) > 1:   # a projection keeps its channels together
        channel = [g for g in fits if set(g[-1].split("*")) == {a for a in atoms if a in ("S", "H", "D")}]
        fits = channel if len(channel) == 1 else fits
    if len(fits) > 1:   # SDPA's [B·H, D, T] views: only the leading axes merged, the rest kept
        leading = [g for g in fits if all("*" not in grp for grp in g[1:])]
        fits = leading if len(leading) == 1 else fits
    if len(fits) != 1:
        raise NoMatch(f"Reshape '{node.name}' from rank {len(in_dims)} to {rout}: "
                      + ("its input's axes are not a split or merge of the head layout" if not fits else
                         f"cannot tell how it groups the axes {atoms} (input dims {in_dims} unknown)"))
    (labels_in,) = fits
    for grp, d in zip(labels_in, in_dims):   # view(b, t, -1, D): H = C / D
        missing = [a for a in grp.split("*") if a in ("S", "H", "D") and not sizes.get(a)]
        if len(missing) == 1 and all(a in ("S", "H", "D") for a in grp.split("*")) \
                and isinstance(d, (int, np.integer)) and d > 0:
            known = int(np.prod([sizes[a] for a in grp.split("*") if a != missing[0]] or [1]))
            if d % known == 0:
                sizes[missing[0]] = int(d) // known
    return labels_in


def _projection_layout(labels: list[str]) -> bool:
    return labels[-1] in ("H*D", "S*H*D") and labels[:-1] in TOKEN_LAYOUTS


def _channels(t: gs.Tensor, opset: int) -> int | None:
    """The static size of t's last axis: from shape inference, else from the projection that
    wrote it (the bias Add's vector, the MatMul/Gemm weight)."""
    dims = _dims(t)
    if dims and isinstance(dims[-1], (int, np.integer)) and dims[-1] > 0:
        return int(dims[-1])
    node = t.inputs[0] if t.inputs else None
    if node is None:
        return None
    for i, x in enumerate(node.inputs[:2]):
        try:
            w = np.asarray(constant_value(x, opset))
        except NotConstant:
            continue
        if node.op == "Add" and w.ndim >= 1 and w.size == w.shape[-1] > 1:
            return int(w.shape[-1])
        if node.op == "MatMul" and i == 1 and w.ndim == 2:
            return int(w.shape[1])
        if node.op == "Gemm" and i == 1 and w.ndim == 2:
            return int(w.shape[0] if node.attrs.get("transB", 0) else w.shape[1])
    return None


def trace_heads(graph: gs.Graph, t: gs.Tensor, labels: list[str], opset: int) -> Traced:
    """Follow t (with axis labels) back through layout ops to a projection output whose tokens
    and channels it splits into heads; raise NoMatch with a reason. The trace stops at the
    earliest tensor in projection layout (tokens × C) before an op that is not layout."""
    nodes: list[gs.Node] = []
    select = None
    sizes: dict = {}
    unflatten = None
    last = None     # the latest point in projection layout: (t, labels, len(nodes), unflatten)
    for _ in range(48):
        if _projection_layout(labels):
            last = (t, list(labels), len(nodes), unflatten)
        fq = fake_quant_source(t)
        if fq is not None and (last is None or (fq[0].inputs[0].op in LAYOUT_OPS
                                                and fq[0].inputs[0].op not in ("Mul", "Div"))):
            nodes += fq[1]
            t = fq[0]
            continue
        if not t.inputs:
            if last:
                break
            raise NoMatch(f"'{t.name}' is a graph input, not a projection output")
        node = t.inputs[0]
        op = node.op
        if last and (op not in LAYOUT_OPS or (op in ("Mul", "Div") and labels[:-1] in TOKEN_LAYOUTS)):
            break
        try:
            t, labels, select, unflatten = _trace_step(node, t, labels, select, sizes, unflatten, opset, nodes)
        except NoMatch:
            if last:
                break
            raise
    else:
        raise NoMatch("head layout chain too long")
    if last is None:
        raise NoMatch(f"'{t.name}' does not reach a projection output in [B, T, C] or [B·T, C] layout")
    t, labels, n, unflatten = last
    nodes = nodes[:n]
    if labels[-1] == "S*H*D":
        sizes.setdefault("S", 3)
    missing = [a for a in labels[-1].split("*") if not sizes.get(a)]
    channels = _channels(t, opset)
    if len(missing) == 1 and channels:   # view(b, t, -1, D) of an untyped tensor: H = C / D
        known = int(np.prod([sizes[a] for a in labels[-1].split("*") if a != missing[0]]))
        if channels % known == 0:
            sizes[missing[0]] = channels // known
    if (labels[-1] == "S*H*D") != (select is not None):
        raise NoMatch(f"'{t.name}': a fused qkv without a q/k/v selection (or the reverse)")
    if len(labels) == 2 and unflatten is None:
        raise NoMatch(f"'{t.name}' holds flattened tokens {labels[0]} and no Reshape shows B and T apart")
    return Traced(t, labels, select, nodes, sizes, unflatten)


def _trace_step(node, t, labels, select, sizes, unflatten, opset, nodes):
    """One op back: (its input, the input's labels, select, unflatten); appends node to nodes."""
    op = node.op
    if op == "Transpose":
        perm = node.attrs.get("perm")
        if perm is None or len(perm) != len(labels):
            raise NoMatch(f"Transpose '{node.name}' without a perm of rank {len(labels)}")
        inner = [None] * len(labels)
        for i, p in enumerate(perm):
            inner[p] = labels[i]
        labels = inner
    elif op in ("Mul", "Div"):
        data = [i for i in node.inputs if not _scalar_positive(i, opset)]
        if len(data) != 1 or (op == "Div" and data[0] is not node.inputs[0]):
            raise NoMatch(f"{op} '{node.name}' is not a scaling by a positive scalar")
        nodes.append(node)
        return data[0], labels, select, unflatten
    elif op in ("Squeeze", "Unsqueeze"):
        axes = node.attrs.get("axes")
        if axes is None and len(node.inputs) > 1:
            try:
                axes = [int(a) for a in constant_value(node.inputs[1], opset).reshape(-1)]
            except NotConstant:
                axes = None
        if axes is None or len(axes) != 1:
            raise NoMatch(f"{op} '{node.name}' without one constant axis")
        if op == "Squeeze":
            a = axes[0] % (len(labels) + 1)
            labels = labels[:a] + ["1?"] + labels[a:]    # a size-1 axis; a q/k/v slice if a Slice made it
        else:
            a = axes[0] % len(labels)
            if labels[a] not in ("1?",) and labels[a] != "S":
                raise NoMatch(f"Unsqueeze '{node.name}' adds axis {labels[a]}")
            if labels[a] == "S":
                raise NoMatch(f"Unsqueeze '{node.name}': the q/k/v axis has size 1")
            labels = labels[:a] + labels[a + 1:]
    elif op == "Gather":
        a = node.attrs.get("axis", 0) % (len(labels) + 1)
        try:
            idx = constant_value(node.inputs[1], opset)
        except NotConstant:
            raise NoMatch(f"Gather '{node.name}' with a dynamic index") from None
        if idx.ndim != 0:
            raise NoMatch(f"Gather '{node.name}' does not pick one slice")
        labels = labels[:a] + ["S"] + labels[a:]
        select = int(idx)
    elif op in ("Split", "Slice"):
        labels, select = _unbind_step(node, t, labels, select, sizes, opset)
    elif op == "Reshape":
        labels_in = _regroup(node, t, labels, sizes, opset)
        outs = _atoms(labels)
        if unflatten is None and "B" in outs and "T" in outs:
            merged = [g for g in labels_in if "B" in g.split("*") and "T" in g.split("*")]
            split = [i for i, lab in enumerate(labels) if lab in ("B", "T")]
            if merged and len(split) == 2 and len(_dims(node.inputs[1]) or []) == 1:
                unflatten = (node.inputs[1], split[0], split[1], labels[split[0]])
        labels = labels_in
    else:
        raise NoMatch(f"'{t.name}' comes from {op} '{node.name}', not a head split")
    nodes.append(node)
    return node.inputs[0], labels, select, unflatten


def _unbind_step(node, t, labels, select, sizes, opset):
    """A Split or Slice that picks q, k or v: out of the size-1 q/k/v axis a Squeeze removes (the
    unbind of reshape(B, T, 3, H, D)), or a third of the channel axis (qkv.chunk(3, -1))."""
    op = node.op
    if op == "Split":
        a = node.attrs.get("axis", 0) % len(labels)
        index = node.outputs.index(t)
        if labels[a] == "1?":
            return labels[:a] + ["S"] + labels[a + 1:], index
        if a == len(labels) - 1 and labels[a] == "H*D" and len(node.outputs) == 3:
            parts = None
            if len(node.inputs) > 1 and node.inputs[1].name:
                try:
                    parts = [int(v) for v in constant_value(node.inputs[1], opset).reshape(-1)]
                except NotConstant:
                    raise NoMatch(f"Split '{node.name}' with dynamic sizes") from None
            if parts is not None and len(set(parts)) != 1:
                raise NoMatch(f"Split '{node.name}' into unequal parts {parts}")
            return labels[:a] + ["S*H*D"], index
        raise NoMatch(f"Split '{node.name}' on another axis than the q/k/v one")
    try:
        starts, ends = (constant_value(node.inputs[i], opset).reshape(-1) for i in (1, 2))
        axes = constant_value(node.inputs[3], opset).reshape(-1) if len(node.inputs) > 3 and node.inputs[3].name else [0]
        steps = constant_value(node.inputs[4], opset).reshape(-1) if len(node.inputs) > 4 and node.inputs[4].name else [1]
    except NotConstant:
        raise NoMatch(f"Slice '{node.name}' with dynamic bounds") from None
    a = int(axes[0]) % len(labels) if len(starts) == 1 else None
    if a is None or int(steps[0]) != 1:
        raise NoMatch(f"Slice '{node.name}' is not one q/k/v slice")
    if labels[a] == "1?" and int(ends[0]) == int(starts[0]) + 1:
        return labels[:a] + ["S"] + labels[a + 1:], int(starts[0])
    if a == len(labels) - 1 and labels[a] == "H*D":
        c = _static(t, None, opset, a) or (sizes.get("H") and sizes.get("D") and sizes["H"] * sizes["D"])
        if c and int(ends[0]) - int(starts[0]) == c and int(starts[0]) % c == 0 and int(starts[0]) // c < 3:
            src = _dims(node.inputs[0])
            if src is not None and isinstance(src[-1], (int, np.integer)) and src[-1] != 3 * c:
                raise NoMatch(f"Slice '{node.name}' takes {c} of {src[-1]} channels, not a third")
            return labels[:a] + ["S*H*D"], int(starts[0]) // c
    raise NoMatch(f"Slice '{node.name}' is not one q/k/v slice")


# ---------------------------------------------------------------------------------------------
@dataclass
class AttentionMatch:
    q: Traced
    k: Traced
    v: Traced
    mask: gs.Tensor | None
    output: gs.Tensor             # merged context [B, T, C]
    heads: int
    channels: int
    core_nodes: list[gs.Node]
    query_key_mask: bool = False  # mask is [B|1, 1, T, T]: the kernel checks its rows are equal
    # How the merged context is laid out: "B,T" (output is [B, T, C], replaced), else the merge
    # Reshape stays and reads the op's [B, T, C] output ("T,B": through a Transpose first).
    merge: str = "B,T"
    merge_reshape: gs.Node | None = None
    scores: gs.Tensor | None = None     # the Softmax input [B, H, T, T]: its last axis is T


def _strip_scale(graph, t: gs.Tensor, opset: int, nodes: list) -> gs.Tensor:
    while t.inputs and t.inputs[0].op in ("Mul", "Div"):
        node = t.inputs[0]
        data = [i for i in node.inputs if not _scalar_positive(i, opset)]
        if len(data) != 1 or (node.op == "Div" and data[0] is not node.inputs[0]):
            if any(_is_scalar_constant(i, opset) for i in node.inputs):
                raise NoMatch(f"{node.op} '{node.name}' of the scores is not a scaling by a positive scalar")
            break
        nodes.append(node)
        t = data[0]
    return t


def _is_scalar_constant(t: gs.Tensor, opset: int) -> bool:
    try:
        return constant_value(t, opset).size == 1
    except NotConstant:
        return False


def _consumers_only(graph: gs.Graph, nodes: list[gs.Node], output: gs.Tensor) -> str | None:
    """A reason if a tensor inside the core is read outside it (or is a graph output)."""
    inside = {id(n) for n in nodes}
    for n in nodes:
        for t in n.outputs:
            if t is output:
                continue
            if is_graph_output(graph, t):
                return f"'{t.name}' inside the attention core is a graph output"
            for user in t.outputs:
                if id(user) not in inside and user.op != "Shape":   # shape reads feed the dead merge
                    return f"'{t.name}' inside the attention core is also read by {user.op} '{user.name}'"
    return None


def _copies_head_dim(reshape: gs.Node, position: int, opset: int) -> bool:
    """Whether target entry `position` of a TorchScript-built Reshape shape is
    Unsqueeze(Gather(Shape(x), position)) of a rank-4 x (the same axis of a head-layout tensor)."""
    concat = reshape.inputs[1].inputs[0] if reshape.inputs[1].inputs else None
    if concat is None or concat.op != "Concat" or len(concat.inputs) != 4:
        return False
    piece = concat.inputs[position]
    node = piece.inputs[0] if piece.inputs else None
    if node is None or node.op != "Unsqueeze" or not node.inputs[0].inputs:
        return False
    gather = node.inputs[0].inputs[0]
    if gather.op != "Gather" or not gather.inputs[0].inputs or gather.inputs[0].inputs[0].op != "Shape":
        return False
    try:
        idx = int(np.asarray(constant_value(gather.inputs[1], opset)).reshape(-1)[0])
    except NotConstant:
        return False
    source = gather.inputs[0].inputs[0].inputs[0]
    return idx == position and _dims(source) is not None and len(_dims(source)) == 4


def _skip_inference_identities(probs: gs.Tensor, opset: int, core: list) -> gs.Tensor:
    """Follow the probabilities through what is the identity at inference: Dropout (not in
    training mode) and SDPA's NaN guard Where(IsNaN(p), 0, p)."""
    for _ in range(3):
        users = list(probs.outputs)
        if len(users) == 1 and users[0].op == "Dropout":
            drop = users[0]
            if len(drop.inputs) > 2 and drop.inputs[2].name:
                try:
                    if bool(np.asarray(constant_value(drop.inputs[2], opset)).reshape(-1)[0]):
                        return probs
                except NotConstant:
                    return probs
            core.append(drop)
            probs = drop.outputs[0]
            continue
        ops_ = sorted(u.op for u in users)
        if ops_ == ["IsNaN", "Where"]:
            isnan = next(u for u in users if u.op == "IsNaN")
            where = next(u for u in users if u.op == "Where")
            if where.inputs[0] is isnan.outputs[0] and where.inputs[2] is probs:
                core += [isnan, where]
                probs = where.outputs[0]
                continue
        return probs
    return probs


def _factor_dims(t: gs.Tensor) -> list | None:
    """t's dims, or where they do not show a broadcast query or key axis, those of the tensor it
    is a Cast or a Reshape-to-Shape(x) of (TorchScript's vmap-indexed padding mask reshapes back
    to its index's shape [B, 1, 1, T], which plain shape inference loses)."""
    for _ in range(4):
        dims = _dims(t)
        if dims is not None and len(dims) >= 2 and (dims[-2] == 1 or dims[-1] == 1):
            return dims
        node = t.inputs[0] if t.inputs else None
        if node is not None and node.op == "Cast":
            t = node.inputs[0]
            continue
        if node is not None and node.op == "Reshape" and node.inputs[1].inputs:
            shape = node.inputs[1].inputs[0]
            if shape.op == "Concat" and len(shape.inputs) == 1 and shape.inputs[0].inputs:
                shape = shape.inputs[0].inputs[0]
            if shape.op == "Shape" and not shape.attrs.get("start") and shape.attrs.get("end") is None:
                t = shape.inputs[0]
                continue
        return dims
    return _dims(t)


# Ops through which a query × key mask may be built from per-key and per-query factors: they keep
# each (query, key) entry a function of the factors' entries, and none compares a query position
# with a key position (LessOrEqual(kv_idx, q_idx), a causal mask, is refused).
_MASK_COMBINE = ("And", "Or", "Not", "Cast", "Where", "Expand")


def _query_key_mask_reason(t: gs.Tensor, opset: int, depth: int = 0) -> str | None:
    """None when the [.., Tq, Tk] mask t is built only from factors that are per key (size 1 on
    the query axis), per query (size 1 on the key axis) or constant with identical query rows —
    transformers ≥ 5's padding mask expanded over the queries — so its query rows can differ only
    through a per-query factor, which the kernel checks at run time; else the reason."""
    try:
        v = np.asarray(constant_value(t, opset))
        if v.ndim >= 2 and not (v == v[..., :1, :]).all():
            return f"constant mask '{t.name}' has query rows that differ (causal?)"
        if v.ndim >= 3 and v.shape[-3] != 1:
            return f"constant mask '{t.name}' varies over heads"
        return None
    except NotConstant:
        pass
    dims = _factor_dims(t)
    if dims is not None and len(dims) >= 2 and (dims[-2] == 1 or dims[-1] == 1):
        if len(dims) >= 3 and dims[-3] != 1:
            return f"mask factor '{t.name}' of shape {dims} may vary over heads"
        return None
    node = t.inputs[0] if t.inputs else None
    if node is None:
        return f"mask '{t.name}' of shape {dims} is a graph input"
    if node.op not in _MASK_COMBINE or depth > 16:
        return f"{node.op} '{node.name}' in the mask may couple query and key positions"
    inputs = node.inputs
    if node.op == "Expand":
        try:
            target = np.asarray(constant_value(inputs[1], opset)).reshape(-1)
            if len(target) >= 3 and int(target[-3]) != 1:
                return f"Expand '{node.name}' broadcasts the mask over heads"
        except NotConstant:
            pass                          # a dynamic target: the kernel checks the mask's shape
        inputs = inputs[:1]
    for i in inputs:
        reason = _query_key_mask_reason(i, opset, depth + 1)
        if reason:
            return reason
    return None


def _strip_fake_quant(t: gs.Tensor, core: list) -> gs.Tensor:
    while (fq := fake_quant_source(t)) is not None:
        core += fq[1]
        t = fq[0]
    return t


def _follow_fake_quant(t: gs.Tensor, core: list) -> gs.Tensor:
    while (fq := fake_quant_user(t)) is not None:
        core += fq[1]
        t = fq[0]
    return t


def match_attention(graph: gs.Graph, softmax: gs.Node) -> MatchResult:
    """The attention core around `softmax` (MatchResult.value: AttentionMatch), or the reason
    and the node where it is not one."""
    try:
        return matched(_match_attention(graph, softmax))
    except Miss as miss:
        return failed(miss)


def _match_attention(graph: gs.Graph, softmax: gs.Node) -> AttentionMatch:
    opset = graph_opset(graph)
    rank = len(softmax.inputs[0].shape) if softmax.inputs[0].shape is not None else 4
    if rank != 4:
        raise NoMatch(f"Softmax over a rank-{rank} tensor, not [B, H, T, T]", softmax)
    if softmax.attrs.get("axis", -1) % 4 != 3:
        raise NoMatch("Softmax not over the key axis", softmax)
    core = [softmax]
    t = _strip_fake_quant(softmax.inputs[0], core)
    mask = None
    if t.inputs and t.inputs[0].op == "Add":
        add = t.inputs[0]
        a, b = add.inputs
        scores = ("MatMul", "Mul", "Div", "DequantizeLinear")
        scores_side = a if a.inputs and a.inputs[0].op in scores else b
        mask = b if scores_side is a else a
        core.append(add)
        t = _strip_fake_quant(scores_side, core)
    t = _strip_fake_quant(_strip_scale(graph, t, opset, core), core)
    if not t.inputs or t.inputs[0].op != "MatMul":
        raise NoMatch("Softmax input is not Q·Kᵀ (with an optional scale and mask)", t.inputs[0] if t.inputs else softmax)
    qk = t.inputs[0]
    core.append(qk)
    probs = _follow_fake_quant(softmax.outputs[0], core)
    probs = _follow_fake_quant(_skip_inference_identities(probs, opset, core), core)
    users = list(probs.outputs)
    if len(users) != 1 or users[0].op != "MatMul" or users[0].inputs[0] is not probs:
        raise NoMatch("Softmax output does not feed one MatMul with V", softmax)
    av = users[0]
    core.append(av)

    q = trace_heads(graph, qk.inputs[0], ["B", "H", "T", "D"], opset)
    k = trace_heads(graph, qk.inputs[1], ["B", "H", "D", "T"], opset)
    v = trace_heads(graph, av.inputs[1], ["B", "H", "T", "D"], opset)
    for tr in (q, k, v):
        core.extend(tr.nodes)

    # Forward: context [B, H, T, D] -> Transpose to [B, T, H, D] (or [T, B, H, D]) -> Reshape to
    # [B, T, H·D] (or flattened tokens [B·T, H·D]), with fake quantisation anywhere between.
    ctx = _follow_fake_quant(av.outputs[0], core)
    ctx_users = [u for u in ctx.outputs if u.op != "Shape"]
    if len(ctx_users) == 1 and ctx_users[0].op == "Reshape" and _dims(ctx_users[0].outputs[0]) is not None \
            and len(_dims(ctx_users[0].outputs[0])) == 4:
        # SDPA decompositions re-view the context as [B, H, T, D] (checked below, once H and D are known)
        core.append(ctx_users[0])
        ctx = ctx_users[0].outputs[0]
        identity_view = ctx_users[0]
    else:
        identity_view = None
    ctx = _follow_fake_quant(ctx, core)
    tr_users = [u for u in ctx.outputs if u.op != "Shape"]
    perm = list(tr_users[0].attrs.get("perm", [])) if len(tr_users) == 1 and tr_users[0].op == "Transpose" else None
    layouts = {(0, 2, 1, 3): "B,T", (2, 0, 1, 3): "T,B"}
    if perm is None or tuple(perm) not in layouts:
        raise NoMatch("attention context is not merged by Transpose(0, 2, 1, 3) (or (2, 0, 1, 3), time-major)",
                      tr_users[0] if len(tr_users) == 1 else av)
    merge = layouts[tuple(perm)]
    core.append(tr_users[0])
    merged = _follow_fake_quant(tr_users[0].outputs[0], core)
    rs_users = [u for u in merged.outputs if u.op != "Shape"]
    if len(rs_users) != 1 or rs_users[0].op != "Reshape":
        raise NoMatch("attention context is not merged by a Reshape", tr_users[0])
    merge_reshape = rs_users[0]
    out = merge_reshape.outputs[0]
    out_rank = _rank(out, graph_opset(graph))
    if out_rank not in (2, 3, None):
        raise NoMatch(f"merged context has rank {out_rank}, not 3 ([B, T, C]) or 2 ([B·T, C])", merge_reshape)

    sizes = {**q.head_dims, **k.head_dims, **v.head_dims}
    heads, depth = sizes.get("H"), sizes.get("D")
    if not heads or not depth:
        raise NoMatch("number of heads or head size is not static", qk)
    if out.shape is not None and isinstance(out.shape[-1], (int, np.integer)) and out.shape[-1] not in (heads * depth,):
        raise NoMatch(f"merged context '{out.name}' has {out.shape[-1]} channels, not {heads}·{depth}", merge_reshape)
    try:
        target = constant_value(merge_reshape.inputs[1], opset).reshape(-1)
        if any(int(x) == 0 for x in target[2:]) or (len(target) and int(target[-1]) not in (heads * depth, -1)):
            raise NoMatch(f"Reshape '{merge_reshape.name}' of the context to {list(target)} is not a head merge",
                          merge_reshape)
    except NotConstant:
        pass
    if identity_view is not None:
        target = _reshape_target(identity_view, opset)
        ok = target is not None and len(target) == 4 and target[1] in (heads, -1) and target[3] in (depth, None) \
            and all(target[i] is not None or _copies_head_dim(identity_view, i, opset) for i in (0, 2, 3))
        if not ok:
            raise NoMatch(f"Reshape '{identity_view.name}' of the context is not a [B, H, T, D] view", identity_view)
    for tr, name in ((q, "Q"), (k, "K"), (v, "V")):
        if tr.head_dims.get("H") not in (None, heads) or tr.head_dims.get("D") not in (None, depth):
            raise NoMatch(f"{name} has another head split than the rest", qk)
        if tr.select is not None and tr.select != {"Q": 0, "K": 1, "V": 2}[name]:
            raise NoMatch(f"{name} is slice {tr.select} of the fused qkv, not {'QKV'.index(name)}", qk)
    fused = {tr.select is not None for tr in (q, k, v)}
    if len(fused) != 1:
        raise NoMatch("a mix of fused and separate projections", qk)
    if fused == {True} and not (q.source is k.source is v.source):
        raise NoMatch("q, k and v come from different fused projections", qk)
    if len({tuple(tr.labels[:-1]) for tr in (q, k, v)}) != 1 and fused == {True}:
        raise NoMatch("q, k and v of one fused projection traced to different layouts", qk)
    query_key_mask = False
    if mask is not None:
        mdims = _dims(mask)
        if mdims is None:
            raise NoMatch(f"mask '{mask.name}' has unknown shape; cannot prove it is a per-key mask", softmax)
        # Broadcasting aligns trailing axes: only [B|1, 1, 1, T] and [1, T] are per key ([T, T]
        # is a causal or other per-query mask).
        if not ((len(mdims) == 4 and mdims[1] == 1 and mdims[2] == 1) or (len(mdims) == 2 and mdims[0] == 1)):
            # A query × key mask [B|1, 1, T, T] (transformers ≥ 5) is fed as it is when its
            # construction is per key up to per-query factors; the kernel checks its rows.
            why = f"rank {len(mdims)}" if len(mdims) != 4 else \
                "it varies over heads" if isinstance(mdims[1], (int, np.integer)) and mdims[1] != 1 else \
                _query_key_mask_reason(mask, opset)
            if why:
                raise NoMatch(f"mask '{mask.name}' of shape {mdims} is not per key [B, 1, 1, T]: {why}", softmax)
            query_key_mask = True
    if merge == "B,T" and out_rank == 3:
        core.append(merge_reshape)
        reason = _consumers_only(graph, core, out)
        merge_reshape = None
    else:   # the merge Reshape stays: it reads the op's output instead
        reason = _consumers_only(graph, core, merge_reshape.inputs[0])
        out = merge_reshape.inputs[0]
    if reason:
        raise NoMatch(reason, softmax)
    return AttentionMatch(q, k, v, mask, out, heads, heads * depth, core, query_key_mask, merge, merge_reshape,
                          softmax.inputs[0])


def _to_batch_major(tr: Traced, channels: int, name: str, nodes: list) -> gs.Tensor:
    """tr.source as [B, T, channels]: as it is, transposed from [T, B, ·], or unflattened from
    [B·T, ·] / [T·B, ·] with the token sizes of the Reshape that unflattened it in the graph."""
    tokens = tr.labels[:-1]
    x = tr.source
    if len(tokens) == 1:
        target, i, j, first = tr.unflatten
        pieces = []
        for n, pos in (("first", i), ("second", j)):
            piece = gs.Variable(f"{name}.{n}_tokens", dtype=np.int64)
            nodes.append(gs.Node("Slice", f"{name}.{n}_tokens", inputs=[
                target, gs.Constant(f"{name}.{n}_start", np.array([pos], np.int64)),
                gs.Constant(f"{name}.{n}_end", np.array([pos + 1], np.int64))], outputs=[piece]))
            pieces.append(piece)
        shape = gs.Variable(f"{name}.token_shape", dtype=np.int64)
        nodes.append(gs.Node("Concat", f"{name}.token_shape", attrs={"axis": 0}, inputs=pieces + [
            gs.Constant(f"{name}.channels", np.array([channels], np.int64))], outputs=[shape]))
        y = gs.Variable(f"{name}.unflattened", dtype=np.float32)
        nodes.append(gs.Node("Reshape", f"{name}.unflatten", inputs=[x, shape], outputs=[y]))
        x, tokens = y, [first, "B" if first == "T" else "T"]
    if tokens == ["T", "B"]:
        y = gs.Variable(f"{name}.batch_major", dtype=np.float32)
        nodes.append(gs.Node("Transpose", f"{name}.to_batch_major", attrs={"perm": [1, 0, 2]}, inputs=[x], outputs=[y]))
        x = y
    return x


@dataclass
class AttentionChange(LayerChange):
    """A converted attention core: no weights; it removes the 2·B·T²·C multiplications of Q·Kᵀ
    and P·V. `rows` (set by convert_onnx) is B·T; T is the static token count when the graph
    has one, else the count is unknown."""
    tokens: int | None = None
    # Where convert_onnx reads T when it is not static: axis tokens_axis of tensor tokens_tensor
    # (the scores [B, H, T, T]; None: axis 1 of the query `activation`, [B, T, C]).
    tokens_tensor: str | None = None
    tokens_axis: int = 1

    @property
    def params(self) -> int:
        return 0

    @property
    def macs_removed(self) -> int | None:
        if self.rows is None or self.tokens is None:
            return None
        return 2 * self.rows * self.tokens * self.in_features


def _static_tokens(m: "AttentionMatch") -> int | None:
    dims = _dims(m.scores)
    return int(dims[-1]) if dims and isinstance(dims[-1], (int, np.integer)) and dims[-1] > 0 else None


# ---------------------------------------------------------------------------------------------
# Fused attention ops: ONNX's Attention (opset 23) and com.microsoft's Attention and
# MultiHeadAttention (onnxruntime.transformers.optimizer). Each is softmax attention whose Q, K, V
# are explicit: the rewrite feeds them (and the key mask, as an additive [B, T] mask) to
# AddLinearAttention; com.microsoft Attention's fused projection becomes MatMul + Add (+ Split),
# linear layers the shift-linear pass converts.
FUSED = {("", "Attention"), ("ai.onnx", "Attention"), ("com.microsoft", "Attention"),
         ("com.microsoft", "MultiHeadAttention")}
MASK_FILL = -10000.0      # what a masked key gets (below the kernel's −1000 threshold)


@dataclass
class FusedMatch:
    kind: str                  # "Attention-23", "com.microsoft.Attention", "com.microsoft.MultiHeadAttention"
    heads: int
    channels: int
    q: gs.Tensor | None        # [B, T, C] (None: from the fused projection)
    k: gs.Tensor | None
    v: gs.Tensor | None
    weight: np.ndarray | None = None      # com.microsoft Attention: [C_in, 3C]
    bias: np.ndarray | None = None        # [3C]
    mask: gs.Tensor | None = None
    mask_kind: str = ""        # "keep" (1 = attend, int/bool), "bool" (True = attend), "additive"
    query_key_mask: bool = False


def _attr(node: gs.Node, name: str, default=None):
    return node.attrs.get(name, default)


def _optional(node: gs.Node, i: int) -> gs.Tensor | None:
    return node.inputs[i] if len(node.inputs) > i and node.inputs[i].name else None


def _used_outputs(graph: gs.Graph, node: gs.Node) -> list[int]:
    return [i for i, t in enumerate(node.outputs) if t.name and (t.outputs or is_graph_output(graph, t))]


def _static_last(t: gs.Tensor) -> int | None:
    d = _dims(t)
    return int(d[-1]) if d and isinstance(d[-1], (int, np.integer)) and d[-1] > 0 else None


def match_fused(graph: gs.Graph, node: gs.Node) -> MatchResult:
    """A fused attention op as AddLinearAttention inputs (value: FusedMatch), or precisely why not."""
    try:
        return matched(_match_fused(graph, node))
    except Miss as miss:
        return failed(miss)


def _per_key_mask(mask: gs.Tensor, node: gs.Node, what: str) -> bool:
    """Whether the mask is query × key [B|1, 1, T, T] (ORT's Attention-23 takes only that form;
    the kernel checks at run time that its rows mask the same keys) rather than per key."""
    d = _dims(mask)
    if d is None:
        raise NoMatch(f"{what} '{mask.name}' has unknown shape; cannot prove it is a per-key mask", node)
    if len(d) == 2 or (len(d) == 4 and d[1] == 1 and d[2] == 1):
        return False
    if len(d) == 4 and d[1] == 1:
        return True
    raise NoMatch(f"{what} '{mask.name}' of shape {d} is not per key ([B, T], [B, 1, 1, T] or [B, 1, T, T] "
                  "with equal rows)", node)


def _match_fused(graph: gs.Graph, node: gs.Node) -> FusedMatch:
    opset = graph_opset(graph)
    used = _used_outputs(graph, node)
    if used != [0]:
        raise NoMatch(f"{node.op} '{node.name}' outputs {[node.outputs[i].name for i in used if i]} "
                      "(KV cache or scores) are read; only the attention output can be rewritten", node)
    if (node.domain or "") in ("", "ai.onnx"):      # ONNX Attention (opset 23)
        q, k, v = node.inputs[:3]
        if _optional(node, 4) or _optional(node, 5):
            raise NoMatch(f"Attention '{node.name}' with past_key/past_value (a KV cache)", node)
        if _attr(node, "is_causal", 0):
            raise NoMatch(f"Attention '{node.name}' is causal (is_causal=1), not linear attention over all keys", node)
        if _attr(node, "softcap", 0.0):
            raise NoMatch(f"Attention '{node.name}' caps its scores (softcap)", node)
        if len(node.inputs) > 6 and _optional(node, 6):
            raise NoMatch(f"Attention '{node.name}' with nonpad_kv_seqlen", node)
        ranks = {len(_dims(t)) if _dims(t) is not None else None for t in (q, k, v)}
        if ranks != {3}:
            raise NoMatch(f"Attention '{node.name}': Q, K, V of rank {sorted(map(str, ranks))}; the rewrite takes "
                          "[B, T, C] inputs (rank 3)", node)
        heads, kv_heads = _attr(node, "q_num_heads"), _attr(node, "kv_num_heads")
        if not heads or kv_heads != heads:
            raise NoMatch(f"Attention '{node.name}': q_num_heads {heads} and kv_num_heads {kv_heads} differ "
                          "(grouped-query attention)", node)
        c = _static_last(q)
        if c is None or _static_last(k) != c or _static_last(v) != c:
            raise NoMatch(f"Attention '{node.name}': Q, K, V channel counts {[_static_last(t) for t in (q, k, v)]} "
                          "not static and equal", node)
        mask = _optional(node, 3)
        kind, query_key = "", False
        if mask is not None:
            query_key = _per_key_mask(mask, node, "attn_mask")
            kind = "bool" if tensor_dtype(mask) == np.bool_ else "additive"
        return FusedMatch("Attention-23", int(heads), c, q, k, v, mask=mask, mask_kind=kind, query_key_mask=query_key)
    heads = _attr(node, "num_heads")
    if not heads:
        raise NoMatch(f"{node.op} '{node.name}' without num_heads", node)
    if _attr(node, "unidirectional", 0):
        raise NoMatch(f"{node.op} '{node.name}' is causal (unidirectional=1)", node)
    if node.op == "Attention":
        x = node.inputs[0]
        if _dims(x) is not None and len(_dims(x)) != 3:
            raise NoMatch(f"Attention '{node.name}': input of rank {len(_dims(x))}, not [B, T, C]", node)
        for i, what in ((4, "past"), (5, "attention_bias"), (6, "past_sequence_length")):
            if _optional(node, i):
                raise NoMatch(f"Attention '{node.name}' with {what}", node)
        if _attr(node, "do_rotary", 0):
            raise NoMatch(f"Attention '{node.name}' applies rotary embeddings inside the op", node)
        try:
            w = np.asarray(constant_value(node.inputs[1], opset), dtype=np.float32)
        except NotConstant as err:
            raise NoMatch(f"Attention '{node.name}': weights are not constant ({err})", node) from None
        sizes = _attr(node, "qkv_hidden_sizes")
        if w.ndim != 2 or w.shape[1] % 3 or (sizes is not None and len(set(sizes)) != 1):
            raise NoMatch(f"Attention '{node.name}': weights {list(w.shape)} with qkv_hidden_sizes {sizes} "
                          "are not three equal projections", node)
        bias = None
        if _optional(node, 2):
            try:
                bias = np.asarray(constant_value(node.inputs[2], opset), dtype=np.float32).reshape(-1)
            except NotConstant as err:
                raise NoMatch(f"Attention '{node.name}': bias is not constant ({err})", node) from None
        mask = _optional(node, 3)
        if mask is not None:
            d = _dims(mask)
            if d is None or len(d) != 2:
                raise NoMatch(f"Attention '{node.name}': mask_index of shape {d}; only a raw [B, T] key mask "
                              "(1 = attend) is per key", node)
        c = w.shape[1] // 3
        return FusedMatch("com.microsoft.Attention", int(heads), c, None, None, None, w, bias, mask,
                          "keep" if mask is not None else "")
    # com.microsoft MultiHeadAttention
    q, k, v = node.inputs[0], _optional(node, 1), _optional(node, 2)
    if k is None or v is None:
        raise NoMatch(f"MultiHeadAttention '{node.name}' with packed QKV or KV", node)
    for i, what in ((5, "attention_bias"), (6, "past_key"), (7, "past_value"), (8, "past_sequence_length")):
        if _optional(node, i):
            raise NoMatch(f"MultiHeadAttention '{node.name}' with {what}", node)
    ranks = [len(_dims(t)) if _dims(t) is not None else None for t in (q, k, v)]
    if ranks != [3, 3, 3]:
        raise NoMatch(f"MultiHeadAttention '{node.name}': query/key/value of ranks {ranks}; the rewrite takes "
                      "[B, T, C] (not BNSH or packed)", node)
    c = _static_last(q)
    if c is None or _static_last(k) != c or _static_last(v) != c:
        raise NoMatch(f"MultiHeadAttention '{node.name}': channel counts not static and equal", node)
    bias = None
    if _optional(node, 3):
        try:
            bias = np.asarray(constant_value(node.inputs[3], opset), dtype=np.float32).reshape(-1)
        except NotConstant as err:
            raise NoMatch(f"MultiHeadAttention '{node.name}': bias is not constant ({err})", node) from None
    mask = _optional(node, 4)
    if mask is not None and (_dims(mask) is None or len(_dims(mask)) != 2):
        raise NoMatch(f"MultiHeadAttention '{node.name}': key_padding_mask of shape {_dims(mask)}; only "
                      "[B, T] (1 = attend) is taken", node)
    return FusedMatch("com.microsoft.MultiHeadAttention", int(heads), c, q, k, v, bias=bias, mask=mask,
                      mask_kind="keep" if mask is not None else "")


def rewrite_fused(graph: gs.Graph, node: gs.Node, m: FusedMatch, label: str, binarizer: str) -> None:
    nodes: list[gs.Node] = []

    def emit(op, inputs, name, dtype=np.float32, **attrs):
        out = gs.Variable(f"{label}.{name}", dtype=dtype)
        nodes.append(gs.Node(op, f"{label}.{name}", attrs=attrs, inputs=inputs, outputs=[out]))
        return out

    def const(name, value):
        return gs.Constant(f"{label}.{name}", np.asarray(value))

    c = m.channels
    if m.weight is not None:     # com.microsoft Attention: x @ W (+ b), split into q, k, v
        qkv = emit("MatMul", [node.inputs[0], const("qkv.weight", m.weight)], "qkv")
        if m.bias is not None:
            qkv = emit("Add", [qkv, const("qkv.bias", m.bias)], "qkv_bias")
        q, k, v = (gs.Variable(f"{label}.{n}", dtype=np.float32) for n in "qkv")
        nodes.append(gs.Node("Split", f"{label}.qkv_split", attrs={"axis": -1},
                             inputs=[qkv, const("split", np.array([c, c, c], np.int64))], outputs=[q, k, v]))
    else:
        q, k, v = m.q, m.k, m.v
        if m.bias is not None:
            q, k, v = (emit("Add", [t, const(f"{n}.bias", m.bias[i * c:(i + 1) * c])], f"{n}_bias")
                       for i, (t, n) in enumerate(((q, "q"), (k, "k"), (v, "v"))))
    inputs = [q, k, v]
    if m.mask is not None:
        if m.mask_kind == "additive":
            inputs.append(m.mask)
        else:   # attend where mask is 1 / True: 0 there, MASK_FILL elsewhere
            keep = m.mask if m.mask_kind == "bool" else emit("Cast", [m.mask], "mask_keep", dtype=np.bool_,
                                                             to=onnx.TensorProto.BOOL)
            inputs.append(emit("Where", [keep, const("mask_zero", np.float32(0)),
                                         const("mask_fill", np.float32(MASK_FILL))], "mask"))
    out = node.outputs[0]
    node.outputs.clear()
    nodes.append(gs.Node(OP, f"{label}.add_attention", domain=DOMAIN, inputs=inputs, outputs=[out],
                         attrs={"num_heads": m.heads, "binarizer": binarizer}))
    graph.nodes.extend(nodes)


@register(NAME, AddAttentionConfig, "softmax attention core → AddLinearAttention (binary Q/K, additions only)")
def run(graph: gs.Graph, cfg: AddAttentionConfig) -> PassResult:
    result = PassResult(NAME)
    for softmax in [n for n in graph.nodes if n.op == "Softmax" and (n.domain or "") in ("", "ai.onnx")]:
        label = node_label(softmax)
        reason = exclusion_reason(label, cfg.include, cfg.exclude)
        if reason:
            result.skip(label, reason)
            continue
        found = match_attention(graph, softmax)
        if not found:
            result.skip(label, found.message_for(label))
            continue
        m = found.value
        c = m.channels
        new_nodes: list[gs.Node] = []
        if m.q.select is not None:
            source = _to_batch_major(m.q, 3 * c, f"{label}.qkv", new_nodes)
            parts = [gs.Variable(f"{label}.{n}", dtype=np.float32) for n in "qkv"]
            split = gs.Constant(f"{label}.split", np.array([c, c, c], dtype=np.int64))
            new_nodes.append(gs.Node("Split", f"{label}.qkv_split", attrs={"axis": -1},
                                     inputs=[source, split], outputs=parts))
            q, k, v = parts
        else:
            q, k, v = (_to_batch_major(tr, c, f"{label}.{n}", new_nodes) for tr, n in ((m.q, "q"), (m.k, "k"), (m.v, "v")))
        inputs = [q, k, v] + ([m.mask] if m.mask is not None else [])
        if m.merge_reshape is None:
            out = m.output
            m.output.inputs[0].outputs.clear()
        else:   # the merge Reshape stays, reading [B, T, C] (or [T, B, C]) instead of the heads
            out = gs.Variable(f"{label}.context", dtype=np.float32)
            merged = out
            if m.merge == "T,B":
                merged = gs.Variable(f"{label}.context_time_major", dtype=np.float32)
                new_nodes.append(gs.Node("Transpose", f"{label}.to_time_major", attrs={"perm": [1, 0, 2]},
                                         inputs=[out], outputs=[merged]))
            m.merge_reshape.inputs[0] = merged
        new_nodes.append(gs.Node(OP, f"{label}.add_attention", domain=DOMAIN, inputs=inputs, outputs=[out],
                                 attrs={"num_heads": m.heads, "binarizer": cfg.binarizer}))
        graph.nodes.extend(new_nodes)
        layout = {("B", "T"): "", ("T", "B"): ", time-major tokens", ("B*T",): ", flattened tokens [B·T, C]",
                  ("T*B",): ", flattened time-major tokens [T·B, C]"}[tuple(m.q.labels[:-1])]
        result.changes.append(AttentionChange(
            NAME, label, OP, c, c, 0, 0, activation=m.q.source.name, tokens=_static_tokens(m),
            tokens_tensor=m.scores.name, tokens_axis=-1,
            detail=f"{m.heads} heads × {c // m.heads}, {'fused qkv' if m.q.select is not None else 'separate q/k/v'}"
                   + (", key mask" if m.mask is not None else "")
                   + (" (query × key, rows checked at run time)" if m.query_key_mask else "") + layout))
    for node in [n for n in graph.nodes if ((n.domain or ""), n.op) in FUSED]:
        label = node_label(node)
        reason = exclusion_reason(label, cfg.include, cfg.exclude)
        if reason:
            result.skip(label, reason)
            continue
        found = match_fused(graph, node)
        if not found:
            result.skip(label, found.message_for(label))
            continue
        m = found.value
        activation = m.q.name if m.q is not None else node.inputs[0].name
        rewrite_fused(graph, node, m, label, cfg.binarizer)
        result.changes.append(AttentionChange(
            NAME, label, OP, m.channels, m.channels, 0, 0, activation=activation,
            tokens=None,
            detail=f"{m.heads} heads × {m.channels // m.heads}, fused {m.kind}"
                   + (" with its projection (MatMul + Add for shift-linear)" if m.weight is not None else "")
                   + (", key mask" if m.mask is not None else "")
                   + (" (query × key, rows checked at run time)" if m.query_key_mask else "")))
    graph.cleanup().toposort()
    return result
