"""--moe-mlp on the real all-MiniLM-L6-v2 export: all 6 MLPs become MoE blocks, the attention
linears follow --shift-linear, the model runs in ORT and reports its routing split; every block
computes, on the real tokens that reach it, what the NumPy reference of the spec computes; forced
all-Mult routing reproduces the original model."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from scipy.special import erf

from mfconvert.convert import ConvertConfig, MoEMLPConfig, convert_onnx
from mfconvert.moe import routing_split
from mfconvert.runtime import session
from mfconvert.zoo.minilm import tokenizer
from tests.test_moe_mlp_reference import block_reference, check, spec_router

pytestmark = pytest.mark.slow
TEXTS = ["The quick brown fox jumps over the lazy dog.", "A man is playing a guitar.", "Hi",
         "Multiplication-free networks replace products with shifts and additions."]


@pytest.fixture(scope="module")
def feeds():
    return tokenizer()(TEXTS)


@pytest.fixture(scope="module")
def original(minilm_onnx_path, feeds):
    sess = ort.InferenceSession(str(minilm_onnx_path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


@pytest.fixture(scope="module")
def converted(minilm_onnx_path):
    return convert_onnx(str(minilm_onnx_path), ConvertConfig(moe_mlp=MoEMLPConfig()))


def test_every_mlp_converts_and_the_model_runs(converted, feeds, original):
    result = converted
    by_pass = {r.pass_name: r for r in result.report.results}
    blocks = {c.detail.split(" ")[1] for c in by_pass["moe-mlp"].changes}
    assert len(by_pass["moe-mlp"].changes) == 12 and len(blocks) == 6
    assert all("384→1536→384, GELU)" in c.detail for c in by_pass["moe-mlp"].changes)
    assert not by_pass["moe-mlp"].skips
    assert len(by_pass["shift-linear"].changes) == 24          # Q, K, V, attention output
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("ShiftLinear") == 36 and ops.count("Gemm") == 18   # 6 × (router + Mult fc1, fc2)

    got = session(result.model.SerializeToString(), threads=2).run(None, feeds)[0]
    assert got.shape == original.shape and np.isfinite(got).all()
    splits = routing_split(result.model, feeds)
    assert set(splits) == blocks
    # Padding tokens are not counted, unless asked: the split is that of the real tokens, the
    # same as running each sentence alone without padding (±1 token for a router tie that
    # float rounding could tip).
    real = int(feeds["attention_mask"].sum())
    assert real < feeds["input_ids"].size and all(s.mult + s.shift == real for s in splits.values())
    padded = routing_split(result.model, feeds, mask_input="")
    assert all(s.mult + s.shift == feeds["input_ids"].size for s in padded.values())
    alone = routing_split(result.model, [tokenizer()([t]) for t in TEXTS])
    assert all(abs(alone[b].shift - splits[b].shift) <= 1 for b in blocks)


def test_forced_all_mult_routing_is_the_original_model(minilm_onnx_path, feeds, original):
    cfg = ConvertConfig(shift_linear=None, add_attention=None,
                        moe_mlp=MoEMLPConfig(router_std=0.0, router_bias=-30.0))
    result = convert_onnx(str(minilm_onnx_path), cfg)
    got = session(result.model.SerializeToString(), threads=2).run(None, feeds)[0]
    # Gemm on the gathered tokens instead of MatMul + Add: float32 rounding only (measured 1e-7).
    np.testing.assert_allclose(got, original, rtol=0, atol=2e-6)


@pytest.mark.usefixtures("one_blas_thread")
def test_every_block_matches_the_numpy_reference_on_real_tokens(converted, feeds):
    """Each of the 6 MoE blocks of the converted model (mixed routing, default router), on the
    tokens that reach it in ORT, against tests/numpy_reference.moe_mlp: router from the spec's
    formula, the Mult expert's float weights (the original fc1/fc2 copied by the pass), the Shift
    expert rounded by the reference itself; bound as in test_moe_mlp_reference (GELU: Lipschitz
    1.13, float32 within 8U·|h|, one-LSB flips of fc2's fixed-point inputs)."""
    model = onnx.ModelProto()
    model.CopyFrom(converted.model)
    blocks = sorted(json.loads({p.key: p.value for p in model.metadata_props}["mfconvert.moe_mlp.routes"]))
    names = [(f"{b}/moe/tokens", f"{b}/moe/gated") for b in blocks]
    model.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for pair in names for n in pair)
    outs = dict(zip([o.name for o in model.graph.output],
                    session(model.SerializeToString(), threads=2).run(None, feeds)))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    gelu = (lambda h: 0.5 * h * (1 + erf(h / np.sqrt(2))), 1.13)
    shares = []
    for b, (x_name, y_name) in zip(blocks, names):
        x = outs[x_name]
        w = [inits[f"{b}/moe/mult.{fc}.{kind}"] for fc in ("fc1", "fc2") for kind in ("weight", "bias")]
        w_r, b_r = spec_router({"router_std": 10.0, "router_bias": 0.0, "seed": 0}, x.shape[1])
        y, tol, info = block_reference(gelu, False, w_r, b_r, *w, x)
        check(outs[y_name], y, tol, info, "gelu", "mixed")
        shares.append(info["expert"].mean())
    # Routing is mixed: every block sends some tokens each way (padding tokens included).
    assert all(0.05 < s < 0.95 for s in shares), shares
