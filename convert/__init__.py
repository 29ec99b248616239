"""Entry points: convert_onnx for ONNX models, convert for PyTorch modules."""
from mfconvert.convert.config import ConvertConfig  # noqa: F401
from mfconvert.convert.onnx_entry import ConversionResult, convert_onnx  # noqa: F401
from mfconvert.convert.onnx_model import ConversionError  # noqa: F401
from mfconvert.passes.moe_mlp import MoEMLPConfig  # noqa: F401
from mfconvert.passes.shift_linear import ShiftLinearConfig  # noqa: F401
