"""Pass add-attention on real torch.onnx exports (TorchScript and dynamo exporters, opsets
13–21) of a timm-style ViT and a HF BERT-style attention block, written as code in
tests/attention_models.py (timm itself needs torchvision, which has no working CPU build on our
package index); cases it must leave alone, with their reasons; the converted models run in ORT
and equal the PyTorch model with AddLinearAttention swapped in."""
import math

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from mfconvert.convert import ConversionError, ConvertConfig, convert_onnx
from mfconvert.nn import AddLinearAttention
from mfconvert.passes.add_attention import AddAttentionConfig
from mfconvert.runtime import session
from mfconvert.tests.attention_models import BertSelfAttention, TinyViT, export, swap_hf_attention_cores


pytestmark = pytest.mark.usefixtures("one_torch_thread")

ONLY_ATTENTION = ConvertConfig(shift_linear=None, shift_conv=None, add_attention=AddAttentionConfig())
EXPORTS = [(False, 13), (False, 17), (True, 18), (True, 21)]   # (dynamo, opset)


def ops(model):
    return [n.op_type for n in model.graph.node]


def swapped_vit(vit: TinyViT) -> nn.Module:
    """The PyTorch model the converted ViT stands for: each attention → AddLinearAttention with
    what the pass emits (sign binariser, zero thresholds, no conv)."""
    for block in vit.blocks:
        attn = block.attn
        layer = AddLinearAttention.from_fused_qkv(attn.qkv, attn.proj, attn.num_heads, conv=None)
        layer.binarizer.fitted.fill_(True)
        block.attn = layer
    return vit


@pytest.mark.parametrize("sdpa", [False, True], ids=["eager", "sdpa"])
@pytest.mark.parametrize("dynamo, opset", EXPORTS, ids=[f"{'dynamo' if d else 'torchscript'}{o}" for d, o in EXPORTS])
def test_timm_style_vit_all_blocks_converted_and_run(tmp_path, dynamo, opset, sdpa):
    if sdpa and not dynamo and opset < 14:
        pytest.skip("the TorchScript exporter has scaled_dot_product_attention from opset 14")
    torch.manual_seed(0)
    vit = TinyViT(sdpa=sdpa).eval()
    img = torch.randn(2, 3, 32, 32)
    path = export(vit, (img,), tmp_path / "vit.onnx", dynamo=dynamo, opset=opset, input_names=["img"],
                  dynamic_axes={"img": {0: "batch"}})
    result = convert_onnx(str(path), ONLY_ATTENTION)
    assert len(result.report.changes) == 2 and not result.report.skips
    assert ops(result.model).count("AddLinearAttention") == 2 and "Softmax" not in ops(result.model)
    got = session(result.model.SerializeToString(), threads=2).run(None, {"img": img.numpy()})[0]
    with torch.no_grad():
        expect = swapped_vit(vit)(img).numpy()
    # ORT's and PyTorch's float ops around the core (LayerNorm, GELU, MatMul) differ in the last
    # bits; the codes are signs, so they agree unless a q/k channel lies within ~1e-6 of 0
    # (then one row moves by O(1/T)). Measured max |diff| 3.0e-7 – 4.5e-7 over the 7 exports.
    np.testing.assert_allclose(got, expect, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dynamo, opset", EXPORTS, ids=[f"{'dynamo' if d else 'torchscript'}{o}" for d, o in EXPORTS])
def test_bert_style_block_with_padding_mask(tmp_path, dynamo, opset):
    torch.manual_seed(0)
    block = BertSelfAttention(64, 4).eval()
    x = torch.randn(2, 7, 64)
    mask = torch.ones(2, 7, dtype=torch.int64)
    mask[1, 4:] = 0
    path = export(block, (x, mask), tmp_path / "bert.onnx", dynamo=dynamo, opset=opset, input_names=["x", "mask"],
                  dynamic_axes={"x": {0: "b", 1: "t"}, "mask": {0: "b", 1: "t"}})
    result = convert_onnx(str(path), ONLY_ATTENTION)
    (change,) = result.report.changes
    assert "key mask" in change.detail and "separate q/k/v" in change.detail
    model = result.model
    (node,) = [n for n in model.graph.node if n.op_type == "AddLinearAttention"]
    assert len(node.input) == 4 and node.input[3]          # Q, K, V and the additive mask
    got = session(model.SerializeToString(), threads=2).run(None, {"x": x.numpy(), "mask": mask.numpy()})[0]
    layer = AddLinearAttention.from_linears(block.query, block.key, block.value, block.dense, 4, conv=None)
    layer.binarizer.fitted.fill_(True)
    with torch.no_grad():
        expect = layer(x, mask.bool()).numpy()
    # Measured max |diff| 8.9e-8 for all four exports.
    np.testing.assert_allclose(got, expect, rtol=0, atol=1e-5)


class Variant(BertSelfAttention):
    """BERT-style attention with one thing changed, to test what the pass must refuse."""

    def __init__(self, kind):
        super().__init__(32, 2)
        self.kind = kind

    def forward(self, x, attention_mask):
        q, k, v = self.split(self.query(x)), self.split(self.key(x)), self.split(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.d)
        if self.kind == "causal":
            t = x.shape[1]
            scores = scores + torch.triu(torch.full((t, t), -1e4), 1)
        if self.kind == "negative_scale":
            scores = scores * -1.0
        probs = scores.softmax(-1)
        ctx = probs @ v
        b, _, t, _ = ctx.shape
        out = self.dense(ctx.permute(0, 2, 1, 3).reshape(b, t, self.h * self.d))
        if self.kind == "probs_output":
            return out, probs
        return out


@pytest.mark.parametrize("kind, reason", [
    ("causal", "not per key"),
    ("negative_scale", "not a scaling by a positive scalar"),
    ("probs_output", "graph output"),
])
def test_unrecognised_attention_is_left_alone_with_a_reason(tmp_path, kind, reason):
    torch.manual_seed(0)
    path = export(Variant(kind), (torch.randn(1, 5, 32), torch.ones(1, 5, dtype=torch.int64)), tmp_path / "v.onnx",
                  dynamo=False, opset=17, input_names=["x", "mask"])
    result = convert_onnx(str(path), ConvertConfig(add_attention=AddAttentionConfig()))
    (skip,) = [s for s in result.report.skips if s.pass_name == "add-attention"]
    assert reason in skip.reason
    assert "Softmax" in ops(result.model) and "AddLinearAttention" not in ops(result.model)


def test_classifier_softmax_is_not_attention(tmp_path):
    head = nn.Sequential(nn.Linear(64, 32), nn.Softmax(-1))
    path = export(head, (torch.randn(2, 64),), tmp_path / "cls.onnx", dynamo=False, opset=17, input_names=["x"])
    result = convert_onnx(str(path), ConvertConfig(add_attention=AddAttentionConfig()))
    (skip,) = [s for s in result.report.skips if s.pass_name == "add-attention"]
    assert "rank-2" in skip.reason and "ShiftLinear" in ops(result.model)
    with pytest.raises(ConversionError, match="nothing to convert.*Softmax over a rank-2 tensor"):
        convert_onnx(str(path), ONLY_ATTENTION)


def test_exclude_and_config_round_trip(tmp_path):
    torch.manual_seed(0)
    path = export(TinyViT(), (torch.randn(1, 3, 32, 32),), tmp_path / "vit.onnx", dynamo=False, opset=17,
                  input_names=["img"])
    cfg = ConvertConfig(shift_linear=None, shift_conv=None, add_attention=AddAttentionConfig(exclude=["blocks.1"]))
    result = convert_onnx(str(path), cfg)
    assert [c.node for c in result.report.changes] == ["/blocks/blocks.0/attn/Softmax"]
    assert "excluded" in result.report.skips[0].reason
    assert ConvertConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="binarizer must be 'sign'"):
        AddAttentionConfig(binarizer="ksh")


def test_default_cli_converts_attention_and_linears_and_can_turn_attention_off(tmp_path):
    from typer.testing import CliRunner

    from mfconvert.cli.main import app
    torch.manual_seed(0)
    img = torch.randn(1, 3, 32, 32)
    path = export(TinyViT(dim=96), (img,), tmp_path / "vit.onnx", dynamo=True, opset=18, input_names=["img"])
    res = CliRunner().invoke(app, [str(path), "-o", str(tmp_path / "on.onnx")])
    assert res.exit_code == 0, res.output
    assert res.output.count("AddLinearAttention") == 2 and "ShiftLinear" in res.output
    model = onnx.load(tmp_path / "on.onnx")
    assert ops(model).count("AddLinearAttention") == 2 and "ShiftLinear" in ops(model)
    out = session(str(tmp_path / "on.onnx"), threads=2).run(None, {"img": img.numpy()})[0]
    assert out.shape == (1, 10) and np.isfinite(out).all()
    res = CliRunner().invoke(app, [str(path), "-o", str(tmp_path / "off.onnx"), "--no-add-attention"])
    assert res.exit_code == 0, res.output
    assert "AddLinearAttention" not in ops(onnx.load(tmp_path / "off.onnx"))


class HFBert(nn.Module):
    """A stock transformers BertModel (tiny random config) returning last_hidden_state."""

    def __init__(self, impl, use_mask):
        super().__init__()
        from transformers import BertConfig, BertModel
        cfg = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                         vocab_size=100, attn_implementation=impl)
        self.bert, self.use_mask = BertModel(cfg).eval(), use_mask

    def forward(self, ids, mask):
        return self.bert(input_ids=ids, attention_mask=mask if self.use_mask else None).last_hidden_state


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_stock_transformers_bert_without_mask(tmp_path, impl):
    """transformers' own BertModel without a padding mask: both attention implementations
    convert (SDPA's NaN guard Where(IsNaN(p), 0, p) and its context re-view included)."""
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.int64)
    axes = {"ids": {0: "b", 1: "t"}, "mask": {0: "b", 1: "t"}}
    path = export(HFBert(impl, use_mask=False).eval(), (ids, mask), tmp_path / "bert.onnx", dynamo=False, opset=17,
                  input_names=["ids", "mask"], dynamic_axes=axes)
    result = convert_onnx(str(path), ONLY_ATTENTION)
    assert len(result.report.changes) == 2 and "Softmax" not in ops(result.model)
    feeds = {"ids": ids.numpy()}
    if any(i.name == "mask" for i in result.model.graph.input):
        feeds["mask"] = mask.numpy()
    out = session(result.model.SerializeToString(), threads=2).run(None, feeds)[0]
    assert out.shape == (2, 7, 64) and np.isfinite(out).all()


def swapped_hf_bert(model: HFBert) -> HFBert:
    """The HF BertModel the converted graph stands for, fed the [B, 1, T, T] mask transformers
    builds (additive for eager, boolean for sdpa)."""
    swap_hf_attention_cores(model.bert, query_key_mask=True)
    return model


HF_EXPORTS = [(impl, dynamo, opset) for impl in ("eager", "sdpa") for dynamo, opset in ((False, 17), (True, 18))]


@pytest.mark.parametrize("impl, dynamo, opset", HF_EXPORTS,
                         ids=[f"{i}-{'dynamo' if d else 'torchscript'}{o}" for i, d, o in HF_EXPORTS])
def test_stock_transformers_bert_with_padding_mask(tmp_path, impl, dynamo, opset):
    """With a padding mask transformers 5 builds an expanded [B, 1, T, T] mask (per key in value,
    not in shape): every block converts with that mask as the op's input, ORT equals the
    PyTorch model with the cores swapped, and padded tokens contribute nothing."""
    torch.manual_seed(0)
    ids = torch.randint(1, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.int64)
    mask[1, 4:] = 0
    bert = HFBert(impl, use_mask=True).eval()
    axes = {"ids": {0: "b", 1: "t"}, "mask": {0: "b", 1: "t"}}
    path = export(bert, (ids, mask), tmp_path / "masked.onnx", dynamo=dynamo, opset=opset,
                  input_names=["ids", "mask"], dynamic_axes=axes)
    result = convert_onnx(str(path), ONLY_ATTENTION)
    assert len(result.report.changes) == 2 and not result.report.skips, result.report.skips
    assert all("key mask (query × key" in c.detail for c in result.report.changes)
    assert "Softmax" not in ops(result.model)
    sess = session(result.model.SerializeToString(), threads=2)
    got = sess.run(None, {"ids": ids.numpy(), "mask": mask.numpy()})[0]
    with torch.no_grad():
        expect = swapped_hf_bert(bert)(ids, mask).numpy()
    # As for the ViT: sign codes agree unless a q/k channel is within float noise of 0; the rest
    # is ORT's vs PyTorch's rounding of LayerNorm/GELU/MatMul on O(1) hidden states.
    # Measured max |diff| 4.8e-7 – 7.2e-7 over the 4 exports.
    print("max |ORT - PyTorch|:", np.abs(got - expect).max())
    np.testing.assert_allclose(got, expect, rtol=0, atol=1e-5)
    other = ids.clone()
    other[1, 4:] = torch.randint(1, 100, (3,))
    assert not torch.equal(other, ids)
    moved = sess.run(None, {"ids": other.numpy(), "mask": mask.numpy()})[0]
    # Masked keys are skipped and every other op is row-wise: the unpadded rows are bit-identical.
    np.testing.assert_array_equal(moved[1, :4], got[1, :4])
    np.testing.assert_array_equal(moved[0], got[0])


class CausalPadded(BertSelfAttention):
    """A decoder-style block: transformers 5's mask construction with a causal factor
    (kv_idx <= q_idx) And-ed with the padding mask, Where(mask, 0, min), added to the scores."""

    def forward(self, x, attention_mask):
        t = x.shape[1]
        pos = torch.arange(t)
        causal = pos[None, None, None, :] <= pos[None, None, :, None]
        keep = causal & attention_mask[:, None, None, :].bool()
        additive = torch.where(keep, 0.0, torch.finfo(x.dtype).min)
        q, k, v = self.split(self.query(x)), self.split(self.key(x)), self.split(self.value(x))
        ctx = (q @ k.transpose(-1, -2) / math.sqrt(self.d) + additive).softmax(-1) @ v
        b, _, t, _ = ctx.shape
        return self.dense(ctx.permute(0, 2, 1, 3).reshape(b, t, self.h * self.d))


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_causal_query_key_mask_is_left_alone(tmp_path, dynamo):
    torch.manual_seed(0)
    path = export(CausalPadded(32, 2), (torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.int64)),
                  tmp_path / "c.onnx", dynamo=dynamo, opset=18 if dynamo else 17, input_names=["x", "mask"],
                  dynamic_axes={"x": {0: "b", 1: "t"}, "mask": {0: "b", 1: "t"}})
    result = convert_onnx(str(path), ConvertConfig(add_attention=AddAttentionConfig()))
    (skip,) = [s for s in result.report.skips if s.pass_name == "add-attention"]
    assert "is not per key" in skip.reason, skip.reason
    assert "Softmax" in ops(result.model) and "AddLinearAttention" not in ops(result.model)
