"""Pass `moe-mlp`: each MLP block fc1 → activation → fc2 becomes a ShiftMoEMLP block
(docs/ops.md#shiftmoemlp): a router sends every token to the float MLP or to its ShiftLinear copy,
and only the chosen expert computes it (Compress → expert → one ScatterND back)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from mfconvert.nn.moe_mlp import router_init
from mfconvert.passes.activation import Activation, copy_nodes, find_activation
from mfconvert.passes.graph import NotConstant, claimant, constant_value, graph_opset, is_graph_output, node_label
from mfconvert.passes.match import MatchResult, failed, fake_quant_user, matched
from mfconvert.passes.linear import LinearMatch, match_linear, shift_linear_node, weight_warnings
from mfconvert.passes.registry import register
from mfconvert.passes.report import LayerChange, PassResult
from mfconvert.passes.shift_format import ShiftFormat
from mfconvert.passes.targeting import Targeting, exclusion_reason

NAME = "moe-mlp"
ROUTES_KEY = "mfconvert.moe_mlp.routes"
MIN_OPSET = 13


@dataclass
class MoEMLPConfig(ShiftFormat, Targeting):
    """ShiftLinear format of the Shift expert (ShiftFormat: the shift-linear pass's fields, terms
    included), router initialisation (docs/ops.md), and which blocks to convert (include/exclude
    match the name of the block's fc1 node)."""
    router_std: float = 10.0
    router_bias: float = 0.0
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if not (self.router_std >= 0 and np.isfinite(self.router_std) and np.isfinite(self.router_bias)):
            raise ValueError(f"router_std must be finite and >= 0 and router_bias finite, "
                             f"got {self.router_std}, {self.router_bias}")
        self.check_targeting()


@dataclass
class Block:
    """An MLP found in the graph: fc1 → activation → fc2, on N-D or flattened ([B·T, C]) tokens;
    reshapes and activation fake quantisation (QuantizeLinear → DequantizeLinear) between the
    linears are part of the block (a bias Add after fc1's fake quantisation is folded into fc1)."""
    fc1: LinearMatch
    act: Activation
    fc2: LinearMatch
    between: list = field(default_factory=list)   # the reshapes and fake quantisation the rewrite drops


# What may sit between the linears and the activation without changing its meaning: reshapes
# (an elementwise function commutes with them; both ends keep the hidden axis last, so tokens keep
# their order) and activation fake quantisation (the identity up to rounding).
_BETWEEN = ("Reshape", "QuantizeLinear")


def _through(graph: gs.Graph, t: gs.Tensor, opset: int, hidden: int, bias: list | None,
             nodes: list) -> gs.Tensor:
    """Follow t forward through reshapes, fake quantisation and (with `bias`, a one-element list
    to add into) a per-channel constant Add, each its only reader; the tensor reached."""
    for _ in range(8):
        users = list(t.outputs)
        if len(users) != 1 or is_graph_output(graph, t):
            return t
        user = users[0]
        if user.op == "Reshape" and user.inputs[0] is t:
            nodes.append(user)
            t = user.outputs[0]
        elif (fq := fake_quant_user(t)) is not None:
            nodes.extend(fq[1])
            t = fq[0]
        elif bias is not None and user.op == "Add" and any(n.op == "QuantizeLinear" for n in nodes):
            other = user.inputs[1] if user.inputs[0] is t else user.inputs[0]
            try:
                b = np.asarray(constant_value(other, opset), dtype=np.float64)
            except NotConstant:
                return t
            if b.size != hidden or b.shape[-1] != hidden:
                return t
            bias[0] = bias[0] + b.reshape(-1)
            nodes.append(user)
            t = user.outputs[0]
        else:
            return t
    return t


def _rank(t: gs.Tensor) -> int | None:
    if t.shape is not None:
        return len(t.shape)
    node = t.inputs[0] if t.inputs else None
    if node is not None and node.op == "Reshape" and node.inputs[1].shape is not None:
        d = node.inputs[1].shape[0]
        return int(d) if isinstance(d, (int, np.integer)) else None
    return None


# com.microsoft activations (onnxruntime.transformers.optimizer fuses fc1's bias into BiasGelu):
# the probe evaluation cannot run them, their definitions name them. Their constant inputs (the
# bias) stay with the node, which both experts copy.
CONTRIB_ACTIVATIONS = {"BiasGelu": "GELU", "Gelu": "GELU", "FastGelu": "GELU(tanh)", "QuickGelu": "QuickGELU"}


def _contrib_activation(graph: gs.Graph, h: gs.Tensor, opset: int):
    users = list(h.outputs)
    if len(users) != 1 or users[0].domain != "com.microsoft" or users[0].op not in CONTRIB_ACTIVATIONS:
        return None
    node = users[0]
    if node.inputs[0] is not h or len(node.outputs[0].outputs) != 1 or is_graph_output(graph, node.outputs[0]):
        return None
    for t in node.inputs[1:]:
        if t.name and not isinstance(t, gs.Constant):
            try:
                constant_value(t, opset)
            except NotConstant:
                return f"{node.op} '{node.name}': bias '{t.name}' is not constant"
            return f"{node.op} '{node.name}': bias '{t.name}' is computed, not an initializer"
    end = node.outputs[0].outputs[0]
    if end.op not in ("MatMul", "Gemm", *_BETWEEN):
        return None
    return Activation(CONTRIB_ACTIVATIONS[node.op], [node], h, node.outputs[0], {}), end


def match_block(graph: gs.Graph, node: gs.Node) -> MatchResult:
    """The MLP block whose fc1 is `node` (value: Block; claims: its linears' nodes), or the reason
    it cannot be converted; a `quiet` miss when `node` does not start an MLP (attention
    projections, heads)."""
    opset = graph_opset(graph)
    fc1 = match_linear(graph, node)
    if isinstance(fc1, str):
        return MatchResult(reason=fc1, node=node, quiet=True)
    hidden = fc1.weight.shape[0]
    between: list[gs.Node] = []
    bias = [np.zeros(hidden) if fc1.bias is None else np.asarray(fc1.bias, dtype=np.float64)]
    h = _through(graph, fc1.output, opset, hidden, bias, between)
    found = _contrib_activation(graph, h, opset) or find_activation(graph, h, ends=_BETWEEN)
    if not isinstance(found, tuple):
        return MatchResult(reason=found or "not followed by an activation and a linear", node=node,
                           quiet=found is None)
    act, end = found
    a = _through(graph, act.output, opset, hidden, None, between) if end.op in _BETWEEN else act.output
    fc2_node = next(iter(a.outputs), None) if len(a.outputs) == 1 else None
    if fc2_node is None or fc2_node.op not in ("MatMul", "Gemm") or fc2_node.inputs[0] is not a:
        return MatchResult(reason="the activation does not reach one linear", node=end, quiet=True)
    if claimant(graph, fc2_node) is not None:
        return MatchResult(reason=f"fc2 '{node_label(fc2_node)}' already converted", node=fc2_node, quiet=True)
    fc2 = match_linear(graph, fc2_node)
    if isinstance(fc2, str):
        return failed(f"fc2 '{node_label(fc2_node)}': {fc2}", fc2_node)
    if fc2.weight.shape[1] != hidden:
        return failed(f"fc1 has {hidden} outputs, fc2 takes {fc2.weight.shape[1]}", fc2_node)
    if any(n.op == "Reshape" for n in between):
        ranks = (_rank(fc1.activation), _rank(a))
        if None in ranks or ranks[0] != ranks[1]:
            return failed(f"the reshapes between fc1 and fc2 change the token layout (rank {ranks[0]} → {ranks[1]})",
                          next(n for n in between if n.op == "Reshape"))
    if graph_opset(graph) < MIN_OPSET:
        return failed(f"opset {graph_opset(graph)} < {MIN_OPSET}", node)
    if any(n.op == "Add" for n in between):
        fc1 = replace(fc1, bias=bias[0])
    return matched(Block(fc1, act, fc2, between), claims=fc1.nodes + fc2.nodes)


class _Emitter:
    """Appends nodes named under one prefix; returns their output tensors."""

    def __init__(self, prefix: str):
        self.prefix, self.nodes = prefix, []

    def const(self, name: str, value) -> gs.Constant:
        return gs.Constant(f"{self.prefix}/{name}", np.asarray(value))

    def __call__(self, op: str, inputs: list, name: str, dtype=None, out: gs.Tensor | None = None, **attrs):
        out = out if out is not None else gs.Variable(f"{self.prefix}/{name}", dtype=dtype)
        self.nodes.append(gs.Node(op=op, name=f"{self.prefix}/{name}", attrs=attrs, inputs=inputs, outputs=[out]))
        return out


def _linear(emit: _Emitter, x: gs.Tensor, linear: LinearMatch, name: str, cfg: MoEMLPConfig,
            shift: bool) -> tuple[gs.Tensor, int]:
    """The linear as a float Gemm (Mult expert) or a ShiftLinear (Shift expert); (output, bytes
    of the ShiftLinear's constants or 0)."""
    if shift:
        y = gs.Variable(f"{emit.prefix}/{name}", dtype=np.float32)
        node_name = f"{emit.prefix}/{name}"   # its terms: allocated per node (calibrate/allocate.py)
        node, nbytes = shift_linear_node(node_name, x, y, linear.weight, linear.bias,
                                         replace(cfg, terms=cfg.terms_for(node_name)))
        emit.nodes.append(node)
        return y, nbytes
    inputs = [x, emit.const(f"{name}.weight", linear.weight.astype(np.float32))]
    if linear.bias is not None:
        inputs.append(emit.const(f"{name}.bias", np.asarray(linear.bias, dtype=np.float32)))
    return emit("Gemm", inputs, name, transB=1), 0


def rewrite(graph: gs.Graph, block: Block, label: str, cfg: MoEMLPConfig) -> tuple[gs.Tensor, int, list[gs.Node]]:
    """Replace the block by the ShiftMoEMLP subgraph of docs/ops.md; (route tensor, bytes of
    the Shift expert's constants, the float Gemms it emitted: router and Mult expert, which no
    later pass may convert)."""
    emit = _Emitter(f"{label}/moe")
    x, y = block.fc1.activation, block.fc2.output
    d, d_out = block.fc1.weight.shape[1], block.fc2.weight.shape[0]
    router_w, router_b = router_init(d, cfg.router_std, cfg.router_bias, cfg.seed)

    x2 = emit("Reshape", [x, emit.const("flat_shape", np.array([-1, d]))], "tokens")
    logits = emit("Gemm", [x2, emit.const("router.weight", router_w), emit.const("router.bias", router_b)],
                  "router", transB=1)
    route = emit("ArgMax", [logits], "route", dtype=np.int64, axis=1, keepdims=1)
    probs = emit("Softmax", [logits], "probs", axis=1)
    gate = emit("GatherElements", [probs, route], "gate", axis=1)
    flat_route = emit("Reshape", [route, emit.const("vector_shape", np.array([-1]))], "route_flat")
    to_shift = emit("Cast", [flat_route], "to_shift", to=onnx.TensorProto.BOOL)
    to_mult = emit("Not", [to_shift], "to_mult")

    outputs, positions, shift_bytes = [], [], 0
    for expert, mask in (("mult", to_mult), ("shift", to_shift)):
        xe = emit("Compress", [x2, mask], f"{expert}.tokens", axis=0)
        positions.append(emit("NonZero", [mask], f"{expert}.positions"))
        hidden, fc1_bytes = _linear(emit, xe, block.fc1, f"{expert}.fc1", cfg, shift=expert == "shift")
        act_nodes, activated = copy_nodes(block.act, hidden, f"{emit.prefix}/{expert}.act")
        emit.nodes.extend(act_nodes)
        ye, fc2_bytes = _linear(emit, activated, block.fc2, f"{expert}.fc2", cfg, shift=expert == "shift")
        outputs.append(ye)
        shift_bytes += fc1_bytes + fc2_bytes

    index = emit("Transpose", [emit("Concat", positions, "positions", axis=1)], "scatter_index", perm=[1, 0])
    stacked = emit("Concat", outputs, "expert_outputs", axis=0)
    merged = emit("ScatterND", [stacked, index, stacked], "merged")
    gated = emit("Mul", [merged, gate], "gated")
    lead = emit("Slice", [emit("Shape", [x], "input_shape"), emit.const("zero", np.array([0])),
                          emit.const("minus_one", np.array([-1]))], "leading_dims")
    out_shape = emit("Concat", [lead, emit.const("out_features", np.array([d_out]))], "output_shape", axis=0)
    reshape_attrs = {"allowzero": 1} if graph_opset(graph) >= 14 else {}
    emit("Reshape", [gated, out_shape], "output", out=y, **reshape_attrs)

    for old in block.fc1.nodes + block.act.nodes + block.fc2.nodes + block.between:
        old.outputs.clear()
    graph.nodes.extend(emit.nodes)
    return route, shift_bytes + router_w.nbytes + router_b.nbytes, [n for n in emit.nodes if n.op == "Gemm"]


def expert_pairs(model: onnx.ModelProto) -> dict[str, str]:
    """{Shift expert ShiftLinear node name: the Mult expert's float weight initializer [out, in]}
    of every block this pass emitted (rewrite() names them `{block}/moe/{expert}.{fc}`)."""
    blocks = json.loads({p.key: p.value for p in model.metadata_props}.get(ROUTES_KEY, "{}"))
    names = {n.name for n in model.graph.node if n.op_type == "ShiftLinear"}
    return {f"{b}/moe/shift.{fc}": f"{b}/moe/mult.{fc}.weight" for b in blocks for fc in ("fc1", "fc2")
            if f"{b}/moe/shift.{fc}" in names}


def _weight_bytes(linear: LinearMatch) -> int:
    return linear.weight.size * 4 + (0 if linear.bias is None else linear.bias.size * 4)


@register(NAME, MoEMLPConfig, "MLP fc1 → act → fc2 → router + float expert + ShiftLinear expert")
def run(graph: gs.Graph, cfg: MoEMLPConfig) -> PassResult:
    result = PassResult(NAME)
    routes = {}
    used: set[int] = set()
    candidates = [n for n in graph.nodes if n.op in ("MatMul", "Gemm") and (n.domain or "") in ("", "ai.onnx")
                  and claimant(graph, n) is None]
    for node in candidates:
        if id(node) in used:
            continue
        label = node_label(node)
        found = match_block(graph, node)
        if not found and found.quiet:
            continue
        reason = found.message_for(label) if not found else exclusion_reason(label, cfg.include, cfg.exclude)
        if reason:
            result.skip(label, reason)
            continue
        block = found.value
        used.update(id(n) for n in found.claims)
        fc2_label = node_label(block.fc2.nodes[0])
        route, after, emitted = rewrite(graph, block, label, cfg)
        result.claims.extend(emitted)   # returned: convert_onnx keeps the passes after this one off them
        routes[label] = route.name
        hidden, d = block.fc1.weight.shape
        d_out = block.fc2.weight.shape[0]
        for linear, name, activation in ((block.fc1, label, block.fc1.activation.name),
                                         (block.fc2, fc2_label, block.act.output.name)):
            out_f, in_f = linear.weight.shape
            share = after if linear is block.fc1 else 0   # the block's new constants, counted once
            result.changes.append(LayerChange(
                NAME, name, "ShiftMoEMLP", in_f, out_f, _weight_bytes(linear),
                _weight_bytes(linear) + share, activation=activation,
                warnings=weight_warnings(label, linear.weight, None, cfg),   # --exclude names the block
                target=label,   # include/exclude name the block by its fc1 (calibrate/sensitivity.py)
                detail=f"block {label} ({d}→{hidden}→{d_out}, {block.act.name}): float Mult expert + "
                       f"{cfg.weight_bits}-bit Shift expert" + (f" × {cfg.terms} terms" if cfg.terms > 1 else "")
                       + "; MACs removed if every token takes Shift"))
    if routes:
        result.metadata[ROUTES_KEY] = json.dumps(routes)
    graph.cleanup().toposort()
    return result
