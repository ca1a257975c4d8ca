"""``gsnet segment`` as a library: images in, masks, overlays and probabilities out, any backend.

Per input: choose the protocol (the paper's sliding window for ordinary photos, tiled windows at
native resolution for large images and georeferenced rasters), encode the vocabulary once (cached
on disk), run the backend, write outputs atomically. A failing input is reported and counted; the
others are still processed.
"""

from __future__ import annotations

import enum
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gsnet_deploy.errors import GSNetError
from gsnet_deploy.io_names import IMAGES, LOGITS, TEXT_EMBEDS, TEXT_TOKENS
from gsnet_deploy.runtime.backend import Backend
from gsnet_deploy.runtime.images import load_image
from gsnet_deploy.runtime.protocol import merge_paper_logits, paper_views
from gsnet_deploy.runtime.tokenizer import BpeTokenizer
from gsnet_deploy.runtime.vocab import DEFAULT_TEMPLATE, TextEmbeddingCache, Vocabulary

PAPER_MAX_SIDE = 1024  # --mode auto: paper protocol up to this long side, tiled above
RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2", ".img")


class Mode(enum.Enum):
    """How an image is cut into views."""

    AUTO = "auto"  # paper up to 1024 px on the long side and for plain images, tiled beyond and for georeferenced rasters
    PAPER = "paper"  # the paper's sliding-window protocol (image resized to 640x640, 4 tiles + global view)
    TILED = "tiled"  # 384-px windows at native resolution, overlapping, blended


@dataclass
class SegmentOptions:
    """Options of a segment run (parsed once by the CLI)."""

    out_dir: Path
    mode: Mode = Mode.AUTO
    save_probs: bool = False
    overlap: int = 128
    gsd_scale: float = 1.0
    max_memory: int = 2 << 30
    bands: tuple[int, ...] | None = None
    palette: Path | None = None
    template: str = DEFAULT_TEMPLATE
    progress: bool = True


@dataclass
class SegmentReport:
    """What a run did: written files per input and failures (input, message)."""

    written: dict[Path, list[Path]] = field(default_factory=dict)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    seconds: dict[Path, float] = field(default_factory=dict)


def encode_vocabulary(backend: Backend, vocab: Vocabulary, template: str, cache: TextEmbeddingCache) -> np.ndarray:
    """Text embeddings ``[N, 512]`` of ``vocab``: from the cache, or the backend's text graph."""
    tokenizer = BpeTokenizer()

    def compute(prompts: list[str]) -> np.ndarray:
        return backend.text.run({TEXT_TOKENS: tokenizer(prompts)})[TEXT_EMBEDS]

    return cache.get_or_compute(vocab, template, backend.model_digest, compute)


def segment_paper(backend: Backend, rgb: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
    """Per-class probabilities ``[N, H, W]`` of an RGB uint8 image under the paper's protocol."""
    views = paper_views(rgb)
    logits = backend.image.run({IMAGES: views.views, TEXT_EMBEDS: text_embeds})[LOGITS]  # [5, N, 96, 96]
    return merge_paper_logits(logits, views.height, views.width)


def _is_raster(path: Path) -> bool:
    """A file for the raster path: a TIFF-like suffix and georeferencing (or unreadable by PIL)."""
    if path.suffix.lower() not in RASTER_SUFFIXES:
        return False
    try:
        from gsnet_deploy.runtime import raster
    except ImportError:
        return False
    try:
        return raster.is_georeferenced(path)
    except (GSNetError, ImportError):
        return False


def resolve_mode(mode: Mode, height: int, width: int) -> Mode:
    """The protocol for an image of this size under ``mode`` (AUTO decides by the long side)."""
    if mode is not Mode.AUTO:
        return mode
    return Mode.PAPER if max(height, width) <= PAPER_MAX_SIDE else Mode.TILED


def segment_files(
    paths: Sequence[Path],
    backend: Backend,
    vocab: Vocabulary,
    options: SegmentOptions,
    cache: TextEmbeddingCache,
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
) -> SegmentReport:
    """Segment every input with an entered ``backend``; one input's failure does not stop the others."""
    from gsnet_deploy.runtime.outputs import prepare_out_dir, write_outputs
    from gsnet_deploy.runtime.palette import resolve_palette

    report = SegmentReport()
    class_names = list(vocab.display_names)
    palette = resolve_palette(class_names, options.palette)
    prepare_out_dir(options.out_dir)
    text_embeds = encode_vocabulary(backend, vocab, options.template, cache)
    for path in paths:
        start = time.perf_counter()
        try:
            if _is_raster(path) and options.mode is not Mode.PAPER:
                from gsnet_deploy.runtime.tiled import segment_tiled

                log(f"{path}: georeferenced raster, tiled mode (384-px windows, overlap {options.overlap})")
                result = segment_tiled(
                    path, backend, text_embeds, out_dir=options.out_dir, class_names=class_names, palette=palette,
                    bands=options.bands, overlap=options.overlap, gsd_scale=options.gsd_scale,
                    max_memory=options.max_memory, save_probs=options.save_probs, progress=options.progress,
                )  # fmt: skip
                for note in result.notes:
                    log(f"{path}: note: {note}")
                written = result.paths
            else:
                loaded = load_image(path)
                for note in loaded.notes:
                    log(f"{path}: note: {note}")
                h, w = loaded.rgb.shape[:2]
                mode = resolve_mode(options.mode, h, w)
                if options.mode is Mode.AUTO:
                    log(f"{path}: {w}x{h}, {mode.value} mode" + (" (long side > 1024)" if mode is Mode.TILED else ""))
                if mode is Mode.PAPER:
                    probs = segment_paper(backend, loaded.rgb, text_embeds)
                else:
                    from gsnet_deploy.runtime.tiled import segment_tiled_array

                    probs = segment_tiled_array(
                        loaded.rgb, backend, text_embeds, overlap=options.overlap, gsd_scale=options.gsd_scale,
                        max_memory=options.max_memory, progress=options.progress,
                    )  # fmt: skip
                written = write_outputs(path.stem, options.out_dir, loaded.rgb, probs, class_names, palette, options.save_probs)
        except GSNetError as exc:
            report.failed.append((path, str(exc)))
            log(f"{path}: error: {exc}")
            continue
        report.written[path] = written
        report.seconds[path] = time.perf_counter() - start
        log(f"{path}: wrote {written[0]} ({report.seconds[path]:.1f} s)")
    return report
