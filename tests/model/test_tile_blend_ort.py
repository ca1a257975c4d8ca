"""Tiled mode blended by ONNX Runtime (``tile_blend.onnx`` / ``tile_emit.onnx``) against the numpy reference.

The stand-in image graph of ``test_tile_blend`` is exported to ONNX here, so the ORT blender
(``runtime.onnxruntime_backend.OrtWindowBlender``, IOBinding, strip kept as OrtValues) and the
numpy path (``run_tiled(device_blend=False)``) run the same logits; one test runs the tiny model's
exported folder through ``OnnxRuntimeBackend``.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from test_tile_blend import LabelSpy, MaskedSource, _forward, _image, _reference, _text, assert_same_tiles

from gsnet_deploy.contracts.io_names import IMAGE_INPUTS, LOGITS, TILE_BLEND_FILE, TILE_EMIT_FILE
from gsnet_deploy.export.tile_onnx import export_tile_graphs
from gsnet_deploy.runtime.onnxruntime_backend import OrtWindowBlender
from gsnet_deploy.runtime.ort_session import open_session
from gsnet_deploy.runtime.rows import ArraySink, ArraySource
from gsnet_deploy.runtime.tiled import run_tiled
from gsnet_deploy.runtime.tiling import WINDOW, WindowGrid


class _Forward(torch.nn.Module):
    def forward(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return _forward(images, text)


@pytest.fixture(scope="module")
def ort_graphs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the stand-in image graph and the two tile graphs."""
    folder = tmp_path_factory.mktemp("tile_ort")
    images, text = torch.rand(2, 3, WINDOW, WINDOW) * 255, torch.randn(3, 512)
    axes = {IMAGE_INPUTS[0]: {0: "B"}, IMAGE_INPUTS[1]: {0: "N"}, LOGITS: {0: "B", 1: "N"}}
    torch.onnx.export(
        _Forward(), (images, text), str(folder / "image.onnx"), input_names=list(IMAGE_INPUTS), output_names=[LOGITS],
        dynamic_axes=axes, opset_version=17, dynamo=False,
    )  # fmt: skip
    export_tile_graphs(folder)
    return folder


class _OrtRunner:
    """The stand-in image graph as the numpy path's runner."""

    def __init__(self, session: object) -> None:
        self.session = session

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {LOGITS: self.session.run([LOGITS], dict(feeds))[0]}  # type: ignore[attr-defined]


class OrtStandInBackend:
    """The stand-in image graph on ONNX Runtime (CPU) with the ORT window blender."""

    name = "ort-standin"
    model_digest = "ort-standin"
    max_views: int | None = None
    preferred_views = 3

    def __init__(self, folder: Path) -> None:
        self.sessions = [open_session(folder / name) for name in ("image.onnx", TILE_BLEND_FILE, TILE_EMIT_FILE)]
        self.image = _OrtRunner(self.sessions[0])

    def tile_blender(self, grid: WindowGrid, text_embeds: np.ndarray) -> OrtWindowBlender:
        return OrtWindowBlender(*self.sessions, text_embeds, grid, ("cpu", 0))


def test_tile_graphs_use_only_tensorrt_ops(ort_graphs: Path, trt_supported_ops: frozenset[str]) -> None:
    # catches: a blend written with ScatterND or another op TensorRT's parser lacks
    for name in (TILE_BLEND_FILE, TILE_EMIT_FILE):
        ops = {node.op_type for node in onnx.load(str(ort_graphs / name)).graph.node}
        assert ops <= trt_supported_ops, f"{name}: {sorted(ops - trt_supported_ops)}"


CASES = [  # (height, width, overlap, N, save_probs)
    pytest.param(333, 517, 128, 5, True, id="333x517-N5"),
    pytest.param(333, 517, 0, 5, False, id="333x517-overlap0-labels-only"),
    pytest.param(1, 1, 128, 5, True, id="1x1"),
    pytest.param(700, 300, 128, 40, True, id="narrower-than-window-N40"),
    pytest.param(900, 1000, 128, 1, True, id="900x1000-N1"),
    pytest.param(600, 700, 96, 40, True, id="600x700-overlap96-N40"),
]


@pytest.mark.parametrize(("height", "width", "overlap", "n", "save_probs"), CASES)
def test_ort_blend_matches_numpy_reference(
    ort_graphs: Path, height: int, width: int, overlap: int, n: int, save_probs: bool
) -> None:
    # catches: a wrong ramp, a missing sigmoid, a window placed off by a pixel, a strip shifted wrongly
    rgb, text = _image(height, width), _text(n)
    backend = OrtStandInBackend(ort_graphs)
    ref = _reference(ArraySource(rgb), backend, text, overlap)
    spy = LabelSpy(n, height, width)
    run_tiled(ArraySource(rgb), spy, backend, text, overlap=overlap, progress=False, save_probs=save_probs)
    assert spy.next_row == height and spy.valid.all() and spy.dtypes == {np.dtype(np.uint8)}
    assert_same_tiles(spy.labels, spy.probs if save_probs else None, ref.probs, ref.valid)
    if not save_probs:
        assert np.isnan(spy.probs).all()


@pytest.mark.parametrize("n", [1, 5])
def test_ort_blend_skips_nodata_windows(ort_graphs: Path, n: int) -> None:
    # catches: the source mask ignored on the device, skipped windows leaving stale strip rows
    height, width = 1300, 450
    rgb = _image(height, width, seed=3)
    valid = np.ones((height, width), dtype=bool)
    valid[384:916] = False
    valid[:200, 300:] = False
    text = _text(n, seed=2)
    backend = OrtStandInBackend(ort_graphs)
    ref = _reference(MaskedSource(rgb, valid), backend, text, 128)
    spy = LabelSpy(n, height, width)
    ran, skipped = run_tiled(MaskedSource(rgb, valid), spy, backend, text, progress=False, save_probs=True)
    assert skipped > 0 and ran + skipped == len(WindowGrid(height, width, WINDOW, 128))
    np.testing.assert_array_equal(spy.valid, ref.valid)
    assert_same_tiles(spy.labels, spy.probs, ref.probs, ref.valid)


def test_onnxruntime_backend_blends_tiny_model_on_its_device(tmp_path: Path) -> None:
    # catches: OnnxRuntimeBackend not offering the blender when the folder has the tile graphs, or offering it without
    from gsnet_deploy.runtime.onnxruntime_backend import OnnxRuntimeBackend

    source = Path("/tmp/B_tiny_onnx")
    if not (source / "manifest.json").is_file():
        pytest.skip("no tiny ONNX export at /tmp/B_tiny_onnx (gsnet export onnx --model-size tiny --out /tmp/B_tiny_onnx)")
    folder = tmp_path / "onnx"
    shutil.copytree(source, folder)
    with OnnxRuntimeBackend(folder, providers=["CPUExecutionProvider"]) as backend:
        assert backend.tile_blender is None  # an older folder: the numpy path, with its note
    export_tile_graphs(folder)
    height, width, n = 333, 517, 5
    rgb, text = _image(height, width, seed=7), _text(n, seed=4)
    with OnnxRuntimeBackend(folder, providers=["CPUExecutionProvider"]) as backend:
        assert backend.tile_blender is not None
        ref = _reference(ArraySource(rgb), backend, text, 128)
        spy = LabelSpy(n, height, width)
        notes: list[str] = []
        run_tiled(ArraySource(rgb), spy, backend, text, progress=False, save_probs=True, notes=notes)
    assert notes == []
    assert_same_tiles(spy.labels, spy.probs, ref.probs, ref.valid)


def test_ort_blend_into_a_probability_sink(ort_graphs: Path) -> None:
    # catches: a RowSink that needs probabilities (ArraySink, ScaledSink) not getting them from the ORT blender
    rgb, text = _image(500, 900, seed=5), _text(5)
    backend = OrtStandInBackend(ort_graphs)
    ref = _reference(ArraySource(rgb), backend, text, 128)
    sink = ArraySink(5, 500, 900)
    run_tiled(ArraySource(rgb), sink, backend, text, progress=False)
    np.testing.assert_allclose(sink.probs, ref.probs, rtol=0, atol=1e-6)


def test_host_never_receives_window_arrays_from_ort(ort_graphs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # catches: logits, window probabilities or the strip copied to the host (OrtValue.numpy) without --save-probs
    import onnxruntime

    n, height, width = 6, 800, 900
    rgb, text = _image(height, width), _text(n)
    backend = OrtStandInBackend(ort_graphs)
    crossed: list[tuple[int, ...]] = []
    real_numpy = onnxruntime.OrtValue.numpy

    def spy_numpy(self: object) -> np.ndarray:
        out = real_numpy(self)
        crossed.append(out.shape)
        return out

    def no_host(*args: object, **kwargs: object) -> None:
        raise AssertionError("the device path used the host's image runner")

    monkeypatch.setattr(onnxruntime.OrtValue, "numpy", spy_numpy)
    monkeypatch.setattr(backend.image, "run", no_host)
    spy = LabelSpy(n, height, width)
    run_tiled(ArraySource(rgb), spy, backend, text, progress=False)
    assert crossed, "the spy saw nothing"
    assert all(len(s) == 2 and s[1] == width for s in crossed), sorted(set(crossed))
