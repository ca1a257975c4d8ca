"""The TensorRT backend's own logic on a simulated TensorRT + CUDA (no GPU): chunk padding, shape checks,
one execution context per CUDA graph, capture failure, DLA core.

The simulation keeps what the documented APIs promise: ``set_input_shape`` returns False outside the
profile, ``execute_async_v3`` returns False without valid shapes, memory copies really copy (host and
"device" memory are host arrays), and work enqueued during stream capture runs only when the graph is
launched, reading the shapes of the execution context it was captured on at launch time (a captured
graph is tied to its context's state). The reference outputs are computed directly in float64.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from gsnet_deploy.contracts import io_names
from gsnet_deploy.contracts.engine_manifest import EngineManifest, Graph, HostInfo, Profile, ShapeRange, write_manifest
from gsnet_deploy.contracts.precision import Precision
from gsnet_deploy.errors import BackendError
from gsnet_deploy.runtime import tensorrt_backend as tb

HOST = HostInfo(tensorrt_version="10.3.0", gpu_name="Orin", compute_capability=(8, 7))
HW = 4  # images [B, 3, 2*HW, 2*HW] -> logits [B, N, HW, HW]


class FakeStream:
    def __init__(self) -> None:
        self.capturing = False
        self.work: list = []


class FakeCudart:
    """``cuda.bindings.runtime`` over host memory."""

    cudaError_t = SimpleNamespace(cudaSuccess=0, cudaErrorStreamCaptureInvalidated=901)
    cudaMemcpyKind = SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)
    cudaStreamCaptureMode = SimpleNamespace(cudaStreamCaptureModeThreadLocal=1)

    def __init__(self) -> None:
        self.blocks: dict[int, np.ndarray] = {}
        self.streams: dict[int, FakeStream] = {}
        self.launches = 0
        self.captures = 0

    def _alloc(self, nbytes: int) -> tuple[int, int]:
        block = np.zeros(nbytes, dtype=np.uint8)
        self.blocks[block.ctypes.data] = block
        return 0, block.ctypes.data

    cudaMalloc = _alloc
    cudaMallocHost = _alloc

    def cudaFree(self, ptr: int) -> tuple[int]:
        self.blocks.pop(ptr)
        return (0,)

    cudaFreeHost = cudaFree

    def cudaMemcpyAsync(self, dst: int, src: int, nbytes: int, kind: int, stream: FakeStream) -> tuple[int]:
        assert not stream.capturing
        ctypes.memmove(dst, src, nbytes)
        return (0,)

    def cudaStreamCreate(self) -> tuple[int, FakeStream]:
        stream = FakeStream()
        self.streams[id(stream)] = stream
        return 0, stream

    def cudaStreamDestroy(self, stream: FakeStream) -> tuple[int]:
        return (0,)

    def cudaSetDevice(self, device: int) -> tuple[int]:
        return (0,)

    def cudaStreamSynchronize(self, stream: FakeStream) -> tuple[int]:
        assert not stream.capturing, "synchronizing a stream that is still capturing"
        return (0,)

    def cudaStreamBeginCapture(self, stream: FakeStream, mode: int) -> tuple[int]:
        assert not stream.capturing
        stream.capturing, stream.work = True, []
        self.captures += 1
        return (0,)

    def cudaStreamEndCapture(self, stream: FakeStream) -> tuple[int, Any]:
        stream.capturing = False
        return 0, list(stream.work)

    def cudaGraphInstantiate(self, graph: list, flags: int) -> tuple[int, list]:
        return 0, graph

    def cudaGraphLaunch(self, graph_exec: list, stream: FakeStream) -> tuple[int]:
        self.launches += 1
        for work in graph_exec:
            work()
        return (0,)

    def cudaGraphDestroy(self, graph: Any) -> tuple[int]:
        return (0,)

    cudaGraphExecDestroy = cudaGraphDestroy

    def cudaGetErrorString(self, err: int) -> tuple[int, bytes]:
        return 0, b"fake error"


def _view(address: int, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    count = int(np.prod(shape))
    raw = (ctypes.c_byte * (count * np.dtype(dtype).itemsize)).from_address(address)
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)


def reference_image(images: np.ndarray, embeds: np.ndarray) -> np.ndarray:
    """logits[b, n] = mean(images[b]) + sum(embeds[n]) + pooled pixel pattern, in float64."""
    pooled = images.astype(np.float64).reshape(images.shape[0], 3, HW, 2, HW, 2).mean(axis=(1, 3, 5))  # [B, HW, HW]
    return pooled[:, None] + embeds.astype(np.float64).sum(axis=1)[None, :, None, None]


class FakeContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.fail_capture = False
        engine.contexts.append(self)

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        shape_range = self.engine.profile.shapes[name]
        if len(shape) != len(shape_range.min) or any(
            not lo <= d <= hi for d, lo, hi in zip(shape, shape_range.min, shape_range.max)
        ):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if name in self.engine.profile.shapes:
            return self.shapes.get(name, (-1,))
        return self.engine.output_shape(self.shapes)

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = address
        return True

    def execute_async_v3(self, handle: int) -> bool:
        stream = self.engine.cudart.streams[handle]
        if set(self.shapes) != set(self.engine.profile.shapes):
            return False
        if stream.capturing and self.fail_capture:
            return False

        def work() -> None:  # reads this context's shapes when it runs: a graph is tied to its context
            self.engine.compute(self)

        if stream.capturing:
            stream.work.append(work)
        else:
            work()
        return True


class FakeEngine:
    def __init__(self, graph: Graph, profile: Profile, cudart: FakeCudart) -> None:
        self.graph, self.profile, self.cudart = graph, profile, cudart
        self.contexts: list[FakeContext] = []
        if graph is Graph.IMAGE:
            self.io = [(io_names.IMAGES, "FLOAT", True), (io_names.TEXT_EMBEDS, "FLOAT", True), (io_names.LOGITS, "FLOAT", False)]
        else:
            self.io = [(io_names.TEXT_TOKENS, "INT64", True), (io_names.TEXT_EMBEDS, "FLOAT", False)]
        self.num_io_tensors = len(self.io)

    def get_tensor_name(self, i: int) -> str:
        return self.io[i][0]

    def get_tensor_mode(self, name: str) -> str:
        return "INPUT" if any(n == name and is_in for n, _, is_in in self.io) else "OUTPUT"

    def get_tensor_dtype(self, name: str) -> Any:
        return SimpleNamespace(name=next(d for n, d, _ in self.io if n == name))

    def create_execution_context(self) -> FakeContext:
        return FakeContext(self)

    def output_shape(self, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
        if self.graph is Graph.IMAGE:
            return (shapes[io_names.IMAGES][0], shapes[io_names.TEXT_EMBEDS][0], HW, HW)
        return (shapes[io_names.TEXT_TOKENS][0], 8)

    def compute(self, ctx: FakeContext) -> None:
        if self.graph is Graph.IMAGE:
            images = _view(ctx.addresses[io_names.IMAGES], ctx.shapes[io_names.IMAGES], np.float32)
            embeds = _view(ctx.addresses[io_names.TEXT_EMBEDS], ctx.shapes[io_names.TEXT_EMBEDS], np.float32)
            out = _view(ctx.addresses[io_names.LOGITS], self.output_shape(ctx.shapes), np.float32)
            out[...] = reference_image(images, embeds)
        else:
            tokens = _view(ctx.addresses[io_names.TEXT_TOKENS], ctx.shapes[io_names.TEXT_TOKENS], np.int64)
            out = _view(ctx.addresses[io_names.TEXT_EMBEDS], self.output_shape(ctx.shapes), np.float32)
            out[...] = tokens[:, :8]


class FakeRuntime:
    def __init__(self, engines: dict[bytes, FakeEngine]) -> None:
        self.engines = engines
        self.DLA_core = -1
        self.loaded: list[tuple[Graph, int]] = []

    def deserialize_cuda_engine(self, data: bytes) -> FakeEngine:
        engine = self.engines[data]
        self.loaded.append((engine.graph, self.DLA_core))
        return engine


def _manifest(graph: Graph, shapes: dict[str, ShapeRange], dla_core: int | None) -> EngineManifest:
    return EngineManifest(
        graph=graph, engine_file=graph.engine_file, onnx_file=f"{graph.value}.onnx", precision=Precision.FP16,
        precision_path="test", strongly_typed=False, host=HOST, profiles=(Profile(shapes=shapes),),
        model_digest="d" * 16, dla_core=dla_core,
    )  # fmt: skip


@pytest.fixture
def fake_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """``make(views=(min, opt, max), classes=(min, max), dla_core=None, cuda_graphs=False)`` -> (backend, sim)."""
    cudart = FakeCudart()
    monkeypatch.setattr(tb, "_cuda_runtime", lambda: cudart)
    monkeypatch.setattr(tb.TensorRTBackend, "host_info", lambda self: HOST)
    monkeypatch.setattr(tb, "stream_handle", id)  # the fake streams are found by id

    def make(views=(1, 5, 8), classes=(1, 6), dla_core=None, cuda_graphs=False):
        image_shapes = {
            io_names.IMAGES: ShapeRange(
                (views[0], 3, 2 * HW, 2 * HW), (views[1], 3, 2 * HW, 2 * HW), (views[2], 3, 2 * HW, 2 * HW)
            ),
            io_names.TEXT_EMBEDS: ShapeRange((classes[0], 16), (classes[1], 16), (classes[1], 16)),
        }
        text_shapes = {io_names.TEXT_TOKENS: ShapeRange((1, 77), (6, 77), (16, 77))}
        manifests = {
            Graph.IMAGE: _manifest(Graph.IMAGE, image_shapes, dla_core),
            Graph.TEXT: _manifest(Graph.TEXT, text_shapes, None),
        }
        engines = {}
        for graph, manifest in manifests.items():
            write_manifest(manifest, tmp_path)
            (tmp_path / graph.engine_file).write_bytes(graph.value.encode())
            engines[graph.value.encode()] = FakeEngine(graph, manifest.profiles[0], cudart)
        runtime = FakeRuntime(engines)
        trt = SimpleNamespace(
            Runtime=lambda logger: runtime,
            Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None}),
            TensorIOMode=SimpleNamespace(INPUT="INPUT"),
        )
        monkeypatch.setattr(tb, "_import_tensorrt", lambda: trt)
        backend = tb.TensorRTBackend(tmp_path, cuda_graphs=cuda_graphs)
        return backend, SimpleNamespace(cudart=cudart, runtime=runtime, engines=engines)

    return make


def _feeds(rng: np.random.Generator, views: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    images = rng.uniform(0, 255, size=(views, 3, 2 * HW, 2 * HW)).astype(np.float32)
    embeds = rng.normal(size=(classes, 16)).astype(np.float32)
    return images, embeds


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_fixed_dla_profile_pads_the_last_chunk(fake_backend, rng: np.random.Generator, cuda_graphs: bool) -> None:
    # catches: a last chunk of 1 view sent to an engine whose profile is fixed at 5 (set_input_shape refused,
    # enqueue fails), and padded rows leaking into the outputs
    backend, _ = fake_backend(views=(5, 5, 5), classes=(6, 6), dla_core=0, cuda_graphs=cuda_graphs)
    images, embeds = _feeds(rng, 11, 6)
    with backend:
        logits = backend.image.run({io_names.IMAGES: images, io_names.TEXT_EMBEDS: embeds})[io_names.LOGITS]
    assert logits.shape == (11, 6, HW, HW)
    np.testing.assert_allclose(logits, reference_image(images, embeds), rtol=1e-6, atol=1e-4)


def test_plan_chunks_and_pad_rows() -> None:
    plan = tb.plan_chunks(11, 5, 5)
    assert [(c.start, c.stop, c.size) for c in plan] == [(0, 5, 5), (5, 10, 5), (10, 11, 5)]
    assert [(c.start, c.stop, c.size) for c in tb.plan_chunks(11, 1, 8)] == [(0, 8, 8), (8, 11, 3)]
    x = np.arange(6).reshape(3, 2)
    np.testing.assert_array_equal(tb.pad_rows(x, 5), [[0, 1], [2, 3], [4, 5], [4, 5], [4, 5]])
    with pytest.raises(BackendError):
        tb.plan_chunks(3, 6, 5)


def test_cuda_graphs_get_one_context_per_shape(fake_backend, rng: np.random.Generator) -> None:
    # catches: one context replaying graphs captured at other shapes (the replay of the first shape then
    # computes with the last shape set on the shared context)
    backend, sim = fake_backend(cuda_graphs=True)
    a = _feeds(rng, 3, 6)
    b = _feeds(rng, 5, 2)
    with backend:
        runs = [backend.image.run({io_names.IMAGES: x, io_names.TEXT_EMBEDS: e})[io_names.LOGITS] for x, e in (a, b, a, b, a)]
        image_engine = sim.engines[b"image_graph"]
        assert len(image_engine.contexts) == 3  # the one that sized the buffers + one per shape set
        assert sim.cudart.captures == 2 and sim.cudart.launches == 3
    for (x, e), out in zip((a, b, a, b, a), runs):
        np.testing.assert_allclose(out, reference_image(x, e), rtol=1e-6, atol=1e-4)


def test_failed_capture_ends_the_capture_and_falls_back(fake_backend, rng: np.random.Generator, monkeypatch) -> None:
    # catches: a stream left capturing after a failed capture (every later call fails), and a shape set
    # that keeps retrying capture instead of running plain enqueues
    backend, sim = fake_backend(cuda_graphs=True)
    real_init = FakeContext.__init__

    def failing_init(self, engine) -> None:
        real_init(self, engine)
        self.fail_capture = True

    monkeypatch.setattr(FakeContext, "__init__", failing_init)
    images, embeds = _feeds(rng, 4, 3)
    with backend:
        for _ in range(3):
            out = backend.image.run({io_names.IMAGES: images, io_names.TEXT_EMBEDS: embeds})[io_names.LOGITS]
            np.testing.assert_allclose(out, reference_image(images, embeds), rtol=1e-6, atol=1e-4)
        assert sim.cudart.captures == 1 and sim.cudart.launches == 0
        assert not any(s.capturing for s in sim.cudart.streams.values())


def test_set_input_shape_refusal_is_an_error() -> None:
    # catches: set_input_shape's False ignored (the enqueue then fails with a vaguer message, or runs stale shapes)
    context = SimpleNamespace(set_input_shape=lambda name, shape: shape[0] <= 4)
    tb.set_input_shapes(context, {"x": (4, 2)}, "e.engine")
    with pytest.raises(BackendError, match=r"refused shape \(5, 2\) for input 'x'"):
        tb.set_input_shapes(context, {"x": (5, 2)}, "e.engine")


def test_dla_core_is_set_before_the_engine_is_deserialized(fake_backend) -> None:
    # catches: IRuntime.DLA_core left at -1 when the DLA image engine is deserialized
    backend, sim = fake_backend(views=(5, 5, 5), classes=(6, 6), dla_core=1)
    with backend:
        pass
    assert (Graph.IMAGE, 1) in sim.runtime.loaded


def test_stream_handle_of_a_cuda_python_stream() -> None:
    # catches: a handle read the deprecated way that breaks where int(stream) goes away (cuda-bindings >= 12.9.1)
    cudart = pytest.importorskip("cuda.bindings.runtime")
    assert tb.stream_handle(cudart.cudaStream_t(1234)) == 1234
