"""Per-image time of a folder of images through ``segment_files``: host before + device + host after.

For one entered backend and one class count it segments the same folder twice in one process:
with the numpy protocol around the image graph (the backend's ``encoder``/``head`` hidden) and,
when the backend has them, with the device protocol. Each run is the real pipeline of ``gsnet
segment`` (decode, ResizeShortestEdge, graphs, mask, overlay and optional probabilities written
atomically, images pipelined); the graph runners are wrapped to add up the time spent in them, so

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
    backend: Backend, vocab: Vocabulary, images: Sequence[Path], *, device_protocol: bool, save_probs: bool = False
) -> dict[str, Any]:
    """Segment ``images`` once with an entered ``backend``; per-image wall clock and graph time in ms.

    Returns None-free dict: ``per_image_ms``, ``graph_ms``, ``outside_share``, ``protocol``
    ("device" or "numpy": what actually ran), ``images``.
    """
    clock = {"text": 0.0, "graph": 0.0}
    timed = _TimedBackend(backend, clock, device_protocol)
    ran = "device" if protocol_runners(timed) is not None else "numpy"  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory(prefix="gsnet-bench-folder-") as tmp:
        options = SegmentOptions(out_dir=Path(tmp), mode=Mode.PAPER, save_probs=save_probs, progress=False)
        start = time.perf_counter()
        report = segment_files(images, timed, vocab, options, TextEmbeddingCache(None), log=lambda msg: None)  # type: ignore[arg-type]
        wall = time.perf_counter() - start - clock["text"]
    if report.failed:
        raise RuntimeError(f"folder benchmark: {report.failed[0][0]} failed: {report.failed[0][1]}")
    count = len(images)
    per_image, graph = 1e3 * wall / count, 1e3 * clock["graph"] / count
    return {"protocol": ran, "images": count, "per_image_ms": per_image, "graph_ms": graph,
            "outside_share": max(0.0, 1.0 - graph / per_image)}  # fmt: skip
