"""Pass `add-attention`: the core of multi-head self-attention (from the Q/K/V projection outputs
to the output projection's input: head split, scale, mask, Softmax, the two MatMuls, head merge)
becomes one AddLinearAttention op (docs/ops.md#addlinearattention). The projections stay linear
layers for the shift-linear pass.

Pattern: every Softmax whose input is (MatMul(q_heads, k_heads_T) [× / ÷ scale] [+ mask]) and
whose output feeds MatMul(·, v_heads). Check: each of q_heads [B,H,T,D], k_heads_T [B,H,D,T] and
v_heads [B,H,T,D] traces back through Transpose / Reshape / positive scalar Mul-Div / the
Split-Gather-Slice(+Squeeze) of a fused qkv to a [B, T, C] (or fused [B, T, 3C]) projection
output, with the tokens and heads laid out alike; the mask is per key [B|1, 1, 1, T], or a query ×
key mask [B|1, 1, T, T] built from per-key and per-query factors only (transformers ≥ 5's expanded
padding mask; the kernel checks its rows agree at run time); the context merges back
through Transpose(0,2,1,3) + Reshape to [B, T, C]; no intermediate tensor is read elsewhere.
Rewrite: AddLinearAttention(Q, K, V[, mask]) writes the merged context tensor (fused qkv: one
Split of the projection output on its last axis).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from mfconvert.ort_ops import DOMAIN
from mfconvert.passes.graph import NotConstant, constant_value, graph_opset, is_graph_output, node_label
from mfconvert.passes.registry import register
from mfconvert.passes.report import LayerChange, PassResult
from mfconvert.passes.targeting import compile_patterns, exclusion_reason

NAME = "add-attention"
OP = "AddLinearAttention"


@dataclass
class AddAttentionConfig:
    binarizer: str = "sign"
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.binarizer != "sign":
            raise ValueError(f"binarizer must be 'sign' for the ONNX pass (got {self.binarizer!r}); the "
                             "'ksh' hash is fitted on data by mfconvert.nn.AddLinearAttention")
        compile_patterns(self.include, "--include")
        compile_patterns(self.exclude, "--exclude")


class NoMatch(Exception):
    """The subgraph is not an attention core we can rewrite; the message is the reason."""


# ---------------------------------------------------------------------------------------------
# Tracing a head-layout tensor back to its [B, T, C] source. Axis labels are strings; a merged
# axis is labels joined by "*" ("H*D" is the channel axis of a projection output).
def _dims(t: gs.Tensor) -> list | None:
    return None if t.shape is None else list(t.shape)


def _same_dim(a, b) -> bool | None:
    """True/False when both dims are known (ints or the same symbol), None when unknowable."""
    if isinstance(a, (int, np.integer)) and isinstance(b, (int, np.integer)):
        return int(a) == int(b)
    if isinstance(a, str) and isinstance(b, str) and a and a == b:
        return True
    return None


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
            if dims is None or len(dims) != 1 or not isinstance(dims[0], (int, np.integer)):
                return None
            out += [None] * int(dims[0])
    return out


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


def _complete(sizes: dict, labels: tuple, src: gs.Tensor) -> None:
    """Fill the one unknown size of `labels` from the source's static channel count."""
    dims = _dims(src)
    channels = dims[-1] if dims else None
    missing = [lab for lab in labels if not sizes.get(lab)]
    if len(missing) != 1 or not isinstance(channels, (int, np.integer)) or channels <= 0:
        return
    known = int(np.prod([sizes[lab] for lab in labels if lab not in missing]))
    if known and channels % known == 0:
        sizes[missing[0]] = int(channels) // known


@dataclass
class Traced:
    source: gs.Tensor             # the [B, T, C] or [B, T, 3C] projection output
    labels: list[str]             # its axis labels
    select: int | None            # which third of a fused qkv (None: not fused)
    nodes: list[gs.Node]          # nodes passed on the way (the rewrite removes them)
    head_dims: dict               # label -> static size ("H", "D", "S")


def _scalar_positive(t: gs.Tensor, opset: int) -> bool:
    if t.inputs and t.inputs[0].op == "Sqrt":       # torch's SDPA export: sqrt(1/sqrt(D)) from Shape
        return True
    try:
        v = constant_value(t, opset)
    except NotConstant:
        return False
    return v.size == 1 and float(v.reshape(-1)[0]) > 0


def trace_heads(graph: gs.Graph, t: gs.Tensor, labels: list[str], opset: int) -> Traced:
    """Follow t (with axis labels) back to a projection output; raise NoMatch with a reason."""
    nodes: list[gs.Node] = []
    select = None
    sizes: dict = {}
    for _ in range(32):
        if not t.inputs:
            raise NoMatch(f"'{t.name}' is a graph input, not a projection output")
        node = t.inputs[0]
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
            t, nodes = data[0], nodes + [node]
            continue
        elif op == "Squeeze":
            axes = node.attrs.get("axes")
            if axes is None and len(node.inputs) > 1:
                try:
                    axes = [int(a) for a in constant_value(node.inputs[1], opset).reshape(-1)]
                except NotConstant:
                    axes = None
            if axes is None or len(axes) != 1:
                raise NoMatch(f"Squeeze '{node.name}' without one constant axis")
            a = axes[0] % (len(labels) + 1)
            labels = labels[:a] + ["S"] + labels[a:]
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
            if "S" not in labels:
                raise NoMatch(f"{op} '{node.name}' outside a qkv unbind")
            a = labels.index("S")
            if op == "Split":
                if node.attrs.get("axis", 0) % len(labels) != a:
                    raise NoMatch(f"Split '{node.name}' on another axis than the q/k/v one")
                select = node.outputs.index(t)
            else:
                try:
                    starts, ends = (constant_value(node.inputs[i], opset).reshape(-1) for i in (1, 2))
                    axes = constant_value(node.inputs[3], opset).reshape(-1) if len(node.inputs) > 3 else [0]
                    steps = constant_value(node.inputs[4], opset).reshape(-1) if len(node.inputs) > 4 else [1]
                except NotConstant:
                    raise NoMatch(f"Slice '{node.name}' with dynamic bounds") from None
                if len(starts) != 1 or int(axes[0]) % len(labels) != a or int(steps[0]) != 1 \
                        or int(ends[0]) != int(starts[0]) + 1:
                    raise NoMatch(f"Slice '{node.name}' is not one q/k/v slice")
                select = int(starts[0])
        elif op == "Reshape":
            src = node.inputs[0]
            rin, rout = (len(_dims(src)) if _dims(src) is not None else None), len(labels)
            head_split = labels[-2:] == ["H", "D"]
            if rin is None and head_split:
                # Rank unknown to shape inference (old-opset LayerNorm decompositions): a head
                # split must start from [B, T, C]; the kernel checks the rank at run time.
                rin = rout - 2 if labels[-3] == "S" else rout - 1
            if rin is None:
                raise NoMatch(f"Reshape '{node.name}': input rank unknown")
            if head_split and rin == rout - 1 and labels[-3] != "S":
                # split of the channel axis into (H, D): the head split
                for lab, ax in ((labels[-2], rout - 2), (labels[-1], rout - 1)):
                    sizes[lab] = _static(t, node, opset, ax)
                _complete(sizes, ("H", "D"), src)        # view(b, t, -1, D): H = C / D
                labels = labels[:-2] + [labels[-2] + "*" + labels[-1]]
            elif head_split and rin == rout - 2 and labels[-3] == "S":
                for lab, ax in ((labels[-3], rout - 3), (labels[-2], rout - 2), (labels[-1], rout - 1)):
                    sizes[lab] = _static(t, node, opset, ax)
                _complete(sizes, ("S", "H", "D"), src)
                labels = labels[:-3] + ["S*" + labels[-2] + "*" + labels[-1]]
            elif rin == rout - 1 and rin == 3:
                # [X*Y, a, b] -> [X, Y, a, b] (merge of leading axes undone)
                if any(_same_dim(x, y) is False for x, y in zip(_dims(src)[-2:], (_dims(t) or [None] * 4)[-2:])):
                    raise NoMatch(f"Reshape '{node.name}' changes the trailing axes")
                labels = [labels[0] + "*" + labels[1]] + labels[2:]
            elif rin == rout + 1 and "*" in labels[0]:
                x, y = labels[0].split("*", 1)
                labels = [x, y] + labels[1:]
            else:
                raise NoMatch(f"Reshape '{node.name}' from rank {rin} to {rout} is not a head split")
            if labels[-1] in ("H*D", "S*H*D") and len(labels) == 3:
                nodes.append(node)
                t = src
                break
        else:
            raise NoMatch(f"'{t.name}' comes from {op} '{node.name}', not a head split")
        nodes.append(node)
        t = node.inputs[0]
    else:
        raise NoMatch("head layout chain too long")
    if labels[:2] != ["B", "T"]:
        raise NoMatch(f"projection output '{t.name}' has axes {labels}, expected [B, T, C]")
    if (labels[-1] == "S*H*D") != (select is not None):
        raise NoMatch(f"'{t.name}': a fused qkv without a q/k/v selection (or the reverse)")
    return Traced(t, labels, select, nodes, sizes)


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


def match_attention(graph: gs.Graph, softmax: gs.Node) -> AttentionMatch:
    opset = graph_opset(graph)
    rank = len(softmax.inputs[0].shape) if softmax.inputs[0].shape is not None else 4
    if rank != 4:
        raise NoMatch(f"Softmax over a rank-{rank} tensor, not [B, H, T, T]")
    if softmax.attrs.get("axis", -1) % 4 != 3:
        raise NoMatch("Softmax not over the key axis")
    core = [softmax]
    t = softmax.inputs[0]
    mask = None
    if t.inputs and t.inputs[0].op == "Add":
        add = t.inputs[0]
        a, b = add.inputs
        scores_side = a if a.inputs and a.inputs[0].op in ("MatMul", "Mul", "Div") else b
        mask = b if scores_side is a else a
        core.append(add)
        t = scores_side
    t = _strip_scale(graph, t, opset, core)
    if not t.inputs or t.inputs[0].op != "MatMul":
        raise NoMatch("Softmax input is not Q·Kᵀ (with an optional scale and mask)")
    qk = t.inputs[0]
    core.append(qk)
    probs = softmax.outputs[0]
    probs = _skip_inference_identities(probs, opset, core)
    users = list(probs.outputs)
    if len(users) != 1 or users[0].op != "MatMul" or users[0].inputs[0] is not probs:
        raise NoMatch("Softmax output does not feed one MatMul with V")
    av = users[0]
    core.append(av)

    q = trace_heads(graph, qk.inputs[0], ["B", "H", "T", "D"], opset)
    k = trace_heads(graph, qk.inputs[1], ["B", "H", "D", "T"], opset)
    v = trace_heads(graph, av.inputs[1], ["B", "H", "T", "D"], opset)
    for tr in (q, k, v):
        core.extend(tr.nodes)

    # Forward: context [B, H, T, D] -> Transpose(0, 2, 1, 3) -> Reshape [B, T, H*D].
    ctx = av.outputs[0]
    ctx_users = [u for u in ctx.outputs if u.op != "Shape"]
    if len(ctx_users) == 1 and ctx_users[0].op == "Reshape" and _dims(ctx_users[0].outputs[0]) is not None \
            and len(_dims(ctx_users[0].outputs[0])) == 4:
        # SDPA decompositions re-view the context as [B, H, T, D] (checked below, once H and D are known)
        core.append(ctx_users[0])
        ctx = ctx_users[0].outputs[0]
        identity_view = ctx_users[0]
    else:
        identity_view = None
    tr_users = [u for u in ctx.outputs if u.op != "Shape"]
    if len(tr_users) != 1 or tr_users[0].op != "Transpose" or list(tr_users[0].attrs.get("perm", [])) != [0, 2, 1, 3]:
        raise NoMatch("attention context is not merged by Transpose(0, 2, 1, 3)")
    merged = tr_users[0].outputs[0]
    rs_users = [u for u in merged.outputs if u.op != "Shape"]
    if len(rs_users) != 1 or rs_users[0].op != "Reshape":
        raise NoMatch("attention context is not merged by a Reshape")
    out = rs_users[0].outputs[0]
    if out.shape is not None and len(out.shape) != 3:
        raise NoMatch(f"merged context has rank {len(out.shape)}, not 3")
    core += [tr_users[0], rs_users[0]]

    sizes = {**q.head_dims, **k.head_dims, **v.head_dims}
    heads, depth = sizes.get("H"), sizes.get("D")
    if not heads or not depth:
        raise NoMatch("number of heads or head size is not static")
    if identity_view is not None:
        target = _reshape_target(identity_view, opset)
        ok = target is not None and len(target) == 4 and target[1] in (heads, -1) and target[3] in (depth, None) \
            and all(target[i] is not None or _copies_head_dim(identity_view, i, opset) for i in (0, 2, 3))
        if not ok:
            raise NoMatch(f"Reshape '{identity_view.name}' of the context is not a [B, H, T, D] view")
    for tr, name in ((q, "Q"), (k, "K"), (v, "V")):
        if tr.head_dims.get("H") not in (None, heads) or tr.head_dims.get("D") not in (None, depth):
            raise NoMatch(f"{name} has another head split than the rest")
        if tr.select is not None and tr.select != {"Q": 0, "K": 1, "V": 2}[name]:
            raise NoMatch(f"{name} is slice {tr.select} of the fused qkv, not {'QKV'.index(name)}")
    fused = {tr.select is not None for tr in (q, k, v)}
    if len(fused) != 1:
        raise NoMatch("a mix of fused and separate projections")
    if fused == {True} and not (q.source is k.source is v.source):
        raise NoMatch("q, k and v come from different fused projections")
    query_key_mask = False
    if mask is not None:
        mdims = _dims(mask)
        if mdims is None:
            raise NoMatch(f"mask '{mask.name}' has unknown shape; cannot prove it is a per-key mask")
        # Broadcasting aligns trailing axes: only [B|1, 1, 1, T] and [1, T] are per key ([T, T]
        # is a causal or other per-query mask).
        if not ((len(mdims) == 4 and mdims[1] == 1 and mdims[2] == 1) or (len(mdims) == 2 and mdims[0] == 1)):
            # A query × key mask [B|1, 1, T, T] (transformers ≥ 5) is fed as it is when its
            # construction is per key up to per-query factors; the kernel checks its rows.
            why = f"rank {len(mdims)}" if len(mdims) != 4 else \
                "it varies over heads" if isinstance(mdims[1], (int, np.integer)) and mdims[1] != 1 else \
                _query_key_mask_reason(mask, opset)
            if why:
                raise NoMatch(f"mask '{mask.name}' of shape {mdims} is not per key [B, 1, 1, T]: {why}")
            query_key_mask = True
    reason = _consumers_only(graph, core, out)
    if reason:
        raise NoMatch(reason)
    return AttentionMatch(q, k, v, mask, out, heads, heads * depth, core, query_key_mask)


@dataclass
class AttentionChange(LayerChange):
    """A converted attention core: no weights; it removes the 2·B·T²·C multiplications of Q·Kᵀ
    and P·V. `rows` (set by convert_onnx) is B·T; T is the static token count when the graph
    has one, else the count is unknown."""
    tokens: int | None = None

    @property
    def params(self) -> int:
        return 0

    @property
    def macs_removed(self) -> int | None:
        if self.rows is None or self.tokens is None:
            return None
        return 2 * self.rows * self.tokens * self.in_features


def _static_tokens(m: "AttentionMatch") -> int | None:
    dims = _dims(m.output)
    return int(dims[1]) if dims and len(dims) == 3 and isinstance(dims[1], (int, np.integer)) else None


@register(NAME, AddAttentionConfig, "softmax attention core → AddLinearAttention (binary Q/K, additions only)")
def run(graph: gs.Graph, cfg: AddAttentionConfig) -> PassResult:
    result = PassResult(NAME)
    for softmax in [n for n in graph.nodes if n.op == "Softmax" and (n.domain or "") in ("", "ai.onnx")]:
        label = node_label(softmax)
        reason = exclusion_reason(label, cfg.include, cfg.exclude)
        if reason:
            result.skip(label, reason)
            continue
        try:
            m = match_attention(graph, softmax)
        except NoMatch as err:
            result.skip(label, str(err))
            continue
        c = m.channels
        if m.q.select is not None:
            parts = [gs.Variable(f"{label}.{n}", dtype=np.float32) for n in "qkv"]
            split = gs.Constant(f"{label}.split", np.array([c, c, c], dtype=np.int64))
            graph.nodes.append(gs.Node("Split", f"{label}.qkv_split", attrs={"axis": -1},
                                       inputs=[m.q.source, split], outputs=parts))
            q, k, v = parts
        else:
            q, k, v = m.q.source, m.k.source, m.v.source
        inputs = [q, k, v] + ([m.mask] if m.mask is not None else [])
        out = m.output
        m.output.inputs[0].outputs.clear()
        graph.nodes.append(gs.Node(OP, f"{label}.add_attention", domain=DOMAIN, inputs=inputs, outputs=[out],
                                   attrs={"num_heads": m.heads, "binarizer": cfg.binarizer}))
        result.changes.append(AttentionChange(
            NAME, label, OP, c, c, 0, 0, activation=m.q.source.name, tokens=_static_tokens(m),
            detail=f"{m.heads} heads × {c // m.heads}, {'fused qkv' if m.q.select is not None else 'separate q/k/v'}"
                   + (", key mask" if m.mask is not None else "")
                   + (" (query × key, rows checked at run time)" if m.query_key_mask else "")))
    graph.cleanup().toposort()
    return result
