"""ONNX export, graph checks and TensorRT engine builds (torch only where export needs it)."""
