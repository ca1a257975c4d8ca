"""Serving on NVIDIA Triton Inference Server: ``gsnet serve`` (PyTriton) and ``gsnet export triton`` (a model repository)."""
