"""ONNX Runtime sessions with the mfconvert custom-op library registered."""
from __future__ import annotations

import onnxruntime as ort

from mfconvert.ort_ops import library_path


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """SessionOptions with our ops registered; `threads` sets ORT's intra-op thread count."""
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(library_path())
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return opts


def session(path_or_bytes, threads: int | None = None) -> ort.InferenceSession:
    """An InferenceSession (CPU) for a model file or serialized model, able to run our ops."""
    return ort.InferenceSession(path_or_bytes, sess_options=session_options(threads),
                                providers=["CPUExecutionProvider"])
