"""Standard ONNX ops as torch functions, for OnnxModule: the registry of nn/executor/ (one
implementation per op and opset range, attribute defaults from the schema at the model's opset)."""
from mfconvert.nn.executor import OPS, attributes, lookup, norm_domain, to_tensor  # noqa: F401
