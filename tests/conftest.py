"""Shared fixtures: the real all-MiniLM-L6-v2, loaded and exported once per test session."""
import pytest


@pytest.fixture(scope="session")
def minilm_model():
    """The PyTorch SentenceEncoder (eval mode)."""
    from mfconvert.zoo.minilm import load_minilm

    return load_minilm()


@pytest.fixture(scope="session")
def minilm_onnx_path(tmp_path_factory, minilm_model):
    """all-MiniLM-L6-v2 exported to ONNX (opset 17) in a session temp dir; a pathlib.Path."""
    from mfconvert.zoo.minilm import minilm_onnx

    return minilm_onnx(tmp_path_factory.mktemp("minilm"), model=minilm_model)
