"""Tiled mode blended by the TensorRT backend (``tile_blend.engine`` / ``tile_emit.engine``) on a simulated TensorRT.

No GPU and no TensorRT here: the simulation of ``tests/runtime/test_tensorrt_backend.py`` (host
memory standing in for device memory, every access checked to lie inside one allocation of the
right kind) runs the *real* exported tile graphs with ONNX Runtime when an engine executes, and the
image engine runs the stand-in image graph of ``test_tile_blend``. What is under test is the
backend's wiring: the strip's two buffer pairs used in turn (an output aliasing its input fails),
the logits bound device to device, ``place`` / ``count`` staged as host shape tensors within the
profile's value ranges, one staging slot per view of a batch, what crosses to the host, buffers
freed. The reference is the numpy path (``run_tiled(device_blend=False)``) on the same backend.
"""

from __future__ import annotations

import ctypes
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from test_tile_blend import LabelSpy, MaskedSource, _forward, _image, _reference, _text, assert_same_tiles

from gsnet_deploy.contracts import io_names
from gsnet_deploy.contracts.engine_manifest import Graph, Profile, ShapeRange, write_manifest
from gsnet_deploy.errors import DeviceBlendUnavailable
from gsnet_deploy.export.profiles import TILE_SHAPE_INPUTS, onnx_input_shapes, profile_for, tile_dim_ranges
from gsnet_deploy.export.tile_onnx import export_tile_graphs
from gsnet_deploy.runtime import tensorrt_backend as tb
from gsnet_deploy.runtime.ort_session import open_session
from gsnet_deploy.runtime.rows import ArraySink, ArraySource
from gsnet_deploy.runtime.tiled import run_tiled
from gsnet_deploy.runtime.tiling import WINDOW
from tests.runtime.test_tensorrt_backend import (
    HOST,
    FakeContext,
    FakeEngine,
    FakeRuntime,
    PaperContext,
    PaperCudart,
    _manifest,
    _view,
    sized_tensorrt,
)

H2D, D2H = 1, 2  # FakeCudart's cudaMemcpyKind values
HOST_INPUTS = {io_names.TILE_PLACE, io_names.TILE_COUNT}  # shape tensors: TensorRT places them in host memory
DTYPES = {io_names.TILE_PLACE: np.int64, io_names.TILE_COUNT: np.int64, io_names.TILE_LABELS: np.int32}
CLASSES_MAX = 64


class TileCudart(PaperCudart):
    """The paper simulation, asynchronous: copies, memsets and engine work queue on the stream and run, in
    order, at ``cudaStreamSynchronize`` (or ``cudaFree``, which synchronizes), as on a GPU. Host memory that
    the caller rewrites before synchronizing is read with its new contents, so a staging race shows."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[Any] = []

    def cudaMemcpyAsync(self, dst: int, src: int, nbytes: int, kind: int, stream: Any) -> tuple[int]:
        self.copies.append((kind, nbytes))
        self.pending.append(lambda: ctypes.memmove(dst, src, nbytes))
        return (0,)

    def cudaMemsetAsync(self, ptr: int, value: int, nbytes: int, stream: Any) -> tuple[int]:
        self.inside(ptr, nbytes, "device")
        self.pending.append(lambda: ctypes.memset(ptr, value, nbytes))
        return (0,)

    def drain(self) -> None:
        while self.pending:
            self.pending.pop(0)()

    def cudaStreamSynchronize(self, stream: Any) -> tuple[int]:
        self.drain()
        return (0,)

    def cudaFree(self, ptr: int) -> tuple[int]:
        self.drain()
        return super().cudaFree(ptr)

    cudaFreeHost = cudaFree


class DeferredContext(FakeContext):
    """``FakeContext`` whose work runs when the stream is synchronized, with the shapes and addresses of its enqueue."""

    def execute_async_v3(self, handle: int) -> bool:
        if set(self.shapes) != set(self.engine.profile.shapes):
            return False
        snapshot = SimpleNamespace(shapes=dict(self.shapes), addresses=dict(self.addresses))
        self.engine.cudart.pending.append(lambda: self.engine.compute(snapshot))
        return True


class ImageEngine(FakeEngine):
    """The image engine running the stand-in image graph: views [B, 3, 384, 384] -> logits [B, N, 96, 96]."""

    def create_execution_context(self) -> DeferredContext:
        return DeferredContext(self)

    def output_shape(self, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
        return (shapes[io_names.IMAGES][0], shapes[io_names.TEXT_EMBEDS][0], WINDOW // 4, WINDOW // 4)

    def compute(self, ctx: Any) -> None:
        images = _view(ctx.addresses[io_names.IMAGES], ctx.shapes[io_names.IMAGES], np.float32)
        embeds = _view(ctx.addresses[io_names.TEXT_EMBEDS], ctx.shapes[io_names.TEXT_EMBEDS], np.float32)
        out = _view(ctx.addresses[io_names.LOGITS], self.output_shape(ctx.shapes), np.float32)
        with torch.no_grad():
            out[...] = _forward(torch.from_numpy(images.copy()), torch.from_numpy(embeds.copy())).numpy()


class TileContext(PaperContext):
    """An execution context of a tile engine: shapes and value ranges checked as TensorRT does, ONNX Runtime computes."""

    def values(self, name: str) -> np.ndarray | None:
        """A shape tensor's values, read from host memory (None: unset or outside the profile's value range)."""
        if name not in self.addresses or name not in self.shapes:
            return None
        count = int(np.prod(self.shapes[name]))
        self.engine.cudart.inside(self.addresses[name], 8 * count, "host")
        values = _view(self.addresses[name], (count,), np.int64).copy()
        r = self.engine.profile.values[name]
        ok = all(lo <= v <= hi for v, lo, hi in zip(values, r.min, r.max))
        return values if ok else None

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if name in self.engine.profile.shapes:
            return self.shapes.get(name, (-1,))
        acc, valid = self.shapes.get(io_names.TILE_ACC), self.shapes.get(io_names.TILE_VALID)
        if acc is None or valid is None:
            return (-1, -1, -1)
        if name == io_names.TILE_ACC_OUT:
            return acc
        if name == io_names.TILE_VALID_OUT:
            return valid
        count = self.values(io_names.TILE_COUNT)
        if count is None:
            return (-1, -1)
        c = int(count[0])
        return (acc[0] - 1, c, acc[2]) if name == io_names.PROBS else (c, acc[2])

    def update_device_memory_size_for_shapes(self) -> int:
        return 4096

    def execute_async_v3(self, handle: int) -> bool:
        engine = self.engine
        if set(self.shapes) != set(engine.profile.shapes):
            return False
        if self.strategy == "USER_MANAGED":
            assert self.device_memory is not None and self.device_memory[1] >= self.update_device_memory_size_for_shapes()
        if any(name in HOST_INPUTS and self.values(name) is None for name in engine.inputs):
            return False  # TensorRT refuses shape-tensor values outside the profile
        enqueued = TileContext(engine, self.strategy)
        enqueued.shapes, enqueued.addresses = dict(self.shapes), dict(self.addresses)
        engine.cudart.pending.append(enqueued.compute)  # runs when the stream is synchronized
        return True

    def compute(self) -> None:
        """The engine's work on the stream: reads its inputs (host shape tensors too) when it runs."""
        engine = self.engine
        feeds: dict[str, np.ndarray] = {}
        spans = []
        for name in engine.inputs:
            if name in HOST_INPUTS:
                values = self.values(name)
                assert values is not None, f"{name} rewritten out of range before the stream ran"
                feeds[name] = values
                continue
            dtype = DTYPES.get(name, np.float32)
            nbytes = int(np.prod(self.shapes[name])) * np.dtype(dtype).itemsize
            engine.cudart.inside(self.addresses[name], nbytes, "device")
            feeds[name] = _view(self.addresses[name], self.shapes[name], dtype).copy()
            spans.append((self.addresses[name], nbytes))
        results = engine.session.run(list(engine.outputs), feeds)
        for name, value in zip(engine.outputs, results):
            value = np.ascontiguousarray(value, dtype=DTYPES.get(name, np.float32))
            start = self.addresses[name]
            engine.cudart.inside(start, value.nbytes, "device")
            for s, n in spans:  # TensorRT does not promise that an output may alias an input
                assert start + value.nbytes <= s or s + n <= start, f"{name} overlaps an input of {engine.graph.value}"
            _view(start, value.shape, value.dtype)[...] = value
        engine.executions += 1


class TileEngine:
    def __init__(self, graph: Graph, profile: Profile, cudart: TileCudart, onnx_path: Path) -> None:
        self.graph, self.profile, self.cudart = graph, profile, cudart
        self.session = open_session(onnx_path)
        blend = graph is Graph.TILE_BLEND
        self.inputs = io_names.TILE_BLEND_INPUTS if blend else io_names.TILE_EMIT_INPUTS
        self.outputs = io_names.TILE_BLEND_OUTPUTS if blend else io_names.TILE_EMIT_OUTPUTS
        self.io = [(n, "INT64" if n in HOST_INPUTS else "FLOAT", True) for n in self.inputs] + [
            (n, "INT32" if n == io_names.TILE_LABELS else "FLOAT", False) for n in self.outputs
        ]
        self.num_io_tensors = len(self.io)
        self.executions = 0

    get_tensor_name = FakeEngine.get_tensor_name
    get_tensor_mode = FakeEngine.get_tensor_mode
    get_tensor_dtype = FakeEngine.get_tensor_dtype

    def get_tensor_location(self, name: str) -> str:
        return "HOST" if name in HOST_INPUTS else "DEVICE"

    def create_execution_context(self, strategy: Any = "STATIC") -> TileContext:
        return TileContext(self, strategy)


@pytest.fixture(scope="module")
def tile_graphs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tile_trt")
    export_tile_graphs(folder)
    return folder


@pytest.fixture
def trt_tiles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tile_graphs: Path):
    """``make(tiles=True, width_max=None, logits="FLOAT", views=(1, 3, 8))`` -> (TensorRTBackend, simulation)."""
    cudart = TileCudart()
    monkeypatch.setattr(tb, "_cuda_runtime", lambda: cudart)
    monkeypatch.setattr(tb.TensorRTBackend, "host_info", lambda self: HOST)
    monkeypatch.setattr(tb, "stream_handle", id)

    def make(tiles: bool = True, width_max: int | None = None, logits: str = "FLOAT", views=(1, 3, 8)):
        side = (3, WINDOW, WINDOW)
        image_shapes = {
            io_names.IMAGES: ShapeRange((views[0], *side), (views[1], *side), (views[2], *side)),
            io_names.TEXT_EMBEDS: ShapeRange((1, 512), (5, 512), (CLASSES_MAX, 512)),
        }
        text_shapes = {io_names.TEXT_TOKENS: ShapeRange((1, 77), (6, 77), (16, 77))}
        manifests = {
            Graph.IMAGE: _manifest(Graph.IMAGE, image_shapes, None),
            Graph.TEXT: _manifest(Graph.TEXT, text_shapes, None),
        }
        if tiles:
            for graph in (Graph.TILE_BLEND, Graph.TILE_EMIT):
                # the production profile (export.profiles), optionally narrower
                profile = profile_for(onnx_input_shapes(tile_graphs / graph.onnx_file), tile_dim_ranges(5), TILE_SHAPE_INPUTS)
                if width_max is not None:
                    narrow = {
                        name: replace(r, opt=(*r.opt[:-1], min(r.opt[-1], width_max)), max=(*r.max[:-1], width_max))
                        for name, r in profile.shapes.items()
                        if name in (io_names.TILE_ACC, io_names.TILE_VALID)
                    }
                    shapes = {**profile.shapes, **narrow}
                    profile = replace(profile, shapes=shapes)
                manifests[graph] = replace(_manifest(graph, dict(profile.shapes), None), profiles=(profile,))
        folder = tmp_path / f"engines{len(list(tmp_path.iterdir()))}"  # one folder per build
        folder.mkdir()
        engines: dict[bytes, Any] = {}
        for graph, manifest in manifests.items():
            write_manifest(manifest, folder)
            (folder / graph.engine_file).write_bytes(graph.value.encode())
            if graph is Graph.IMAGE:
                engine = ImageEngine(graph, manifest.profiles[0], cudart)
                engine.io = [(n, logits if n == io_names.LOGITS else d, i) for n, d, i in engine.io]
            elif graph is Graph.TEXT:
                engine = FakeEngine(graph, manifest.profiles[0], cudart)
            else:
                engine = TileEngine(graph, manifest.profiles[0], cudart, tile_graphs / graph.onnx_file)
            engines[graph.value.encode()] = engine
        monkeypatch.setattr(tb, "_import_tensorrt", lambda: sized_tensorrt(FakeRuntime(engines)))
        sim = SimpleNamespace(cudart=cudart, engines={g: engines[g.value.encode()] for g in manifests})
        return tb.TensorRTBackend(folder), sim

    return make


CASES = [  # (height, width, overlap, N, save_probs)
    pytest.param(333, 517, 128, 5, True, id="333x517-N5"),
    pytest.param(333, 517, 0, 5, False, id="333x517-overlap0-labels-only"),
    pytest.param(1, 1, 128, 5, True, id="1x1"),
    pytest.param(700, 300, 128, 40, True, id="narrower-than-window-N40"),
    pytest.param(900, 1000, 96, 1, True, id="900x1000-overlap96-N1"),
]


@pytest.mark.parametrize(("height", "width", "overlap", "n", "save_probs"), CASES)
def test_trt_blend_matches_numpy_reference(trt_tiles, height: int, width: int, overlap: int, n: int, save_probs: bool) -> None:
    # catches: the strip read and written in one buffer (an aliased output), the wrong buffer of the pair read
    # after a call, logits of another view bound, place values staged wrongly, a count outside the profile
    backend, sim = trt_tiles()
    rgb, text = _image(height, width), _text(n)
    with backend:
        ref = _reference(ArraySource(rgb), backend, text, overlap)  # the numpy path on the same image engine
        spy = LabelSpy(n, height, width)
        notes: list[str] = []
        run_tiled(ArraySource(rgb), spy, backend, text, overlap=overlap, progress=False, save_probs=save_probs, notes=notes)
    assert notes == [] and sim.engines[Graph.TILE_BLEND].executions > 0
    assert spy.next_row == height and spy.valid.all() and spy.dtypes == {np.dtype(np.uint8)}
    assert_same_tiles(spy.labels, spy.probs if save_probs else None, ref.probs, ref.valid)


def test_trt_blend_skips_nodata_windows(trt_tiles) -> None:
    # catches: partial windows' validity ignored or staged into a slot that a later window of the batch
    # overwrites before the device read it, skipped windows leaving stale strip rows
    height, width, n = 1300, 450, 5
    rgb = _image(height, width, seed=3)
    valid = np.ones((height, width), dtype=bool)
    valid[384:916] = False
    valid[:200, 300:] = False
    valid[1000:1100, :100] = False
    text = _text(n, seed=2)
    backend, _ = trt_tiles()
    with backend:
        ref = _reference(MaskedSource(rgb, valid), backend, text, 128)
        spy = LabelSpy(n, height, width)
        ran, skipped = run_tiled(MaskedSource(rgb, valid), spy, backend, text, progress=False, save_probs=True)
    assert skipped > 0 and ran > 0
    np.testing.assert_array_equal(spy.valid, ref.valid)
    assert_same_tiles(spy.labels, spy.probs, ref.probs, ref.valid)


@pytest.mark.parametrize("save_probs", [False, True])
def test_only_class_map_rows_cross_to_the_host(trt_tiles, save_probs: bool) -> None:
    # catches: logits or window probabilities copied back per window, probabilities copied when not asked for
    height, width, n = 500, 700, 5
    backend, sim = trt_tiles()
    rgb, text = _image(height, width), _text(n)
    with backend:
        sim.cudart.copies.clear()
        run_tiled(ArraySource(rgb), LabelSpy(n, height, width), backend, text, progress=False, save_probs=save_probs)
    back = sum(nbytes for kind, nbytes in sim.cudart.copies if kind == D2H)
    per_pixel = 4 + 4 + (4 * n if save_probs else 0)  # int32 labels, float validity, probabilities when asked
    assert back == per_pixel * height * width


def test_strip_and_staging_freed_after_each_image(trt_tiles) -> None:
    # catches: a blender never closed (each image's strips and staging kept until the backend exits); the
    # runners' own buffers grow only, so a second identical image allocates nothing that stays
    backend, sim = trt_tiles()
    held = []
    with backend:
        for _ in range(2):
            run_tiled(ArraySource(_image(400, 900)), LabelSpy(3, 400, 900), backend, _text(3), progress=False)
            held.append(len(sim.cudart.blocks))
    assert held[0] == held[1]
    assert not sim.cudart.blocks  # and the backend frees the rest on exit


def test_wider_than_the_engines_blends_on_the_host_with_a_note(trt_tiles) -> None:
    # catches: a run that fails (or overruns the engine's profile) on a raster wider than the tile engines take
    backend, sim = trt_tiles(width_max=600)
    rgb, text = _image(300, 700), _text(4)
    with backend:
        ref = _reference(ArraySource(rgb), backend, text, 128)
        sink = ArraySink(4, 300, 700)
        notes: list[str] = []
        run_tiled(ArraySource(rgb), sink, backend, text, progress=False, notes=notes)
        with pytest.raises(DeviceBlendUnavailable, match="700 px wide"):
            run_tiled(ArraySource(rgb), LabelSpy(4, 300, 700), backend, text, progress=False, device_blend=True)
    assert len(notes) == 1 and "wider than the TensorRT tile engines take (600 px)" in notes[0]
    assert sim.engines[Graph.TILE_BLEND].executions == 0
    np.testing.assert_array_equal(sink.probs, ref.probs)  # the numpy path, as the reference


def test_fp16_logits_or_no_tile_engines_fall_back(trt_tiles) -> None:
    # catches: FP16 logits bound to a blend engine that reads FP32 (garbage), engines built before the tile graphs
    backend, _ = trt_tiles(logits="HALF")
    with backend, pytest.raises(DeviceBlendUnavailable, match="float16 logits"):
        backend.tile_blender(tb.WindowGrid(100, 100, WINDOW, 128), _text(2))
    backend, _ = trt_tiles(tiles=False)
    with backend:
        assert backend.tile_blender is None


@pytest.mark.parametrize("graph", [Graph.TILE_EMIT, Graph.PAPER_HEAD])
def test_half_an_engine_pair_is_refused_in_one_line(trt_tiles, graph: Graph) -> None:
    # catches: a build folder holding one engine of a pair (a copy cut short) opened as if the pair were absent,
    # or failing later with a KeyError; a folder without either engine of the pair still opens
    from gsnet_deploy.contracts.engine_manifest import manifest_path
    from gsnet_deploy.errors import EngineBuildError

    backend, _ = trt_tiles()
    folder = backend.engine_dir
    if graph is Graph.PAPER_HEAD:  # the simulation builds no paper engines: add the encoder's manifest alone
        write_manifest(replace(backend.manifests[Graph.IMAGE], graph=Graph.PAPER_ENCODER,
                               engine_file=Graph.PAPER_ENCODER.engine_file), folder)  # fmt: skip
    else:
        manifest_path(folder / graph.engine_file).unlink()
    with pytest.raises(EngineBuildError, match=f"no {graph.engine_file} beside the other"):
        tb.TensorRTBackend(folder)
