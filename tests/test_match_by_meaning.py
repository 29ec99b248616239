"""Matching attention cores and MLPs by what they compute, not by one exporter's layout (issue 11
item 5): the same ViT with Gemm on flattened [B·T, C] tokens and reshapes between the linears (as
onnxslim or ORT's basic optimisation at a fixed shape write it), torch.nn.MultiheadAttention (one
in_proj, time-major tokens, unflatten/unbind of the fused qkv) from both exporters, and the fused
attention ops (ONNX Attention-23, com.microsoft Attention and MultiHeadAttention). Each converted model runs in ORT with our ops and is compared
with an independent PyTorch reference: the model with AddLinearAttention swapped in (attention),
or the exported model itself (MoE with every token routed to the float expert)."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from mfconvert.convert import ConvertConfig, MoEMLPConfig, convert_onnx
from mfconvert.nn import AddLinearAttention
from mfconvert.passes.add_attention import AddAttentionConfig
from mfconvert.runtime import session
from mfconvert.tests.attention_models import TinyViT, export

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ONLY_ATTENTION = ConvertConfig(shift_linear=None, shift_conv=None, add_attention=AddAttentionConfig())
ALL_MULT_MOE = ConvertConfig(shift_linear=None, shift_conv=None, add_attention=None,
                             moe_mlp=MoEMLPConfig(router_std=0.0, router_bias=-30.0))
# Attention: ORT's and PyTorch's float ops around the core differ in the last bits and the codes
# are signs, so outputs agree unless a q/k channel lies within ~1e-6 of 0 (as in
# test_add_attention_pass.py, measured there ≤ 4.5e-7). MoE routed all to the float expert: the
# block is the original fc1 → act → fc2 on the same tokens (Gemm instead of MatMul + Add), float32
# rounding only.
ATOL = 1e-5


def _ort(model, feeds):
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _ours(model, feeds):
    return session(model.SerializeToString(), threads=2).run(None, feeds)[0]


def _swapped_vit(vit: TinyViT) -> nn.Module:
    for block in vit.blocks:
        layer = AddLinearAttention.from_fused_qkv(block.attn.qkv, block.attn.proj, block.attn.num_heads, conv=None)
        layer.binarizer.fitted.fill_(True)
        block.attn = layer
    return vit


def ort_basic_at(path, shapes: dict, out) -> onnx.ModelProto:
    """The model with its inputs fixed to `shapes` through ORT's basic graph optimisation — constant
    folding, and at static shapes MatMul + Add on [B, T, C] becomes Reshape → Gemm on [B·T, C] →
    Reshape (MatMulAddFusion): the layout onnxslim writes too, and the issue's miss "Reshape …
    from rank 2 to 5 is not a head split"."""
    model = onnx.load(str(path))
    for inp in model.graph.input:
        if inp.name in shapes:
            for dim, value in zip(inp.type.tensor_type.shape.dim, shapes[inp.name]):
                dim.Clear()
                dim.dim_value = value
    fixed = str(out) + ".fixed.onnx"
    onnx.save(model, fixed)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(out)
    ort.InferenceSession(fixed, opts, providers=["CPUExecutionProvider"])
    return onnx.load(str(out))


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_vit_on_flattened_tokens(tmp_path, dynamo):
    """Gemm on [B·T, C] between reshapes (ORT basic optimisation at a fixed shape, as onnxslim
    writes it): both attention cores and both MLPs are found again."""
    torch.manual_seed(0)
    vit = TinyViT(depth=2).eval()
    img = torch.randn(2, 3, 32, 32)
    path = export(vit, (img,), tmp_path / "vit.onnx", dynamo=dynamo, opset=18 if dynamo else 17,
                  input_names=["img"], dynamic_axes={"img": {0: "batch"}})
    flat = ort_basic_at(path, {"img": [2, 3, 32, 32]}, tmp_path / "vit_flat.onnx")
    assert "Gemm" in [n.op_type for n in flat.graph.node]
    feeds = {"img": img.numpy()}

    result = convert_onnx(flat, ONLY_ATTENTION)
    assert len(result.report.changes) == 2 and not result.report.skips
    assert all("flattened tokens" in c.detail for c in result.report.changes)
    with torch.no_grad():
        expect = _swapped_vit(vit)(img).numpy()
    np.testing.assert_allclose(_ours(result.model, feeds), expect, rtol=0, atol=ATOL)

    moe = convert_onnx(flat, ALL_MULT_MOE)
    assert len(moe.report.changes) == 4 and not moe.report.skips   # 2 blocks × (fc1, fc2)
    np.testing.assert_allclose(_ours(moe.model, feeds), _ort(flat, feeds), rtol=0, atol=ATOL)
    assert "shapes not inferable" not in moe.report.table()


class MHABlock(nn.Module):
    """torch.nn.MultiheadAttention (batch_first: time-major inside, one in_proj) and an MLP."""

    def __init__(self, dim=48, heads=3):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        y = x + self.attn(x, x, x, need_weights=False)[0]
        return y + self.fc2(nn.functional.gelu(self.fc1(y)))

    def swapped(self, x):
        a = self.attn
        qkv = nn.Linear(a.embed_dim, 3 * a.embed_dim)
        with torch.no_grad():
            qkv.weight.copy_(a.in_proj_weight)
            qkv.bias.copy_(a.in_proj_bias)
        layer = AddLinearAttention.from_fused_qkv(qkv, a.out_proj, a.num_heads, conv=None)
        layer.binarizer.fitted.fill_(True)
        y = x + layer(x)
        return y + self.fc2(nn.functional.gelu(self.fc1(y)))


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_torch_multihead_attention(tmp_path, dynamo):
    torch.manual_seed(0)
    block = MHABlock().eval()
    x = torch.randn(2, 9, 48)
    path = export(block, (x,), tmp_path / "mha.onnx", dynamo=dynamo, opset=18 if dynamo else 17,
                  input_names=["x"], dynamic_axes={"x": {0: "batch", 1: "tokens"}})
    feeds = {"x": x.numpy()}
    result = convert_onnx(str(path), ONLY_ATTENTION)
    (change,) = result.report.changes
    assert "fused qkv" in change.detail and "time-major" in change.detail, change.detail
    with torch.no_grad():
        expect = block.swapped(x).numpy()
    np.testing.assert_allclose(_ours(result.model, feeds), expect, rtol=0, atol=ATOL)
    moe = convert_onnx(str(path), ALL_MULT_MOE)
    assert len(moe.report.changes) == 2
    np.testing.assert_allclose(_ours(moe.model, feeds), _ort(path, feeds), rtol=0, atol=ATOL)


# --- fused attention ops, built by hand as onnxruntime.transformers.optimizer / opset 23 write them
B, T, C, H = 2, 6, 32, 4


def _core(q, k, v, keep=None):
    """The reference: AddLinearAttention's core (sign codes, no thresholds) on [B, T, C] tensors."""
    layer = AddLinearAttention(C, H, conv=None, projections=False)
    layer.binarizer.fitted.fill_(True)
    mask = None if keep is None else torch.from_numpy(np.where(keep, 0.0, -10000.0).astype(np.float32))
    with torch.no_grad():
        return layer.core(*(torch.from_numpy(t) for t in (q, k, v)), mask).numpy()


def _model(nodes, inputs, opset=17, ms=True):
    graph = helper.make_graph(nodes, "fused", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, T, C])])
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("com.microsoft", 1)] if ms else [])
    return helper.make_model(graph, opset_imports=imports)


def _float(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def test_com_microsoft_attention_with_its_projection():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, T, C)).astype(np.float32)
    w = (rng.standard_normal((C, 3 * C)) * 0.2).astype(np.float32)
    b = (rng.standard_normal(3 * C) * 0.1).astype(np.float32)
    keep = np.ones((B, T), np.int32)
    keep[1, 4:] = 0
    node = helper.make_node("Attention", ["x", "w", "b", "mask"], ["y"], domain="com.microsoft", num_heads=H)
    model = _model([node], [_float("x", [B, T, C]), helper.make_tensor_value_info("mask", TensorProto.INT32, [B, T])])
    model.graph.initializer.extend([onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(b, "b")])
    result = convert_onnx(model, ONLY_ATTENTION)
    (change,) = result.report.changes
    assert "com.microsoft.Attention" in change.detail and "key mask" in change.detail
    assert [n.op_type for n in result.model.graph.node].count("MatMul") == 1   # the projection, for shift-linear
    qkv = x @ w + b
    expect = _core(qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:], keep.astype(bool))
    got = _ours(result.model, {"x": x, "mask": keep})
    np.testing.assert_allclose(got, expect, rtol=0, atol=ATOL)
    assert np.abs(got[1] - _ours(result.model, {"x": x, "mask": keep[::-1].copy()})[1]).max() > 1e-3   # the mask acts
    # the default conversion also turns the projection into a ShiftLinear
    assert "ShiftLinear" in [n.op_type for n in convert_onnx(model).model.graph.node]


def test_com_microsoft_multihead_attention():
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((B, T, C)).astype(np.float32) for _ in range(3))
    bias = (rng.standard_normal(3 * C) * 0.1).astype(np.float32)
    node = helper.make_node("MultiHeadAttention", ["q", "k", "v", "bias"], ["y"], domain="com.microsoft", num_heads=H)
    model = _model([node], [_float(n, [B, T, C]) for n in "qkv"])
    model.graph.initializer.append(onnx.numpy_helper.from_array(bias, "bias"))
    result = convert_onnx(model, ONLY_ATTENTION)
    (change,) = result.report.changes
    assert "MultiHeadAttention" in change.detail
    expect = _core(q + bias[:C], k + bias[C:2 * C], v + bias[2 * C:])
    np.testing.assert_allclose(_ours(result.model, {"q": q, "k": k, "v": v}), expect, rtol=0, atol=ATOL)


def test_onnx_attention_opset23():
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((B, T, C)).astype(np.float32) for _ in range(3))
    keep = np.ones((B, 1, T, T), bool)   # ORT takes attn_mask as [.., Tq, Tk] only: padding expanded over queries
    keep[0, ..., 3:] = False
    node = helper.make_node("Attention", ["q", "k", "v", "m"], ["y"], q_num_heads=H, kv_num_heads=H)
    inputs = [_float(n, [B, T, C]) for n in "qkv"] + [helper.make_tensor_value_info("m", TensorProto.BOOL, [B, 1, T, T])]
    model = _model([node], inputs, opset=23, ms=False)
    feeds = {"q": q, "k": k, "v": v, "m": keep}
    _ort(model, feeds)   # a valid model ORT runs as it is
    result = convert_onnx(model, ONLY_ATTENTION)
    (change,) = result.report.changes
    assert "Attention-23" in change.detail and "query × key" in change.detail
    np.testing.assert_allclose(_ours(result.model, feeds), _core(q, k, v, keep[:, 0, 0]), rtol=0, atol=ATOL)
    causal = np.tril(np.ones((T, T), bool))[None, None].repeat(B, 0)   # rows differ: the kernel refuses it
    with pytest.raises(Exception, match="not per key"):
        _ours(result.model, {**feeds, "m": causal})


def test_fused_ops_left_alone_say_why():
    causal = helper.make_node("Attention", ["q", "k", "v"], ["y"], q_num_heads=H, kv_num_heads=H, is_causal=1)
    model = _model([causal], [_float(n, [B, T, C]) for n in "qkv"], opset=23, ms=False)
    result = convert_onnx(model, ONLY_ATTENTION, allow_unchanged=True)
    (skip,) = result.report.skips
    assert "causal" in skip.reason
    node = helper.make_node("Attention", ["x", "w"], ["y"], domain="com.microsoft", num_heads=H)
    model = _model([node], [_float("x", [B, T, C]), _float("w", [C, 3 * C])])
    (skip,) = convert_onnx(model, ONLY_ATTENTION, allow_unchanged=True).report.skips
    assert "weights are not constant" in skip.reason
