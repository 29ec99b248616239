"""PyTorch reference layers: the trainable faces of mfconvert's ONNX ops."""
from mfconvert.nn.moe_mlp import ShiftMoEMLP  # noqa: F401
from mfconvert.nn.shift_linear import ShiftLinear  # noqa: F401
from mfconvert.nn.add_attention import AddLinearAttention  # noqa: F401
