"""Fixtures of the runtime tests: small numpy backends and synthetic GeoTIFFs made in the test."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from gsnet_deploy.contracts.io_names import IMAGES, LOGITS, TEXT_EMBEDS


class LinearImageRunner:
    """Image graph stand-in: logits are a fixed random linear function of 4x4-pooled pixels.

    ``logits[b, n, y, x] = sum_c A[n, c] * pooled[b, c, y, x] / 255 + bias[n]``, so outputs vary in space
    and depend on the window's content.
    """

    def __init__(self, num_classes: int, seed: int = 0, fail_on_call: int | None = None) -> None:
        rng = np.random.default_rng(seed)
        self.a = rng.normal(0.0, 3.0, size=(num_classes, 3)).astype(np.float32)
        self.bias = rng.normal(0.0, 1.0, size=num_classes).astype(np.float32)
        self.calls = 0
        self.batches: list[int] = []
        self.fail_on_call = fail_on_call

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        if self.fail_on_call is not None and self.calls == self.fail_on_call:
            raise KeyboardInterrupt
        views, emb = feeds[IMAGES], feeds[TEXT_EMBEDS]
        assert views.dtype == np.float32 and views.shape[1:] == (3, 384, 384)
        assert emb.shape[0] == self.a.shape[0]
        self.batches.append(views.shape[0])
        b = views.shape[0]
        pooled = views.reshape(b, 3, 96, 4, 96, 4).mean(axis=(3, 5)) / 255.0  # [B, 3, 96, 96]
        logits = np.einsum("nc,bchw->bnhw", self.a, pooled) + self.bias[None, :, None, None]  # [B, N, 96, 96]
        return {LOGITS: logits.astype(np.float32)}


class ConstantImageRunner:
    """Image graph stand-in whose logits are constant in space: ``logits[b, n] = values[n]``."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = values.astype(np.float32)
        self.calls = 0

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        b = feeds[IMAGES].shape[0]
        out = np.broadcast_to(self.values[None, :, None, None], (b, len(self.values), 96, 96))
        return {LOGITS: np.ascontiguousarray(out, dtype=np.float32)}


class FakeBackend:
    """A ``Backend`` around one image runner (no text runner needed by tiled mode)."""

    def __init__(self, image: object, preferred_views: int = 4, max_views: int | None = 8) -> None:
        self.name = "fake"
        self.model_digest = "fake"
        self.preferred_views = preferred_views
        self.max_views = max_views
        self._image = image
        self.entered = 0

    @property
    def text(self) -> object:
        raise AssertionError("tiled mode must not run the text graph")

    @property
    def image(self) -> object:
        return self._image

    def __enter__(self) -> FakeBackend:
        self.entered += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self.entered -= 1


def make_geotiff(
    path: Path,
    height: int,
    width: int,
    *,
    count: int = 3,
    dtype: str = "uint8",
    nodata: float | None = None,
    seed: int = 0,
    data: np.ndarray | None = None,
    colorinterp: list[str] | None = None,
) -> Path:
    """Write a georeferenced (EPSG:32633, 0.5 m pixels) test raster with smooth random content."""
    import rasterio
    from affine import Affine
    from rasterio.enums import ColorInterp

    if data is None:
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        bands = []
        for _ in range(count):
            fx, fy, ph = rng.uniform(0.005, 0.03), rng.uniform(0.005, 0.03), rng.uniform(0, 6.28)
            bands.append(0.5 + 0.4 * np.sin(fx * xx + ph) * np.cos(fy * yy))
        base = np.stack(bands)  # [C, H, W] in 0.1..0.9
        top = 254.0 if dtype == "uint8" else 4000.0
        data = (base * top).astype(dtype)
    profile = {
        "driver": "GTiff",
        "height": height,
        "width": width,
        "count": count,
        "dtype": dtype,
        "crs": "EPSG:32633",
        "transform": Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 5400000.0),  # 0.5 m pixels, north up
        "nodata": nodata,
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        if colorinterp is not None:
            dst.colorinterp = [getattr(ColorInterp, c) for c in colorinterp]
    return path


@pytest.fixture
def geotiff_factory(tmp_path: Path) -> Callable[..., Path]:
    """Make a synthetic GeoTIFF under ``tmp_path``: ``geotiff_factory(name, height, width, **kwargs)``."""

    def make(name: str, height: int, width: int, **kwargs: object) -> Path:
        return make_geotiff(tmp_path / name, height, width, **kwargs)  # type: ignore[arg-type]

    return make


@pytest.fixture
def fakes() -> SimpleNamespace:
    """This folder's fakes, as a fixture (a conftest module cannot be imported reliably by tests).

    Attributes: ``linear`` (LinearImageRunner), ``constant`` (ConstantImageRunner), ``backend``
    (FakeBackend), ``geotiff`` (make_geotiff).
    """
    return SimpleNamespace(linear=LinearImageRunner, constant=ConstantImageRunner, backend=FakeBackend, geotiff=make_geotiff)
