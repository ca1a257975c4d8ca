"""Tests of runtime.raster: band rules, nodata values, windowed reads, stretch, small-raster fallback."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import rasterio
from PIL import Image

from gsnet_deploy.errors import RasterError
from gsnet_deploy.runtime.raster import (
    RasterReader,
    apply_stretch,
    is_georeferenced,
    mask_nodata_value,
    parse_bands,
    read_small_rgb,
    select_bands,
)


@pytest.mark.parametrize(("spec", "expected"), [("1,2,3", (1, 2, 3)), ("4,3,2", (4, 3, 2)), ("2", (2,))])
def test_parse_bands_accepts(spec: str, expected: tuple[int, ...]) -> None:
    assert parse_bands(spec) == expected


@pytest.mark.parametrize("spec", ["1,2", "a,b,c", "0,1,2", "1,2,3,4", ""])
def test_parse_bands_rejects(spec: str) -> None:
    with pytest.raises(RasterError, match="--bands"):
        parse_bands(spec)


def test_select_bands_rules() -> None:
    notes: list[str] = []
    p = Path("x.tif")
    assert select_bands(3, ["gray", "undefined", "undefined"], None, p, notes) == (1, 2, 3)
    assert notes == []
    assert select_bands(4, ["blue", "green", "red", "undefined"], None, p, notes) == (3, 2, 1)
    assert "3,2,1" in notes[-1]
    assert select_bands(8, ["gray"] * 8, (5, 3, 2), p, notes) == (5, 3, 2)
    assert select_bands(1, ["gray"], (1,), p, notes) == (1, 1, 1)
    with pytest.raises(RasterError, match="pass --bands"):
        select_bands(1, ["gray"], None, p, notes)
    with pytest.raises(RasterError, match="pass --bands"):
        select_bands(2, ["gray", "undefined"], None, p, notes)
    with pytest.raises(RasterError, match="pass --bands R,G,B"):
        select_bands(4, ["gray", "undefined", "undefined", "undefined"], None, p, notes)
    with pytest.raises(RasterError, match=r"band 5 but x\.tif has 4 bands"):
        select_bands(4, ["gray"] * 4, (1, 2, 5), p, notes)


@pytest.mark.parametrize(
    ("nodata", "has_mask", "n", "expected"),
    [
        (None, False, 5, None),
        (0.0, True, 5, 255),
        (255.0, True, 5, 255),
        (200.0, True, 5, 200),
        (3.0, True, 5, 255),
        (-9999.0, True, 5, 255),
        (None, True, 5, 255),
    ],
)
def test_mask_nodata_value(nodata: float | None, has_mask: bool, n: int, expected: int | None) -> None:
    assert mask_nodata_value(nodata, has_mask, n) == expected


def test_mask_nodata_value_needs_a_free_value() -> None:
    with pytest.raises(RasterError, match="at most 255"):
        mask_nodata_value(0.0, True, 256)


def test_reader_reads_rectangles_equal_to_full_read(tmp_path: Path, fakes: SimpleNamespace) -> None:
    path = fakes.geotiff(tmp_path / "r.tif", 300, 500, count=4, colorinterp=["red", "green", "blue", "alpha"])
    with rasterio.open(path) as ds:
        full = ds.read([1, 2, 3]).transpose(1, 2, 0)
    with RasterReader(path) as reader:
        assert reader.bands == (1, 2, 3)
        assert reader.has_mask  # the alpha band masks pixels
        rgb, valid = reader.read(10, 200, 33, 420)
    np.testing.assert_array_equal(rgb, full[10:200, 33:420])
    assert valid is not None and valid.shape == (190, 387)


def test_reader_nodata_mask(tmp_path: Path, fakes: SimpleNamespace) -> None:
    data = np.full((3, 64, 64), 7, dtype=np.uint8)
    data[:, :10, :] = 0
    data[0, 20, 5] = 0  # one band at nodata is not a nodata pixel (all selected bands must be)
    path = fakes.geotiff(tmp_path / "n.tif", 64, 64, nodata=0, data=data)
    with RasterReader(path) as reader:
        _, valid = reader.read(0, 64, 0, 64)
    assert valid is not None
    expected = np.ones((64, 64), bool)
    expected[:10] = False
    np.testing.assert_array_equal(valid, expected)


def test_reader_stretch_of_uint16(tmp_path: Path, fakes: SimpleNamespace) -> None:
    path = fakes.geotiff(tmp_path / "u.tif", 200, 300, dtype="uint16")
    with rasterio.open(path) as ds:
        raw = ds.read().astype(np.float64)  # [3, H, W]
    lo, hi = np.percentile(raw, (2, 98))  # the raster is small, so the decimated read is the full raster
    with RasterReader(path) as reader:
        assert reader.stretch is not None
        np.testing.assert_allclose(reader.stretch, (lo, hi), rtol=1e-9)
        rgb, valid = reader.read(0, 200, 0, 300)
    assert valid is None
    expected = np.clip(np.rint((raw - lo) * 255.0 / (hi - lo)), 0, 255).transpose(1, 2, 0)
    assert np.abs(rgb.astype(np.int64) - expected).max() <= 1  # float32 vs float64 rounding


def test_apply_stretch_hand_values() -> None:
    out = apply_stretch(np.array([100, 150, 200, 250, 50], np.uint16), 100.0, 200.0)
    np.testing.assert_array_equal(out, [0, 128, 255, 255, 0])  # 127.5 rounds half to even -> 128


def test_reader_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RasterError, match="does not exist"), RasterReader(tmp_path / "nope.tif"):
        pass


def test_read_small_rgb_16bit(tmp_path: Path, fakes: SimpleNamespace) -> None:
    path = fakes.geotiff(tmp_path / "s.tif", 40, 30, dtype="uint16")
    notes: list[str] = []
    rgb = read_small_rgb(path, notes)
    assert rgb is not None and rgb.shape == (40, 30, 3) and rgb.dtype == np.uint8
    assert notes and "stretched" in notes[0]
    assert rgb.min() == 0 and rgb.max() == 255


def test_read_small_rgb_unreadable_returns_none(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"not a tiff")
    assert read_small_rgb(bad, []) is None


def test_is_georeferenced(tmp_path: Path, fakes: SimpleNamespace) -> None:
    geo = fakes.geotiff(tmp_path / "g.tif", 20, 20)
    png = tmp_path / "p.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(png)
    assert is_georeferenced(geo)
    assert not is_georeferenced(png)
    assert not is_georeferenced(tmp_path / "missing.tif")
