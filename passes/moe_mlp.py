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
from mfconvert.passes.graph import claim, claimant, graph_opset, node_label
from mfconvert.passes.linear import LinearMatch, match_linear, shift_linear_node, weight_warnings
from mfconvert.passes.registry import register
from mfconvert.passes.report import LayerChange, PassResult
from mfconvert.passes.shift_format import ShiftFormat
from mfconvert.passes.targeting import compile_patterns, exclusion_reason

NAME = "moe-mlp"
ROUTES_KEY = "mfconvert.moe_mlp.routes"
MIN_OPSET = 13


@dataclass
class MoEMLPConfig(ShiftFormat):
    """ShiftLinear format of the Shift expert (ShiftFormat: the shift-linear pass's fields, terms
    included), router initialisation (docs/ops.md), and which blocks to convert (include/exclude
    match the name of the block's fc1 node)."""
    router_std: float = 10.0
    router_bias: float = 0.0
    seed: int = 0
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)

    def __post_init__(self):
        super().__post_init__()
        if not (self.router_std >= 0 and np.isfinite(self.router_std) and np.isfinite(self.router_bias)):
            raise ValueError(f"router_std must be finite and >= 0 and router_bias finite, "
                             f"got {self.router_std}, {self.router_bias}")
        compile_patterns(self.include, "--include")
        compile_patterns(self.exclude, "--exclude")


@dataclass
class Block:
    """An MLP found in the graph: fc1 → activation → fc2."""
    fc1: LinearMatch
    act: Activation
    fc2: LinearMatch


def match_block(graph: gs.Graph, node: gs.Node) -> Block | str | None:
    """The MLP block whose fc1 is `node`; a reason when it is one but cannot be converted;
    None when `node` does not start an MLP (attention projections, heads)."""
    fc1 = match_linear(graph, node)
    if isinstance(fc1, str):
        return None
    found = find_activation(graph, fc1.output)
    if not isinstance(found, tuple):
        return found
    act, fc2_node = found
    if claimant(graph, fc2_node) is not None:
        return None
    fc2 = match_linear(graph, fc2_node)
    if isinstance(fc2, str):
        return f"fc2 '{node_label(fc2_node)}': {fc2}"
    if graph_opset(graph) < MIN_OPSET:
        return f"opset {graph_opset(graph)} < {MIN_OPSET}"
    return Block(fc1, act, fc2)


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


def rewrite(graph: gs.Graph, block: Block, label: str, cfg: MoEMLPConfig) -> tuple[gs.Tensor, int]:
    """Replace the block by the ShiftMoEMLP subgraph of docs/ops.md; (route tensor, bytes of
    the Shift expert's constants)."""
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

    for old in block.fc1.nodes + block.act.nodes + block.fc2.nodes:
        old.outputs.clear()
    graph.nodes.extend(emit.nodes)
    claim(graph, [n for n in emit.nodes if n.op == "Gemm"], NAME)
    return route, shift_bytes + router_w.nbytes + router_b.nbytes


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
        block = match_block(graph, node)
        if block is None:
            continue
        reason = block if isinstance(block, str) else exclusion_reason(label, cfg.include, cfg.exclude)
        if reason:
            result.skip(label, reason)
            continue
        used.update(id(n) for n in block.fc1.nodes + block.fc2.nodes)
        fc2_label = node_label(block.fc2.nodes[0])
        route, after = rewrite(graph, block, label, cfg)
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
