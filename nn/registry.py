"""Our ops (domain ai.mfconvert), one entry each naming all the op's faces: the C++ kernel's
registered name, the pass(es) that emit it, the PyTorch layer and the glue OnnxModule runs it
with, and its section of docs/ops.md. nn/onnx_module.py dispatches through OPS only;
tests/test_op_registry.py checks that every face exists and that they agree.

Adding an op is one entry in OPS:
    OpEntry(op="MyOp",                       # the name its C++ kernel registers: mfconvert::MyOpCustomOp in kOps
                                             # of ort_ops/src/register_ops.cc
            passes=("my-pass",),             # names in passes.registry.PASSES that emit it
            layer=MyLayer,                   # the mfconvert.nn layer
            flow_inputs=1,                   # leading inputs that are activations; the rest are constants
            from_onnx=_my_from_onnx,         # (node, attrs, {input index: ndarray}, BuildContext) -> layer
            to_onnx=_my_to_onnx,             # (layer, node, values) -> new initializers
            call=lambda layer, flow: (layer(flow[0]),),   # the node's outputs from its activations
            spec="myop",                     # anchor of its `## MyOp` heading in docs/ops.md
            examples=_my_examples)           # () -> [Example]: small nodes for the registry test
from_onnx gets the node's constant inputs (initializers, by input index; OnnxModule refuses a
constant input that is not one) and raises ValueError naming what is wrong (OnnxModule prefixes
the node). to_onnx writes the layer's trained constants into `values` ({initializer name:
array}) under the node's existing input names, may rewire the node (it gets the copy being
written) and returns initializers it had to add.

ShiftMoEMLP is not an op: the moe-mlp pass emits standard ops for the router and the Mult
expert plus two ShiftLinear nodes per block, which come through the ShiftLinear entry.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, NamedTuple

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from mfconvert.nn import adder_conv, pow2, shift_conv, spatial_shift
from mfconvert.nn.add_attention import AddLinearAttention
from mfconvert.nn.shift_conv import ShiftConv
from mfconvert.nn.shift_linear import ShiftLinear
from mfconvert.ort_ops import DOMAIN


@dataclass(frozen=True)
class BuildContext:
    """What from_onnx may need beyond the node."""
    latent: Mapping[str, np.ndarray]             # {node name: the teacher's float weight}
    shift_mode: str                              # ShiftLinear's training mode, "Q" or "PS"
    shape: Callable[[str], list | None]          # a tensor's inferred dims (None where dynamic)


class Example(NamedTuple):
    """One node of the op with its constant initializers and activation feeds; the PyTorch
    layer must reproduce the kernel within atol (0: bit for bit)."""
    node: onnx.NodeProto
    constants: dict[str, np.ndarray]
    feeds: dict[str, np.ndarray]
    atol: float


@dataclass(frozen=True)
class OpEntry:
    op: str
    passes: tuple[str, ...]
    layer: type
    flow_inputs: int
    from_onnx: Callable[[onnx.NodeProto, dict, dict[int, np.ndarray], BuildContext], nn.Module]
    to_onnx: Callable[[nn.Module, onnx.NodeProto, dict], list[onnx.TensorProto]]
    call: Callable[[nn.Module, list], tuple]
    spec: str
    examples: Callable[[], list[Example]]
    domain: str = DOMAIN


# -- ShiftLinear --------------------------------------------------------------------------------
def _shift_linear_from_onnx(node, attrs, constants, ctx) -> ShiftLinear:
    missing = [i for i in (1, 2) if i not in constants]
    if missing:
        raise ValueError(f"ShiftLinear without its constant inputs {missing} (W_codes, W_exponent)")
    bits = attrs.get("weight_bits", 5)
    n_in, n_out = attrs["in_features"], attrs["out_features"]
    terms = attrs.get("terms", 1)
    codes = pow2.unpack_codes(constants[1], terms * n_in * n_out, bits).reshape(terms, n_out, n_in)
    codes = codes if terms > 1 else codes[0]
    exponent = torch.from_numpy(constants[2].astype(np.int8))
    bias = torch.from_numpy(constants[3].copy()) if 3 in constants else None
    layer = ShiftLinear.from_codes(torch.from_numpy(codes), exponent, bias, weight_bits=bits,
                                   act_bits=attrs.get("act_bits", 32), act_frac_bits=attrs.get("act_frac_bits", 16),
                                   mode=ctx.shift_mode)
    if node.name in ctx.latent and ctx.shift_mode == "Q":
        # DeepShift-Q keeps float weights: start from the original ones (same codes, finer state).
        layer.set_latent_weight(torch.from_numpy(np.asarray(ctx.latent[node.name], dtype=np.float32)))
    return layer


def _shift_linear_to_onnx(layer: ShiftLinear, node, values) -> list:
    packed, exponent, bias = layer.onnx_constants()
    values[node.input[1]], values[node.input[2]] = packed, exponent
    if bias is not None:
        values[node.input[3]] = bias
    return []


def _shift_linear_examples() -> list[Example]:
    rng = np.random.default_rng(0)
    out = []
    for terms, bias in ((1, True), (2, False)):
        linear = nn.Linear(12, 5, bias=bias)
        layer = ShiftLinear.from_linear(linear, terms=terms, act_frac_bits=12).eval()
        packed, exponent, b = layer.onnx_constants()
        consts = {"codes": packed, "exponent": exponent, **({"bias": b} if bias else {})}
        node = helper.make_node("ShiftLinear", ["X", *consts], ["Y"], name=f"shift_t{terms}", domain=DOMAIN,
                                in_features=12, out_features=5, weight_bits=layer.weight_bits, act_bits=layer.act_bits,
                                act_frac_bits=layer.act_frac_bits, terms=terms)
        out.append(Example(node, consts, {"X": rng.normal(size=(2, 3, 12)).astype(np.float32)}, 0.0))
    return out


# -- AddLinearAttention -------------------------------------------------------------------------
def _attention_from_onnx(node, attrs, constants, ctx) -> AddLinearAttention:
    return AddLinearAttention.from_onnx(_channels(node, constants, ctx), attrs, constants,
                                        key_input=len(node.input) > 1 and bool(node.input[1]))


def _channels(node, constants: dict[int, np.ndarray], ctx) -> int:
    """C of the node's [B, T, C] inputs: from shape inference, else from [H, D] constants."""
    for name in (node.input[0], node.input[2] if len(node.input) > 2 else ""):
        dims = ctx.shape(name) if name else None
        if dims and dims[-1]:
            return int(dims[-1])
    for index in (5, 6, 7):
        if index in constants:
            return int(constants[index].shape[0] * constants[index].shape[-1])
    raise ValueError("the channel count of its inputs is unknown (no static last dim after shape inference)")


def _attention_to_onnx(layer: AddLinearAttention, node, values) -> list[onnx.TensorProto]:
    """Write the layer's constants into `values` (existing inputs) or as new initializers wired to
    the node (a conv added for finetuning, thresholds that became non-zero); set its attributes."""
    new = []
    for index, value in sorted(layer.onnx_constants().items()):
        name = node.input[index] if index < len(node.input) else ""
        if name:
            values[name] = value
            continue
        if index in (5, 6) and not np.any(value):
            continue                                  # absent thresholds are 0: keep them absent
        name = f"{node.name or node.output[0]}.{_ATTENTION_CONSTANTS[index]}"
        while len(node.input) <= index:
            node.input.append("")
        node.input[index] = name
        new.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
    del node.attribute[:]
    node.attribute.extend(helper.make_attribute(k, v) for k, v in layer.onnx_attributes().items())
    return new


_ATTENTION_CONSTANTS = {4: "conv_weight", 5: "q_threshold", 6: "k_threshold", 7: "hash_anchors",
                        8: "hash_center", 9: "hash_projection", 10: "hash_sigma"}


def _attention_call(layer: AddLinearAttention, flow: list) -> tuple:
    flow = flow + [None] * (4 - len(flow))
    return (layer.core(flow[0], flow[1], flow[2], flow[3]),)


def _attention_examples() -> list[Example]:
    rng = np.random.default_rng(1)
    heads, d, t = 2, 4, 6
    x = {n: rng.normal(size=(2, t, heads * d)).astype(np.float32) for n in "QKV"}
    mask = np.zeros((2, t), np.float32)
    mask[1, -2:] = -1e4
    sign = {"conv": (rng.normal(size=(heads, 3)) * 0.1).astype(np.float32),
            "q_thr": (rng.normal(size=(heads, d)) * 0.1).astype(np.float32),
            "k_thr": (rng.normal(size=(heads, d)) * 0.1).astype(np.float32)}
    node = helper.make_node("AddLinearAttention", ["Q", "K", "V", "mask", *sign], ["Y"], name="attn_sign",
                            domain=DOMAIN, num_heads=heads, binarizer="sign")
    anchors = rng.normal(size=(heads, 5, d))
    ksh = {"anchors": (anchors / np.linalg.norm(anchors, axis=-1, keepdims=True)).astype(np.float32),
           "center": rng.uniform(0.2, 0.6, size=(heads, 5)).astype(np.float32),
           "projection": rng.normal(size=(heads, 4, 5)).astype(np.float32),
           "sigma": rng.uniform(0.5, 1.5, size=heads).astype(np.float32)}
    ksh_node = helper.make_node("AddLinearAttention", ["Q", "", "V", "", "", "", "", *ksh], ["Y"], name="attn_ksh",
                                domain=DOMAIN, num_heads=heads, binarizer="ksh")
    # float32 sums in another order (docs/ops.md, Parity): measured ≤ 1.9e-6 on unit-norm rows
    return [Example(node, sign, {**x, "mask": mask}, 1e-5),
            Example(ksh_node, ksh, {"Q": x["Q"], "V": x["V"]}, 1e-5)]


OPS: dict[tuple[str, str], OpEntry] = {(e.domain, e.op): e for e in [
    OpEntry(op="ShiftLinear", passes=("shift-linear", "moe-mlp"), layer=ShiftLinear, flow_inputs=1,
            from_onnx=_shift_linear_from_onnx, to_onnx=_shift_linear_to_onnx,
            call=lambda layer, flow: (layer(flow[0]),), spec="shiftlinear", examples=_shift_linear_examples),
    OpEntry(op="AddLinearAttention", passes=("add-attention",), layer=AddLinearAttention, flow_inputs=4,
            from_onnx=_attention_from_onnx, to_onnx=_attention_to_onnx, call=_attention_call,
            spec="addlinearattention", examples=_attention_examples),
    OpEntry(op="ShiftConv", passes=("shift-conv", "shift-add-conv"), layer=ShiftConv, flow_inputs=1,
            from_onnx=shift_conv.from_onnx, to_onnx=shift_conv.to_onnx,
            call=lambda layer, flow: (layer(flow[0]),), spec="shiftconv", examples=shift_conv.registry_examples),
    OpEntry(op="AdderConv", passes=("adder-conv", "shift-add-conv"), layer=adder_conv.AdderConv, flow_inputs=1,
            from_onnx=adder_conv.from_onnx, to_onnx=adder_conv.to_onnx,
            call=lambda layer, flow: (layer(flow[0]),), spec="adderconv", examples=adder_conv.registry_examples),
    OpEntry(op="SpatialShift", passes=("spatial-shift",), layer=spatial_shift.SpatialShift, flow_inputs=1,
            from_onnx=spatial_shift.from_onnx, to_onnx=spatial_shift.to_onnx,
            call=lambda layer, flow: (layer(flow[0]),), spec="spatialshift", examples=spatial_shift.registry_examples),
]}


def entry(node: onnx.NodeProto) -> OpEntry | None:
    """The registry entry of a node of ours; None for any other node."""
    return OPS.get((node.domain, node.op_type))
