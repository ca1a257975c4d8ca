"""Tests of runtime.tiled: streaming tiled inference into GeoTIFFs and arrays, with fake numpy backends."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import rasterio

from gsnet_deploy.errors import GSNetError, ImageError, RasterError
from gsnet_deploy.runtime.palette import default_palette
from gsnet_deploy.runtime.resize import resize_bilinear
from gsnet_deploy.runtime.segment import segment_raster as segment_tiled
from gsnet_deploy.runtime.tiled import segment_tiled_array

S = 384


def _starts(length: int, overlap: int) -> list[int]:
    """Window starts written plainly: stride 384 - overlap, plus the edge-aligned last one."""
    if length <= S:
        return [0]
    out, s = [], 0
    while s + S < length:
        out.append(s)
        s += S - overlap
    return [*out, length - S]


def _reference_probs(rgb: np.ndarray, runner: Any, overlap: int) -> np.ndarray:
    """Tiled merge in float64 from the definitions: reflect padding, sigmoid(upsampled logits), ramps."""
    h, w = rgb.shape[:2]
    i = np.arange(S, dtype=np.float64)
    prof = np.minimum(1.0, (np.minimum(i, S - 1 - i) + 0.5) / overlap) if overlap else np.ones(S)
    wgt = np.outer(prof, prof)
    n = runner.a.shape[0]
    acc = np.zeros((n, h, w))
    tot = np.zeros((h, w))
    for r0 in _starts(h, overlap):
        for c0 in _starts(w, overlap):
            patch = rgb[r0 : r0 + S, c0 : c0 + S].astype(np.float64)
            ph, pw = patch.shape[:2]
            if (ph, pw) != (S, S):
                patch = np.pad(patch, ((0, S - ph), (0, S - pw), (0, 0)), mode="reflect")
            pooled = patch.transpose(2, 0, 1).reshape(3, 96, 4, 96, 4).mean(axis=(2, 4)) / 255.0  # [3, 96, 96]
            logits = np.einsum("nc,chw->nhw", runner.a.astype(np.float64), pooled) + runner.bias[:, None, None]
            up = resize_bilinear(logits.astype(np.float32), (S, S)).astype(np.float64)  # [N, S, S]
            prob = 1.0 / (1.0 + np.exp(-up))
            acc[:, r0 : r0 + ph, c0 : c0 + pw] += prob[:, :ph, :pw] * wgt[:ph, :pw]
            tot[r0 : r0 + ph, c0 : c0 + pw] += wgt[:ph, :pw]
    return acc / tot


def _read_rgb(path: Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read([1, 2, 3]).transpose(1, 2, 0)


@pytest.mark.parametrize(("height", "width", "overlap"), [(500, 300, 128), (700, 1000, 64), (384, 800, 0)])
def test_segment_tiled_array_matches_reference(height: int, width: int, overlap: int, fakes: SimpleNamespace) -> None:
    rgb = np.random.default_rng(3).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    runner = fakes.linear(3, seed=1)
    probs = segment_tiled_array(rgb, fakes.backend(runner), np.zeros((3, 512), np.float32), overlap=overlap)
    assert probs.shape == (3, height, width) and probs.dtype == np.float32
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs, _reference_probs(rgb, runner, overlap), rtol=0, atol=2e-5)


@pytest.mark.parametrize(("preferred", "max_views"), [(1, None), (4, 8), (8, 3)])
def test_segment_tiled_array_batches_to_backend(preferred: int, max_views: int | None, fakes: SimpleNamespace) -> None:
    rgb = np.zeros((1000, 700, 3), dtype=np.uint8)
    runner = fakes.linear(2)
    segment_tiled_array(rgb, fakes.backend(runner, preferred, max_views), np.zeros((2, 512), np.float32))
    want = min(preferred, max_views or preferred)
    assert sum(runner.batches) == 4 * 3  # every window once
    assert all(b == want for b in runner.batches[:-1]) and 0 < runner.batches[-1] <= want


@pytest.mark.parametrize(("height", "width", "overlap"), [(700, 1000, 128), (1300, 450, 64), (200, 300, 128), (900, 900, 0)])
def test_constant_logits_merge_seamlessly(height: int, width: int, overlap: int, fakes: SimpleNamespace) -> None:
    values = np.array([-3.0, 0.0, 0.7, 5.0], dtype=np.float32)
    rgb = np.random.default_rng(0).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    probs = segment_tiled_array(rgb, fakes.backend(fakes.constant(values)), np.zeros((4, 512), np.float32), overlap=overlap)
    expected = 1.0 / (1.0 + np.exp(-values.astype(np.float64)))
    np.testing.assert_allclose(probs, np.broadcast_to(expected[:, None, None], probs.shape), rtol=0, atol=1e-6)
    # no step across any window border: neighbouring pixels are equal to 1e-6
    assert np.abs(np.diff(probs, axis=1)).max() <= 1e-6 and np.abs(np.diff(probs, axis=2)).max() <= 1e-6


@pytest.mark.parametrize("scale", [2.0, 0.5, 1.3])
def test_gsd_scale_resamples_there_and_back(scale: float, fakes: SimpleNamespace) -> None:
    rgb = np.random.default_rng(5).integers(0, 256, size=(450, 610, 3), dtype=np.uint8)
    runner = fakes.linear(2, seed=2)
    probs = segment_tiled_array(rgb, fakes.backend(runner), np.zeros((2, 512), np.float32), gsd_scale=scale)
    assert probs.shape == (2, 450, 610)
    # reference: whole-image torch-style bilinear resize, tiled merge, resize back
    size = (round(450 * scale), round(610 * scale))
    scaled = resize_bilinear(rgb.transpose(2, 0, 1).astype(np.float32), size)  # [3, h, w]
    scaled_u8 = np.clip(np.rint(scaled), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    ref = resize_bilinear(_reference_probs(scaled_u8, runner, 128).astype(np.float32), (450, 610))
    # the streamed resampler and the whole-image one may differ by one float32 ulp, which can flip the
    # uint8 rounding of a pixel sitting on .5; such pixels are rare and move the result by ~1e-4 at most
    err = np.abs(probs - ref)
    assert np.mean(err <= 5e-5) > 0.999
    assert err.max() <= 2e-3


def test_gsd_scale_rejects_nonpositive(fakes: SimpleNamespace) -> None:
    with pytest.raises(GSNetError, match="gsd-scale"):
        segment_tiled_array(
            np.zeros((10, 10, 3), np.uint8),
            fakes.backend(fakes.linear(1)),
            np.zeros((1, 512), np.float32),
            gsd_scale=0.0,
        )


def test_segment_tiled_keeps_georeferencing(tmp_path: Path, fakes: SimpleNamespace) -> None:
    src = fakes.geotiff(tmp_path / "scene.tif", 700, 1000, nodata=255)
    names = ["building", "road", "tree", "car"]
    runner = fakes.linear(4, seed=4)
    out = tmp_path / "out"
    result = segment_tiled(
        src,
        fakes.backend(runner),
        np.zeros((4, 512), np.float32),
        out_dir=out,
        class_names=names,
        palette=default_palette(4),
        save_probs=True,
        progress=False,
    )
    assert [p.name for p in result.paths] == ["scene_mask.tif", "scene_overlay.png", "scene_probs.tif"]
    assert sorted(p.name for p in out.iterdir()) == ["scene_mask.tif", "scene_overlay.png", "scene_probs.tif"]
    assert result.windows == 12 and result.skipped == 0
    with (
        rasterio.open(src) as a,
        rasterio.open(out / "scene_mask.tif") as m,
        rasterio.open(out / "scene_probs.tif") as p,
    ):
        for ds in (m, p):
            assert ds.crs == a.crs and ds.crs.to_epsg() == 32633
            assert ds.transform == a.transform
            assert (ds.width, ds.height) == (1000, 700)
        assert m.nodata == a.nodata == 255
        assert m.count == 1 and m.dtypes[0] == "uint8" and m.block_shapes[0] == (256, 256)
        assert m.compression.name.lower() == "deflate"
        cmap = m.colormap(1)
        for i, color in enumerate(default_palette(4)):
            assert cmap[i][:3] == tuple(int(c) for c in color)
        assert json.loads(m.tags()["GSNET_CLASS_NAMES"]) == names
        assert p.count == 4 and list(p.descriptions) == names
        mask = m.read(1)
        probs_u8 = p.read()
    ref = _reference_probs(_read_rgb(src), runner, 128)  # [4, 700, 1000]
    np.testing.assert_allclose(probs_u8 / 255.0, ref, rtol=0, atol=0.5 / 255 + 1e-4)
    top2 = np.sort(ref, axis=0)[-2:]
    clear = (top2[1] - top2[0]) > 1e-3
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(mask[clear], np.argmax(ref, axis=0)[clear])


def test_segment_tiled_nodata_skipped_and_written(tmp_path: Path, fakes: SimpleNamespace) -> None:
    data = np.full((3, 700, 1000), 120, dtype=np.uint8)
    data[:, :, :500] = 0  # nodata block: the first window column lies entirely inside it
    src = fakes.geotiff(tmp_path / "nd.tif", 700, 1000, nodata=0, data=data)
    runner = fakes.linear(2)
    result = segment_tiled(
        src,
        fakes.backend(runner, 2, 2),
        np.zeros((2, 512), np.float32),
        out_dir=tmp_path / "o",
        class_names=["a", "b"],
        palette=default_palette(2),
        progress=False,
        overlay=False,
    )
    assert result.skipped == 3 and result.windows == 9  # 3 window rows x the first window column
    with rasterio.open(result.paths[0]) as m:
        assert m.nodata == 255  # 0 is a class index, so the mask uses 255 and records the input's value
        assert m.tags()["GSNET_INPUT_NODATA"] == "0.0"
        mask = m.read(1)
    assert (mask[:, :500] == 255).all()
    assert (mask[:, 500:] < 2).all()


def test_segment_tiled_records_stretch_of_16bit(tmp_path: Path, fakes: SimpleNamespace) -> None:
    src = fakes.geotiff(tmp_path / "u16.tif", 500, 420, dtype="uint16")
    result = segment_tiled(
        src,
        fakes.backend(fakes.linear(1)),
        np.zeros((1, 512), np.float32),
        out_dir=tmp_path / "o",
        class_names=["x"],
        palette=default_palette(1),
        progress=False,
        overlay=False,
    )
    with rasterio.open(src) as ds:
        values = ds.read().astype(np.float64)
    lo, hi = np.percentile(values, (2, 98))
    with rasterio.open(result.paths[0]) as m:
        stretch = json.loads(m.tags()["GSNET_STRETCH"])
    assert stretch["percentiles"] == [2.0, 98.0] and stretch["dtype"] == "uint16"
    np.testing.assert_allclose([stretch["low"], stretch["high"]], [lo, hi], rtol=1e-9)
    assert any("stretched" in n for n in result.notes)


def test_peak_memory_stays_under_budget(tmp_path: Path, fakes: SimpleNamespace) -> None:
    height, width, n = 3200, 1400, 2
    budget = 32 << 20
    assert n * height * width * 4 > budget  # the whole float probability volume would not fit
    src = fakes.geotiff(tmp_path / "big.tif", height, width)
    runner = fakes.linear(n)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        segment_tiled(
            src,
            fakes.backend(runner, 4, 8),
            np.zeros((n, 512), np.float32),
            out_dir=tmp_path / "o",
            class_names=["a", "b"],
            palette=default_palette(2),
            max_memory=budget,
            progress=False,
            overlay=False,
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < budget, f"peak {peak / 2**20:.1f} MiB over the {budget / 2**20:.0f} MiB budget"
    with rasterio.open(tmp_path / "o" / "big_mask.tif") as m:
        assert (m.height, m.width) == (height, width)


def test_budget_too_small_is_one_clear_error(tmp_path: Path, fakes: SimpleNamespace) -> None:
    src = fakes.geotiff(tmp_path / "w.tif", 400, 2000)
    with pytest.raises(ImageError, match="max-memory"):
        segment_tiled(
            src,
            fakes.backend(fakes.linear(1)),
            np.zeros((1, 512), np.float32),
            out_dir=tmp_path / "o",
            class_names=["a"],
            palette=default_palette(1),
            max_memory=1 << 20,
            progress=False,
        )
    assert list((tmp_path / "o").iterdir()) == []


def test_interrupt_leaves_no_mask_and_no_temp(tmp_path: Path, fakes: SimpleNamespace) -> None:
    src = fakes.geotiff(tmp_path / "int.tif", 700, 1000)
    runner = fakes.linear(2, fail_on_call=3)
    threads_before = threading.active_count()
    out = tmp_path / "o"
    with pytest.raises(KeyboardInterrupt):
        segment_tiled(
            src,
            fakes.backend(runner, 1, 1),
            np.zeros((2, 512), np.float32),
            out_dir=out,
            class_names=["a", "b"],
            palette=default_palette(2),
            save_probs=True,
            progress=False,
        )
    assert runner.calls == 3
    assert list(out.iterdir()) == []  # no _mask.tif, no _probs.tif, no hidden temp file
    assert threading.active_count() == threads_before  # reader thread stopped


def test_one_band_without_bands_is_clear_error(tmp_path: Path, fakes: SimpleNamespace) -> None:
    src = fakes.geotiff(tmp_path / "gray.tif", 300, 300, count=1)
    with pytest.raises(RasterError, match="--bands"):
        segment_tiled(
            src,
            fakes.backend(fakes.linear(1)),
            np.zeros((1, 512), np.float32),
            out_dir=tmp_path / "o",
            class_names=["a"],
            palette=default_palette(1),
            progress=False,
        )
    # with --bands 1 it runs (gray repeated to RGB)
    result = segment_tiled(
        src,
        fakes.backend(fakes.linear(1)),
        np.zeros((1, 512), np.float32),
        out_dir=tmp_path / "o",
        class_names=["a"],
        palette=default_palette(1),
        bands=(1,),
        progress=False,
        overlay=False,
    )
    assert result.paths[0].name == "gray_mask.tif"


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_tiff_is_clear_error(
    tmp_path: Path, damage: str, geotiff_factory: Callable[..., Path], fakes: SimpleNamespace
) -> None:
    path = tmp_path / "bad.tif"
    if damage == "garbage":
        path.write_bytes(b"II*\x00" + b"\x13" * 4000)
    else:
        good = geotiff_factory("good.tif", 700, 1000)
        raw = good.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    out = tmp_path / "o"
    with pytest.raises(RasterError, match=r"bad\.tif"):
        segment_tiled(
            path,
            fakes.backend(fakes.linear(1)),
            np.zeros((1, 512), np.float32),
            out_dir=out,
            class_names=["a"],
            palette=default_palette(1),
            progress=False,
        )
    assert not out.exists() or list(out.iterdir()) == []


def test_zero_size_image_is_clear_error(fakes: SimpleNamespace) -> None:
    with pytest.raises(ImageError, match="no pixels"):
        segment_tiled_array(np.zeros((0, 50, 3), np.uint8), fakes.backend(fakes.linear(1)), np.zeros((1, 512), np.float32))


def test_unwritable_output_folder_is_clear_error(tmp_path: Path, fakes: SimpleNamespace) -> None:
    src = fakes.geotiff(tmp_path / "s.tif", 100, 100)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ImageError, match="output folder"):
        segment_tiled(
            src,
            fakes.backend(fakes.linear(1)),
            np.zeros((1, 512), np.float32),
            out_dir=blocker / "sub",
            class_names=["a"],
            palette=default_palette(1),
            progress=False,
        )


def test_runtime_imports_without_torch() -> None:
    code = """
import importlib, pkgutil, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == 'torch' or name.startswith('torch.'):
            raise ImportError('torch is blocked in this test')
        return None
sys.meta_path.insert(0, Block())
import gsnet_deploy.runtime as rt
names = [m.name for m in pkgutil.iter_modules(rt.__path__, 'gsnet_deploy.runtime.')]
for name in names:
    importlib.import_module(name)
assert 'torch' not in sys.modules
print(','.join(sorted(names)))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    for module in ("tiling", "tiled", "raster", "outputs", "palette"):
        assert f"gsnet_deploy.runtime.{module}" in proc.stdout


def test_segment_tiled_gsd_scale_keeps_native_grid(tmp_path: Path, fakes: SimpleNamespace) -> None:
    data = np.full((3, 500, 420), 90, dtype=np.uint8)
    data[:, 300:, :] = 0  # nodata rows at the bottom
    src = fakes.geotiff(tmp_path / "g.tif", 500, 420, nodata=0, data=data)
    values = np.array([2.0, -1.0], np.float32)
    result = segment_tiled(
        src,
        fakes.backend(fakes.constant(values)),
        np.zeros((2, 512), np.float32),
        out_dir=tmp_path / "o",
        class_names=["a", "b"],
        palette=default_palette(2),
        gsd_scale=1.7,
        save_probs=True,
        progress=False,
        overlay=False,
    )
    assert any("gsd-scale 1.7" in n for n in result.notes)
    with rasterio.open(src) as a, rasterio.open(result.paths[0]) as m, rasterio.open(result.paths[-1]) as p:
        assert (m.width, m.height) == (420, 500) and m.transform == a.transform and m.crs == a.crs
        mask, probs = m.read(1), p.read()
    assert (mask[:300] == 0).all() and (mask[301:] == 255).all()  # row 300 borders nodata after resampling
    expected = np.rint(255.0 / (1.0 + np.exp(-values.astype(np.float64))))
    np.testing.assert_array_equal(probs[:, :299], np.broadcast_to(expected[:, None, None], (2, 299, 420)))
