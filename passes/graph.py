"""Small questions passes ask of an onnx-graphsurgeon graph: is this tensor constant, who reads it."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx.reference import ReferenceEvaluator

# A weight computed from constants (paddle2onnx and others emit Transpose/Cast/Reshape chains
# on initializers) is folded when its producing subgraph has at most this many nodes.
MAX_FOLD_NODES = 16


class NotConstant(Exception):
    """The tensor depends on a graph input (or on an op we cannot evaluate)."""


def node_label(node: gs.Node) -> str:
    """The name a report shows for a node: its name, or its op and first output if unnamed."""
    if node.name:
        return node.name
    out = node.outputs[0].name if node.outputs else "?"
    return f"{node.op}({out})"


def _producer_subgraph(tensor: gs.Tensor) -> list[gs.Node]:
    """Nodes computing `tensor` from constants alone, in execution order."""
    order: list[gs.Node] = []
    seen: set[int] = set()

    def visit(t: gs.Tensor) -> None:
        if isinstance(t, gs.Constant):
            return
        if not t.inputs:
            raise NotConstant(f"it depends on graph input '{t.name}'")
        node = t.inputs[0]
        if id(node) in seen:
            return
        if node.op in ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial"):
            raise NotConstant(f"'{t.name}' comes from random op {node.op}")
        if any(True for _ in node.subgraphs()):
            raise NotConstant(f"'{t.name}' comes from control-flow op {node.op}")
        for inp in node.inputs:
            if inp.name or isinstance(inp, gs.Constant):
                visit(inp)
        seen.add(id(node))
        order.append(node)
        if len(order) > MAX_FOLD_NODES:
            raise NotConstant(f"'{t.name}' needs more than {MAX_FOLD_NODES} nodes to fold")

    visit(tensor)
    return order


def constant_value(tensor: gs.Tensor, opset: int) -> np.ndarray:
    """The value of a tensor that is an initializer, a Constant node's output, or computed
    from constants by a small subgraph; raises NotConstant otherwise."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    nodes = _producer_subgraph(tensor)
    if len(nodes) == 1 and nodes[0].op == "Constant" and "value" in nodes[0].attrs:
        value = nodes[0].attrs["value"]
        return np.asarray(value.values if isinstance(value, gs.Constant) else value)
    sub = gs.Graph(nodes=[_clone(n) for n in nodes], outputs=[], opset=opset)
    produced = {o.name: o for n in sub.nodes for o in n.outputs}
    sub.outputs = [produced[tensor.name]]
    model = gs.export_onnx(sub, do_type_check=False)
    try:
        (value,) = ReferenceEvaluator(model).run(None, {})
    except Exception as err:  # the reference evaluator lacks some ops
        raise NotConstant(f"'{tensor.name}' could not be folded: {err}") from err
    return np.asarray(value)


def _clone(node: gs.Node) -> gs.Node:
    """A detached copy of a node (so building a subgraph leaves the original graph intact)."""
    def copy_tensor(t: gs.Tensor) -> gs.Tensor:
        if isinstance(t, gs.Constant):
            return gs.Constant(t.name, t.values)
        return gs.Variable(t.name, dtype=t.dtype, shape=t.shape)
    clone = gs.Node(op=node.op, name=node.name, attrs=dict(node.attrs), domain=node.domain,
                    inputs=[], outputs=[])
    clone.inputs = [copy_tensor(t) for t in node.inputs]
    clone.outputs = [gs.Variable(t.name, dtype=t.dtype, shape=t.shape) for t in node.outputs]
    return clone


def graph_opset(graph: gs.Graph) -> int:
    return int(graph.opset)


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(out is tensor or out.name == tensor.name for out in graph.outputs)


def sole_consumer(graph: gs.Graph, tensor: gs.Tensor) -> gs.Node | None:
    """The one node reading `tensor`, if exactly one does and it is not a graph output."""
    if len(tensor.outputs) != 1 or is_graph_output(graph, tensor):
        return None
    return tensor.outputs[0]


def tensor_dtype(tensor: gs.Tensor):
    """numpy dtype of a tensor where the graph knows it, else None."""
    if isinstance(tensor, gs.Constant):
        return tensor.values.dtype
    dt = tensor.dtype
    if dt is None:
        return None
    if isinstance(dt, int):
        try:
            return onnx.helper.tensor_dtype_to_np_dtype(dt)
        except KeyError:   # UNDEFINED (0) or not a type: unknown
            return None
    return np.dtype(dt)


def claim(graph: gs.Graph, nodes: list[gs.Node], pass_name: str) -> None:
    """Mark nodes a pass emitted as final, so later passes leave them alone (e.g. the float
    Gemms of an MoE block's Mult expert must not become ShiftLinear)."""
    claims = graph.__dict__.setdefault("_mfconvert_claims", {})
    claims.update({id(n): (n, pass_name) for n in nodes})


def claimant(graph: gs.Graph, node: gs.Node) -> str | None:
    """The pass that claimed `node`, or None."""
    entry = graph.__dict__.get("_mfconvert_claims", {}).get(id(node))
    return entry[1] if entry else None
