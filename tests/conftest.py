"""Shared fixtures: the real all-MiniLM-L6-v2, loaded and exported once per test session."""
import pytest
import torch


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


@pytest.fixture
def one_torch_thread():
    """Small tensors: torch's intra-op threads only contend with ORT's pool on 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_blas_thread():
    """NumPy references with large float64 matmuls: one BLAS thread (on 2 shared cores, OpenBLAS's
    spinning threads made them several times slower)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield
