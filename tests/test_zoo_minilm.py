"""The packaged all-MiniLM-L6-v2: PyTorch encoder vs sentence-transformers, ONNX export vs
PyTorch, and the shape of the exported graph (what the conversion passes rely on)."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from mfconvert.calibrate.text import sentences
from mfconvert.zoo import minilm

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar.",
    "Hi",
    "Multiplication-free networks replace products with shifts and additions.",
] + sentences(12, seed=7)


@pytest.fixture(scope="module")
def torch_embeddings(minilm_model):
    return minilm.encode(minilm_model, TEXTS)


def test_tokenizer_pads_to_longest_and_truncates():
    tok = minilm.tokenizer()
    batch = tok(["Hello world.", "A somewhat longer sentence than the first one."])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.dtype == np.int64 and mask.dtype == np.int64 and ids.shape == mask.shape
    assert ids.shape[0] == 2 and mask[1].all() and not mask[0].all()
    assert (ids[mask == 0] == 0).all()                       # padding id 0
    assert ids[0, 0] == 101 and ids[0, mask[0].sum() - 1] == 102  # [CLS] ... [SEP]
    long = tok([" ".join(["word"] * 500)])
    assert long["input_ids"].shape == (1, 128)
    assert minilm.tokenizer(max_length=32)([" ".join(["word"] * 500)])["input_ids"].shape == (1, 32)


def test_hidden_states_match_bert_forward(minilm_model):
    """Our embeddings/mask plumbing computes exactly BertModel.forward's last_hidden_state."""
    import torch

    batch = minilm.tokenizer()(TEXTS)
    ids, mask = torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["attention_mask"])
    with torch.no_grad():
        ours = minilm_model.hidden_states(ids, mask)
        theirs = minilm_model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()  # padding positions are never used (pooling masks them out)
    # Measured: 0.0 (same kernels, same order of additions); 1e-5 allows other builds' kernels.
    assert (ours - theirs)[real].abs().max().item() < 1e-5


def test_encoder_matches_sentence_transformers(torch_embeddings):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(minilm.model_dir()), device="cpu")
    # All TEXTS fit in 128 tokens, so our 128-token truncation and ST's 256 agree.
    assert minilm.tokenizer()(TEXTS)["input_ids"].shape[1] < 128
    expected = st.encode(TEXTS, convert_to_numpy=True, batch_size=len(TEXTS))
    cos = np.sum(expected * torch_embeddings, axis=1)
    assert cos.min() > 0.9999
    np.testing.assert_allclose(np.linalg.norm(torch_embeddings, axis=1), 1.0, atol=1e-6)


def test_onnx_matches_torch(minilm_onnx_path, torch_embeddings):
    sess = ort.InferenceSession(str(minilm_onnx_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    assert [o.name for o in sess.get_outputs()] == ["sentence_embedding"]
    tok = minilm.tokenizer()
    # Padded batch (different batch and sequence length from the export example) ...
    out = sess.run(None, tok(TEXTS))[0]
    assert out.shape == (len(TEXTS), minilm.HIDDEN_SIZE)
    # Tolerance: both sides are float32 on unit-norm vectors; measured max abs diff 2.2e-7
    # (torch 2.13 / ORT 1.32, CPU), i.e. a few float32 ulps at magnitude ~0.1-0.3, so 1e-5
    # leaves ~50x headroom for other kernels while still catching any real graph difference.
    assert np.abs(out - torch_embeddings).max() < 1e-5
    # ... and a single unpadded sentence, batch 1 (padding must not change the embedding).
    one = sess.run(None, tok(TEXTS[:1]))[0]
    assert np.abs(one[0] - torch_embeddings[0]).max() < 1e-5


def test_onnx_graph_has_36_constant_weight_matmuls(minilm_onnx_path):
    model = onnx.load(str(minilm_onnx_path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    const_2d = [n for n in matmuls if n.input[1] in inits and len(inits[n.input[1]].dims) == 2]
    assert len(const_2d) == minilm.NUM_LINEAR == 36
    shapes = sorted(tuple(inits[n.input[1]].dims) for n in const_2d)
    assert shapes.count((384, 384)) == 24     # Q, K, V, attention output
    assert shapes.count((384, 1536)) == 6     # fc1 (stored [in, out]: MatMul(x, W^T))
    assert shapes.count((1536, 384)) == 6     # fc2
    # The other MatMuls are the 12 activation x activation attention products.
    assert len(matmuls) == 36 + 12
    # Every linear layer has its bias Add with a constant 1-D operand.
    consumers = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    for mm in const_2d:
        adds = [c for c in consumers.get(mm.output[0], []) if c.op_type == "Add"]
        assert len(adds) == 1
        bias = [inits[x] for x in adds[0].input if x in inits]
        assert len(bias) == 1 and len(bias[0].dims) == 1
    assert not any("pooler" in i.name for i in graph.initializer)
    weight = numpy_helper.to_array(inits[const_2d[0].input[1]])
    assert weight.dtype == np.float32 and np.isfinite(weight).all()


def test_onnx_shapes_inferable_at_fixed_input_shape(minilm_onnx_path):
    """With inputs fixed to [1, 128], ONNX shape inference knows every linear layer's input
    shape, so the conversion report can count rows and MACs per layer."""
    model = onnx.load(str(minilm_onnx_path))
    for inp in model.graph.input:
        for dim, value in zip(inp.type.tensor_type.shape.dim, (1, 128)):
            dim.Clear()
            dim.dim_value = value
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes = {vi.name: [d.dim_value if d.HasField("dim_value") else None
                        for d in vi.type.tensor_type.shape.dim]
              for vi in inferred.graph.value_info}
    inits = {i.name for i in model.graph.initializer}
    linear = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert len(linear) == 36
    for node in linear:
        assert shapes[node.input[0]] in ([1, 128, 384], [1, 128, 1536]), node.name
    out = [o for o in inferred.graph.output if o.name == "sentence_embedding"][0]
    assert [d.dim_value for d in out.type.tensor_type.shape.dim] == [1, 384]


def test_minilm_onnx_is_cached(minilm_onnx_path):
    mtime = minilm_onnx_path.stat().st_mtime_ns
    again = minilm.minilm_onnx(minilm_onnx_path.parent)
    assert again == minilm_onnx_path and again.stat().st_mtime_ns == mtime
    assert [p.name for p in minilm_onnx_path.parent.iterdir()] == [minilm.ONNX_FILENAME]


def test_stale_export_is_not_current(minilm_onnx_path, tmp_path):
    model = onnx.load(str(minilm_onnx_path))
    assert minilm._is_current(minilm_onnx_path, 17) and not minilm._is_current(minilm_onnx_path, 18)
    for prop in model.metadata_props:
        if prop.key == minilm._VERSION_KEY:
            prop.value = "0"
    stale = tmp_path / minilm.ONNX_FILENAME
    onnx.save(model, str(stale))
    assert not minilm._is_current(stale, 17)
    stale.write_bytes(b"truncated")
    assert not minilm._is_current(stale, 17)
    assert not minilm._is_current(tmp_path / "missing.onnx", 17)
