"""The paper protocol in two steps on any backend: ``encode`` an image once, ``decode`` it with any vocabulary.

The one implementation of the protocol's orchestration, used by both entry points:
``runtime.segment.predict_paper`` (``gsnet segment``, serving, benchmarks) and
``segmenter.Segmenter`` (the Python API, which keeps encodings to re-query an image).
``paper_path`` chooses, once per open backend, between

- ``SplitPath``: the backend's paper encoder and head runners (``paper_encoder`` / ``paper_head``
  graphs). The host does only detectron2's ``ResizeShortestEdge``; views, merge, resize and argmax
  run in the graphs, and probabilities cross to the host only when asked. ``segment`` uses the
  backend's combined ``segment_paper`` when it has one (features stay on the device);
- ``OnePiecePath``: backends without them (an ONNX folder or engines made before the paper
  graphs, a stand-in): the numpy protocol (``runtime.protocol``) around the one-piece image graph.
  The features are the 5 views; it is also the reference the device protocol is tested against.

Torch-free: numpy and the backend's runners only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from gsnet_deploy.contracts.io_names import (
    CLASS_MAP,
    IMAGES,
    LOGITS,
    OUT_SIZE,
    PAPER_FEATURES,
    PAPER_IMAGE,
    PROBS,
    TEXT_EMBEDS,
)
from gsnet_deploy.errors import BackendError, GSNetError
from gsnet_deploy.runtime.backend import Backend, GraphRunner
from gsnet_deploy.runtime.protocol import host_class_map, merge_paper_logits, paper_views

__all__ = ["VIEWS_FEATURE", "OnePiecePath", "PaperPath", "SplitPath", "paper_path", "protocol_runners"]

VIEWS_FEATURE = "views"  # the one feature of the one-piece path: the 5 views [5, 3, 384, 384]


class PaperPath(Protocol):
    """How a backend runs the paper protocol, in two steps or at once.

    Attributes:
        feature_names: the names ``encode`` returns.
        split: whether the protocol runs in the backend's encoder and head (else numpy around the image graph).

    """

    feature_names: tuple[str, ...]
    split: bool

    def encode(self, resized: np.ndarray) -> dict[str, np.ndarray]:
        """Class-independent features of an image after ResizeShortestEdge (uint8 ``[h, w, 3]``)."""
        ...

    def decode(
        self, features: Mapping[str, np.ndarray], text_embeds: np.ndarray, out_size: tuple[int, int], probs: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Class map ``[H, W]`` (uint8 up to 255 classes) and, when ``probs``, float32 probabilities ``[N, H, W]``."""
        ...

    def segment(
        self, resized: np.ndarray, text_embeds: np.ndarray, out_size: tuple[int, int], probs: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``decode(encode(resized), ...)``, without handing the features to the host where the backend can."""
        ...

    def segment_batch(
        self, resized: Sequence[np.ndarray], text_embeds: np.ndarray, out_size: tuple[int, int], probs: bool
    ) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """``segment`` of several images of one size (same ``resized`` shape, same ``out_size``), in their order.

        This default runs them one at a time; a path whose backend can run them in one call overrides it.
        """
        return [self.segment(image, text_embeds, out_size, probs) for image in resized]


class OnePiecePath(PaperPath):
    """The numpy protocol around the one-piece image graph: the features are the 5 views, the head is everything.

    Several images run one at a time (``PaperPath.segment_batch``): the image graph's views are one image's.
    """

    feature_names: tuple[str, ...] = (VIEWS_FEATURE,)
    split = False

    def __init__(self, backend: Backend) -> None:
        """Run the protocol on ``backend.image`` (an entered backend)."""
        self.backend = backend

    def encode(self, resized: np.ndarray) -> dict[str, np.ndarray]:
        """The 5 views ``[5, 3, 384, 384]`` of an image after ResizeShortestEdge."""
        # NOTE: paper_views resizes again; ResizeShortestEdge of an already resized image is the identity
        return {VIEWS_FEATURE: paper_views(resized).views}

    def probs(self, features: Mapping[str, np.ndarray], text_embeds: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
        """Float32 probabilities ``[N, H, W]``: the image graph on the views, merged by the numpy protocol."""
        feeds = {IMAGES: features[VIEWS_FEATURE], TEXT_EMBEDS: text_embeds}
        logits = self.backend.image.run(feeds)[LOGITS]  # [5, N, 96, 96]
        return merge_paper_logits(logits, int(out_size[0]), int(out_size[1]))  # [N, H, W]

    def decode(
        self, features: Mapping[str, np.ndarray], text_embeds: np.ndarray, out_size: tuple[int, int], probs: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Class map ``[H, W]`` and, when ``probs``, the probabilities ``[N, H, W]``."""
        merged = self.probs(features, text_embeds, out_size)  # [N, H, W]
        return host_class_map(np.argmax(merged, axis=0), merged.shape[0]), (merged if probs else None)

    def segment(
        self, resized: np.ndarray, text_embeds: np.ndarray, out_size: tuple[int, int], probs: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``decode(encode(resized), ...)``."""
        return self.decode(self.encode(resized), text_embeds, out_size, probs)


class SplitPath(PaperPath):
    """The paper protocol in the backend's encoder and head runners (``paper_encoder`` / ``paper_head`` graphs).

    The encoder takes the uint8 image after ResizeShortestEdge and returns the class-independent
    features of the 5 views; the head decodes them with text embeddings, merges the views and
    resizes to the output size on the backend's device, returning probabilities only when asked.

    Several images of one size share one call when the backend has ``segment_paper_batch`` (the
    torch backend); the ONNX Runtime and TensorRT paper graphs take one image ``[1, 3, h, w]``, so
    there they run one at a time.
    """

    feature_names: tuple[str, ...] = PAPER_FEATURES
    split = True

    def __init__(self, backend: Backend, encoder: GraphRunner, head: GraphRunner) -> None:
        """Run the protocol on ``backend``'s ``encoder`` and ``head`` runners (from ``protocol_runners``)."""
        self.backend, self.encoder, self.head = backend, encoder, head

    def encode(self, resized: np.ndarray) -> dict[str, np.ndarray]:
        """The encoder's features (``PAPER_FEATURES``) of an image after ResizeShortestEdge, on the host."""
        features = self.encoder.run({PAPER_IMAGE: _image_nchw(resized)})
        return {name: features[name] for name in PAPER_FEATURES}

    def decode(
        self, features: Mapping[str, np.ndarray], text_embeds: np.ndarray, out_size: tuple[int, int], probs: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The head on host features: class map ``[H, W]`` and, when ``probs``, probabilities ``[N, H, W]``."""
        feeds = {**features, TEXT_EMBEDS: text_embeds, OUT_SIZE: np.asarray(out_size, dtype=np.int64)}
        out = self.head.run(feeds, outputs=(CLASS_MAP, PROBS) if probs else (CLASS_MAP,))
        return self._outputs(out, text_embeds.shape[0], out_size, probs)

    def segment(
        self, resized: np.ndarray, text_embeds: np.ndarray, out_size: tuple[int, int], probs: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Encoder and head at once: the backend's ``segment_paper`` when it has one (features stay on its device)."""
        combined = getattr(self.backend, "segment_paper", None)
        if not callable(combined):
            return self.decode(self.encode(resized), text_embeds, out_size, probs)
        out = combined(_image_nchw(resized), text_embeds, (int(out_size[0]), int(out_size[1])), with_probs=probs)
        return self._outputs(out, text_embeds.shape[0], out_size, probs)

    def segment_batch(
        self, resized: Sequence[np.ndarray], text_embeds: np.ndarray, out_size: tuple[int, int], probs: bool
    ) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """Several images of one size in one call of the backend's ``segment_paper_batch``, else one at a time."""
        batched = getattr(self.backend, "segment_paper_batch", None)
        if not callable(batched) or len(resized) < 2:
            return super().segment_batch(resized, text_embeds, out_size, probs)
        shapes = {image.shape for image in resized}
        if len(shapes) != 1:
            raise BackendError(f"a batch of paper images must share one size, got {sorted(shapes)}")
        images = np.stack([_image_nchw(image)[0] for image in resized])  # [B, 3, h, w]
        size = (int(out_size[0]), int(out_size[1]))
        outs = batched(images, text_embeds, size, with_probs=probs)
        if len(outs) != len(resized):
            raise BackendError(f"the {self.backend.name} backend returned {len(outs)} results for {len(resized)} images")
        return [self._outputs(out, text_embeds.shape[0], out_size, probs) for out in outs]

    def _outputs(
        self, out: Mapping[str, np.ndarray], num_classes: int, out_size: tuple[int, int], probs: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The head's outputs on the host: the class map's dtype rule, its shape checked, probs as float32."""
        class_map = host_class_map(out[CLASS_MAP], num_classes)  # [H, W]
        height, width = int(out_size[0]), int(out_size[1])
        if class_map.shape != (height, width):
            raise BackendError(
                f"the {self.backend.name} paper head returned a {class_map.shape} class map for a {width}x{height} image"
            )
        return class_map, (np.asarray(out[PROBS], dtype=np.float32) if probs else None)


def _image_nchw(resized: np.ndarray) -> np.ndarray:
    """The encoder's input: uint8 ``[1, 3, h, w]`` from an image ``[h, w, 3]``."""
    return np.ascontiguousarray(resized.transpose(2, 0, 1)[None])


def protocol_runners(backend: Backend) -> tuple[GraphRunner, GraphRunner] | None:
    """The backend's paper-protocol runners ``(encoder, head)``, or None when it has none.

    A backend offers the device protocol through ``encoder`` and ``head`` runners; one without
    them (None, missing, or raising because its folder lacks the graphs) runs the numpy protocol.
    """
    try:
        encoder = getattr(backend, "encoder", None)
        head = getattr(backend, "head", None)
    except (GSNetError, FileNotFoundError):  # a backend may raise when its folder lacks the graphs
        return None
    if encoder is None or head is None:
        return None
    return encoder, head


def paper_path(backend: Backend) -> PaperPath:
    """The paper protocol of an open ``backend``: its encoder and head, else numpy around the one-piece image graph."""
    runners = protocol_runners(backend)
    if runners is None:
        return OnePiecePath(backend)
    return SplitPath(backend, *runners)
