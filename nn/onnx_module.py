"""OnnxModule: run an ONNX model as a differentiable PyTorch module, for finetuning.

Float initializers become nn.Parameters, other initializers buffers; standard ONNX ops map to
torch functions (nn/executor/: the implementation for the model's opset, attribute defaults from
the op's schema; If/Loop/Scan run eagerly) and our own ops to the mfconvert.nn layers, so gradients flow
through the whole graph with the straight-through rules of those layers. After training,
`to_onnx()` writes the trained values back into a copy of the model (shift weights repacked).

Our ops go through their entries in nn/registry.py (layer, activation vs constant inputs, from/to
ONNX): ShiftLinear nodes become nn.ShiftLinear layers (codes unpacked, the teacher's float
weights as latent weights when given); AddLinearAttention nodes become the op's core of
nn.AddLinearAttention (binariser and conv constants from the node's inputs, its STE rules), fed
the node's Q, K, V and mask. The MoE blocks of `--moe-mlp` are standard ops plus ShiftLinear.

It executes the graph node by node in the model's order, which ONNX requires to be
topological. An op it does not know is an error naming the op and the node, raised when the
module is built, not halfway through a training run.
"""
from __future__ import annotations

import copy
import re

import numpy as np
import onnx
import onnx.inliner
import torch
from onnx import numpy_helper
from torch import nn

from mfconvert.nn import registry
from mfconvert.nn.add_attention import AddLinearAttention
from mfconvert.nn.onnx_ops import attributes, lookup, norm_domain, to_tensor
from mfconvert.ort_ops import DOMAIN


class UnsupportedOp(ValueError):
    pass


def _compile(node: onnx.NodeProto, opsets: dict[str, int]) -> dict:
    """The node's attributes over its schema's defaults at the model's opset, with the op's
    implementation (`_fn`) and, for If, its compiled branches; UnsupportedOp if there is none."""
    domain = norm_domain(node.domain)
    opset = opsets.get(domain, 1)
    fn = lookup(domain, node.op_type, opset)
    if fn is None and node.op_type not in _CONTROL_FLOW:
        label = node.name or node.output[0]
        raise UnsupportedOp(f"node '{label}': op {domain + '.' if domain else ''}"
                            f"{node.op_type} is not supported by the PyTorch executor")
    attrs = attributes(node, opset)
    attrs.update(_fn=fn, _opset=opset, _nout=len(node.output), _op=node.op_type)
    graphs = {name: v for name, v in attrs.items() if isinstance(v, onnx.GraphProto)}
    if graphs:   # subgraph attributes: control flow bodies, FlexAttention's score/prob mods
        attrs["_branches"] = {name: _compile_graph(g, opsets) for name, g in graphs.items()}
    return attrs


# Control-flow ops and their subgraph attributes; they run eagerly, their bodies op by op.
_CONTROL_FLOW = {"If": ("then_branch", "else_branch"), "Loop": ("body",), "Scan": ("body",)}


def _compile_graph(graph: onnx.GraphProto, opsets: dict[str, int]) -> tuple:
    """(constants, [(node, attrs)], outputs) of a subgraph; it sees the outer scope's tensors."""
    consts = {i.name: to_tensor(numpy_helper.to_array(i)) for i in graph.initializer}
    nodes = []
    for node in graph.node:
        if norm_domain(node.domain) == "" and node.op_type == "Constant":
            consts[node.output[0]] = to_tensor(_constant_value(node))
        else:
            nodes.append((node, _compile(node, opsets)))
    return consts, nodes, [o.name for o in graph.output], [i.name for i in graph.input]


def _run_node(node: onnx.NodeProto, attrs: dict, env: dict, lookup_value) -> None:
    """Run one standard node, writing its outputs into env (If: its chosen branch, eagerly)."""
    args = [None if not n else env[n] if n in env else lookup_value(n) for n in node.input]
    if node.op_type in _CONTROL_FLOW and norm_domain(node.domain) == "" and "_branches" in attrs:
        outputs = _CONTROL_FLOW_RUN[node.op_type](attrs, args, env, lookup_value)
    else:
        if "_branches" in attrs:   # the op calls its subgraphs as functions of tensors
            attrs = {**attrs, "_call": lambda name, xs: _run_graph(
                attrs["_branches"][name], dict(zip(attrs["_branches"][name][3], xs)), env, lookup_value)}
        outputs = attrs["_fn"](attrs, *args)
        if not isinstance(outputs, (tuple, list)):
            outputs = (outputs,)
    for name, value in zip(node.output, outputs):
        if name:
            env[name] = value


def _arithmetic(value: np.ndarray) -> bool:
    """A constant of the graph's arithmetic, never trained: one element (an epsilon, GELU's
    coefficients, a scale; tf2onnx/jax2tf exports keep them as initializers) or a non-finite fill
    (a −inf max-pool pad). Training them moves e.g. LayerNorm's epsilon below zero: NaN."""
    return value.size <= 1 or (value.dtype.kind == "f" and not np.isfinite(value).all())


def _safe(name: str) -> str:
    """A module/parameter name made from a tensor or node name."""
    return re.sub(r"[^0-9A-Za-z_]", "_", name) or "_"


class OnnxModule(nn.Module):
    """forward(**feeds) → list of outputs (torch tensors), in the model's output order."""

    def __init__(self, model: onnx.ModelProto, latent_weights: dict[str, np.ndarray] | None = None,
                 shift_mode: str = "Q", train_lookup_tables: bool = False):
        super().__init__()
        if model.functions:   # model-local functions (the dynamo exporter's): run their bodies inline
            model = onnx.inliner.inline_local_functions(model)
        self.model = model
        self.input_names = [i.name for i in model.graph.input
                            if i.name not in {t.name for t in model.graph.initializer}]
        self.output_names = [o.name for o in model.graph.output]
        self._tensor_keys: dict[str, str] = {}
        self._shapes: dict[str, list] | None = None
        self._constants: dict[str, np.ndarray] | None = None
        self.params = nn.ParameterDict()
        self.layers = nn.ModuleDict()
        # Embedding tables (data inputs of Gather) stay frozen unless asked: they hold most of a
        # text model's parameters, take dense gradients, and converting changes nothing in them.
        tables = set() if train_lookup_tables else {n.input[0] for n in model.graph.node if n.op_type == "Gather"}
        for init in model.graph.initializer:
            value = numpy_helper.to_array(init)
            self._add_initializer(init.name, value, trainable=init.name not in tables and not _arithmetic(value))
        self.opsets = {norm_domain(o.domain): o.version for o in model.opset_import}
        self.nodes = []
        consumed_by_layers = set()
        for index, node in enumerate(model.graph.node):
            key = f"n{index}_{_safe(node.name or node.op_type)}"
            if node.domain == DOMAIN:
                context = registry.BuildContext(latent_weights or {}, shift_mode, self._shape)
                self.layers[key] = self._custom_layer(node, context)
                consumed_by_layers.update(node.input[registry.entry(node).flow_inputs:])
                self.nodes.append((key, node, attributes(node)))
                continue
            if norm_domain(node.domain) == "" and node.op_type == "Constant":
                # constants of the graph's arithmetic: never trained
                self._add_initializer(node.output[0], _constant_value(node), trainable=False)
                continue
            self.nodes.append((key, node, _compile(node, self.opsets)))
        # The custom layers own their constants (codes, exponents, bias): drop the raw copies.
        for name in consumed_by_layers:
            key = self._tensor_keys.pop(name, None)
            if key in self.params:
                del self.params[key]
            elif key is not None:
                delattr(self, key)

    def _add_initializer(self, name: str, value: np.ndarray, trainable: bool = True) -> None:
        key = f"t_{_safe(name)}"
        tensor = to_tensor(value)
        if trainable and tensor.is_floating_point():
            self.params[key] = nn.Parameter(tensor)
        else:
            self.register_buffer(key, tensor)
        self._tensor_keys[name] = key

    def _custom_layer(self, node: onnx.NodeProto, context: registry.BuildContext) -> nn.Module:
        """The layer of a node of ours, built by its registry entry from its constant inputs."""
        op = registry.entry(node)
        if op is None:
            raise UnsupportedOp(f"node '{node.name}': op {DOMAIN}.{node.op_type} is not supported by the PyTorch executor")
        if self._constants is None:
            self._constants = {i.name: numpy_helper.to_array(i) for i in self.model.graph.initializer}
        constants = {}
        for index, name in enumerate(node.input[op.flow_inputs:], start=op.flow_inputs):
            if name:
                if name not in self._constants:
                    raise UnsupportedOp(f"node '{node.name}': input {index} ('{name}') of {node.op_type} "
                                        "must be an initializer for the PyTorch executor")
                constants[index] = self._constants[name]
        try:
            return op.from_onnx(node, attributes(node), constants, context)
        except ValueError as err:
            raise UnsupportedOp(f"node '{node.name}': {err}") from None

    def _shape(self, name: str) -> list | None:
        """The tensor's dims after shape inference (None for a dynamic one); None if unknown."""
        if self._shapes is None:
            inferred = onnx.shape_inference.infer_shapes(self.model)
            self._shapes = {}
            for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
                dims = info.type.tensor_type.shape.dim
                self._shapes[info.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
        return self._shapes.get(name)

    def attention_layers(self) -> dict[str, AddLinearAttention]:
        """{node name: layer} of the AddLinearAttention nodes."""
        return {node.name or key: self.layers[key] for key, node, _ in self.nodes
                if key in self.layers and isinstance(self.layers[key], AddLinearAttention)}

    def _value(self, name: str) -> torch.Tensor:
        key = self._tensor_keys[name]
        return self.params[key] if key in self.params else getattr(self, key)

    def forward(self, capture: tuple[str, ...] = (), **feeds):
        """The model's outputs (a list); with `capture`, also {name: tensor} of those
        intermediate tensors, as (outputs, captured)."""
        env: dict[str, torch.Tensor] = {}
        for name in self.input_names:
            if name not in feeds:
                raise ValueError(f"missing input '{name}' (the model takes {self.input_names})")
            value = feeds[name]
            env[name] = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
        for key, node, attrs in self.nodes:
            if key in self.layers:   # the layer holds its own constants: only the activations flow in
                op = registry.entry(node)
                flow = [env[n] if n else None for n in node.input[:op.flow_inputs]]
                outputs = op.call(self.layers[key], flow)
                for name, value in zip(node.output, outputs):
                    if name:
                        env[name] = value
            else:
                _run_node(node, attrs, env, self._value)
        outputs = [env[n] if n in env else self._value(n) for n in self.output_names]
        return (outputs, {n: env[n] for n in capture}) if capture else outputs

    @torch.no_grad()
    def to_onnx(self) -> onnx.ModelProto:
        """A copy of the model with the current parameter values (shift weights repacked)."""
        model = copy.deepcopy(self.model)
        values = {}
        for name, key in self._tensor_keys.items():
            values[name] = (self.params[key] if key in self.params else getattr(self, key)).detach().numpy()
        added = []
        for key, node, _ in self.nodes:
            if key in self.layers:
                index = int(key[1:key.index("_")])          # keys are n{node index}_{name}
                added += registry.entry(node).to_onnx(self.layers[key], model.graph.node[index], values)
        for init in model.graph.initializer:
            if init.name in values:
                dtype = numpy_helper.to_array(init).dtype
                init.CopyFrom(numpy_helper.from_array(values[init.name].astype(dtype), init.name))
        model.graph.initializer.extend(added)
        return model


def _run_graph(graph: tuple, feeds: dict, env: dict, lookup_value) -> list:
    consts, nodes, outs, _ = graph
    inner = {**env, **consts, **feeds}
    for sub, sub_attrs in nodes:
        _run_node(sub, sub_attrs, inner, lookup_value)
    return [inner[n] if n in inner else lookup_value(n) for n in outs]


def _run_if(attrs, args, env, lookup_value):
    branch = "then_branch" if bool(args[0].reshape(-1)[0]) else "else_branch"
    return _run_graph(attrs["_branches"][branch], {}, env, lookup_value)


def _run_loop(attrs, args, env, lookup_value):
    body = attrs["_branches"]["body"]
    names = body[3]
    trip = int(args[0].reshape(-1)[0]) if len(args) > 0 and args[0] is not None else None
    cond = bool(args[1].reshape(-1)[0]) if len(args) > 1 and args[1] is not None else True
    carried = list(args[2:])
    scans: list[list] = []
    i = 0
    while cond and (trip is None or i < trip):
        feeds = dict(zip(names, [torch.tensor(i, dtype=torch.int64), torch.tensor(cond), *carried]))
        out = _run_graph(body, feeds, env, lookup_value)
        cond = bool(out[0].reshape(-1)[0])
        carried = out[1:1 + len(carried)]
        for k, v in enumerate(out[1 + len(carried):]):
            (scans.append([]) if k >= len(scans) else None)
            scans[k].append(v)
        i += 1
    n_scan = len(body[2]) - 1 - len(carried)
    stacked = [torch.stack(v) if v else torch.zeros(0) for v in (scans + [[]] * (n_scan - len(scans)))]
    return [*carried, *stacked]


def _run_scan(attrs, args, env, lookup_value):
    body = attrs["_branches"]["body"]
    m = attrs["num_scan_inputs"]
    n = len(args) - m
    states, xs = list(args[:n]), args[n:]
    in_axes = list(attrs.get("scan_input_axes") or [0] * m)
    in_dirs = list(attrs.get("scan_input_directions") or [0] * m)
    xs = [x.movedim(ax % x.dim(), 0) for x, ax in zip(xs, in_axes)]
    xs = [x.flip(0) if d else x for x, d in zip(xs, in_dirs)]
    steps = xs[0].shape[0] if xs else 0
    scans: list[list] = []
    for t in range(steps):
        out = _run_graph(body, dict(zip(body[3], [*states, *[x[t] for x in xs]])), env, lookup_value)
        states = out[:n]
        for k, v in enumerate(out[n:]):
            (scans.append([]) if k >= len(scans) else None)
            scans[k].append(v)
    k_out = len(body[2]) - n
    out_axes = list(attrs.get("scan_output_axes") or [0] * k_out)
    out_dirs = list(attrs.get("scan_output_directions") or [0] * k_out)
    ys = []
    for k in range(k_out):
        y = torch.stack(scans[k]) if k < len(scans) else torch.zeros(0)
        y = y.flip(0) if out_dirs[k] else y
        ys.append(y.movedim(0, out_axes[k] % y.dim()))
    return [*states, *ys]


_CONTROL_FLOW_RUN = {"If": _run_if, "Loop": _run_loop, "Scan": _run_scan}


def _constant_value(node: onnx.NodeProto) -> np.ndarray:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name in ("value_float", "value_int"):
            return np.array(onnx.helper.get_attribute_value(attr),
                            dtype=np.float32 if attr.name == "value_float" else np.int64)
        if attr.name in ("value_floats", "value_ints"):
            return np.array(onnx.helper.get_attribute_value(attr),
                            dtype=np.float32 if attr.name == "value_floats" else np.int64)
    raise UnsupportedOp(f"node '{node.name}': Constant without a supported value attribute")
