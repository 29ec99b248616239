"""The ONNX→PyTorch executor's ops, built like onnx.reference: one implementation per op and
opset range (registry.py), attribute defaults from the op's schema at the model's opset."""
# Importing each family registers its ops.
from mfconvert.nn.executor import attention, elementwise, misc, msft, nnops, quant, resize, rnn, tensor  # noqa: F401
from mfconvert.nn.executor.registry import OPS, attributes, lookup, norm_domain, to_tensor  # noqa: F401
