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
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from gsnet_deploy.contracts import io_names
from gsnet_deploy.contracts.engine_manifest import EngineManifest, Graph, HostInfo, Profile, ShapeRange, write_manifest
from gsnet_deploy.contracts.precision import Precision
from gsnet_deploy.errors import BackendError, EngineBuildError
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


# ---- the paper protocol engines (encoder + head) on the simulation ----
#
# The simulated encoder maps an image to small static features; the simulated head reads the features,
# the text embeddings and the out_size shape tensor *from host memory* (as TensorRT reads shape tensors)
# and writes probs [N, H, W] and the class map [H, W]. Every kernel checks that each address it touches
# lies inside one allocation of the matching kind (device or pinned host), so an undersized or wrongly
# placed buffer fails the test instead of corrupting memory.

FEATURE_SHAPES = {name: (5, 2 + i, 3, 3) for i, name in enumerate(io_names.PAPER_FEATURES)}
PAPER_OUT_MAX = (64, 80)


def reference_features(image: np.ndarray) -> dict[str, np.ndarray]:
    """features[k][v, c, i, j] = mean(image) * (k + 1) + v - c + 0.1 * (i + j), in float64."""
    mean = float(image.astype(np.float64).mean())
    out = {}
    for k, (name, shape) in enumerate(FEATURE_SHAPES.items()):
        v, c, i, j = np.indices(shape, dtype=np.float64)
        out[name] = mean * (k + 1) + v - c + 0.1 * (i + j)
    return out


def reference_head(features: dict[str, np.ndarray], embeds: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """probs[n, y, x] = sin(sum of features + 3 * embeds[n, 0] + 0.37 y - 0.21 x + n), in float64."""
    total = sum(float(f.astype(np.float64).sum()) for f in features.values())
    n, y, x = np.indices((embeds.shape[0], *size), dtype=np.float64)
    return np.sin(total * 1e-3 + 3.0 * embeds.astype(np.float64)[:, 0][:, None, None] + 0.37 * y - 0.21 * x + n)


class PaperCudart(FakeCudart):
    """FakeCudart that knows which allocations are device and which pinned host, and logs copies."""

    def __init__(self) -> None:
        super().__init__()
        self.kinds: dict[int, str] = {}
        self.copies: list[tuple[int, int]] = []  # (kind, nbytes)
        self.mallocs = 0

    def cudaMalloc(self, nbytes: int) -> tuple[int, int]:
        err, ptr = self._alloc(nbytes)
        self.kinds[ptr] = "device"
        self.mallocs += 1
        return err, ptr

    def cudaMallocHost(self, nbytes: int) -> tuple[int, int]:
        err, ptr = self._alloc(nbytes)
        self.kinds[ptr] = "host"
        return err, ptr

    def cudaFree(self, ptr: int) -> tuple[int]:
        self.kinds.pop(ptr, None)
        return super().cudaFree(ptr)

    cudaFreeHost = cudaFree

    def cudaMemcpyAsync(self, dst: int, src: int, nbytes: int, kind: int, stream: FakeStream) -> tuple[int]:
        self.copies.append((kind, nbytes))
        return super().cudaMemcpyAsync(dst, src, nbytes, kind, stream)

    def inside(self, address: int, nbytes: int, kind: str) -> None:
        for start, block in self.blocks.items():
            if start <= address and address + nbytes <= start + block.nbytes:
                assert self.kinds[start] == kind, f"{kind} data at a {self.kinds[start]} address"
                return
        raise AssertionError(f"{nbytes} bytes at {address:#x} lie outside every allocation")


class PaperContext:
    def __init__(self, engine: PaperEngine, strategy: Any) -> None:
        self.engine, self.strategy = engine, strategy
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.device_memory: tuple[int, int] | None = None
        self.executions = 0

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        r = self.engine.profile.shapes[name]
        if len(shape) != len(r.min) or any(not lo <= d <= hi for d, lo, hi in zip(shape, r.min, r.max)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = address
        return True

    def out_size(self) -> tuple[int, int] | None:
        """The out_size values, read from host memory as TensorRT does (None: unset or outside the profile)."""
        if io_names.OUT_SIZE not in self.addresses:
            return None
        self.engine.cudart.inside(self.addresses[io_names.OUT_SIZE], 16, "host")
        h, w = (int(v) for v in _view(self.addresses[io_names.OUT_SIZE], (2,), np.int64))
        r = self.engine.profile.values[io_names.OUT_SIZE]
        return (h, w) if r.min[0] <= h <= r.max[0] and r.min[1] <= w <= r.max[1] else None

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if name in self.engine.profile.shapes:
            return self.shapes.get(name, (-1,))
        if self.engine.graph is Graph.PAPER_ENCODER:
            return FEATURE_SHAPES[name]
        size = self.out_size()
        if size is None or io_names.TEXT_EMBEDS not in self.shapes:
            return (-1, -1) if name == io_names.CLASS_MAP else (-1, -1, -1)
        return size if name == io_names.CLASS_MAP else (self.shapes[io_names.TEXT_EMBEDS][0], *size)

    def update_device_memory_size_for_shapes(self) -> int:
        n = self.shapes[io_names.TEXT_EMBEDS][0]
        h, w = self.out_size() or (0, 0)
        return 4 * n * h * w + 256

    def set_device_memory(self, address: int, size: int) -> None:
        self.device_memory = (address, size)

    def _read(self, name: str, dtype: Any) -> np.ndarray:
        shape = self.shapes[name]
        self.engine.cudart.inside(self.addresses[name], int(np.prod(shape)) * np.dtype(dtype).itemsize, "device")
        return _view(self.addresses[name], shape, dtype)

    def _write(self, name: str, value: np.ndarray) -> None:
        self.engine.cudart.inside(self.addresses[name], value.nbytes, "device")
        _view(self.addresses[name], value.shape, value.dtype)[...] = value

    def execute_async_v3(self, handle: int) -> bool:
        if set(self.shapes) != set(self.engine.profile.shapes):
            return False
        self.executions += 1
        if self.engine.graph is Graph.PAPER_ENCODER:
            for name, value in reference_features(self._read(io_names.PAPER_IMAGE, np.uint8)).items():
                self._write(name, value.astype(np.float32))
            return True
        size = self.out_size()
        if size is None:
            return False
        if self.strategy == "USER_MANAGED":
            needed = self.update_device_memory_size_for_shapes()
            assert self.device_memory is not None and self.device_memory[1] >= needed
            self.engine.cudart.inside(self.device_memory[0], needed, "device")
        features = {name: self._read(name, np.float32) for name in io_names.PAPER_FEATURES}
        probs = reference_head(features, self._read(io_names.TEXT_EMBEDS, np.float32), size).astype(np.float32)
        self._write(io_names.PROBS, probs)
        self._write(io_names.CLASS_MAP, np.argmax(probs, axis=0).astype(np.int32))
        return True


class PaperEngine:
    def __init__(self, graph: Graph, profile: Profile, cudart: PaperCudart, legacy_memory_api: bool = False) -> None:
        self.graph, self.profile, self.cudart = graph, profile, cudart
        self.legacy_memory_api = legacy_memory_api
        self.contexts: list[PaperContext] = []
        features = [(name, "FLOAT", graph is Graph.PAPER_HEAD) for name in io_names.PAPER_FEATURES]
        if graph is Graph.PAPER_ENCODER:
            self.io = [(io_names.PAPER_IMAGE, "UINT8", True), *features]
        else:
            self.io = [
                *features, (io_names.TEXT_EMBEDS, "FLOAT", True), (io_names.OUT_SIZE, "INT64", True),
                (io_names.CLASS_MAP, "INT32", False), (io_names.PROBS, "FLOAT", False),
            ]  # fmt: skip
        self.num_io_tensors = len(self.io)

    get_tensor_name = FakeEngine.get_tensor_name
    get_tensor_mode = FakeEngine.get_tensor_mode
    get_tensor_dtype = FakeEngine.get_tensor_dtype

    def get_tensor_location(self, name: str) -> str:
        """kHOST for the shape tensor out_size (as TensorRT places shape-tensor inputs), kDEVICE otherwise."""
        return "HOST" if name == io_names.OUT_SIZE else "DEVICE"

    def create_execution_context(self, strategy: Any = "STATIC") -> PaperContext:
        context = (PaperContext100 if self.legacy_memory_api else PaperContext)(self, strategy)
        self.contexts.append(context)
        return context


class PaperContext100(PaperContext):
    """TensorRT 10.0's Python context: no ``set_device_memory(ptr, size)``, only the ``device_memory`` setter."""

    @property
    def set_device_memory(self) -> Any:  # type: ignore[override]
        raise AttributeError("set_device_memory")  # absent before 10.1

    def _set_memory(self, address: int | None) -> None:
        if address is None:  # PaperContext.__init__
            return
        block = self.engine.cudart.blocks[address]  # TensorRT trusts the pointer; the simulation knows its size
        self._memory = (address, block.nbytes)

    device_memory = property(lambda self: getattr(self, "_memory", None), _set_memory)  # type: ignore[assignment]


def _paper_manifests(classes_max: int = 6, feature_shapes=None, pooling=(1, 1)) -> dict[Graph, EngineManifest]:
    feature_shapes = FEATURE_SHAPES if feature_shapes is None else feature_shapes
    encoder = Profile(shapes={io_names.PAPER_IMAGE: ShapeRange((1, 3, 1, 1), (1, 3, 8, 12), (1, 3, 2560, 2560))})
    head = Profile(
        shapes={
            **{name: ShapeRange(shape, shape, shape) for name, shape in FEATURE_SHAPES.items()},
            io_names.TEXT_EMBEDS: ShapeRange((1, 16), (3, 16), (classes_max, 16)),
            io_names.OUT_SIZE: ShapeRange((2,), (2,), (2,)),
        },
        values={io_names.OUT_SIZE: ShapeRange((1, 1), (8, 12), PAPER_OUT_MAX)},
    )
    out = {}
    for graph, profile, pool in ((Graph.PAPER_ENCODER, encoder, pooling[0]), (Graph.PAPER_HEAD, head, pooling[1])):
        out[graph] = replace(
            _manifest(graph, dict(profile.shapes), None),
            profiles=(profile,),
            pooling=pool,
            output_shapes=feature_shapes if graph is Graph.PAPER_ENCODER else {},
        )
    return out


def sized_tensorrt(runtime: FakeRuntime) -> SimpleNamespace:
    """The ``tensorrt`` module as the runners of per-call-sized engines use it (allocation strategy, tensor location)."""
    return SimpleNamespace(
        Runtime=lambda logger: runtime,
        Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None}),
        TensorIOMode=SimpleNamespace(INPUT="INPUT"),
        ExecutionContextAllocationStrategy=SimpleNamespace(USER_MANAGED="USER_MANAGED"),
        TensorLocation=SimpleNamespace(HOST="HOST", DEVICE="DEVICE"),
    )


@pytest.fixture
def paper_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """``make(paper=True, **manifest_kw)`` -> (backend, sim): text + image engines, and the paper engines if asked."""
    cudart = PaperCudart()
    monkeypatch.setattr(tb, "_cuda_runtime", lambda: cudart)
    monkeypatch.setattr(tb.TensorRTBackend, "host_info", lambda self: HOST)
    monkeypatch.setattr(tb, "stream_handle", id)

    def make(paper: bool = True, legacy_memory_api: bool = False, **kw: Any):
        image_shapes = {
            io_names.IMAGES: ShapeRange((1, 3, 2 * HW, 2 * HW), (5, 3, 2 * HW, 2 * HW), (8, 3, 2 * HW, 2 * HW)),
            io_names.TEXT_EMBEDS: ShapeRange((1, 16), (6, 16), (6, 16)),
        }
        text_shapes = {io_names.TEXT_TOKENS: ShapeRange((1, 77), (6, 77), (16, 77))}
        manifests = {
            Graph.IMAGE: replace(_manifest(Graph.IMAGE, image_shapes, None), pooling=1),
            Graph.TEXT: replace(_manifest(Graph.TEXT, text_shapes, None), pooling=1),
        }
        if paper:
            manifests.update(_paper_manifests(**kw))
        engines: dict[bytes, Any] = {}
        for graph, manifest in manifests.items():
            write_manifest(manifest, tmp_path)
            (tmp_path / graph.engine_file).write_bytes(graph.value.encode())
            if graph in (Graph.PAPER_ENCODER, Graph.PAPER_HEAD):
                engines[graph.value.encode()] = PaperEngine(graph, manifest.profiles[0], cudart, legacy_memory_api)
            else:
                engines[graph.value.encode()] = FakeEngine(graph, manifest.profiles[0], cudart)
        monkeypatch.setattr(tb, "_import_tensorrt", lambda: sized_tensorrt(FakeRuntime(engines)))
        return tb.TensorRTBackend(tmp_path), SimpleNamespace(cudart=cudart, engines=engines)

    return make


def _paper_inputs(rng: np.random.Generator, classes: int, hw: tuple[int, int] = (8, 12)) -> tuple[np.ndarray, np.ndarray]:
    image = rng.integers(0, 256, size=(1, 3, *hw), dtype=np.uint8)
    return image, rng.normal(size=(classes, 16)).astype(np.float32)


H2D, D2H = FakeCudart.cudaMemcpyKind.cudaMemcpyHostToDevice, FakeCudart.cudaMemcpyKind.cudaMemcpyDeviceToHost


@pytest.mark.parametrize("with_probs", [False, True])
def test_segment_paper_keeps_features_on_the_device(paper_backend, rng: np.random.Generator, with_probs: bool) -> None:
    # catches: features copied device -> host -> device between the engines (7 D2H + 7 H2D more), and
    # probabilities [N, H, W] copied back when only the class map was asked for
    backend, sim = paper_backend()
    image, embeds = _paper_inputs(rng, 4)
    with backend:
        sim.cudart.copies.clear()
        out = backend.segment_paper(image, embeds, (21, 34), with_probs=with_probs)
    expected = reference_head(reference_features(image), embeds, (21, 34))  # float64, from the image
    np.testing.assert_array_equal(out[io_names.CLASS_MAP], np.argmax(expected, axis=0))
    assert out[io_names.CLASS_MAP].dtype == np.uint8  # runtime.protocol.host_class_map for N <= 255
    h2d = [n for kind, n in sim.cudart.copies if kind == H2D]
    d2h = [n for kind, n in sim.cudart.copies if kind == D2H]
    assert sorted(h2d) == sorted([image.nbytes, embeds.nbytes])  # out_size is a host shape tensor: no copy
    assert d2h == [21 * 34 * 4] + ([4 * 21 * 34 * 4] if with_probs else [])
    assert (io_names.PROBS in out) is with_probs
    if with_probs:
        np.testing.assert_allclose(out[io_names.PROBS], expected, rtol=1e-5, atol=1e-5)


def test_out_size_is_a_host_shape_tensor_checked_before_running(paper_backend, rng: np.random.Generator) -> None:
    # catches: out_size bound to device memory (TensorRT reads shape tensors from the host), and an output
    # size beyond the profile's value range sent to TensorRT (a vague enqueue failure) instead of one line
    backend, sim = paper_backend()
    image, embeds = _paper_inputs(rng, 3)
    with backend:
        backend.segment_paper(image, embeds, (5, 7))
        head = sim.engines[b"paper_head"].contexts[0]
        sim.cudart.inside(head.addresses[io_names.OUT_SIZE], 16, "host")
        assert head.out_size() == (5, 7)
        runs = head.executions
        sim.cudart.copies.clear()
        with pytest.raises(BackendError, match=r"out_size 65x80 is outside .* \(up to 64x80\)") as info:
            backend.segment_paper(image, embeds, (65, 80))
        assert "\n" not in str(info.value)
        assert head.executions == runs and sim.engines[b"paper_encoder"].contexts[0].executions == 1
        assert sim.cudart.copies == []  # refused before any work


def test_paper_outputs_sized_per_call_and_grow_only(paper_backend, rng: np.random.Generator) -> None:
    # catches: output buffers sized for the first call (a larger N x H x W then overflows them), buffers
    # reallocated on every call, and activation memory not sized for the call's shapes
    backend, sim = paper_backend()
    calls = [(3, (6, 9)), (6, (40, 50)), (2, (10, 10)), (6, (40, 50))]
    with backend:
        for i, (classes, size) in enumerate(calls):
            image, embeds = _paper_inputs(rng, classes)
            before = sim.cudart.mallocs
            out = backend.segment_paper(image, embeds, size, with_probs=True)
            expected = reference_head(reference_features(image), embeds, size)
            np.testing.assert_allclose(out[io_names.PROBS], expected, rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(out[io_names.CLASS_MAP], np.argmax(expected, axis=0))
            if i >= 2:  # smaller or equal to what was already held: nothing new
                assert sim.cudart.mallocs == before
        head = backend.head
        assert head.buffers[io_names.PROBS].nbytes == 4 * 6 * 40 * 50
        assert sim.engines[b"paper_head"].contexts[0].strategy == "USER_MANAGED"


def test_head_runner_from_host_features(paper_backend, rng: np.random.Generator) -> None:
    # catches: the host-array head runner (re-query of cached features) binding out_size or features wrongly,
    # or copying probabilities that were not asked for
    backend, sim = paper_backend()
    image, embeds = _paper_inputs(rng, 5)
    with backend:
        features = backend.encoder.run({io_names.PAPER_IMAGE: image})
        for name, value in reference_features(image).items():
            np.testing.assert_allclose(features[name], value, rtol=1e-6)
        sim.cudart.copies.clear()
        feeds = {**features, io_names.TEXT_EMBEDS: embeds, io_names.OUT_SIZE: np.array([9, 13], dtype=np.int64)}
        out = backend.head.run(feeds, outputs=[io_names.CLASS_MAP])
    assert set(out) == {io_names.CLASS_MAP} and [k for k, _ in sim.cudart.copies].count(D2H) == 1
    np.testing.assert_array_equal(out[io_names.CLASS_MAP], np.argmax(reference_head(features, embeds, (9, 13)), axis=0))


def test_manifests_refuse_a_head_that_cannot_take_the_encoders_features(paper_backend) -> None:
    # catches: a head engine built from another export (feature shapes differ) accepted, its device inputs
    # then bound to buffers of another size
    other = {**FEATURE_SHAPES, io_names.PAPER_FEATURES[2]: (5, 99, 3, 3)}
    with pytest.raises(EngineBuildError, match=r"paper_head.engine cannot take paper_encoder.engine's feature 'appearance_"):
        paper_backend(feature_shapes=other)


def test_pooling_is_answered_and_mismatches_refused(paper_backend) -> None:
    # catches: the TensorRT backend unable to say its pooling (Segmenter then cannot refuse foreign features),
    # and engines of two poolings mixed in one folder
    backend, _ = paper_backend(pooling=(1, 1))
    assert backend.manifest.pooling == 1
    with pytest.raises(EngineBuildError, match="different poolings"):
        paper_backend(pooling=(1, 2))


def test_engines_without_paper_graphs_still_work(paper_backend, rng: np.random.Generator) -> None:
    # catches: engines built before the paper graphs refused outright (the orchestrator falls back to the
    # numpy protocol around the image engine when `encoder` raises a BackendError, a GSNetError)
    backend, _ = paper_backend(paper=False)
    assert set(backend.manifests) == {Graph.TEXT, Graph.IMAGE}
    images, embeds = _feeds(rng, 5, 3)
    with backend:
        for runner in ("encoder", "head"):
            with pytest.raises(BackendError, match="built before the paper protocol graphs"):
                getattr(backend, runner)
        logits = backend.image.run({io_names.IMAGES: images, io_names.TEXT_EMBEDS: embeds})[io_names.LOGITS]
    np.testing.assert_allclose(logits, reference_image(images, embeds), rtol=1e-6, atol=1e-4)


def test_predict_paper_runs_the_combined_engines(paper_backend, rng: np.random.Generator) -> None:
    # catches: the orchestrator not finding the TensorRT backend's device path (the numpy protocol then runs
    # around the image engine and every feature and probability crosses to the host)
    from gsnet_deploy.runtime.protocol import resize_shortest_edge
    from gsnet_deploy.runtime.segment import predict_paper

    backend, sim = paper_backend()
    rgb = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    embeds = rng.normal(size=(3, 16)).astype(np.float32)
    with backend:
        sim.cudart.copies.clear()
        class_map, probs = predict_paper(backend, rgb, embeds, want_probs=False)
    assert probs is None
    image = resize_shortest_edge(rgb).transpose(2, 0, 1)[None]  # [1, 3, 640, 960]
    expected = reference_head(reference_features(image), embeds, (20, 30))
    np.testing.assert_array_equal(class_map, np.argmax(expected, axis=0))
    assert [n for k, n in sim.cudart.copies if k == D2H] == [20 * 30 * 4]  # the int32 class map, nothing else
    assert sim.engines[b"paper_head"].contexts[0].executions == 1


def test_activation_memory_on_the_tensorrt_10_0_python_api(paper_backend, rng: np.random.Generator) -> None:
    # catches: set_device_memory(ptr, size) called on TensorRT 10.0, whose Python API has only the
    # `device_memory` setter (set_device_memory arrived with setDeviceMemoryV2 in 10.1): an AttributeError
    backend, sim = paper_backend(legacy_memory_api=True)
    image, embeds = _paper_inputs(rng, 4)
    with backend:
        out = backend.segment_paper(image, embeds, (30, 41), with_probs=True)
        head = sim.engines[b"paper_head"].contexts[0]
        assert isinstance(head, PaperContext100) and head.device_memory is not None
    np.testing.assert_allclose(
        out[io_names.PROBS], reference_head(reference_features(image), embeds, (30, 41)), rtol=1e-5, atol=1e-5
    )


def test_unsized_activation_memory_is_one_line(paper_backend, rng: np.random.Generator, monkeypatch) -> None:
    # catches: update_device_memory_size_for_shapes' 0 (TensorRT's error answer) taken as a size, so a 1-byte
    # buffer is handed to TensorRT and the enqueue fails vaguely or writes past it
    backend, sim = paper_backend()
    monkeypatch.setattr(PaperContext, "update_device_memory_size_for_shapes", lambda self: 0)
    image, embeds = _paper_inputs(rng, 2)
    with backend, pytest.raises(BackendError, match=r"could not size the activation memory of paper_head\.engine") as info:
        backend.segment_paper(image, embeds, (6, 7))
    assert "\n" not in str(info.value) and sim.engines[b"paper_head"].contexts[0].executions == 0
