"""A deterministic synthetic aerial scene for demos, calibration fallbacks and tests.

Not real imagery: a field with noise, a road cross, roofs, tree crowns and a pond, so that a
newcomer can run ``gsnet segment`` with no data, and calibration has something to cut views from.
"""

from __future__ import annotations

import numpy as np


def example_image(seed: int = 0, height: int = 512, width: int = 640) -> np.ndarray:
    """An RGB uint8 ``[height, width, 3]`` synthetic aerial scene (same seed, same pixels)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.empty((height, width, 3), dtype=np.float32)
    img[:] = (86, 118, 62)  # grass
    img += rng.normal(0, 9, size=img.shape).astype(np.float32)
    pond = ((yy - 0.75 * height) / (0.16 * height)) ** 2 + ((xx - 0.2 * width) / (0.15 * width)) ** 2 < 1
    img[pond] = (40, 72, 110)
    road_w = max(height // 24, 4)
    row, col = int(height * 0.45), int(width * 0.55)
    img[row - road_w : row + road_w, :] = (128, 128, 124)
    img[:, col - road_w : col + road_w] = (128, 128, 124)
    for _ in range(14):  # roofs
        h, w = rng.integers(height // 16, height // 7), rng.integers(width // 16, width // 7)
        y, x = rng.integers(0, height - h), rng.integers(0, width - w)
        if pond[y : y + h, x : x + w].any():
            continue
        img[y : y + h, x : x + w] = (168, 64, 52) if rng.random() < 0.6 else (196, 190, 182)
    for _ in range(40):  # tree crowns
        r = rng.integers(height // 64 + 3, height // 24 + 4)
        cy, cx = rng.integers(0, height), rng.integers(0, width)
        crown = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        img[crown & ~pond] = (38, 78, 34)
    img += rng.normal(0, 4, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)
