"""gsnet-deploy: deployment toolchain for GSNet, open-vocabulary remote-sensing segmentation.

GSNet: "Towards Open-Vocabulary Remote Sensing Image Semantic Segmentation" (AAAI 2025),
reference code github.com/yecy749/GSNet (built on CAT-Seg). This package re-implements the
model in plain PyTorch and deploys it through ONNX, ONNX Runtime and TensorRT.

Importing the package is cheap: no torch, no onnxruntime. Heavy modules load on use.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for type checkers only; at run time they load on first use (``__getattr__``)
    from gsnet_deploy.segmenter import EncodedImage, Segmentation, Segmenter

__version__ = "0.1.0"

__all__ = ["EncodedImage", "Segmentation", "Segmenter", "__version__"]

_LAZY = ("EncodedImage", "Segmentation", "Segmenter")  # from gsnet_deploy.segmenter, imported on first use


def __getattr__(name: str) -> object:
    """``gsnet_deploy.Segmenter`` and its result types, imported on first use (keeps the package import cheap)."""
    if name in _LAZY:
        from gsnet_deploy import segmenter

        return getattr(segmenter, name)
    raise AttributeError(f"module 'gsnet_deploy' has no attribute {name!r}")
