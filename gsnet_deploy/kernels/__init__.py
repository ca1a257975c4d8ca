"""Fused kernels for GSNet (Triton) and their TensorRT plugin registration.

``fused_cost_volume`` is the QGFF front end: the Triton kernel on CUDA, the plain PyTorch
``cost_volume_reference`` elsewhere. Triton and TensorRT are imported only when used.
"""

from gsnet_deploy.kernels.cost_volume import cost_volume_reference, fused_cost_volume

__all__ = ["cost_volume_reference", "fused_cost_volume"]
