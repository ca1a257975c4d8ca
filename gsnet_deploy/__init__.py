"""gsnet-deploy: deployment toolchain for GSNet, open-vocabulary remote-sensing segmentation.

GSNet: "Towards Open-Vocabulary Remote Sensing Image Semantic Segmentation" (AAAI 2025),
reference code github.com/yecy749/GSNet (built on CAT-Seg). This package re-implements the
model in plain PyTorch and deploys it through ONNX, ONNX Runtime and TensorRT.

Importing the package is cheap: no torch, no onnxruntime. Heavy modules load on use.
"""

__version__ = "0.1.0"
