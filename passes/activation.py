"""The activation between two linear layers: find its nodes, name the function, copy it.

Exporters write GELU in many node orders (x·0.5·(1+erf(x/√2)), 0.5·x·(…), x·(…)·0.5, a single
Gelu op in opset 20, the tanh form), so instead of listing orders we take the subgraph of
elementwise ops that computes one tensor from another with scalar constants only, and identify
the function it computes by evaluating it at probe points. The copies keep the original nodes,
so the converted model computes exactly what the export did.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import onnx_graphsurgeon as gs
from onnx.reference import ReferenceEvaluator

from mfconvert.passes.graph import NotConstant, constant_value, graph_opset, is_graph_output

ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Erf", "Tanh", "Sigmoid", "Relu", "Gelu",
               "Exp", "Log", "Neg", "Abs", "Reciprocal", "Max", "Min", "Clip", "LeakyRelu",
               "Softplus", "HardSigmoid", "HardSwish", "Elu", "Identity"}
MAX_NODES = 24
PROBE = np.linspace(-8.0, 8.0, 641)
# Float32 evaluation of these ops is accurate to ~1e-6; GELU's erf and tanh forms differ by up to
# 5e-4 (near |x| = 2), so 1e-5 tells them apart.
TOLERANCE = 1e-5


KNOWN = {
    "GELU": lambda x: 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2))),
    "GELU(tanh)": lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))),
    "SiLU": lambda x: x / (1 + np.exp(-x)),
    "ReLU": lambda x: np.maximum(x, 0),
}


@dataclass
class Activation:
    """Nodes (graph order) computing `output` elementwise from `input`; `name` from KNOWN."""
    name: str
    nodes: list[gs.Node]
    input: gs.Tensor
    output: gs.Tensor
    constants: dict[int, np.ndarray]    # id(tensor) → value, for inputs that are not `input`'s descendants


def _is_standard(node: gs.Node) -> bool:
    return (node.domain or "") in ("", "ai.onnx")


def find_activation(graph: gs.Graph, h: gs.Tensor, ends: tuple = ()) -> tuple[Activation, gs.Node] | str | None:
    """(activation, the linear node reading its output) when h flows through an elementwise
    activation into exactly one MatMul/Gemm (or op in `ends`: a layout op or fake quantisation
    before it, which the caller follows); a reason when it does but cannot be converted;
    None when h's consumers are not an activation-then-linear at all."""
    region, inside, frontier, linears = [], {id(h): h}, [h], []
    while frontier:
        t = frontier.pop()
        for consumer in t.outputs:
            if any(consumer is n for n in region):
                continue
            if consumer.op in ("MatMul", "Gemm", *ends) and _is_standard(consumer):
                linears.append((t, consumer))
                continue
            if consumer.op not in ELEMENTWISE or not _is_standard(consumer) or len(region) == MAX_NODES:
                return None
            region.append(consumer)
            for out in consumer.outputs:
                inside[id(out)] = out
                frontier.append(out)
    if not region or len(linears) != 1:
        return None
    a, linear = linears[0]
    if a is h or linear.inputs[0] is not a or len(a.outputs) != 1:
        return None
    constants = {}
    for node in region:
        for tensor in node.inputs:
            if id(tensor) in inside or not (tensor.name or isinstance(tensor, gs.Constant)):
                continue
            try:
                value = constant_value(tensor, graph_opset(graph))
            except NotConstant:
                return None   # another branch joins (a residual Add, a gated MLP's product)
            if value.size != 1:
                return f"activation constant '{tensor.name}' has shape {list(value.shape)}, not a scalar"
            constants[id(tensor)] = value
    for tensor in inside.values():
        if is_graph_output(graph, tensor):
            return f"activation tensor '{tensor.name}' is a graph output"
        if tensor is not a and tensor is not h and not tensor.outputs:
            return f"activation tensor '{tensor.name}' is computed but unused"
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    region.sort(key=lambda n: order[id(n)])
    unnamed = Activation("", region, h, a, constants)
    name = identify(graph, unnamed)
    if not name:
        return f"activation ({', '.join(n.op for n in region)}) is none of {', '.join(KNOWN)}"
    return replace(unnamed, name=name), linear


def copy_nodes(act: Activation, x: gs.Tensor, prefix: str) -> tuple[list[gs.Node], gs.Tensor]:
    """The activation's nodes again, reading `x`, with tensors and nodes named under `prefix`."""
    mapping = {id(act.input): x}
    nodes = []
    for i, node in enumerate(act.nodes):
        inputs = []
        for t in node.inputs:
            if id(t) in mapping:
                inputs.append(mapping[id(t)])
            elif isinstance(t, gs.Constant):
                inputs.append(t)
            elif id(t) in act.constants:
                inputs.append(gs.Constant(f"{prefix}/{t.name}", np.asarray(act.constants[id(t)])))
            else:
                inputs.append(t)     # an omitted optional input (empty name)
        outputs = []
        for t in node.outputs:
            mapping[id(t)] = gs.Variable(f"{prefix}/{t.name}", dtype=t.dtype)
            outputs.append(mapping[id(t)])
        nodes.append(gs.Node(op=node.op, name=f"{prefix}/{node.name or f'{node.op}_{i}'}", attrs=dict(node.attrs),
                             domain=node.domain, inputs=inputs, outputs=outputs))
    return nodes, mapping[id(act.output)]


def identify(graph: gs.Graph, act: Activation) -> str:
    """The KNOWN name of the function the activation computes at the probe points, or ''."""
    x = gs.Variable("probe", dtype=np.float32, shape=[PROBE.size])
    nodes, y = copy_nodes(act, x, "probe")
    y.dtype, y.shape = np.float32, [PROBE.size]
    model = gs.export_onnx(gs.Graph(nodes=nodes, inputs=[x], outputs=[y], opset=graph_opset(graph)),
                           do_type_check=False)
    try:
        (got,) = ReferenceEvaluator(model).run(None, {"probe": PROBE.astype(np.float32)})
    except Exception:   # an op the reference evaluator cannot run: not one we know
        return ""
    for name, reference in KNOWN.items():
        expect = reference(PROBE)
        if got.shape == expect.shape and np.all(np.abs(got - expect) <= TOLERANCE * (1 + np.abs(expect))):
            return name
    return ""
