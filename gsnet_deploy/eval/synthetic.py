"""Synthetic segmentation scenes: textured regions, each class named by a distinct word (numpy only).

A scene is a 384x384 RGB view cut into a few Voronoi regions; each region is filled with one
class's texture (stripes, checkers, dots, plain colour, blocky noise, rings), drawn with random
frequency, phase, orientation and a colour jittered around the class's own pair of colours. The
generator is seeded and deterministic, so the training script (``tools/train_synthetic.py``) and
the accuracy tests draw from the same distribution: training scenes from ``TRAIN_SEED``, held-out
scenes from ``HELD_OUT_SEED``, calibration scenes from ``CALIB_SEED``.

The small model trained on these scenes (``tests/data/synthetic_tiny.pth``) answers something
that can be measured: a precision's damage shows as lost mIoU and argmax agreement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CLASS_NAMES = ("stripes", "checkers", "dots", "plain", "noise", "rings")
TRAIN_SEED = 0
HELD_OUT_SEED = 1
CALIB_SEED = 2
SIZE = 384

# two base colours (RGB 0..255) per class; each region jitters them
_PALETTE = {
    "stripes": ((220, 60, 40), (250, 220, 200)),
    "checkers": ((30, 30, 160), (200, 200, 250)),
    "dots": ((240, 200, 30), (60, 40, 10)),
    "plain": ((90, 170, 90), (90, 170, 90)),
    "noise": ((120, 120, 120), (30, 30, 30)),
    "rings": ((160, 40, 160), (250, 180, 250)),
}


@dataclass(frozen=True)
class SyntheticScenes:
    """A batch of scenes and their labels.

    Attributes:
        images: float32 ``[S, 3, 384, 384]``, raw RGB 0..255 (the image graph's input).
        labels: uint8 ``[S, 384, 384]``, index into ``class_names`` per pixel.
        class_names: the vocabulary the labels index (the order of the text embeddings).

    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]


def _texture(name: str, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """A ``[H, W]`` mask in [0, 1] choosing between the class's two colours."""
    if name == "stripes":
        angle, period = rng.uniform(0, np.pi), rng.uniform(14, 26)
        phase = rng.uniform(0, 2 * np.pi)
        return (np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period + phase) > 0).astype(np.float32)
    if name == "checkers":
        cell = rng.integers(10, 18)
        oy, ox = rng.integers(0, cell, size=2)
        return (((yy + oy) // cell + (xx + ox) // cell) % 2).astype(np.float32)
    if name == "dots":
        pitch = rng.uniform(14, 22)
        radius = pitch * rng.uniform(0.22, 0.32)
        oy, ox = rng.uniform(0, pitch, size=2)
        dy = (yy + oy) % pitch - pitch / 2
        dx = (xx + ox) % pitch - pitch / 2
        return (dy * dy + dx * dx < radius * radius).astype(np.float32)
    if name == "plain":
        return np.zeros(yy.shape, np.float32)
    if name == "noise":
        block = int(rng.integers(2, 5))
        h, w = yy.shape
        cells = rng.random((h // block + 1, w // block + 1)).astype(np.float32)
        return np.repeat(np.repeat(cells, block, axis=0), block, axis=1)[:h, :w]
    if name == "rings":
        cy, cx = rng.uniform(0, yy.shape[0], size=2)
        period = rng.uniform(16, 28)
        radius = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        return (np.sin(2 * np.pi * radius / period) > 0).astype(np.float32)
    raise ValueError(f"unknown synthetic class {name!r}")


def make_scene(
    rng: np.random.Generator, class_names: Sequence[str], num_regions: int, size: int = SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """One scene of ``num_regions`` Voronoi regions, each a random class of ``class_names``.

    Returns:
        ``(image, label)``: float32 ``[3, size, size]`` RGB 0..255 and uint8 ``[size, size]``
        indices into ``class_names``.

    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)  # [H, W] each
    seeds = rng.uniform(0, size, size=(num_regions, 2)).astype(np.float32)
    dist = (yy[None] - seeds[:, 0, None, None]) ** 2 + (xx[None] - seeds[:, 1, None, None]) ** 2  # [R, H, W]
    region = dist.argmin(axis=0)  # [H, W]
    # every scene shows at least two distinct classes when it can
    region_class = rng.integers(0, len(class_names), size=num_regions)
    if len(class_names) > 1 and num_regions > 1 and len(set(region_class.tolist())) == 1:
        region_class[1] = (region_class[0] + rng.integers(1, len(class_names))) % len(class_names)
    image = np.empty((3, size, size), np.float32)
    label = np.empty((size, size), np.uint8)
    for r in range(num_regions):
        name = class_names[int(region_class[r])]
        mask = region == r
        pattern = _texture(name, rng, yy, xx)  # [H, W] in [0, 1]
        low, high = (np.asarray(c, np.float32) + rng.uniform(-25, 25, size=3).astype(np.float32) for c in _PALETTE[name])
        fill = low[:, None, None] + (high - low)[:, None, None] * pattern[None]  # [3, H, W]
        image[:, mask] = fill[:, mask]
        label[mask] = region_class[r]
    image += rng.normal(0, 6, size=image.shape).astype(np.float32)  # sensor noise
    return np.clip(image, 0, 255), label


def synthetic_scenes(
    num_scenes: int,
    seed: int = HELD_OUT_SEED,
    class_names: Sequence[str] = CLASS_NAMES,
    regions: tuple[int, int] = (3, 6),
    size: int = SIZE,
) -> SyntheticScenes:
    """``num_scenes`` seeded scenes over ``class_names`` (labels index that order).

    Args:
        num_scenes: how many scenes.
        seed: generator seed (``HELD_OUT_SEED`` for evaluation, ``TRAIN_SEED`` for training).
        class_names: vocabulary, any subset and order of ``CLASS_NAMES``.
        regions: inclusive range of Voronoi regions per scene.
        size: side of a scene in pixels.

    Returns:
        The scenes (deterministic for equal arguments).

    """
    unknown = [n for n in class_names if n not in _PALETTE]
    if unknown:
        raise ValueError(f"unknown synthetic classes {unknown}; choose from {CLASS_NAMES}")
    rng = np.random.default_rng(seed)
    images = np.empty((num_scenes, 3, size, size), np.float32)
    labels = np.empty((num_scenes, size, size), np.uint8)
    for i in range(num_scenes):
        images[i], labels[i] = make_scene(rng, class_names, int(rng.integers(regions[0], regions[1] + 1)), size)
    return SyntheticScenes(images=images, labels=labels, class_names=tuple(class_names))
