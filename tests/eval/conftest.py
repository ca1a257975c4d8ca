"""Fixtures for the evaluation tests: tiny synthetic datasets in the official layouts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from gsnet_deploy.eval.datasets import DatasetSpec

# Images encode their label: gray level = GRAY_STEP * label (ignore pixels get gray 0), in 8x8
# blocks aligned to the JPEG grid, so even FloodNet's JPEGs decode back to the label.
GRAY_STEP = 20
BLOCK = 8


def label_image(labels: np.ndarray, spec: DatasetSpec) -> np.ndarray:
    """RGB uint8 [H, W, 3] image whose gray level encodes ``labels`` (ignore -> 0)."""
    lab = np.where(labels == spec.ignore_label, 0, labels)
    lab = np.clip(lab, 0, 255 // GRAY_STEP)
    gray = (lab * GRAY_STEP).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)  # [H, W, 3]


def decode_label(image: np.ndarray, num_classes: int) -> np.ndarray:
    """Inverse of ``label_image`` (ignore pixels come back as class 0)."""
    lab = np.rint(image[:, :, 0].astype(np.float64) / GRAY_STEP).astype(np.int64)
    return np.clip(lab, 0, num_classes - 1)


def save_image(array: np.ndarray, path: Path) -> None:
    """Save an RGB or label array losslessly (JPEG at quality 100, no chroma subsampling)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        img.save(path, quality=100, subsampling=0)
    else:
        img.save(path)


def block_labels(rng: np.random.Generator, spec: DatasetSpec, blocks_hw: tuple[int, int]) -> np.ndarray:
    """Random label map [H, W] of 8x8 blocks: classes the encoding can carry, plus ignore blocks."""
    max_label = min(spec.num_classes - 1, 255 // GRAY_STEP)
    choices = [c for c in range(max_label + 1) if c != spec.ignore_label] + [spec.ignore_label]
    small = rng.choice(choices, size=blocks_hw)
    return np.kron(small, np.ones((BLOCK, BLOCK), dtype=np.int64)).astype(np.int64)  # [H, W]


MakeDataset = Callable[..., list[tuple[Path, Path]]]


@pytest.fixture
def make_dataset(tmp_path: Path) -> MakeDataset:
    """Return ``make(spec, n=3, dataset_dir=None, mask_dir=None, mask_suffix='', seed=0)``.

    It writes ``n`` image/mask pairs under ``tmp_path`` in the spec's layout and returns the
    (image, mask) paths in name order. The root is ``tmp_path / 'root'``.
    """

    def make(
        spec: DatasetSpec,
        n: int = 3,
        dataset_dir: str | None = None,
        mask_dir: str | None = None,
        mask_suffix: str = "",
        seed: int = 0,
    ) -> list[tuple[Path, Path]]:
        rng = np.random.default_rng(seed)
        base = tmp_path / "root" / (dataset_dir if dataset_dir is not None else spec.dataset_dirs[0])
        out = []
        for i in range(n):
            labels = block_labels(rng, spec, (2, 3))  # [16, 24]
            img_path = base / spec.image_dir / f"tile_{i:03d}{spec.image_ext}"
            mask_path = base / (mask_dir or spec.mask_dirs[0]) / f"tile_{i:03d}{mask_suffix}{spec.mask_ext}"
            save_image(label_image(labels, spec), img_path)
            save_image(labels.astype(np.uint8), mask_path)
            out.append((img_path, mask_path))
        return out

    return make


@pytest.fixture
def synth() -> SimpleNamespace:
    """The helpers above, for test modules (tests/ is not a package, so they cannot import conftest)."""
    return SimpleNamespace(label_image=label_image, decode_label=decode_label, save_image=save_image)
