"""`python -m mfconvert.ort_ops` prints the custom-op library's path (for C++ programs,
Triton's model_operations, or any onnxruntime register_custom_ops_library call)."""
import sys

from mfconvert.ort_ops import library_path

try:
    print(library_path())
except FileNotFoundError as err:
    sys.exit(f"mfconvert: error: {err}")
