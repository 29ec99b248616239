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
        if _is_qdq(node):
            return   # a leaf: evaluated in NumPy (constant_value), not by the reference evaluator
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
    if tensor.inputs and _is_qdq(tensor.inputs[0]):
        return _qdq_value(tensor.inputs[0], opset)
    nodes = _producer_subgraph(tensor)
    if len(nodes) == 1 and nodes[0].op == "Constant" and "value" in nodes[0].attrs:
        value = nodes[0].attrs["value"]
        return np.asarray(value.values if isinstance(value, gs.Constant) else value)
    # Inputs made by QuantizeLinear/DequantizeLinear enter the subgraph as their values.
    leaves = {t.name: _qdq_value(t.inputs[0], opset) for n in nodes for t in n.inputs
              if not isinstance(t, gs.Constant) and t.inputs and _is_qdq(t.inputs[0])}
    sub = gs.Graph(nodes=[_clone(n, leaves) for n in nodes], outputs=[], opset=opset)
    produced = {o.name: o for n in sub.nodes for o in n.outputs}
    sub.outputs = [produced[tensor.name]]
    model = gs.export_onnx(sub, do_type_check=False)
    try:
        (value,) = ReferenceEvaluator(model).run(None, {})
    except Exception as err:  # the reference evaluator lacks some ops
        raise NotConstant(f"'{tensor.name}' could not be folded: {err}") from err
    return np.asarray(value)


def _clone(node: gs.Node, values: dict[str, np.ndarray] | None = None) -> gs.Node:
    """A detached copy of a node (so building a subgraph leaves the original graph intact);
    inputs named in `values` become constants holding them."""
    def copy_tensor(t: gs.Tensor) -> gs.Tensor:
        if isinstance(t, gs.Constant):
            return gs.Constant(t.name, t.values)
        if values and t.name in values:
            return gs.Constant(t.name, values[t.name])
        return gs.Variable(t.name, dtype=t.dtype, shape=t.shape)
    clone = gs.Node(op=node.op, name=node.name, attrs=dict(node.attrs), domain=node.domain,
                    inputs=[], outputs=[])
    clone.inputs = [copy_tensor(t) for t in node.inputs]
    clone.outputs = [gs.Variable(t.name, dtype=t.dtype, shape=t.shape) for t in node.outputs]
    return clone


# --- QuantizeLinear / DequantizeLinear on constants (a QDQ model's weights) ------------------
# onnx.reference has no DequantizeLinear for some opsets (18) and reads float8/int4 types we do
# not take; these follow the ONNX spec: y = (x − zp)·scale, and y = saturate(round(x / scale) + zp)
# with round half to even, scale per tensor, per axis (1-D along `axis`) or per block.

_QDQ_DOMAINS = ("", "ai.onnx", "com.microsoft")
_INT_TYPES = (np.int8, np.uint8, np.int16, np.uint16, np.int32)


def _is_qdq(node: gs.Node) -> bool:
    return node.op in ("QuantizeLinear", "DequantizeLinear") and (node.domain or "") in _QDQ_DOMAINS


def _qdq_args(node: gs.Node, opset: int) -> list[np.ndarray | None]:
    return [constant_value(t, opset) if (t.name or isinstance(t, gs.Constant)) else None for t in node.inputs]


def _broadcast_scale(a: np.ndarray, shape: tuple, axis: int, block: int, node: gs.Node) -> np.ndarray:
    """A scale or zero point shaped to broadcast against an input of `shape`."""
    if a.size == 1 and (a.ndim <= 1 or block <= 0):
        return a.reshape(())
    axis = axis + len(shape) if axis < 0 else axis
    if not 0 <= axis < len(shape):
        raise NotConstant(f"{node.op} '{node.name}': axis {axis} out of range for rank {len(shape)}")
    if block > 0:
        if a.ndim != len(shape):
            raise NotConstant(f"{node.op} '{node.name}': blocked scale of rank {a.ndim}, input of rank {len(shape)}")
        return np.repeat(a, block, axis=axis).take(range(shape[axis]), axis=axis)
    if a.ndim != 1 or a.size != shape[axis]:
        raise NotConstant(f"{node.op} '{node.name}': scale of shape {list(a.shape)} is not per axis {axis} "
                          f"of an input of shape {list(shape)}")
    return a.reshape([-1 if i == axis else 1 for i in range(len(shape))])


def _qdq_value(node: gs.Node, opset: int) -> np.ndarray:
    """The value of a QuantizeLinear or DequantizeLinear whose inputs are constant."""
    x, scale, *rest = _qdq_args(node, opset) + [None]
    zp = rest[0]
    axis, block = int(node.attrs.get("axis", 1)), int(node.attrs.get("block_size", 0))
    if x is None or scale is None:
        raise NotConstant(f"{node.op} '{node.name}' lacks an input")
    if not np.issubdtype(scale.dtype, np.floating):
        raise NotConstant(f"{node.op} '{node.name}': scale of type {scale.dtype} (float8/bfloat16 not read)")
    s = _broadcast_scale(scale, x.shape, axis, block, node)
    if node.op == "DequantizeLinear":
        if x.dtype.type not in _INT_TYPES:
            raise NotConstant(f"DequantizeLinear '{node.name}': input type {x.dtype} (float8/int4 not read)")
        z = np.zeros((), np.int64) if zp is None else _broadcast_scale(zp, x.shape, axis, block, node)
        q = x.astype(np.int64) - z.astype(np.int64)   # exact; its float conversion is exact below 2^24
        return (q.astype(scale.dtype) * s).astype(scale.dtype)
    # QuantizeLinear
    if zp is not None:
        out = zp.dtype
    elif int(node.attrs.get("output_dtype", 0)):
        out = onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["output_dtype"]))
    else:
        out = np.dtype(np.uint8)
    if out.type not in _INT_TYPES[:4]:
        raise NotConstant(f"QuantizeLinear '{node.name}': output type {out} (float8/int4 not read)")
    z = np.zeros((), np.int64) if zp is None else _broadcast_scale(zp, x.shape, axis, block, node)
    q = np.rint(x.astype(scale.dtype) / s).astype(np.float64) + z.astype(np.float64)   # rint: half to even
    info = np.iinfo(out)
    return np.clip(q, info.min, info.max).astype(out)


def dequantised_from(tensor: gs.Tensor) -> tuple[str, int] | None:
    """How a constant weight was stored, when a DequantizeLinear in its producers made it from
    integers: e.g. "int8 (per-channel, axis 1)", "uint8 (per-tensor), fake-quantised from float",
    with the bytes per weight the file held (4 when fake-quantised from float32)."""
    seen, stack = set(), [tensor]
    while stack:
        t = stack.pop()
        if isinstance(t, gs.Constant) or not t.inputs or id(t) in seen:
            continue
        seen.add(id(t))
        node = t.inputs[0]
        if node.op == "DequantizeLinear" and _is_qdq(node):
            q, scale = node.inputs[0], node.inputs[1]
            fake = not isinstance(q, gs.Constant) and bool(q.inputs) and q.inputs[0].op == "QuantizeLinear"
            dtype = q.values.dtype if isinstance(q, gs.Constant) else tensor_dtype(q)
            shape = scale.values.shape if isinstance(scale, gs.Constant) else scale.shape
            size = int(np.prod(shape)) if shape is not None and all(isinstance(d, int) for d in shape) else None
            if int(node.attrs.get("block_size", 0)) > 0:
                kind = f"per-block of {int(node.attrs['block_size'])}, axis {int(node.attrs.get('axis', 1))}"
            elif size == 1:
                kind = "per-tensor"
            else:
                kind = f"per-channel, axis {int(node.attrs.get('axis', 1))}"
            name = np.dtype(dtype).name if dtype is not None else "integers"
            held = tensor_dtype(q.inputs[0].inputs[0]) if fake else dtype
            return (f"{name} ({kind})" + (", fake-quantised from float" if fake else ""),
                    np.dtype(held).itemsize if held is not None else 4)
        stack.extend(i for i in node.inputs if i.name)
    return None


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
    Gemms of an MoE block's Mult expert must not become ShiftLinear). convert_onnx records here
    what each pass returns in PassResult.claims."""
    claims = graph.__dict__.setdefault("_mfconvert_claims", {})
    claims.update({id(n): (n, pass_name) for n in nodes})


def claimant(graph: gs.Graph, node: gs.Node) -> str | None:
    """The pass that claimed `node`, or None."""
    entry = graph.__dict__.get("_mfconvert_claims", {}).get(id(node))
    return entry[1] if entry else None
