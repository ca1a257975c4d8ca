"""The backend protocol: what every inference engine (torch, ONNX Runtime, TensorRT) offers.

A backend is a context manager holding graph runners (text, image, and the paper protocol's
encoder and head), each taking and
returning name -> array dicts with the names of ``gsnet_deploy.contracts.io_names``. Buffers and sessions
are created on ``__enter__`` and freed on ``__exit__``, as Polygraphy's runners do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class GraphRunner(Protocol):
    """Runs one graph: feeds by input name, returns outputs by output name."""

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run the graph once on host arrays and return host arrays: only ``outputs`` (None: all).

        Outputs not asked for do not cross to the host (the paper head's probabilities ``[N, H, W]``).
        """
        ...


@runtime_checkable
class Backend(Protocol):
    """A text runner and an image runner from one model, with the model's identity.

    Attributes:
        name: short backend name for messages ("torch", "onnxruntime", "tensorrt").
        model_digest: digest of the weights the graphs came from (keys the text cache).
        max_views: largest view batch the image runner accepts (None: any).
        preferred_views: view batch the image runner is fastest at (tiled mode batches to it).

    """

    name: str
    model_digest: str
    max_views: int | None
    preferred_views: int

    @property
    def text(self) -> GraphRunner:
        """The text graph's runner (tokens -> text_embeds)."""
        ...

    @property
    def image(self) -> GraphRunner:
        """The image graph's runner (images, text_embeds -> logits)."""
        ...

    @property
    def encoder(self) -> GraphRunner:
        """The paper protocol's encoder: ``{PAPER_IMAGE: uint8 [1, 3, h, w]}`` -> ``{name: array for name in PAPER_FEATURES}``."""
        ...

    @property
    def head(self) -> GraphRunner:
        """The paper protocol's head: features + ``TEXT_EMBEDS`` + ``OUT_SIZE`` (int64 [H, W]) -> ``CLASS_MAP`` (+ ``PROBS``).

        The host gets the class map as uint8 for N <= 255 and int32 beyond.
        """
        ...

    def __enter__(self) -> Backend: ...

    def __exit__(self, *exc: object) -> None: ...
