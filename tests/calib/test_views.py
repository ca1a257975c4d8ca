"""Calibration views are cut like inference (paper protocol) from image files or the example images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gsnet_deploy.calib.views import (
    EOT_TOKEN,
    SOT_TOKEN,
    CalibrationDataWarning,
    calibration_tokens,
    calibration_views,
)
from gsnet_deploy.errors import ImageError


def _write(path: Path, rgb: np.ndarray) -> Path:
    Image.fromarray(rgb).save(path)
    return path


def test_views_of_a_640_image_are_its_crops(tmp_path: Path) -> None:
    # a 640x640 image passes both resizes unchanged, so the tiles are plain crops at stride 256
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(640, 640, 3), dtype=np.uint8)
    _write(tmp_path / "a.png", rgb)
    views = calibration_views([tmp_path], max_images=4)
    assert views.shape == (5, 3, 384, 384) and views.dtype == np.float32
    chw = rgb.transpose(2, 0, 1).astype(np.float32)
    for i, (r, c) in enumerate([(0, 0), (0, 256), (256, 0), (256, 256)]):
        np.testing.assert_array_equal(views[i], chw[:, r : r + 384, c : c + 384])


@pytest.mark.parametrize("count", [1, 3])
def test_views_of_flat_images_keep_their_colour(tmp_path: Path, count: int) -> None:
    for k in range(count):
        _write(tmp_path / f"{k}.png", np.full((300, 500, 3), (10 * k, 100, 200), dtype=np.uint8))
    views = calibration_views([tmp_path], max_images=8)
    assert views.shape == (5 * count, 3, 384, 384)
    for k in range(count):
        np.testing.assert_allclose(views[5 * k : 5 * k + 5, 0], 10.0 * k, atol=1e-3)
        np.testing.assert_allclose(views[5 * k : 5 * k + 5, 2], 200.0, atol=1e-3)


def test_max_images_subsamples(tmp_path: Path) -> None:
    for k in range(5):
        _write(tmp_path / f"{k}.png", np.full((64, 64, 3), 40 * k, dtype=np.uint8))
    views = calibration_views([tmp_path], max_images=2)
    assert views.shape[0] == 10
    np.testing.assert_allclose([views[0].mean(), views[5].mean()], [0.0, 160.0], atol=1e-3)  # first and last


def test_without_images_warns_and_uses_examples() -> None:
    with pytest.warns(CalibrationDataWarning, match="real imagery"):
        views = calibration_views(None, max_images=2)
    assert views.shape == (10, 3, 384, 384)
    assert np.isfinite(views).all() and 0.0 <= views.min() and views.max() <= 255.0 and views.std() > 1.0


def test_missing_and_empty_inputs(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="does not exist"):
        calibration_views([tmp_path / "nope"])
    with pytest.raises(ImageError, match="No images"):
        calibration_views([tmp_path])


def test_calibration_tokens_shape() -> None:
    tokens = calibration_tokens(7)
    assert tokens.shape == (7, 77) and tokens.dtype == np.int64
    assert (tokens[:, 0] == SOT_TOKEN).all()
    assert ((tokens == EOT_TOKEN).sum(axis=1) == 1).all()
    assert (tokens.argmax(axis=1) == (tokens == EOT_TOKEN).argmax(axis=1)).all()  # EOT is the largest id (CLIP pooling)
