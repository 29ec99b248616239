"""Linear layers in a graph: find one (MatMul/Gemm with a constant weight, optional bias Add), and
build the ShiftLinear node that replaces one. Shared by the passes that rewrite linears; kept out
of the passes' own modules so importing it registers no pass (registration order is run order)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
import torch

from mfconvert.nn import pow2
from mfconvert.ort_ops import DOMAIN
from mfconvert.passes.graph import NotConstant, constant_value, graph_opset, sole_consumer, tensor_dtype
from mfconvert.passes.registry import PassError


@dataclass
class LinearMatch:
    """A linear layer found in the graph: y = x @ weight.T + bias, weight [out, in]."""
    nodes: list[gs.Node]          # the nodes the rewrite replaces (MatMul/Gemm [, Add])
    activation: gs.Tensor
    weight: np.ndarray
    bias: np.ndarray | None
    output: gs.Tensor


def match_linear(graph: gs.Graph, node: gs.Node) -> LinearMatch | str:
    """Pattern and check: the linear layer rooted at a MatMul or Gemm, or why it is not one."""
    opset = graph_opset(graph)
    x, w_tensor = node.inputs[0], node.inputs[1]
    if isinstance(x, gs.Constant):
        return "activation input is constant (fold the graph instead)"
    try:
        w = constant_value(w_tensor, opset)
    except NotConstant as err:
        return f"no constant weight: the second input is an activation ({err}), e.g. attention scores"
    if w.ndim != 2:
        return f"weight has rank {w.ndim}, not 2 (batched MatMul)"
    if not np.issubdtype(w.dtype, np.floating):
        return f"weight dtype {w.dtype} is not floating point"
    x_dtype = tensor_dtype(x)
    if x_dtype is not None and x_dtype != np.float32:
        return f"activation dtype {np.dtype(x_dtype).name}; ShiftLinear takes float32"
    bias = None
    nodes = [node]
    if node.op == "Gemm":
        if node.attrs.get("transA", 0):
            return "Gemm with transA=1"
        w = w.T if node.attrs.get("transB", 0) else w
        w = w * float(node.attrs.get("alpha", 1.0))
        if len(node.inputs) > 2 and node.inputs[2].name:
            try:
                c = constant_value(node.inputs[2], opset)
            except NotConstant as err:
                return f"Gemm bias C is not constant: {err}"
            c = np.asarray(c, dtype=np.float64) * float(node.attrs.get("beta", 1.0))
            if c.size not in (1, w.shape[1]) or (c.ndim == 2 and c.shape[0] != 1):
                return f"Gemm bias C has shape {list(c.shape)}, not per output channel"
            bias = np.broadcast_to(c.reshape(-1), (w.shape[1],))
    output = node.outputs[0]
    if bias is None:
        bias, add = _bias_add(graph, output, w.shape[1], opset)
        if add is not None:
            nodes.append(add)
            output = add.outputs[0]
    return LinearMatch(nodes, x, np.ascontiguousarray(w.T), bias, output)


def _bias_add(graph: gs.Graph, y: gs.Tensor, out_features: int, opset: int):
    """(bias, Add node) when y's only consumer adds a constant per-channel vector, else (None, None)."""
    add = sole_consumer(graph, y)
    if add is None or add.op != "Add":
        return None, None
    other = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
    try:
        b = constant_value(other, opset)
    except NotConstant:
        return None, None
    if b.size != out_features or b.shape[-1] != out_features or any(d != 1 for d in b.shape[:-1]):
        return None, None
    y_rank = len(y.shape) if y.shape is not None else None
    if y_rank is not None and b.ndim > y_rank:
        return None, None   # the Add would broadcast the output to a higher rank
    return b.reshape(-1), add


def shift_linear_node(name: str, x: gs.Tensor, y: gs.Tensor, weight: np.ndarray,
                      bias: np.ndarray | None, cfg) -> tuple[gs.Node, int]:
    """The ShiftLinear node computing y from x with `weight` [out, in] rounded to codes in the
    format of `cfg` (weight_bits, act_bits, act_frac_bits, weight_scale, and terms where the
    config has them), and the bytes its constants take."""
    if not np.isfinite(weight).all():
        raise PassError(f"node '{name}': weight has NaN or Inf values")
    if bias is not None and not np.isfinite(bias).all():
        raise PassError(f"node '{name}': bias has NaN or Inf values")
    out_features, in_features = weight.shape
    w = torch.from_numpy(np.asarray(weight, dtype=np.float64))
    exponent = pow2.channel_exponents(w, cfg.weight_scale)
    bad = (exponent.to(torch.int32) - cfg.act_frac_bits)
    if bad.min() < -126 or bad.max() > 127:
        raise PassError(f"node '{name}': weight exponents with act_frac_bits={cfg.act_frac_bits} leave "
                        "the float32 range of the final rescale")
    terms = getattr(cfg, "terms", 1)
    codes = pow2.round_to_term_codes(w, exponent, cfg.weight_bits, terms)   # [terms, out, in], packed flat
    inputs = [x,
              gs.Constant(f"{name}.codes", pow2.pack_codes(codes.numpy(), cfg.weight_bits)),
              gs.Constant(f"{name}.exponent", exponent.numpy().astype(np.int8))]
    if bias is not None:
        inputs.append(gs.Constant(f"{name}.bias", np.asarray(bias, dtype=np.float32)))
    node = gs.Node(op="ShiftLinear", name=name, domain=DOMAIN, inputs=inputs, outputs=[y], attrs={
        "in_features": in_features, "out_features": out_features, "weight_bits": cfg.weight_bits,
        "act_bits": cfg.act_bits, "act_frac_bits": cfg.act_frac_bits, **({"terms": terms} if terms > 1 else {})})
    nbytes = sum(t.values.nbytes for t in inputs[1:])
    return node, nbytes
