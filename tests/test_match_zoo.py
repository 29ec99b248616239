"""Matching by meaning on third-party layouts of real models (issue 11 item 5; zoo marker: minutes,
not seconds): all-MiniLM-L6-v2 with Gemm on [B·T, C] tokens (ORT's basic optimisation at a fixed
shape, the layout onnxslim writes too) and after
onnxruntime.transformers.optimizer (SkipLayerNormalization, BiasGelu), and the public zoo's
smart-turn (Whisper-tiny encoder in int8 QDQ form). Every attention core and MLP is found; the
converted models run in ORT with our ops."""
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from mfconvert.convert import ConvertConfig, MoEMLPConfig, convert_onnx
from mfconvert.passes.add_attention import AddAttentionConfig
from mfconvert.runtime import session
from mfconvert.zoo import public

pytestmark = pytest.mark.zoo

ONLY_ATTENTION = ConvertConfig(shift_linear=None, shift_conv=None, add_attention=AddAttentionConfig())
ALL_MULT_MOE = ConvertConfig(shift_linear=None, shift_conv=None, add_attention=None,
                             moe_mlp=MoEMLPConfig(router_std=0.0, router_bias=-30.0))


def _run(model, feeds, ours):
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    if ours:
        return session(data, threads=2).run(None, feeds)[0]
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _by_pass(result, name):
    return next(r for r in result.report.results if r.pass_name == name)


@pytest.fixture(scope="module")
def minilm_feeds():
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 5000, (2, 16)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 11:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def minilm_variants(minilm_onnx_path, tmp_path_factory):
    """name -> ModelProto: our MiniLM export with Gemm on [B·T, C] tokens (ORT's basic optimisation
    at input shapes [2, 16], the layout onnxslim writes too) and after ORT's transformer optimizer."""
    from onnxruntime.transformers import optimizer

    from mfconvert.tests.test_match_by_meaning import ort_basic_at

    tmp = tmp_path_factory.mktemp("minilm-variants")
    flat = ort_basic_at(minilm_onnx_path, {"input_ids": [2, 16], "attention_mask": [2, 16]}, tmp / "flat.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer.optimize_model(str(minilm_onnx_path), model_type="bert", num_heads=12, hidden_size=384,
                                 opt_level=0).save_model_to_file(str(tmp / "opt.onnx"))   # adds the com.microsoft import
    opt = onnx.load(str(tmp / "opt.onnx"))
    assert "Gemm" in [n.op_type for n in flat.graph.node]
    assert {"SkipLayerNormalization", "BiasGelu"} <= {n.op_type for n in opt.graph.node}
    return {"flattened-tokens": flat, "ort-optimizer": opt}


@pytest.mark.parametrize("variant", ["flattened-tokens", "ort-optimizer"])
def test_minilm_variants_match_like_the_plain_export(minilm_variants, minilm_onnx_path, minilm_feeds, variant):
    model = minilm_variants[variant]
    result = convert_onnx(model, ONLY_ATTENTION)
    assert len(_by_pass(result, "add-attention").changes) == 6 and not result.report.skips
    plain = convert_onnx(str(minilm_onnx_path), ONLY_ATTENTION)
    # The same cores with the same Q, K, V: equal up to float32 rounding of the ops around them
    # (Gemm vs MatMul + Add, SkipLayerNormalization vs LayerNormalization; codes are signs).
    # Measured max |Δ| 7.5e-8 on these sentences.
    np.testing.assert_allclose(_run(result.model, minilm_feeds, True), _run(plain.model, minilm_feeds, True),
                               rtol=0, atol=1e-5)
    moe = convert_onnx(model, ALL_MULT_MOE)
    assert len(_by_pass(moe, "moe-mlp").changes) == 12 and not moe.report.skips
    # Every token to the float expert: the exported MLP itself (float32 rounding, measured 0).
    np.testing.assert_allclose(_run(moe.model, minilm_feeds, True), _run(model, minilm_feeds, False),
                               rtol=0, atol=1e-5)


def test_smart_turn_attention_and_mlps():
    """Int8 QDQ Whisper-tiny encoder: fake quantisation (QuantizeLinear → DequantizeLinear) sits
    between every op of the attention core and between the MLP's linears; SDPA's K goes through
    a [B·H, D, T] view. 4 attention cores and 4 encoder MLPs (plus the classifier's) are found; the
    attention pooling's Softmax over [B, T, 1] is not a core, with the reason."""
    try:
        path = public.fetch("smart-turn")
    except public.ZooUnavailable as err:
        pytest.skip(f"zoo model 'smart-turn' unavailable: {err}")
    feeds = public.sample("smart-turn")
    original = _run(path, feeds, False)

    att = convert_onnx(str(path), ONLY_ATTENTION)
    attention = _by_pass(att, "add-attention")
    assert len(attention.changes) == 4
    (skip,) = attention.skips
    assert "rank-3" in skip.reason
    got = _run(att.model, feeds, True)
    assert got.shape == original.shape and np.isfinite(got).all()

    moe = convert_onnx(str(path), ALL_MULT_MOE)
    blocks = _by_pass(moe, "moe-mlp")
    assert sum("384→1536→384, GELU" in c.detail for c in blocks.changes) == 2 * 4
    # Routed to the float expert, a block is the dequantised MLP: it drops the int8 fake
    # quantisation inside it (of fc1's output and of the activation), so the output moves by
    # that rounding; measured |Δp| 0.0048 on this sample (item 6's ShiftLinear conversion: 0.0059).
    np.testing.assert_allclose(_run(moe.model, feeds, True), original, rtol=0, atol=0.02)
