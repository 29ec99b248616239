"""PyTorch reference layers: the trainable faces of mfconvert's ONNX ops."""
from mfconvert.nn.shift_linear import ShiftLinear  # noqa: F401
