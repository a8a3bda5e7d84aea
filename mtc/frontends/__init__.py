"""Front ends: every source format becomes an ONNX model in the mtc IR."""
