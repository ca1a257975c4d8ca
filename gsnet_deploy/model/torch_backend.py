"""The PyTorch backend: GSNet's two graphs run eagerly behind the runtime's Backend protocol.

It lets the torch model serve the same pipeline (paper protocol, tiling, outputs) as ONNX Runtime
and TensorRT. On CPU it runs fp32; on CUDA it can run the fast path (fp16, the fused cost-volume
kernel, SDPA) selected by ``Precision``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from open_clip.transformer import LayerNormFp32

from gsnet_deploy.contracts.io_names import (
    CLASS_MAP,
    IMAGES,
    LOGITS,
    OUT_SIZE,
    PAPER_FEATURES,
    PAPER_IMAGE,
    PROBS,
    TEXT_EMBEDS,
    TEXT_TOKENS,
)
from gsnet_deploy.errors import BackendError
from gsnet_deploy.model.gsnet import GSNet
from gsnet_deploy.model.protocol import PaperEncoder, PaperHead
from gsnet_deploy.model.tile_blend import TorchWindowBlender
from gsnet_deploy.runtime.protocol import NUM_VIEWS, host_class_map
from gsnet_deploy.runtime.tiling import WindowGrid


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


class CudaGraphCache:
    """A function of CUDA tensors captured as one CUDA graph per input shape and replayed.

    Like ``CudaGraphImage``: each new shape key is warmed up on a side stream, captured once, then
    replayed with the inputs copied into the captured buffers.
    """

    def __init__(self, fn: Callable[..., tuple[torch.Tensor, ...]]) -> None:
        """Wrap ``fn(*tensors) -> tuple of tensors`` (shapes of the outputs fixed by the inputs' shapes)."""
        self.fn = fn
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], tuple[torch.Tensor, ...]]] = {}

    @torch.no_grad()
    def __call__(self, *inputs: torch.Tensor, key: tuple) -> tuple[torch.Tensor, ...]:
        """Outputs of ``fn(*inputs)``: views of the captured graph's buffers, valid until the next call."""
        if key not in self._graphs:
            static = [t.clone() for t in inputs]
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self.fn(*static)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outputs = self.fn(*static)
            self._graphs[key] = (graph, static, outputs)
        graph, static, outputs = self._graphs[key]
        for buffer, value in zip(static, inputs):
            buffer.copy_(value)
        graph.replay()
        return outputs


class _PaperRunners:
    """The paper protocol's encoder and head on the torch model; features stay on the device between them."""

    def __init__(self, model: GSNet, device: torch.device, dtype: torch.dtype, cuda_graphs: bool) -> None:
        self.device, self.dtype = device, dtype
        self.encoder_module = PaperEncoder(model)
        self.head_module = PaperHead(model).to(device)  # the tile count buffer
        self._encode_graphs = CudaGraphCache(self._encode_tuple) if cuda_graphs else None
        self._head_graphs = CudaGraphCache(self._head_tuple) if cuda_graphs else None
        self._head_batch_graphs = CudaGraphCache(self._head_batch_tuple) if cuda_graphs else None

    def _encode_tuple(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.encoder_module(image)
        return tuple(features[name] for name in PAPER_FEATURES)

    def _head_tuple(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        *features, text, out_size = inputs
        class_map, probs = self.head_module(dict(zip(PAPER_FEATURES, features)), text, out_size)
        return class_map, probs

    def _head_batch_tuple(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        *features, text, out_size = inputs
        class_maps, probs = self.head_module.forward_batch(dict(zip(PAPER_FEATURES, features)), text, out_size)
        return class_maps, probs

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 ``[B, 3, h, w]`` device tensor -> device features of the 5B views (CUDA graph per (B, h, w) on CUDA)."""
        if self._encode_graphs is not None:
            outputs = self._encode_graphs(image, key=tuple(image.shape))
            return {name: t.clone() for name, t in zip(PAPER_FEATURES, outputs)}  # the next replay overwrites the buffers
        return dict(zip(PAPER_FEATURES, self._encode_tuple(image)))

    @torch.no_grad()
    def decode(
        self, features: Mapping[str, torch.Tensor], text: torch.Tensor, out_size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Device class map ``[H, W]`` int32 and probabilities ``[N, H, W]`` (CUDA graph per (N, H, W) on CUDA)."""
        text = text.to(self.device, self.dtype)
        size = torch.tensor(out_size, dtype=torch.int64)  # sizes are shapes: they stay on the host
        inputs = [features[name] for name in PAPER_FEATURES]
        if self._head_graphs is not None:
            class_map, probs = self._head_graphs(*inputs, text, size, key=(text.shape[0], *out_size))
        else:
            class_map, probs = self._head_tuple(*inputs, text, size)
        return class_map, probs

    @torch.no_grad()
    def decode_batch(
        self, features: Mapping[str, torch.Tensor], text: torch.Tensor, out_size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of B images (``encode`` of ``[B, 3, h, w]``) -> device class maps and probabilities.

        Returns class maps ``[B, H, W]`` int32 and probabilities ``[B, N, H, W]`` (CUDA graph per
        (B, N, H, W) on CUDA).
        """
        text = text.to(self.device, self.dtype)
        size = torch.tensor(out_size, dtype=torch.int64)  # sizes are shapes: they stay on the host
        inputs = [features[name] for name in PAPER_FEATURES]
        if self._head_batch_graphs is not None:
            batch = inputs[0].shape[0] // NUM_VIEWS
            class_maps, probs = self._head_batch_graphs(*inputs, text, size, key=(batch, text.shape[0], *out_size))
        else:
            class_maps, probs = self._head_batch_tuple(*inputs, text, size)
        return class_maps, probs


class _EncoderRunner:
    """``GraphRunner`` view of the paper encoder: host image in, host features out."""

    def __init__(self, paper: _PaperRunners) -> None:
        self.paper = paper

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """``{PAPER_IMAGE: uint8 [1, 3, h, w]}`` -> features (float32 on the host)."""
        image = _paper_images(feeds[PAPER_IMAGE]).to(self.paper.device)
        features = self.paper.encode(image)
        names = PAPER_FEATURES if outputs is None else tuple(outputs)
        return {name: features[name].float().cpu().numpy() for name in names}


class _HeadRunner:
    """``GraphRunner`` view of the paper head: the class map crosses to the host, probabilities only when asked."""

    def __init__(self, paper: _PaperRunners) -> None:
        self.paper = paper

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Features + text_embeds + out_size -> ``CLASS_MAP`` (uint8 for N <= 255) and, if asked, ``PROBS``."""
        missing = [n for n in (*PAPER_FEATURES, TEXT_EMBEDS, OUT_SIZE) if n not in feeds]
        if missing:
            raise BackendError(f"the paper head needs inputs {missing}; pass the encoder's features, text_embeds and out_size.")
        features = {
            n: torch.from_numpy(np.ascontiguousarray(feeds[n], dtype=np.float32)).to(self.paper.device, self.paper.dtype)
            for n in PAPER_FEATURES
        }
        text = torch.from_numpy(np.ascontiguousarray(feeds[TEXT_EMBEDS], dtype=np.float32))
        out_size = _out_size(feeds[OUT_SIZE])
        class_map, probs = self.paper.decode(features, text, out_size)
        return paper_outputs(class_map, probs, text.shape[0], outputs)


def _paper_images(images: np.ndarray, *, single: bool = True) -> torch.Tensor:
    """The encoder's input as a uint8 ``[1, 3, h, w]`` tensor (``[B, 3, h, w]`` unless ``single``), or a BackendError."""
    array = np.asarray(images)
    shown = "[1, 3, h, w]" if single else "[B, 3, h, w]"
    batch_ok = array.ndim == 4 and (array.shape[0] == 1 if single else array.shape[0] >= 1)
    if array.dtype != np.uint8 or not batch_ok or array.shape[1] != 3 or min(array.shape[2:]) < 1:
        raise BackendError(f"the paper encoder takes uint8 images {shown}, got {array.dtype} {list(array.shape)}.")
    return torch.from_numpy(np.ascontiguousarray(array))


def _out_size(value: np.ndarray) -> tuple[int, int]:
    """``OUT_SIZE`` as (H, W), or a BackendError."""
    size = np.asarray(value).reshape(-1)
    if size.shape != (2,) or not np.issubdtype(size.dtype, np.integer) or (size < 1).any():
        raise BackendError(f"out_size must be two positive integers (H, W), got {value!r}.")
    return int(size[0]), int(size[1])


def paper_outputs(
    class_map: torch.Tensor, probs: torch.Tensor, num_classes: int, outputs: Sequence[str] | None
) -> dict[str, np.ndarray]:
    """The requested head outputs on the host: the class map narrowed on the device first, probs only if asked."""
    names = (CLASS_MAP, PROBS) if outputs is None else tuple(outputs)
    unknown = [n for n in names if n not in (CLASS_MAP, PROBS)]
    if unknown:
        raise BackendError(f"the paper head has no outputs {unknown} (it has {[CLASS_MAP, PROBS]}).")
    result: dict[str, np.ndarray] = {}
    if CLASS_MAP in names:
        narrow = torch.uint8 if num_classes <= 255 else torch.int32
        result[CLASS_MAP] = host_class_map(class_map.to(narrow).cpu().numpy(), num_classes)
    if PROBS in names:
        result[PROBS] = probs.float().cpu().numpy()
    return result


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
        self._paper: _PaperRunners | None = None

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
        self._paper = _PaperRunners(self.model, self.device, dtype, self.cuda_graphs)
        return self

    def __exit__(self, *exc: object) -> None:
        """Drop the runners (the model stays usable)."""
        self._text = self._image = None
        self._paper = None

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

    @property
    def paper(self) -> _PaperRunners:
        """The paper protocol on the device, features kept there (``encode`` then ``decode``)."""
        if self._paper is None:
            raise BackendError("the torch backend is not open; use it in a 'with' block")
        return self._paper

    @property
    def encoder(self) -> _EncoderRunner:
        """The paper encoder as a host-array runner (features cross to the host: for re-querying)."""
        return _EncoderRunner(self.paper)

    @property
    def head(self) -> _HeadRunner:
        """The paper head as a host-array runner."""
        return _HeadRunner(self.paper)

    def tile_blender(self, grid: WindowGrid, text_embeds: np.ndarray) -> TorchWindowBlender:
        """Tiled mode on the device: image graph, upsampling, sigmoid and blending of ``grid``'s windows (one image)."""
        text = torch.from_numpy(np.ascontiguousarray(text_embeds, dtype=np.float32)).to(self.device)
        return TorchWindowBlender(self.image.forward, text, grid, self.device)

    def segment_paper(
        self, image: np.ndarray, text_embeds: np.ndarray, out_size: tuple[int, int], with_probs: bool = False
    ) -> dict[str, np.ndarray]:
        """The combined path: encoder and head on the device, only the class map (and probs if asked) to the host.

        Args:
            image: uint8 ``[1, 3, h, w]`` after ``ResizeShortestEdge``.
            text_embeds: ``[N, 512]``.
            out_size: the original (H, W).
            with_probs: also return ``PROBS`` ``[N, H, W]``.
        """
        paper = self.paper
        features = paper.encode(_paper_images(image).to(self.device))
        text = torch.from_numpy(np.ascontiguousarray(text_embeds, dtype=np.float32))
        class_map, probs = paper.decode(features, text, (int(out_size[0]), int(out_size[1])))
        return paper_outputs(class_map, probs, text.shape[0], (CLASS_MAP, PROBS) if with_probs else (CLASS_MAP,))

    def segment_paper_batch(
        self, images: np.ndarray, text_embeds: np.ndarray, out_size: tuple[int, int], with_probs: bool = False
    ) -> list[dict[str, np.ndarray]]:
        """``segment_paper`` of B images of one size in one encoder call and one head call (5B views each).

        The views of all B images go through ``encode_views`` together and ``decode_views``
        together; each image's own 5 views are then merged, resized and reduced to its class map
        as in ``segment_paper`` (CUDA graphs per batch size on CUDA). Per image the result equals
        ``segment_paper``'s up to the batch's effect on the convolutions' and matmuls' summation
        order (none on CPU fp32 in the tests).

        Args:
            images: uint8 ``[B, 3, h, w]``, each after ``ResizeShortestEdge`` of an image of ``out_size``.
            text_embeds: ``[N, 512]``.
            out_size: the original (H, W), shared by the B images.
            with_probs: also return ``PROBS`` ``[N, H, W]`` per image.

        Returns:
            B dicts, in the order of ``images``, as ``segment_paper`` returns them.
        """
        paper = self.paper
        batch = _paper_images(images, single=False)
        features = paper.encode(batch.to(self.device))  # 5B views, view major
        text = torch.from_numpy(np.ascontiguousarray(text_embeds, dtype=np.float32))
        class_maps, probs = paper.decode_batch(features, text, (int(out_size[0]), int(out_size[1])))  # [B, H, W], [B, N, H, W]
        names = (CLASS_MAP, PROBS) if with_probs else (CLASS_MAP,)
        host = paper_outputs(class_maps, probs, text.shape[0], names)  # one copy of the B maps (and probs) to the host
        return [{name: host[name][b] for name in names} for b in range(batch.shape[0])]
