"""The PyTorch backend: GSNet's two graphs run eagerly behind the runtime's Backend protocol.

It lets the torch model serve the same pipeline (paper protocol, tiling, outputs) as ONNX Runtime
and TensorRT. On CPU it runs fp32; on CUDA it can run the fast path (fp16, the fused cost-volume
kernel, SDPA) selected by ``Precision``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

import numpy as np
import torch

from gsnet_deploy.errors import BackendError
from gsnet_deploy.io_names import IMAGES, LOGITS, TEXT_EMBEDS, TEXT_TOKENS
from gsnet_deploy.model.gsnet import GSNet


class TorchPrecision(enum.Enum):
    """Arithmetic of the torch image graph."""

    FP32 = "fp32"
    FP16 = "fp16"  # CUDA only: weights and activations in half precision (LayerNorms of CLIP stay fp32)


def pick_device(requested: str | None) -> torch.device:
    """``requested`` ("cpu", "cuda", "cuda:1") or CUDA when available, else CPU."""
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"--device {requested} asked for CUDA but torch sees no GPU; pass --device cpu")
    return device


class _TextRunner:
    """Text graph on the torch model."""

    def __init__(self, model: GSNet, device: torch.device) -> None:
        self.model, self.device = model, device

    @torch.no_grad()
    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """tokens ``[N, 77]`` int64 -> text_embeds ``[N, 512]`` float32."""
        tokens = torch.from_numpy(np.ascontiguousarray(feeds[TEXT_TOKENS], dtype=np.int64)).to(self.device)
        return {TEXT_EMBEDS: self.model.encode_text(tokens).float().cpu().numpy()}


class _ImageRunner:
    """Image graph on the torch model."""

    def __init__(self, model: GSNet, device: torch.device, dtype: torch.dtype) -> None:
        self.model, self.device, self.dtype = model, device, dtype

    @torch.no_grad()
    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """images ``[B, 3, 384, 384]`` + text_embeds ``[N, 512]`` -> logits ``[B, N, 96, 96]`` float32."""
        images = torch.from_numpy(np.ascontiguousarray(feeds[IMAGES], dtype=np.float32)).to(self.device, self.dtype)
        text = torch.from_numpy(np.ascontiguousarray(feeds[TEXT_EMBEDS], dtype=np.float32)).to(self.device, self.dtype)
        return {LOGITS: self.model.forward_image(images, text).float().cpu().numpy()}


class TorchBackend:
    """GSNet in PyTorch behind the runtime's ``Backend`` protocol."""

    name = "torch"
    max_views: int | None = None
    preferred_views = 5

    def __init__(self, model: GSNet, device: str | None = None, precision: TorchPrecision = TorchPrecision.FP32) -> None:
        """Wrap ``model`` (moved to ``device`` on enter)."""
        self.model = model
        self.device = pick_device(device)
        if precision is TorchPrecision.FP16 and self.device.type != "cuda":
            raise BackendError("torch fp16 needs a CUDA device; use fp32 on CPU")
        self.precision = precision
        self.model_digest = model.digest
        self._text: _TextRunner | None = None
        self._image: _ImageRunner | None = None

    def __enter__(self) -> TorchBackend:
        """Move the model to its device and create the runners."""
        self.model.to(self.device)
        dtype = torch.float16 if self.precision is TorchPrecision.FP16 else torch.float32
        self._text = _TextRunner(self.model, self.device)
        self._image = _ImageRunner(self.model, self.device, dtype)
        return self

    def __exit__(self, *exc: object) -> None:
        """Drop the runners (the model stays usable)."""
        self._text = self._image = None

    @property
    def text(self) -> _TextRunner:
        """The text graph's runner."""
        if self._text is None:
            raise BackendError("the torch backend is not open; use it in a 'with' block")
        return self._text

    @property
    def image(self) -> _ImageRunner:
        """The image graph's runner."""
        if self._image is None:
            raise BackendError("the torch backend is not open; use it in a 'with' block")
        return self._image
