"""ONNX Runtime sessions with the mfconvert custom-op library registered."""
from __future__ import annotations

import onnxruntime as ort

from mfconvert.ort_ops import library_path


def session_options(threads: int | None = None, spinning: bool = True) -> ort.SessionOptions:
    """SessionOptions with our ops registered; `threads` sets ORT's intra-op thread count.
    `spinning=False` stops idle ORT threads from busy-waiting, for sessions that share the
    cores with other work (a PyTorch training step, say)."""
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(library_path())
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return opts


def session(path_or_bytes, threads: int | None = None, spinning: bool = True) -> ort.InferenceSession:
    """An InferenceSession (CPU) for a model file or serialized model, able to run our ops."""
    return ort.InferenceSession(path_or_bytes, sess_options=session_options(threads, spinning),
                                providers=["CPUExecutionProvider"])
