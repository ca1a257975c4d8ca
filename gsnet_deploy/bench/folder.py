"""Per-image time of a folder of images through ``segment_files``: host before + device + host after.

For one entered backend and one class count it segments the same folder twice in one process:
with the numpy protocol around the image graph (the backend's ``encoder``/``head`` hidden) and,
when the backend has them, with the device protocol; with ``batch_images`` K > 1 also with up to K
same-size images per device call (``--batch-images``; the torch backend's ``segment_paper_batch``).
Each run is the real pipeline of ``gsnet segment`` (decode, ResizeShortestEdge, graphs, mask,
overlay and optional probabilities written atomically, images pipelined; a backend's combined
``segment_paper`` / ``segment_paper_batch`` used as ``gsnet segment`` uses them); the graph calls
are wrapped to add up the time spent in them, so

    per image = wall clock of the folder / images   (text encoder excluded)
    graph     = time inside the protocol's graphs / images
    outside   = 1 - graph / per image   (host glue the pipeline could not hide)
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from gsnet_deploy.runtime.backend import Backend
from gsnet_deploy.runtime.paper_path import protocol_runners
from gsnet_deploy.runtime.segment import Mode, SegmentOptions, segment_files
from gsnet_deploy.runtime.vocab import TextEmbeddingCache, Vocabulary


class _TimedRunner:
    """A graph runner that adds the seconds spent in ``run`` to ``clock[key]``."""

    def __init__(self, runner: Any, clock: dict[str, float], key: str) -> None:
        self.runner, self.clock, self.key = runner, clock, key

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        try:
            return self.runner.run(feeds) if outputs is None else self.runner.run(feeds, outputs=outputs)
        finally:
            self.clock[self.key] += time.perf_counter() - start


class _TimedCall:
    """A backend method (``segment_paper``, ``segment_paper_batch``) that adds its seconds to ``clock[key]``."""

    def __init__(self, fn: Any, clock: dict[str, float], key: str) -> None:
        self.fn, self.clock, self.key = fn, clock, key

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.clock[self.key] += time.perf_counter() - start


COMBINED_CALLS = ("segment_paper", "segment_paper_batch")  # a backend's whole-protocol calls, timed when it has them


@dataclass
class _TimedBackend:
    """``backend`` with timed runners; ``device_protocol=False`` hides its encoder and head."""

    inner: Any
    clock: dict[str, float]
    device_protocol: bool

    def __post_init__(self) -> None:
        self.name = self.inner.name
        self.model_digest = self.inner.model_digest
        self.max_views = self.inner.max_views
        self.preferred_views = self.inner.preferred_views
        self.text = _TimedRunner(self.inner.text, self.clock, "text")
        self.image = _TimedRunner(self.inner.image, self.clock, "graph")
        runners = protocol_runners(self.inner) if self.device_protocol else None
        if runners is not None:
            self.encoder = _TimedRunner(runners[0], self.clock, "graph")
            self.head = _TimedRunner(runners[1], self.clock, "graph")
            for name in COMBINED_CALLS:
                fn = getattr(self.inner, name, None)
                if callable(fn):
                    setattr(self, name, _TimedCall(fn, self.clock, "graph"))

    def __enter__(self) -> _TimedBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def make_folder(directory: Path, count: int, height: int = 512, width: int = 768, seed: int = 0) -> list[Path]:
    """``count`` seeded smooth RGB PNG images of ``width`` x ``height`` in ``directory``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    paths = []
    for index in range(count):
        bands = [127 + 120 * np.sin(rng.uniform(0.005, 0.05) * xx + rng.uniform(0, 6)) * np.cos(rng.uniform(0.005, 0.05) * yy)
                 for _ in range(3)]  # fmt: skip
        path = directory / f"img{index:03d}.png"
        Image.fromarray(np.stack(bands, axis=-1).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def measure_folder(
    backend: Backend,
    vocab: Vocabulary,
    images: Sequence[Path],
    *,
    device_protocol: bool,
    save_probs: bool = False,
    batch_images: int = 1,
) -> dict[str, Any]:
    """Segment ``images`` once with an entered ``backend``; per-image wall clock and graph time in ms.

    Args:
        backend: an entered backend.
        vocab: the classes.
        images: the folder's images.
        device_protocol: run the backend's encoder and head (False: the numpy protocol).
        save_probs: also write the probabilities.
        batch_images: ``SegmentOptions.batch_images`` (``--batch-images``).

    Returns None-free dict: ``per_image_ms``, ``graph_ms``, ``outside_share``, ``protocol``
    ("device" or "numpy": what actually ran), ``images``, ``batch_images``, ``batched`` (whether
    the backend has a batched call, i.e. whether K > 1 changed the device calls).
    """
    clock = {"text": 0.0, "graph": 0.0}
    timed = _TimedBackend(backend, clock, device_protocol)
    ran = "device" if protocol_runners(timed) is not None else "numpy"  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory(prefix="gsnet-bench-folder-") as tmp:
        options = SegmentOptions(
            out_dir=Path(tmp), mode=Mode.PAPER, save_probs=save_probs, progress=False, batch_images=batch_images
        )
        start = time.perf_counter()
        report = segment_files(images, timed, vocab, options, TextEmbeddingCache(None), log=lambda msg: None)  # type: ignore[arg-type]
        wall = time.perf_counter() - start - clock["text"]
    if report.failed:
        raise RuntimeError(f"folder benchmark: {report.failed[0][0]} failed: {report.failed[0][1]}")
    count = len(images)
    per_image, graph = 1e3 * wall / count, 1e3 * clock["graph"] / count
    batched = ran == "device" and batch_images > 1 and callable(getattr(timed, "segment_paper_batch", None))
    return {"protocol": ran, "images": count, "per_image_ms": per_image, "graph_ms": graph,
            "outside_share": max(0.0, 1.0 - graph / per_image), "batch_images": batch_images, "batched": batched}  # fmt: skip
