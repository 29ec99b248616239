"""The C++ ONNX Runtime custom-op library (ops of domain ai.mfconvert, see docs/ops.md)."""
from __future__ import annotations

import os

DOMAIN = "ai.mfconvert"
OPSET_VERSION = 1
_LIBRARY_NAME = "libmfconvert_ops.so"
# Another build of the library to load instead (the sanitizer build of `make sanitize`).
LIBRARY_ENV = "MFCONVERT_OPS_LIBRARY"


def library_path() -> str:
    """Absolute path of the built custom-op library, to pass to register_custom_ops_library:
    $MFCONVERT_OPS_LIBRARY when set, else the library built next to this file."""
    override = os.environ.get(LIBRARY_ENV)
    if override:
        path = os.path.abspath(override)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{LIBRARY_ENV}={override}: no such file")
        return path
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), _LIBRARY_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is missing: the custom-op library is not built. Build it with "
            "`make setup` (or `pip install -e .` in the repository root).")
    return path
