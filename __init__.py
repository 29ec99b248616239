"""mfconvert: convert pretrained models into multiplication-free models served by ONNX Runtime."""
