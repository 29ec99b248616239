"""The real all-MiniLM-L6-v2 (TorchScript export, opset 17): all 6 attention cores become
AddLinearAttention (with the padding mask), its 36 linears still become ShiftLinear, and the
converted model runs in ORT through our library and equals the PyTorch model with the same
layers swapped in."""
import copy

import numpy as np
import onnx
import pytest
import torch

from mfconvert.convert import ConvertConfig, ShiftLinearConfig, convert_onnx
from mfconvert.passes.add_attention import AddAttentionConfig
from mfconvert.runtime import session
from mfconvert.tests.attention_models import swap_hf_attention_cores
from mfconvert.zoo.minilm import tokenizer

SENTENCES = ["Binary keys and queries turn attention into additions.", "A short one.",
             "The quick brown fox jumps over the lazy dog, again and again."]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def converted(minilm_onnx_path):
    return convert_onnx(str(minilm_onnx_path), ConvertConfig(shift_linear=None, add_attention=AddAttentionConfig()))


def test_six_of_six_attention_blocks_converted(converted, minilm_onnx_path):
    changes = converted.report.changes
    assert len(changes) == 6 and not converted.report.skips
    assert all("key mask" in c.detail and c.detail.startswith("12 heads × 32") for c in changes)
    ops = [n.op_type for n in converted.model.graph.node]
    assert ops.count("AddLinearAttention") == 6 and "Softmax" not in ops
    assert ops.count("MatMul") == 36          # the Q/K/V/out/fc1/fc2 linears are left for shift-linear
    both = convert_onnx(str(minilm_onnx_path), ConvertConfig(shift_linear=ShiftLinearConfig()))
    ops = [n.op_type for n in both.model.graph.node]
    assert ops.count("AddLinearAttention") == 6 and ops.count("ShiftLinear") == 36 and "MatMul" not in ops


def swap_attention(model):
    """The SentenceEncoder with every BERT self-attention core replaced by AddLinearAttention."""
    model = copy.deepcopy(model)
    swap_hf_attention_cores(model.bert)
    return model


def test_runs_in_ort_and_matches_pytorch(converted, minilm_model):
    feeds = tokenizer()(SENTENCES)
    got = session(converted.model.SerializeToString(), threads=2).run(None, feeds)[0]
    assert got.shape == (3, 384) and np.isfinite(got).all()
    with torch.no_grad():
        expect = swap_attention(minilm_model).eval()(
            *(torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask"))).numpy()
    # Sign codes of q/k agree unless a channel is within float noise of 0 (ORT vs PyTorch
    # MatMul/LayerNorm rounding). Measured max |diff| on unit-norm embeddings: 1.0e-7.
    assert np.abs(got - expect).max() < 1e-5
