"""The backend protocol: what every inference engine (torch, ONNX Runtime, TensorRT) offers.

A backend is a context manager holding two graph runners, text and image, each taking and
returning name -> array dicts with the names of ``gsnet_deploy.io_names``. Buffers and sessions
are created on ``__enter__`` and freed on ``__exit__``, as Polygraphy's runners do.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class GraphRunner(Protocol):
    """Runs one graph: feeds by input name, returns outputs by output name."""

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph once on host arrays and return host arrays."""
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

    def __enter__(self) -> Backend: ...

    def __exit__(self, *exc: object) -> None: ...
