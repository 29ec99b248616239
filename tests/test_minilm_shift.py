"""The real all-MiniLM-L6-v2: every linear layer becomes ShiftLinear, the converted model runs in
ORT through our library and equals the PyTorch reference model (nn.ShiftLinear swapped in)."""
import copy

import numpy as np
import onnx
import pytest
import torch

from mfconvert.convert import ConvertConfig, convert_onnx
from mfconvert.nn.swap import shift_linears
from mfconvert.runtime import session
from mfconvert.zoo.minilm import tokenizer

SENTENCES = [
    "Return a new array of given shape and type, filled with zeros.",
    "The quick brown fox jumps over the lazy dog.",
    "Compute the arithmetic mean along the specified axis.",
    "Shift layers replace multiplications by bit shifts and sign flips.",
]


@pytest.fixture(scope="module")
def converted(minilm_onnx_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm_mf") / "minilm.mf.onnx"
    return convert_onnx(str(minilm_onnx_path), ConvertConfig(add_attention=None), output=str(out),
                        input_shapes={"input_ids": [1, 128], "attention_mask": [1, 128]})


def test_all_36_linears_become_shift_linear(converted):
    model = onnx.load(converted.output)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("ShiftLinear") == 36 and "MatMul" in ops   # the attention MatMuls stay
    assert not converted.report.skips or all("no constant weight" in s.reason for s in converted.report.skips)
    assert len(converted.report.changes) == 36
    # 6 layers × (4·384² + 2·384·1536) weights, 128 tokens each.
    assert sum(c.macs_removed for c in converted.report.changes) == 128 * 6 * (4 * 384 * 384 + 2 * 384 * 1536)


def test_ort_equals_pytorch_reference_model(converted, minilm_model, minilm_onnx_path):
    feeds = tokenizer()(SENTENCES)
    got = session(converted.output, threads=2).run(None, feeds)[0]
    reference = copy.deepcopy(minilm_model)
    assert len(shift_linears(reference)) == 36
    with torch.no_grad():
        expect = reference.eval()(*(torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask"))).numpy()
    # The shift layers agree bit for bit; ORT's and PyTorch's float ops around them (LayerNorm,
    # Softmax, GELU) differ in the last bits, which now and then moves an activation across a
    # Q16.16 floor step (2^-16) and changes one term by 2^-16·|w|. Measured on 16 held-out
    # sentences: max |diff| 2.0e-5, mean 4e-6 on unit-norm embeddings, against a conversion
    # error of ~1e-1 (cosine 0.91); 1e-4 leaves room for other sentences.
    assert np.abs(got - expect).max() < 1e-4
    original = session(str(minilm_onnx_path), threads=2).run(None, feeds)[0]
    cos = (got * original).sum(1)
    assert cos.min() > 0.8     # 5-bit power-of-two weights, no finetuning: a real but lossy copy
