"""Calibration inputs cut exactly the way inference cuts them.

Each calibration image goes through ``runtime.images.load_image`` and the paper protocol's
``runtime.protocol.paper_views`` (4 sliding-window tiles + 1 global view), so the INT8 scales are
measured on the same pixels, value range and layout the engine sees at inference time.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gsnet_deploy.errors import ImageError
from gsnet_deploy.runtime.images import load_image
from gsnet_deploy.runtime.protocol import paper_views

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DEFAULT_EXAMPLE_COUNT = 4

# CLIP BPE constants (open_clip tokenizer): start / end of text and vocabulary size.
SOT_TOKEN = 49406
EOT_TOKEN = 49407
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77


class CalibrationDataWarning(UserWarning):
    """Calibration ran on data that cannot give real accuracy (example or synthetic images)."""


def find_images(paths: Sequence[Path]) -> list[Path]:
    """Expand folders into their image files (sorted); keep files as given.

    Raises:
        ImageError: a path does not exist, or nothing that looks like an image was found.

    """
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            found.append(path)
        else:
            raise ImageError(f"Calibration image path {path} does not exist; pass image files or a folder of images.")
    if not found:
        raise ImageError(
            f"No images ({', '.join(IMAGE_SUFFIXES)}) found in {', '.join(map(str, paths))}; pass a folder "
            "of "
            "representative images."
        )
    return found


def _evenly_spaced(items: list[Path], count: int) -> list[Path]:
    """``count`` items spread over the whole (sorted) list, first and last included."""
    if len(items) <= count:
        return items
    picks = np.linspace(0, len(items) - 1, count).round().astype(int)
    return [items[i] for i in picks]


def _synthetic_image(seed: int, height: int = 512, width: int = 768) -> np.ndarray:
    """A deterministic RGB uint8 image with smooth regions and edges (only used without example images)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.zeros((height, width, 3), dtype=np.float32)
    for _ in range(6):  # a few soft blobs of random colour
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        radius = rng.uniform(40, 200)
        weight = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))[..., None]  # [H, W, 1]
        image += weight * rng.uniform(0, 255, size=3).astype(np.float32)
    image += rng.normal(0, 8, size=image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def example_images(count: int = DEFAULT_EXAMPLE_COUNT) -> list[np.ndarray]:
    """The repository's example images (RGB uint8), or deterministic synthetic ones before those exist."""
    try:
        from gsnet_deploy.runtime.examples import example_image
    except ImportError:
        return [_synthetic_image(seed) for seed in range(count)]
    return [np.asarray(example_image(seed)) for seed in range(count)]


def calibration_views(images: Sequence[Path] | None, max_images: int = 32) -> np.ndarray:
    """Cut the paper protocol's 5 views from each calibration image.

    Args:
        images: image files and/or folders of images; None or empty uses the example images and
            warns (``CalibrationDataWarning``) that real imagery is needed for real accuracy.
        max_images: largest number of images used; a longer list is subsampled evenly.

    Returns:
        float32 ``[K * 5, 3, 384, 384]``, raw RGB 0..255, image by image (4 tiles then the global view).

    Raises:
        ImageError: an image path is missing or unreadable, or ``max_images`` < 1.

    """
    if max_images < 1:
        raise ImageError(f"max_images must be at least 1, got {max_images}; pass a positive number of images.")
    if images:
        rgbs = [load_image(p).rgb for p in _evenly_spaced(find_images(images), max_images)]
    else:
        warnings.warn(
            "Calibrating on the example images: INT8 scales from them are not representative; pass real "
            "imagery "
            "(--images DIR) for real accuracy.",
            CalibrationDataWarning,
            stacklevel=2,
        )
        rgbs = example_images(min(max_images, DEFAULT_EXAMPLE_COUNT))
    views = [paper_views(rgb).views for rgb in rgbs]  # K x [5, 3, 384, 384]
    return np.ascontiguousarray(np.concatenate(views, axis=0), dtype=np.float32)  # [K * 5, 3, 384, 384]


def calibration_tokens(num_classes: int = 40, seed: int = 0) -> np.ndarray:
    """Deterministic CLIP-shaped token rows ``int64 [N, 77]``: SOT, a few random word ids, EOT, zero padding.

    NOTE: a stand-in for a real vocabulary when none is given; it gives the image graph text
    embeddings with the text encoder's real statistics (unit norm, CLIP's embedding cone) for
    AutoCast's range check and INT8 calibration. Pass the tokens of the real class names where known.
    """
    rng = np.random.default_rng(seed)
    tokens = np.zeros((num_classes, CONTEXT_LENGTH), dtype=np.int64)
    for row in tokens:
        length = int(rng.integers(1, 6))
        row[0] = SOT_TOKEN
        row[1 : 1 + length] = rng.integers(1, SOT_TOKEN, size=length)
        row[1 + length] = EOT_TOKEN
    return tokens
