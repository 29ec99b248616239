"""mfconvert: convert pretrained models into multiplication-free models served by ONNX Runtime.

    from mfconvert import convert, convert_onnx, ConvertConfig
    result = convert_onnx("vit.onnx", ConvertConfig(), output="vit.mf.onnx")
    result = convert(torch_module, example_inputs)          # exports, then the same passes

`mfconvert.convert` is the PyTorch entry function; the package of the same name stays importable
as `from mfconvert.convert import ...`.
"""
from mfconvert.convert import ConversionError, ConvertConfig, convert_onnx  # noqa: F401
from mfconvert.convert.torch_entry import convert  # noqa: F401  (binds the function over the subpackage name)
from mfconvert.passes.shift_linear import ShiftLinearConfig  # noqa: F401
