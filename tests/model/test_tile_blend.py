"""Tiled mode blended on the torch device (``model.tile_blend``) against the numpy reference.

The reference is ``run_tiled`` with ``device_blend=False``: logits come to the host and are
upsampled (``resize_bilinear``), passed through ``sigmoid`` and merged by ``StripAccumulator``.
The device path runs the same image graph and does all of that in torch. Probabilities must agree
within 1e-6 and class maps wherever the reference's top two classes are more than 2e-6 apart.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Mapping

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gsnet_deploy.contracts.io_names import IMAGES, LOGITS, TEXT_EMBEDS
from gsnet_deploy.model.tile_blend import TorchWindowBlender
from gsnet_deploy.runtime.rows import ArraySink, ArraySource
from gsnet_deploy.runtime.tiled import TILED_FALLBACK_NOTE, run_tiled, tiled_memory
from gsnet_deploy.runtime.tiling import WINDOW, WindowGrid

PROB_TOL = 1e-6


def _forward(images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Image graph stand-in: logits ``[b, N, 96, 96]`` vary in space, with the window's content and with the class."""
    pooled = F.avg_pool2d(images, 4) / 255.0 - 0.5  # [b, 3, 96, 96]
    mixed = torch.einsum("nc,bchw->bnhw", 12.0 * text[:, :3], pooled)  # [b, N, 96, 96]
    return mixed + 6.0 * pooled[:, None, 0] ** 2 * text[None, :, 3, None, None] + 2.0 * text[None, :, 4, None, None]


class _ImageRunner:
    """The stand-in on host arrays (what the numpy path calls)."""

    def __init__(self) -> None:
        self.calls = 0

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        with torch.no_grad():
            logits = _forward(torch.from_numpy(feeds[IMAGES]), torch.from_numpy(feeds[TEXT_EMBEDS]))
        return {LOGITS: logits.numpy()}


class StandInTorchBackend:
    """A backend with the stand-in image graph and the torch window blender (on the CPU)."""

    name = "standin"
    model_digest = "standin"
    max_views: int | None = None

    def __init__(self, preferred_views: int = 3, device: str = "cpu") -> None:
        self.preferred_views = preferred_views
        self.image = _ImageRunner()
        self.device = torch.device(device)

    def tile_blender(self, grid: WindowGrid, text_embeds: np.ndarray) -> TorchWindowBlender:
        return TorchWindowBlender(_forward, torch.from_numpy(text_embeds).to(self.device), grid, self.device)


class LabelSpy:
    """A ``LabelSink`` (and ``RowSink``) keeping what it got: class map, validity, probabilities if any."""

    def __init__(self, num_classes: int, height: int, width: int) -> None:
        self.labels = np.full((height, width), -1, dtype=np.int64)
        self.valid = np.zeros((height, width), dtype=bool)
        self.probs = np.full((num_classes, height, width), np.nan, dtype=np.float32)
        self.shapes: list[tuple[int, ...]] = []
        self.dtypes: set[np.dtype] = set()
        self.next_row = 0

    def write(self, rows: object) -> None:
        raise AssertionError("a label sink must get class-map rows from the device path")

    def write_labels(self, row_off: int, labels: np.ndarray, valid: np.ndarray | None, probs: np.ndarray | None) -> None:
        assert row_off == self.next_row  # top to bottom, each row once
        assert valid is not None
        h = labels.shape[0]
        self.next_row += h
        self.dtypes.add(labels.dtype)
        self.labels[row_off : row_off + h] = labels
        self.valid[row_off : row_off + h] = valid
        for a in (labels, valid) + (() if probs is None else (probs,)):
            self.shapes.append(a.shape)
        if probs is not None:
            self.probs[:, row_off : row_off + h] = probs


class MaskedSource:
    """An in-memory image with a nodata mask (False = nodata)."""

    def __init__(self, rgb: np.ndarray, valid: np.ndarray) -> None:
        self.rgb, self.mask = rgb, valid
        self.height, self.width = rgb.shape[:2]
        self.sample_bytes = 1

    def read(self, row_off: int, row_end: int, col_off: int, col_end: int) -> tuple[np.ndarray, np.ndarray]:
        return self.rgb[row_off:row_end, col_off:col_end], self.mask[row_off:row_end, col_off:col_end]


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    bands = [127 + 110 * np.sin(rng.uniform(0.01, 0.05) * xx + c) * np.cos(rng.uniform(0.01, 0.05) * yy) for c in range(3)]
    noise = rng.normal(0, 8, size=(height, width, 3))
    return np.clip(np.stack(bands, axis=-1) + noise, 0, 255).astype(np.uint8)


def _text(n: int, seed: int = 1) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, 512, generator=gen), dim=-1).numpy()


def _reference(source: object, backend: object, text: np.ndarray, overlap: int) -> ArraySink:
    """The numpy path: probabilities ``[N, H, W]`` and validity."""
    sink = ArraySink(text.shape[0], source.height, source.width)  # type: ignore[attr-defined]
    run_tiled(source, sink, backend, text, overlap=overlap, progress=False, device_blend=False)  # type: ignore[arg-type]
    return sink


def assert_same_tiles(labels: np.ndarray, probs: np.ndarray | None, ref: np.ndarray, valid: np.ndarray) -> None:
    """Probabilities within ``PROB_TOL``; class maps equal away from near-ties of the reference."""
    if probs is not None:
        np.testing.assert_allclose(probs, ref, rtol=0, atol=PROB_TOL)
    want = ref.argmax(axis=0)
    assert (labels[~valid] == 0).all()
    if ref.shape[0] == 1:
        assert (labels == 0).all()
        return
    top2 = np.partition(ref, -2, axis=0)[-2:]  # [2, H, W]
    clear = (top2[1] - top2[0] > 2 * PROB_TOL) & valid
    assert clear.mean() > 0.5 * valid.mean(), "too few pixels away from ties for the comparison to mean anything"
    assert len(np.unique(want[clear])) > 1 or clear.sum() < 50, "one class wins everywhere: the argmax is not tested"
    np.testing.assert_array_equal(labels[clear], want[clear])


CASES = [  # (height, width, overlap, N, save_probs)
    pytest.param(333, 517, 128, 5, True, id="333x517-N5"),
    pytest.param(333, 517, 128, 5, False, id="333x517-N5-labels-only"),
    pytest.param(333, 517, 0, 5, True, id="333x517-overlap0"),
    pytest.param(1, 1, 128, 5, True, id="1x1"),
    pytest.param(700, 300, 128, 40, True, id="narrower-than-window-N40"),
    pytest.param(900, 1000, 128, 1, True, id="900x1000-N1"),
    pytest.param(900, 1000, 0, 5, False, id="900x1000-overlap0-labels-only"),
    pytest.param(600, 700, 96, 40, True, id="600x700-overlap96-N40"),
]


@pytest.mark.parametrize(("height", "width", "overlap", "n", "save_probs"), CASES)
def test_device_blend_matches_numpy_reference(height: int, width: int, overlap: int, n: int, save_probs: bool) -> None:
    # catches: a wrong ramp, a missing sigmoid, a window placed one pixel off, a wrong normalization or argmax
    rgb, text = _image(height, width), _text(n)
    backend = StandInTorchBackend()
    ref = _reference(ArraySource(rgb), backend, text, overlap)
    calls = backend.image.calls
    spy = LabelSpy(n, height, width)
    ran, skipped = run_tiled(ArraySource(rgb), spy, backend, text, overlap=overlap, progress=False, save_probs=save_probs)
    assert backend.image.calls == calls, "the device path ran the image graph through the host runner"
    assert ran == len(WindowGrid(height, width, WINDOW, overlap)) and skipped == 0
    assert spy.next_row == height and spy.valid.all()
    assert spy.dtypes == {np.dtype(np.uint8)}
    assert_same_tiles(spy.labels, spy.probs if save_probs else None, ref.probs, ref.valid)
    if not save_probs:
        assert np.isnan(spy.probs).all()


@pytest.mark.parametrize("n", [1, 5, 40])
def test_device_blend_skips_nodata_windows(n: int) -> None:
    # catches: the device validity strip ignoring the source mask, or skipped windows leaving stale rows
    height, width, overlap = 1300, 450, 128
    rgb = _image(height, width, seed=3)
    valid = np.ones((height, width), dtype=bool)
    valid[384:916] = False  # whole window rows of nodata: skipped
    valid[:200, 300:] = False  # part of a window: blended, masked
    valid[1000:1100, 10:20] = False
    text = _text(n, seed=2)
    backend = StandInTorchBackend(preferred_views=2)
    ref = _reference(MaskedSource(rgb, valid), backend, text, overlap)
    spy = LabelSpy(n, height, width)
    ran, skipped = run_tiled(MaskedSource(rgb, valid), spy, backend, text, overlap=overlap, progress=False, save_probs=True)
    assert skipped > 0 and ran + skipped == len(WindowGrid(height, width, WINDOW, overlap))
    np.testing.assert_array_equal(spy.valid, ref.valid)
    assert not spy.valid[384:916].any() and not spy.valid[:200, 300:].any()
    assert_same_tiles(spy.labels, spy.probs, ref.probs, ref.valid)


def test_device_blend_into_a_probability_sink_matches() -> None:
    # catches: a RowSink that needs probabilities (ArraySink, ScaledSink) getting class maps or nothing
    rgb, text = _image(500, 900, seed=5), _text(5)
    backend = StandInTorchBackend()
    ref = _reference(ArraySource(rgb), backend, text, 128)
    sink = ArraySink(5, 500, 900)
    run_tiled(ArraySource(rgb), sink, backend, text, progress=False)
    np.testing.assert_allclose(sink.probs, ref.probs, rtol=0, atol=PROB_TOL)
    np.testing.assert_array_equal(sink.valid, ref.valid)


def test_more_than_255_classes_give_int32_labels() -> None:
    # catches: labels narrowed to uint8 past 255 classes (class 300 would wrap to 44)
    n = 300
    text = _text(n)
    text[:, 4] = 0.0
    text[299, 4] = 5.0  # class 299 wins everywhere by a wide margin
    spy = LabelSpy(n, 50, 60)
    run_tiled(ArraySource(_image(50, 60)), spy, StandInTorchBackend(), text, progress=False)
    assert spy.dtypes == {np.dtype(np.int32)}
    assert (spy.labels == 299).all()


def test_host_never_receives_window_probabilities(monkeypatch: pytest.MonkeyPatch) -> None:
    # catches: per-window [N, 384, 384] probabilities (or logits, or strip probabilities) copied to the host
    # when probabilities were not asked for: every torch -> numpy conversion is recorded
    n, height, width = 6, 800, 900
    rgb, text = _image(height, width), _text(n)
    crossed: list[tuple[int, ...]] = []
    real_numpy = torch.Tensor.numpy

    def spy_numpy(self: torch.Tensor, *args: object, **kwargs: object) -> np.ndarray:
        crossed.append(tuple(self.shape))
        return real_numpy(self, *args, **kwargs)

    def no_host(*args: object, **kwargs: object) -> None:
        raise AssertionError("the device path used the host's resize or sigmoid")

    monkeypatch.setattr(torch.Tensor, "numpy", spy_numpy)
    monkeypatch.setattr("gsnet_deploy.runtime.tiled.resize_bilinear", no_host)
    monkeypatch.setattr("gsnet_deploy.runtime.tiled.sigmoid", no_host)
    spy = LabelSpy(n, height, width)
    run_tiled(ArraySource(rgb), spy, StandInTorchBackend(), text, progress=False)
    assert crossed, "the spy saw nothing"
    assert all(len(s) == 2 and s[1] == width for s in crossed), sorted(set(crossed))
    assert all(len(s) == 2 for s in spy.shapes)


class HostOnlyBackend:
    """The stand-in image graph without a window blender (an older ONNX folder, TensorRT today)."""

    name = "hostonly"
    model_digest = "hostonly"
    max_views: int | None = None
    preferred_views = 3

    def __init__(self) -> None:
        self.image = _ImageRunner()


def test_backend_without_blender_falls_back_with_a_note() -> None:
    # catches: a backend without tile_blender failing, or falling back silently
    backend = HostOnlyBackend()
    notes: list[str] = []
    sink = ArraySink(3, 100, 120)
    run_tiled(ArraySource(_image(100, 120)), sink, backend, _text(3), progress=False, notes=notes)
    assert notes == [TILED_FALLBACK_NOTE.format(name="hostonly")]
    assert sink.valid.all()
    notes.clear()
    run_tiled(ArraySource(_image(100, 120)), sink, StandInTorchBackend(), _text(3), progress=False, notes=notes)
    assert notes == []


def test_device_blend_host_memory_stays_in_the_host_estimate() -> None:
    # catches: host buffers that still grow with N x 384 x 384 per window when the device blends
    n, height, width = 40, 800, 1500
    host_n1 = tiled_memory(width, 1, 3, 2, 1, device_blend=True, with_probs=False).host
    estimate = tiled_memory(width, n, 3, 2, 1, device_blend=True, with_probs=False)
    numpy_path = tiled_memory(width, n, 3, 2, 1)
    assert estimate.host == host_n1, "without probabilities the host part must not grow with N"
    assert estimate.host < numpy_path.host and estimate.device > 0
    rgb, text = _image(height, width), _text(n)
    backend = StandInTorchBackend()
    spy = LabelSpy(1, height, width)
    spy.probs = np.zeros((1, 1, 1), np.float32)  # the spy's own buffers stay small
    tracemalloc.start()  # numpy buffers are traced, torch's are not: this is the host part
    try:
        run_tiled(ArraySource(rgb), spy, backend, text, progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < estimate.host, f"host peak {peak / 2**20:.1f} MiB over the estimate {estimate.host / 2**20:.1f} MiB"
    assert peak < n * WINDOW * WINDOW * 4, "the host held a window's probabilities"


def test_tiny_torch_backend_tiles_on_device(tiny_gsnet) -> None:
    # catches: TorchBackend.tile_blender wired to another graph, device or dtype than its image runner
    from gsnet_deploy.model.torch_backend import TorchBackend

    height, width, n = 333, 517, 5
    rgb, text = _image(height, width, seed=7), _text(n, seed=4)
    with TorchBackend(tiny_gsnet, device="cpu") as backend:
        ref = _reference(ArraySource(rgb), backend, text, 128)
        spy = LabelSpy(n, height, width)
        run_tiled(ArraySource(rgb), spy, backend, text, progress=False, save_probs=True)
    assert_same_tiles(spy.labels, spy.probs, ref.probs, ref.valid)


def test_blender_strip_lives_on_its_device() -> None:
    # catches: strip buffers allocated on the host (they would cross every emit)
    blender = TorchWindowBlender(_forward, torch.from_numpy(_text(4)), WindowGrid(500, 700), torch.device("meta"))
    assert blender._acc.shape == (4, 384, 700) and blender._wsum.shape == blender._valid.shape == (384, 700)
    assert {t.device.type for t in (blender._acc, blender._wsum, blender._valid, blender.weights)} == {"meta"}


def _geotiff(path, rgb: np.ndarray, nodata: int) -> None:
    import rasterio
    from affine import Affine

    height, width = rgb.shape[:2]
    profile = {
        "driver": "GTiff", "height": height, "width": width, "count": 3, "dtype": "uint8", "crs": "EPSG:32633",
        "transform": Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 5400000.0), "nodata": nodata,
    }  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(rgb.transpose(2, 0, 1))


@pytest.mark.parametrize("save_probs", [False, True])
def test_segment_raster_on_device_writes_what_numpy_writes(tmp_path, save_probs: bool) -> None:
    # catches: the GeoTIFF sink fed class-map rows wrongly (nodata, row offsets, probabilities when saved)
    import rasterio

    from gsnet_deploy.runtime.palette import default_palette
    from gsnet_deploy.runtime.segment import segment_raster

    n, height, width = 5, 600, 700
    rgb = _image(height, width, seed=11)
    rgb[:150, :200] = 0  # nodata corner (all bands 0)
    _geotiff(tmp_path / "in.tif", rgb, nodata=0)
    names, palette = [f"c{i}" for i in range(n)], default_palette(n)
    out: dict[str, list[np.ndarray]] = {}
    notes: dict[str, list[str]] = {}
    for name, backend in (("numpy", HostOnlyBackend()), ("device", StandInTorchBackend())):
        result = segment_raster(
            tmp_path / "in.tif", backend, _text(n), out_dir=tmp_path / name, class_names=names, palette=palette,  # type: ignore[arg-type]
            save_probs=save_probs, overlay=False, progress=False,
        )  # fmt: skip
        notes[name] = result.notes
        out[name] = []
        for path in result.paths:
            with rasterio.open(path) as ds:
                out[name].append(ds.read())
    assert any("numpy" in note for note in notes["numpy"]) and not any("numpy" in note for note in notes["device"])
    assert len(out["device"]) == len(out["numpy"]) == (2 if save_probs else 1)
    mask_ref, mask_dev = out["numpy"][0][0], out["device"][0][0]
    assert (mask_ref[:150, :200] == mask_dev[:150, :200]).all() and mask_ref[0, 0] not in range(n)  # nodata value
    assert (mask_ref != mask_dev).mean() < 1e-3  # near-ties only
    assert len(np.unique(mask_ref)) > 2
    if save_probs:
        assert np.abs(out["numpy"][1].astype(int) - out["device"][1].astype(int)).max() <= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("n", [5, 40])
def test_cuda_blend_matches_numpy_reference(n: int) -> None:
    # catches: device-only differences (TF32 matmuls, argmax order, strip shifts on the GPU)
    height, width = 700, 900
    rgb, text = _image(height, width, seed=9), _text(n)
    ref = _reference(ArraySource(rgb), StandInTorchBackend(), text, 128)
    spy = LabelSpy(n, height, width)
    run_tiled(ArraySource(rgb), spy, StandInTorchBackend(device="cuda"), text, progress=False, save_probs=True)
    assert_same_tiles(spy.labels, spy.probs, ref.probs, ref.valid)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tiny_torch_backend_tiles_on_cuda_with_graphs(tiny_gsnet) -> None:
    # catches: the CUDA-graph image runner's output buffer overwritten before the blender used it
    from gsnet_deploy.model.torch_backend import TorchBackend

    height, width, n = 500, 900, 5
    rgb, text = _image(height, width, seed=7), _text(n, seed=4)
    with TorchBackend(tiny_gsnet, device="cpu") as backend:
        ref = _reference(ArraySource(rgb), backend, text, 128)
    spy = LabelSpy(n, height, width)
    try:
        with TorchBackend(tiny_gsnet, device="cuda", cuda_graphs=True) as backend:
            run_tiled(ArraySource(rgb), spy, backend, text, progress=False, save_probs=True)
    finally:
        tiny_gsnet.to("cpu")  # the session's model stays on the CPU for the other tests
    np.testing.assert_allclose(spy.probs, ref.probs, rtol=0, atol=1e-4)  # the graph itself differs CPU vs GPU
