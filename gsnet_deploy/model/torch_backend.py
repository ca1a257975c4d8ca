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
from open_clip.transformer import LayerNormFp32

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


class CudaGraphImage:
    """``forward_image`` captured as one CUDA graph per (views, classes) shape and replayed.

    Replays remove the launch overhead of the ~1,000 small kernels of the head; each new shape is
    warmed up (Triton compiles, cuBLAS picks algorithms) on a side stream, then captured once.
    """

    def __init__(self, model: GSNet, dtype: torch.dtype) -> None:
        """Wrap a model that already sits on a CUDA device."""
        self.model, self.dtype = model, dtype
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, N, 96, 96]`` of CUDA tensors (a view of the graph's output buffer)."""
        key = (images.shape[0], text.shape[0])
        if key not in self._graphs:
            static_images, static_text = images.clone(), text.clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self.model.forward_image(static_images, static_text)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.model.forward_image(static_images, static_text)
            self._graphs[key] = (graph, static_images, static_text, static_out)
        graph, static_images, static_text, static_out = self._graphs[key]
        static_images.copy_(images)
        static_text.copy_(text)
        graph.replay()
        return static_out


class _ImageRunner:
    """Image graph on the torch model."""

    def __init__(self, model: GSNet, device: torch.device, dtype: torch.dtype, cuda_graphs: bool) -> None:
        self.model, self.device, self.dtype = model, device, dtype
        self.graphs = CudaGraphImage(model, dtype) if cuda_graphs else None

    @torch.no_grad()
    def forward(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Device tensors in, device logits out (the timed region of benchmarks)."""
        images, text = images.float(), text.to(self.dtype)
        if self.graphs is not None:
            return self.graphs(images, text)
        return self.model.forward_image(images, text)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """images ``[B, 3, 384, 384]`` + text_embeds ``[N, 512]`` -> logits ``[B, N, 96, 96]`` float32."""
        images = torch.from_numpy(np.ascontiguousarray(feeds[IMAGES], dtype=np.float32)).to(self.device)
        text = torch.from_numpy(np.ascontiguousarray(feeds[TEXT_EMBEDS], dtype=np.float32)).to(self.device)
        return {LOGITS: self.forward(images, text).float().cpu().numpy()}


class TorchBackend:
    """GSNet in PyTorch behind the runtime's ``Backend`` protocol."""

    name = "torch"
    max_views: int | None = None
    preferred_views = 5

    def __init__(
        self,
        model: GSNet,
        device: str | None = None,
        precision: TorchPrecision = TorchPrecision.FP32,
        cuda_graphs: bool | None = None,
    ) -> None:
        """Wrap ``model`` (moved to ``device`` on enter).

        Args:
            model: GSNet in eval mode.
            device: torch device; default CUDA when available.
            precision: FP16 (CUDA only) halves the image modules; the text tower stays fp32.
            cuda_graphs: replay captured CUDA graphs per (B, N); default on for CUDA.
        """
        self.model = model
        self.device = pick_device(device)
        if precision is TorchPrecision.FP16 and self.device.type != "cuda":
            raise BackendError("torch fp16 needs a CUDA device; use fp32 on CPU")
        self.precision = precision
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and self.device.type != "cuda":
            raise BackendError("CUDA graphs need a CUDA device")
        self.model_digest = model.digest
        self._text: _TextRunner | None = None
        self._image: _ImageRunner | None = None

    def __enter__(self) -> TorchBackend:
        """Move the model to its device and create the runners."""
        self.model.to(self.device)
        dtype = torch.float16 if self.precision is TorchPrecision.FP16 else torch.float32
        if dtype is torch.float16:
            # everything but the text tower (text embeddings are computed once, in fp32)
            for name, module in self.model.named_children():
                if name != "clip_text":
                    module.half()
            # NOTE: CLIP's LayerNorms compute in fp32 (as the reference's) and need fp32 weights for that
            for module in self.model.clip_visual.modules():
                if isinstance(module, LayerNormFp32):
                    module.float()
        self._text = _TextRunner(self.model, self.device)
        self._image = _ImageRunner(self.model, self.device, dtype, self.cuda_graphs)
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
