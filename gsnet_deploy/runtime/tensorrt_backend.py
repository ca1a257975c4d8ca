"""TensorRT backend of the runtime (torch-free): text and image engines (+ the paper protocol's), cuda-python.

Implements ``runtime.backend.Backend`` for the engines of ``gsnet export build``. Construction only
reads the manifests; ``__enter__`` imports TensorRT and ``cuda.bindings.runtime`` (cuda-python),
refuses engines that do not fit this host (TensorRT version, GPU name / compute capability, model
digest), deserializes them and allocates device buffers and pinned host buffers for each engine's
largest profile shapes once; ``__exit__`` frees everything. ``run`` copies host -> pinned -> device
asynchronously, enqueues with ``execute_async_v3`` (optionally replaying a CUDA graph captured for
the shapes it has seen), copies back and synchronizes once. Batches larger than the profile's
maximum are split into chunks along the batch axis; a chunk smaller than the profile's minimum (the
last one, on a fixed-shape DLA engine) is padded by repeating its last row and its outputs are
sliced back. Every output's first axis is the batch axis of the chunked input. Shape of the design:
Polygraphy's ``TrtRunner`` and NanoOWL's chunking engine wrapper.

CUDA graphs: TensorRT documents a captured graph as tied to the execution context state it was
captured with (its input shapes), so each input-shape set gets its own execution context, captured
once and replayed from then on; a failed capture ends the stream capture and falls back to plain
enqueues for that shape set.

Paper protocol (``paper_encoder.engine`` / ``paper_head.engine``, when the build has them): the
``encoder`` / ``head`` runners take and return host arrays like the others, and ``segment_paper``
runs both on the backend's stream with the encoder's output device buffers bound as the head's
inputs, so the features never cross to the host. The head's ``out_size`` is a shape tensor: its
values live in host memory (TensorRT reads shape tensors from the host) and are checked against
the profile's value range before anything runs. The paper buffers grow only: a buffer is
reallocated when a call needs more than it holds and kept for later calls, because the head's
outputs (``[H, W]`` class map, ``[N, H, W]`` probabilities) range from bytes to gigabytes with the
image and vocabulary, so sizing them for the profile maximum (as the text and image runners do)
would hold gigabytes for nothing, and allocating per call would synchronize the device each time.
The head's activation memory is managed the same way (``USER_MANAGED`` allocation sized by
``update_device_memory_size_for_shapes`` per call). Probabilities are copied back only when asked.
The paper runners do not capture CUDA graphs.

Tiled mode (``tile_blend.engine`` / ``tile_emit.engine``, FP32, when the build has them): the
``tile_blender`` factory makes a ``TrtWindowBlender`` per image. The image engine's logits stay in
its device buffer and are bound as the blend engine's input; the strip ``[N + 1, R, W]`` lives in
two device buffer pairs used in turn (each call reads one and writes the other: TensorRT does not
promise that an output may alias an input), so per-window probabilities never reach the host; only
class-map rows and validity come back (probabilities only when asked). ``place`` and ``count`` are
shape tensors staged in pinned host memory, one ``place`` slot per view of a batch, so the stream
is synchronized once per batch of views (before the next batch's staging is rewritten) and at each
band of finished rows.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from gsnet_deploy.contracts import io_names
from gsnet_deploy.contracts.engine_manifest import (
    CORE_GRAPHS,
    PAPER_GRAPHS,
    TILE_GRAPHS,
    EngineManifest,
    Graph,
    HostInfo,
    check_engine_compatible,
    check_head_takes_encoder,
    check_same_model,
    check_same_pooling,
    manifest_path,
    read_manifest,
    this_platform,
)
from gsnet_deploy.contracts.tensorrt_import import require_tensorrt
from gsnet_deploy.errors import BackendError, DeviceBlendUnavailable, EngineBuildError
from gsnet_deploy.runtime.protocol import host_class_map
from gsnet_deploy.runtime.tiling import WindowGrid, blend_weights


def _cuda_runtime() -> Any:
    """Import ``cuda.bindings.runtime`` (cuda-python >= 12.6 layout).

    Raises:
        BackendError: cuda-python is not installed.

    """
    try:
        from cuda.bindings import runtime as cudart
    except ImportError as err:
        raise BackendError(f"cuda-python is not installed ({err}); `pip install cuda-python` for the TensorRT backend.") from err
    return cudart


def _check(result: Any, what: str) -> Any:
    """Unpack a cuda-python ``(err, *values)`` result; raise ``BackendError`` on a CUDA error."""
    cudart = _cuda_runtime()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        _, message = cudart.cudaGetErrorString(err)
        raise BackendError(
            f"CUDA call {what} failed ({message.decode() if isinstance(message, bytes) else message}); check the GPU and driver."
        )
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def current_gpu(device: int = 0) -> tuple[str, tuple[int, int]]:
    """Name and compute capability of CUDA device ``device``.

    Raises:
        BackendError: no CUDA device or driver.

    """
    cudart = _cuda_runtime()
    props = _check(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name.split(b"\0", 1)[0].decode() if isinstance(props.name, bytes) else str(props.name)
    return name, (int(props.major), int(props.minor))


def _import_tensorrt() -> ModuleType:
    return require_tensorrt(BackendError, "install TensorRT >= 10 or use --backend onnxruntime.")


def chunk_slices(total: int, max_batch: int) -> list[slice]:
    """Split ``total`` rows into consecutive slices of at most ``max_batch`` rows (pure)."""
    if max_batch < 1:
        raise BackendError(f"Engine profile maximum batch is {max_batch}; rebuild the engine with a profile max of 1 or more.")
    return [slice(start, min(start + max_batch, total)) for start in range(0, total, max_batch)]


@dataclass(frozen=True)
class Chunk:
    """Rows ``start:stop`` of the chunked input, run as a batch of ``size`` rows (``size > stop - start`` pads)."""

    start: int
    stop: int
    size: int

    @property
    def rows(self) -> int:
        """Number of real (unpadded) rows."""
        return self.stop - self.start


def plan_chunks(total: int, min_batch: int, max_batch: int) -> list[Chunk]:
    """Split ``total`` rows into chunks of at most ``max_batch``, each run with at least ``min_batch`` rows (pure).

    A fixed-shape profile (DLA: min = max = 5 views) takes 11 views as 5, 5 and 1 padded to 5.
    """
    if min_batch < 1 or min_batch > max_batch:
        raise BackendError(f"Engine profile batch range {min_batch}..{max_batch} is invalid; rebuild the engine.")
    return [Chunk(rows.start, rows.stop, max(rows.stop - rows.start, min_batch)) for rows in chunk_slices(total, max_batch)]


def pad_rows(array: np.ndarray, size: int) -> np.ndarray:
    """``array`` with its last row repeated up to ``size`` rows along axis 0 (pure; no copy when already that size)."""
    missing = size - array.shape[0]
    if missing <= 0:
        return array
    return np.concatenate([array, np.repeat(array[-1:], missing, axis=0)], axis=0)


def stream_handle(stream: Any) -> int:
    """The address of a cuda-python stream as an int, for ``execute_async_v3``.

    ``int(stream)`` is deprecated from cuda-bindings 12.9.1 on; ``cuda.bindings.utils.get_cuda_native_handle``
    replaces it where it exists (older cuda-bindings, >= 12.6.1, have only ``int``).
    """
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:
        return int(stream)
    return int(get_cuda_native_handle(stream))


def set_input_shapes(context: Any, shapes: Mapping[str, Sequence[int]], engine_file: str) -> None:
    """Set every input shape on ``context``, checking TensorRT's answer for each.

    Raises:
        BackendError: TensorRT refused a shape (outside the engine's profile).
    """
    for name, shape in shapes.items():
        if not context.set_input_shape(name, tuple(int(d) for d in shape)):
            raise BackendError(
                f"TensorRT refused shape {tuple(shape)} for input {name!r} of {engine_file} (outside its profile); "
                "rebuild the engine with a wider profile."
            )


def check_feeds(feeds: Mapping[str, np.ndarray], manifest: EngineManifest, chunk_input: str) -> None:
    """Refuse feeds the engine's profile cannot take (names, rank, static dims, non-chunk dims in range).

    The ``chunk_input``'s first dim may exceed the profile maximum (``run`` splits it); every other
    dim of every input must lie within the profile.

    Raises:
        BackendError: a name is missing or a shape does not fit.

    """
    profile = manifest.profiles[0]
    missing = set(profile.shapes) - set(feeds)
    if missing:
        raise BackendError(f"Inputs {sorted(missing)} missing for {manifest.engine_file}; pass {sorted(profile.shapes)}.")
    for name, shape_range in profile.shapes.items():
        shape = tuple(np.shape(feeds[name]))
        if len(shape) != len(shape_range.min):
            raise BackendError(
                f"Input {name!r} has shape {shape} but {manifest.engine_file} expects rank {len(shape_range.min)}."
            )
        for axis, (size, lo, hi) in enumerate(zip(shape, shape_range.min, shape_range.max)):
            if name == chunk_input and axis == 0:
                if size < 1:
                    raise BackendError(f"Input {name!r} is empty; pass at least one row.")
                continue
            if not lo <= size <= hi:
                raise BackendError(
                    f"Input {name!r} dim {axis} is {size} but {manifest.engine_file} accepts {lo}..{hi}; "
                    "rebuild the engine "
                    "with a wider profile (e.g. --classes-opt) or pass fewer classes."
                )


@dataclass
class _Buffer:
    """One I/O tensor's device buffer and pinned host staging buffer, sized for the profile maximum."""

    device_ptr: int
    host_ptr: int
    nbytes: int
    dtype: np.dtype[Any]

    def host_view(self, shape: tuple[int, ...]) -> np.ndarray:
        """The first ``prod(shape)`` elements of the pinned host buffer as an array of ``shape``."""
        count = int(np.prod(shape, dtype=np.int64))
        raw = (ctypes.c_byte * (count * self.dtype.itemsize)).from_address(self.host_ptr)
        return np.frombuffer(memoryview(raw).cast("B"), dtype=self.dtype, count=count).reshape(shape)


@dataclass
class _Captured:
    """An execution context set to one input-shape set, and the CUDA graph captured on it (None: plain enqueue)."""

    context: Any
    graph_exec: Any = None


@dataclass
class _EngineRunner:
    """Runs one engine: ``run(feeds) -> outputs`` with chunking over ``chunk_input``'s first axis.

    Without CUDA graphs one execution context serves every shape. With CUDA graphs each input-shape
    set gets its own context (``new_context``) and graph; all contexts share the I/O buffers.
    """

    manifest: EngineManifest
    engine: Any
    context: Any
    stream: Any
    buffers: dict[str, _Buffer]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    chunk_input: str
    cuda_graphs: bool
    cudart: Any
    new_context: Callable[[], Any]
    captured: dict[tuple[tuple[int, ...], ...], _Captured] = field(default_factory=dict)

    @property
    def max_batch(self) -> int:
        """Largest first-axis size of ``chunk_input`` in the engine's profile."""
        return self.manifest.profiles[0].shapes[self.chunk_input].max[0]

    @property
    def min_batch(self) -> int:
        """Smallest first-axis size of ``chunk_input`` in the engine's profile (= max on a fixed DLA profile)."""
        return self.manifest.profiles[0].shapes[self.chunk_input].min[0]

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run on host arrays, return host arrays (chunked and padded to fit the profile); ``outputs``: only these."""
        if outputs is not None:
            unknown = [n for n in outputs if n not in self.outputs]
            if unknown:
                raise BackendError(f"{self.manifest.engine_file} has no outputs {unknown} (it has {list(self.outputs)}).")
            return {name: value for name, value in self.run(feeds).items() if name in outputs}
        check_feeds(feeds, self.manifest, self.chunk_input)
        total = int(np.shape(feeds[self.chunk_input])[0])
        parts: dict[str, list[np.ndarray]] = {name: [] for name in self.outputs}
        for chunk in plan_chunks(total, self.min_batch, self.max_batch):
            batch = {
                name: pad_rows(np.asarray(v)[chunk.start : chunk.stop], chunk.size) if name == self.chunk_input else np.asarray(v)
                for name, v in feeds.items()
            }
            for name, value in self._run_once(batch).items():
                if chunk.size != chunk.rows:
                    if value.shape[0] != chunk.size:
                        raise BackendError(
                            f"Output {name!r} of {self.manifest.engine_file} has {value.shape[0]} rows for a padded batch "
                            f"of {chunk.size}; run batches of {self.min_batch}..{self.max_batch} rows."
                        )
                    value = value[: chunk.rows]
                parts[name].append(value)
        return {name: np.concatenate(values, axis=0) for name, values in parts.items()}

    def run_on_device(self, feeds: Mapping[str, np.ndarray]) -> dict[str, tuple[int, tuple[int, ...]]]:
        """Run one batch that fits the profile and leave the outputs on the device (no synchronization).

        A batch below the profile's minimum (a fixed DLA profile) is padded; the padded rows'
        outputs follow the real ones. The pinned staging buffers are rewritten here, so the caller
        synchronizes the stream before calling again.

        Returns:
            Output name -> (device address, shape), valid until the next call.
        """
        check_feeds(feeds, self.manifest, self.chunk_input)
        total = int(np.shape(feeds[self.chunk_input])[0])
        if total > self.max_batch:
            raise BackendError(f"{total} views is more than {self.manifest.engine_file} takes at once ({self.max_batch}).")
        size = max(total, self.min_batch)
        padded = {name: pad_rows(np.asarray(v), size) if name == self.chunk_input else v for name, v in feeds.items()}
        context = self._stage_and_enqueue(padded)
        return {name: (self.buffers[name].device_ptr, tuple(context.get_tensor_shape(name))) for name in self.outputs}

    def _stage_and_enqueue(self, feeds: Mapping[str, np.ndarray]) -> Any:
        """Copy the inputs host -> pinned -> device and enqueue; returns the context that ran."""
        cudart = self.cudart
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        shapes = {name: tuple(np.shape(feeds[name])) for name in self.inputs}
        for name in self.inputs:
            buf = self.buffers[name]
            value = np.ascontiguousarray(feeds[name], dtype=buf.dtype)
            buf.host_view(value.shape)[...] = value
            _check(
                cudart.cudaMemcpyAsync(buf.device_ptr, buf.host_ptr, value.nbytes, h2d, self.stream),
                "cudaMemcpyAsync H2D",
            )
        return self._enqueue(shapes)

    def _run_once(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart = self.cudart
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        context = self._stage_and_enqueue(feeds)
        out_shapes = {name: tuple(context.get_tensor_shape(name)) for name in self.outputs}
        for name, shape in out_shapes.items():
            buf = self.buffers[name]
            nbytes = int(np.prod(shape, dtype=np.int64)) * buf.dtype.itemsize
            _check(
                cudart.cudaMemcpyAsync(buf.host_ptr, buf.device_ptr, nbytes, d2h, self.stream),
                "cudaMemcpyAsync D2H",
            )
        _check(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return {name: self.buffers[name].host_view(shape).copy() for name, shape in out_shapes.items()}

    def _execute(self, context: Any) -> None:
        if not context.execute_async_v3(stream_handle(self.stream)):
            raise BackendError(f"TensorRT failed to enqueue {self.manifest.engine_file}; see the TensorRT log.")

    def _enqueue(self, shapes: Mapping[str, tuple[int, ...]]) -> Any:
        """Enqueue the engine for these input shapes and return the context that ran it."""
        if not self.cuda_graphs:
            if any(tuple(self.context.get_tensor_shape(n)) != s for n, s in shapes.items()):
                set_input_shapes(self.context, shapes, self.manifest.engine_file)
            self._execute(self.context)
            return self.context
        key = tuple(shapes[name] for name in self.inputs)
        entry = self.captured.get(key)
        if entry is None:
            context = self.new_context()
            set_input_shapes(context, shapes, self.manifest.engine_file)
            # NOTE: TensorRT needs one ordinary enqueue after a shape change before capture; it
            # also produces this call's outputs (the captured work is not run by the capture).
            self._execute(context)
            self.captured[key] = _Captured(context, self._capture(context))
            return context
        if entry.graph_exec is None:
            self._execute(entry.context)
        else:
            _check(self.cudart.cudaGraphLaunch(entry.graph_exec, self.stream), "cudaGraphLaunch")
        return entry.context

    def _capture(self, context: Any) -> Any:
        """Capture one enqueue of ``context`` into an instantiated CUDA graph; None where capture fails."""
        cudart = self.cudart
        success = cudart.cudaError_t.cudaSuccess
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        _check(cudart.cudaStreamBeginCapture(self.stream, mode), "cudaStreamBeginCapture")
        ok = False
        try:
            ok = bool(context.execute_async_v3(stream_handle(self.stream)))
        finally:
            # NOTE: always end the capture, or the stream stays in capture mode and every later call fails.
            err, graph = cudart.cudaStreamEndCapture(self.stream)
        if not ok or err != success or graph is None:
            if err == success and graph is not None:
                cudart.cudaGraphDestroy(graph)
            return None  # this shape set runs with plain enqueues from now on
        err, graph_exec = cudart.cudaGraphInstantiate(graph, 0)
        cudart.cudaGraphDestroy(graph)
        return graph_exec if err == success else None

    def close(self) -> None:
        """Free CUDA graphs and buffers (the stream is the backend's)."""
        cudart = self.cudart
        for entry in self.captured.values():
            if entry.graph_exec is not None:
                cudart.cudaGraphExecDestroy(entry.graph_exec)
        self.captured.clear()
        for buf in self.buffers.values():
            cudart.cudaFree(buf.device_ptr)
            cudart.cudaFreeHost(buf.host_ptr)
        self.buffers.clear()


@dataclass
class _GrowBuffer:
    """A device buffer (and optionally a pinned host buffer) that is reallocated only to grow."""

    cudart: Any
    pinned: bool = False
    device_ptr: int = 0
    host_ptr: int = 0
    nbytes: int = 0

    def ensure(self, nbytes: int) -> None:
        """Hold at least ``nbytes`` (at least 1 byte): keep the buffers if they are big enough, else reallocate."""
        nbytes = max(int(nbytes), 1)
        if nbytes <= self.nbytes:
            return
        self.free()
        self.device_ptr = int(_check(self.cudart.cudaMalloc(nbytes), "cudaMalloc"))
        if self.pinned:
            self.host_ptr = int(_check(self.cudart.cudaMallocHost(nbytes), "cudaMallocHost"))
        self.nbytes = nbytes

    def host_view(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        """The first ``prod(shape)`` elements of the pinned host buffer as an array of ``shape``."""
        return _Buffer(self.device_ptr, self.host_ptr, self.nbytes, dtype).host_view(shape)

    def free(self) -> None:
        """Free both buffers (idempotent)."""
        if self.device_ptr:
            self.cudart.cudaFree(self.device_ptr)
        if self.host_ptr:
            self.cudart.cudaFreeHost(self.host_ptr)
        self.device_ptr = self.host_ptr = self.nbytes = 0


def _nbytes(shape: Sequence[int], dtype: np.dtype[Any]) -> int:
    return int(np.prod(tuple(shape), dtype=np.int64)) * dtype.itemsize


@dataclass
class _PaperRunner:
    """Runs one engine whose I/O sizes vary per call (paper encoder and head, tile engines) on grow-only buffers.

    ``bind_host`` stages host inputs (shape tensors stay in host memory), ``bind_address`` binds
    memory the caller owns (another engine's device output, a staged shape tensor) as an input,
    ``bind_output`` makes an output write into the caller's device memory, ``enqueue`` sizes the
    other outputs and runs, ``fetch`` copies the named outputs back. ``run`` is the host-array
    ``GraphRunner`` on top of them. See the module docstring.
    """

    manifest: EngineManifest
    engine: Any
    context: Any
    stream: Any
    cudart: Any
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dtypes: dict[str, np.dtype[Any]]
    host_inputs: tuple[str, ...]
    user_memory: bool
    buffers: dict[str, _GrowBuffer] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    scratch: _GrowBuffer | None = None
    bound_outputs: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (device address, bytes)

    def _buffer(self, name: str) -> _GrowBuffer:
        if name not in self.buffers:
            self.buffers[name] = _GrowBuffer(self.cudart, pinned=True)
        return self.buffers[name]

    def check_shape_values(self, name: str, values: np.ndarray) -> None:
        """Refuse shape-tensor values outside the profile's value range, with one line, before anything runs."""
        value_range = self.manifest.profiles[0].values.get(name)
        if value_range is None:
            return
        if values.shape != (len(value_range.min),) or any(
            not lo <= int(v) <= hi for v, lo, hi in zip(values, value_range.min, value_range.max)
        ):
            shown = "x".join(str(int(v)) for v in values.reshape(-1))
            limit = "x".join(str(v) for v in value_range.max)
            raise BackendError(
                f"{name} {shown} is outside what {self.manifest.engine_file} takes (up to {limit}); "
                "use --mode tiled or --backend onnxruntime for larger outputs."
            )

    def bind_host(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Stage host inputs: shape tensors into pinned host memory, the others onto the device (async H2D)."""
        h2d = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        for name in self.host_inputs:
            if name in feeds:
                self.check_shape_values(name, np.asarray(feeds[name]).reshape(-1))
        for name, value in feeds.items():
            array = np.ascontiguousarray(value, dtype=self.dtypes[name])
            buf = self._buffer(name)
            buf.ensure(array.nbytes)
            buf.host_view(array.shape, array.dtype)[...] = array
            if name in self.host_inputs:
                # NOTE: a kHOST tensor (the shape tensor out_size) takes a host pointer: TensorRT reads it to
                # resolve output shapes and copies the values at enqueue, also to the device where the graph
                # computes with them (cast to float for the resize scale). Rewritten only after a sync.
                self.context.set_tensor_address(name, buf.host_ptr)
            else:
                _check(
                    self.cudart.cudaMemcpyAsync(buf.device_ptr, buf.host_ptr, array.nbytes, h2d, self.stream),
                    "cudaMemcpyAsync H2D",
                )
                self.context.set_tensor_address(name, buf.device_ptr)
            self.shapes[name] = tuple(array.shape)

    def bind_address(self, name: str, address: int, shape: tuple[int, ...]) -> None:
        """Bind memory the caller owns as input ``name``: no copy.

        A device buffer (another engine's output, on the same stream) for a device input; pinned host
        memory for a shape tensor (``host_inputs``), whose values the caller checks and keeps unchanged
        until the stream has run the enqueue.
        """
        self.context.set_tensor_address(name, address)
        self.shapes[name] = tuple(shape)

    def bind_output(self, name: str, device_ptr: int, nbytes: int) -> None:
        """Make output ``name`` write into the caller's device buffer of ``nbytes`` (checked at ``enqueue``)."""
        self.bound_outputs[name] = (device_ptr, nbytes)

    def enqueue(self) -> dict[str, tuple[int, ...]]:
        """Set the input shapes (checked), size the outputs for them, run; returns the output shapes."""
        missing = [n for n in self.inputs if n not in self.shapes]
        if missing:
            raise BackendError(f"Inputs {missing} missing for {self.manifest.engine_file}; pass {list(self.inputs)}.")
        set_input_shapes(self.context, {n: self.shapes[n] for n in self.inputs}, self.manifest.engine_file)
        out_shapes = {name: tuple(int(d) for d in self.context.get_tensor_shape(name)) for name in self.outputs}
        for name, shape in out_shapes.items():
            if any(d < 0 for d in shape):
                raise BackendError(
                    f"TensorRT could not resolve output {name!r} of {self.manifest.engine_file} (shape {shape}); "
                    "check the inputs against the engine's profile."
                )
            needed = _nbytes(shape, self.dtypes[name])
            if name in self.bound_outputs:
                device_ptr, nbytes = self.bound_outputs[name]
                if needed > nbytes:
                    raise BackendError(f"output {name!r} of {self.manifest.engine_file} needs {needed} bytes, bound {nbytes}")
                self.context.set_tensor_address(name, device_ptr)
                continue
            buf = self._buffer(name)
            buf.ensure(needed)
            self.context.set_tensor_address(name, buf.device_ptr)
        if self.user_memory:
            assert self.scratch is not None
            size = int(self.context.update_device_memory_size_for_shapes())  # for these shapes (TensorRT >= 10.0)
            if size <= 0:  # TensorRT's answer when it cannot size the memory (IExecutionContext docs)
                raise BackendError(
                    f"TensorRT could not size the activation memory of {self.manifest.engine_file} for shapes "
                    f"{[self.shapes[n] for n in self.inputs]}; see the TensorRT log."
                )
            self.scratch.ensure(size)
            set_memory = getattr(self.context, "set_device_memory", None)  # (ptr, size): Python API >= 10.1
            if set_memory is not None:
                set_memory(self.scratch.device_ptr, self.scratch.nbytes)
            else:  # TensorRT 10.0: only the deprecated `device_memory` setter (pointer alone)
                self.context.device_memory = self.scratch.device_ptr
        if not self.context.execute_async_v3(stream_handle(self.stream)):
            raise BackendError(f"TensorRT failed to enqueue {self.manifest.engine_file}; see the TensorRT log.")
        self.shapes.update({name: shape for name, shape in out_shapes.items()})
        return out_shapes

    def fetch(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        """Copy outputs ``names`` of the last ``enqueue`` to the host and synchronize the stream once."""
        d2h = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name in names:
            buf, shape = self.buffers[name], self.shapes[name]
            _check(
                self.cudart.cudaMemcpyAsync(buf.host_ptr, buf.device_ptr, _nbytes(shape, self.dtypes[name]), d2h, self.stream),
                "cudaMemcpyAsync D2H",
            )
        _check(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return {name: self.buffers[name].host_view(self.shapes[name], self.dtypes[name]).copy() for name in names}

    def device_output(self, name: str) -> tuple[int, tuple[int, ...]]:
        """Device address and shape of output ``name`` of the last ``enqueue``."""
        return self.buffers[name].device_ptr, self.shapes[name]

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run on host arrays and return host arrays: only ``outputs`` (None: all) cross to the host."""
        names = list(self.outputs) if outputs is None else list(outputs)
        unknown = [n for n in names if n not in self.outputs]
        if unknown:
            raise BackendError(f"{self.manifest.engine_file} has no outputs {unknown} (it has {list(self.outputs)}).")
        missing = sorted(set(self.inputs) - set(feeds))
        if missing:
            raise BackendError(f"Inputs {missing} missing for {self.manifest.engine_file}; pass {list(self.inputs)}.")
        self.bind_host({name: feeds[name] for name in self.inputs})
        self.enqueue()
        result = self.fetch(names)
        if io_names.CLASS_MAP in result:
            result[io_names.CLASS_MAP] = host_class_map(result[io_names.CLASS_MAP], self.shapes[io_names.TEXT_EMBEDS][0])
        return result

    def close(self) -> None:
        """Free the buffers and the activation memory."""
        for buf in self.buffers.values():
            buf.free()
        self.buffers.clear()
        if self.scratch is not None:
            self.scratch.free()


class TrtWindowBlender:
    """Tiled mode's blending on the GPU (``runtime.tiling.WindowBlender``): the tile engines around the image engine.

    Made by ``TensorRTBackend.tile_blender`` for one image. The strip is two device buffer pairs
    (``acc [N + 1, R, W]``, ``valid [R, W]``) used in turn; see the module docstring.
    """

    def __init__(
        self, image: _EngineRunner, blend: _PaperRunner, emit: _PaperRunner, text_embeds: np.ndarray, grid: WindowGrid
    ) -> None:
        """Allocate and zero the strips, upload the ramp weights and the text embeddings' host copy."""
        self.image, self.blend_runner, self.emit_runner, self.grid = image, blend, emit, grid
        self.cudart, self.stream = blend.cudart, blend.stream
        self.text = np.ascontiguousarray(text_embeds, dtype=np.float32)
        self.num_classes = int(self.text.shape[0])
        rows = min(grid.size, grid.height)
        self.acc_shape = (self.num_classes + 1, rows, grid.width)  # [N + 1, R, W]
        self.valid_shape = (rows, grid.width)  # [R, W]
        self._buffers: list[_GrowBuffer] = []
        try:
            self._strips = [(self._device(_nbytes(self.acc_shape, np.dtype(np.float32))),
                             self._device(_nbytes(self.valid_shape, np.dtype(np.float32)))) for _ in range(2)]  # fmt: skip
            for acc, valid in self._strips:
                self._zero(acc)
                self._zero(valid)
            self._weights = self._upload(blend_weights(grid.size, grid.overlap))  # [S, S]
            self._all_valid = self._upload(np.ones((grid.size, grid.size), np.float32))  # [S, S]
            self._window_valid: list[_GrowBuffer] = []  # one pinned + device slot per view of a batch
            self._place: list[_GrowBuffer] = []  # one pinned slot per view of a batch (shape tensor)
            self._count = self._pinned(8)  # int64 [1] (shape tensor)
            _check(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")  # uploads done
        except BaseException:
            self.close()
            raise
        self._current = 0  # which strip holds the state
        self._logits: tuple[int, tuple[int, ...]] | None = None  # device address and shape of the last infer

    def _device(self, nbytes: int) -> _GrowBuffer:
        buf = _GrowBuffer(self.cudart)
        self._buffers.append(buf)
        buf.ensure(nbytes)
        return buf

    def _pinned(self, nbytes: int) -> _GrowBuffer:
        buf = _GrowBuffer(self.cudart, pinned=True)
        self._buffers.append(buf)
        buf.ensure(nbytes)
        return buf

    def _zero(self, buf: _GrowBuffer) -> None:
        _check(self.cudart.cudaMemsetAsync(buf.device_ptr, 0, buf.nbytes, self.stream), "cudaMemsetAsync")

    def _upload(self, array: np.ndarray) -> _GrowBuffer:
        buf = self._pinned(array.nbytes)
        buf.host_view(array.shape, array.dtype)[...] = array
        h2d = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        _check(self.cudart.cudaMemcpyAsync(buf.device_ptr, buf.host_ptr, array.nbytes, h2d, self.stream), "cudaMemcpyAsync H2D")
        return buf

    def infer(self, views: np.ndarray) -> None:
        """Run the image engine on views ``[b, 3, S, S]``; the logits stay in its device buffer."""
        # the previous batch's blends read this batch's staging slots and the image engine's buffers
        _check(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        out = self.image.run_on_device({io_names.IMAGES: views, io_names.TEXT_EMBEDS: self.text})
        self._logits = out[io_names.LOGITS]  # [b, N, 96, 96]

    def _slot(self, slots: list[_GrowBuffer], index: int, nbytes: int) -> _GrowBuffer:
        while len(slots) <= index:
            slots.append(self._pinned(nbytes))
        return slots[index]

    def blend(self, index: int, row: int, col: int, height: int, width: int, valid: np.ndarray | None) -> None:
        """Blend view ``index`` of the last ``infer`` into the strip (``tile_blend.engine``)."""
        if self._logits is None:
            raise RuntimeError("blend before infer")
        runner, size = self.blend_runner, self.grid.size
        place = np.array([index, row, col, height, width], dtype=np.int64)
        runner.check_shape_values(io_names.TILE_PLACE, place)
        staged = self._slot(self._place, index, place.nbytes)
        staged.host_view(place.shape, place.dtype)[...] = place
        window_valid = self._all_valid
        if valid is not None:
            window_valid = self._slot(self._window_valid, index, size * size * 4)
            partial = window_valid.host_view((size, size), np.dtype(np.float32))
            partial[...] = 0.0
            partial[:height, :width] = valid
            h2d = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            _check(
                self.cudart.cudaMemcpyAsync(window_valid.device_ptr, window_valid.host_ptr, partial.nbytes, h2d, self.stream),
                "cudaMemcpyAsync H2D",
            )
        acc, strip_valid = self._strips[self._current]
        acc_out, valid_out = self._strips[1 - self._current]
        runner.bind_address(io_names.TILE_ACC, acc.device_ptr, self.acc_shape)
        runner.bind_address(io_names.TILE_VALID, strip_valid.device_ptr, self.valid_shape)
        runner.bind_address(io_names.LOGITS, *self._logits)
        runner.bind_address(io_names.TILE_PLACE, staged.host_ptr, place.shape)
        runner.bind_address(io_names.TILE_WINDOW_VALID, window_valid.device_ptr, (size, size))
        runner.bind_address(io_names.TILE_WEIGHTS, self._weights.device_ptr, (size, size))
        runner.bind_output(io_names.TILE_ACC_OUT, acc_out.device_ptr, acc_out.nbytes)
        runner.bind_output(io_names.TILE_VALID_OUT, valid_out.device_ptr, valid_out.nbytes)
        runner.enqueue()
        self._current = 1 - self._current

    def emit(self, count: int, with_probs: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Normalize, argmax and shift the strip (``tile_emit.engine``); class map and validity to the host."""
        runner = self.emit_runner
        value = np.array([count], dtype=np.int64)
        runner.check_shape_values(io_names.TILE_COUNT, value)
        self._count.host_view(value.shape, value.dtype)[...] = value  # free: the last emit's fetch synchronized
        acc, strip_valid = self._strips[self._current]
        acc_out, valid_out = self._strips[1 - self._current]
        runner.bind_address(io_names.TILE_ACC, acc.device_ptr, self.acc_shape)
        runner.bind_address(io_names.TILE_VALID, strip_valid.device_ptr, self.valid_shape)
        runner.bind_address(io_names.TILE_COUNT, self._count.host_ptr, value.shape)
        runner.bind_output(io_names.TILE_ACC_OUT, acc_out.device_ptr, acc_out.nbytes)
        runner.bind_output(io_names.TILE_VALID_OUT, valid_out.device_ptr, valid_out.nbytes)
        runner.enqueue()
        self._current = 1 - self._current
        names = (io_names.TILE_LABELS, io_names.TILE_VALID_ROWS) + ((io_names.PROBS,) if with_probs else ())
        out = runner.fetch(names)
        labels = host_class_map(out[io_names.TILE_LABELS], self.num_classes)  # [count, W]
        return labels, out[io_names.TILE_VALID_ROWS] > 0.5, out[io_names.PROBS] if with_probs else None

    def close(self) -> None:
        """Wait for the stream, then free the strips and staging buffers (idempotent)."""
        if self._buffers:
            self.cudart.cudaStreamSynchronize(self.stream)
        for buf in self._buffers:
            buf.free()
        self._buffers.clear()


_NP_DTYPES = {
    "FLOAT": np.float32,
    "HALF": np.float16,
    "INT32": np.int32,
    "INT64": np.int64,
    "INT8": np.int8,
    "BOOL": np.bool_,
    "UINT8": np.uint8,
}


def _optional_pair(engine_dir: Path, pair: tuple[Graph, ...], what: str) -> dict[Graph, EngineManifest]:
    """The manifests of an optional pair of engines (paper, tile): both, or none for a build made before them.

    Raises:
        EngineBuildError: only one of the two is there.
    """
    present = [manifest_path(engine_dir / g.engine_file).is_file() for g in pair]
    if any(present) and not all(present):
        missing = next(g.engine_file for g, ok in zip(pair, present) if not ok)
        raise EngineBuildError(f"{engine_dir} has no {missing} beside the other {what} engine; rebuild the engines.")
    return {g: read_manifest(engine_dir / g.engine_file) for g in pair} if all(present) else {}


PAPER_ENGINES_MISSING = (
    "engines in {folder} were built before the paper protocol graphs (no paper_encoder.engine / paper_head.engine); "
    "re-export the ONNX folder and rebuild with `gsnet export build` to run the protocol on the GPU"
)


class TensorRTBackend:
    """The ``tensorrt`` backend: ``text_encoder.engine`` + ``image_graph.engine`` (+ the paper engines) from one build.

    Attributes:
        name: ``"tensorrt"``.
        model_digest: the engines' model digest (all manifests agree).
        max_views: largest view batch of the image engine's profile (bigger batches are chunked).
        preferred_views: the image profile's opt view batch.
        manifests: every engine's manifest, by graph (the paper graphs only when built).
        manifest: the image engine's manifest; its ``pooling`` is the pooling of every engine here.

    """

    name = "tensorrt"

    def __init__(self, engine_dir: Path, *, device: int = 0, cuda_graphs: bool = False) -> None:
        """Read and cross-check the manifests; nothing is loaded on the GPU yet.

        Args:
            engine_dir: folder with both engines and their ``.json`` manifests.
            device: CUDA device index.
            cuda_graphs: capture each engine's enqueue into a CUDA graph per input-shape set and replay it.

        Raises:
            EngineBuildError: a manifest is missing or malformed, or the engines come from different weights.

        """
        self.engine_dir = Path(engine_dir)
        self.device = device
        self.cuda_graphs = cuda_graphs
        self.manifests = {graph: read_manifest(self.engine_dir / graph.engine_file) for graph in CORE_GRAPHS}
        self.manifests.update(_optional_pair(self.engine_dir, PAPER_GRAPHS, "paper"))
        if Graph.PAPER_HEAD in self.manifests:
            check_head_takes_encoder(self.manifests[Graph.PAPER_ENCODER], self.manifests[Graph.PAPER_HEAD])
        self.manifests.update(_optional_pair(self.engine_dir, TILE_GRAPHS, "tile"))
        for graph, manifest in self.manifests.items():
            if graph is not Graph.TEXT:
                check_same_model(self.manifests[Graph.TEXT], manifest)
        check_same_pooling(self.manifests)
        self.manifest = self.manifests[Graph.IMAGE]
        self.model_digest = self.manifests[Graph.IMAGE].model_digest
        views = self.manifests[Graph.IMAGE].profiles[0].shapes[io_names.IMAGES]
        self.max_views: int | None = views.max[0]
        self.preferred_views = views.opt[0]
        self._runners: dict[Graph, _EngineRunner] = {}
        self._paper: dict[Graph, _PaperRunner] = {}  # paper and tile engines (buffers sized per call)
        self._stream: Any = None
        self._trt_runtime: Any = None

    @property
    def text(self) -> _EngineRunner:
        """Runner of the text engine (tokens -> text_embeds); only inside ``with``."""
        return self._runner(Graph.TEXT)

    @property
    def image(self) -> _EngineRunner:
        """Runner of the image engine (images + text_embeds -> logits); only inside ``with``."""
        return self._runner(Graph.IMAGE)

    def _runner(self, graph: Graph) -> _EngineRunner:
        if graph not in self._runners:
            raise BackendError("The TensorRT backend is not open; use it inside `with TensorRTBackend(...) as backend:`.")
        return self._runners[graph]

    @property
    def encoder(self) -> _PaperRunner:
        """Runner of the paper encoder engine (uint8 image ``[1, 3, h, w]`` -> ``PAPER_FEATURES``); only inside ``with``.

        Raises:
            BackendError: the backend is not open, or the build has no paper engines.
        """
        return self._paper_runner(Graph.PAPER_ENCODER)

    @property
    def head(self) -> _PaperRunner:
        """Runner of the paper head engine (features, text_embeds, out_size -> class_map, probs); only inside ``with``."""
        return self._paper_runner(Graph.PAPER_HEAD)

    def _paper_runner(self, graph: Graph) -> _PaperRunner:
        self._runner(Graph.IMAGE)  # raises when not open
        if graph not in self.manifests:
            raise BackendError(PAPER_ENGINES_MISSING.format(folder=self.engine_dir))
        return self._paper[graph]

    @property
    def tile_blender(self) -> Callable[[WindowGrid, np.ndarray], TrtWindowBlender] | None:
        """Tiled mode's device blender factory (``tile_blend.engine`` / ``tile_emit.engine``), or None without them.

        The factory raises ``DeviceBlendUnavailable`` (tiled mode then blends on the host, with the
        reason as a note) for an image wider, or a vocabulary larger, than the engines' profile, or
        when the image engine's logits are not FP32 as the blend engine takes them.
        """
        self._runner(Graph.IMAGE)  # raises when not open
        if Graph.TILE_BLEND not in self._paper:
            return None
        image, blend, emit = self._runners[Graph.IMAGE], self._paper[Graph.TILE_BLEND], self._paper[Graph.TILE_EMIT]
        strip_max = blend.manifest.profiles[0].shapes[io_names.TILE_ACC].max  # (N + 1, R, W)

        def make(grid: WindowGrid, text_embeds: np.ndarray) -> TrtWindowBlender:
            num_classes = int(np.shape(text_embeds)[0])
            if grid.width > strip_max[2]:
                raise DeviceBlendUnavailable(
                    f"the image is {grid.width} px wide, wider than the TensorRT tile engines take ({strip_max[2]} px)"
                )
            if num_classes + 1 > strip_max[0]:
                raise DeviceBlendUnavailable(
                    f"the TensorRT tile engines take up to {strip_max[0] - 1} classes, not {num_classes}"
                )
            if image.buffers[io_names.LOGITS].dtype != blend.dtypes[io_names.LOGITS]:
                raise DeviceBlendUnavailable(
                    f"{image.manifest.engine_file} writes {image.buffers[io_names.LOGITS].dtype} logits but "
                    f"{blend.manifest.engine_file} takes {blend.dtypes[io_names.LOGITS]}"
                )
            return TrtWindowBlender(image, blend, emit, text_embeds, grid)

        return make

    def segment_paper(
        self, image: np.ndarray, text_embeds: np.ndarray, out_size: tuple[int, int], with_probs: bool = False
    ) -> dict[str, np.ndarray]:
        """Encoder and head on the GPU with the features kept there: only the class map (and probs if asked) come back.

        Host -> device: the image and the text embeddings; ``out_size`` is written to pinned host
        memory (a shape tensor). Device -> host: the class map, and the probabilities only with
        ``with_probs``. One stream, one synchronization.

        Args:
            image: uint8 ``[1, 3, h, w]`` after ``ResizeShortestEdge``.
            text_embeds: ``[N, 512]``.
            out_size: the original (H, W).
            with_probs: also return ``PROBS`` ``[N, H, W]``.

        Returns:
            ``{CLASS_MAP: [H, W]}`` (uint8 for N <= 255, else int32) and ``PROBS`` when asked.

        Raises:
            BackendError: no paper engines, or an input (image size, N, out_size) outside their profiles.
        """
        encoder, head = self.encoder, self.head
        size = np.asarray(out_size, dtype=np.int64).reshape(-1)  # [2]
        head.check_shape_values(io_names.OUT_SIZE, size)  # a too-large output fails before any work
        encoder.bind_host({io_names.PAPER_IMAGE: image})
        encoder.enqueue()
        for name in io_names.PAPER_FEATURES:
            head.bind_address(name, *encoder.device_output(name))  # device to device: no copy at all
        head.bind_host({io_names.TEXT_EMBEDS: text_embeds, io_names.OUT_SIZE: size})
        head.enqueue()
        out = head.fetch((io_names.CLASS_MAP, io_names.PROBS) if with_probs else (io_names.CLASS_MAP,))
        out[io_names.CLASS_MAP] = host_class_map(out[io_names.CLASS_MAP], int(np.shape(text_embeds)[0]))
        return out

    def host_info(self) -> HostInfo:
        """TensorRT version, GPU and platform of this host."""
        trt = _import_tensorrt()
        name, capability = current_gpu(self.device)
        system, machine = this_platform()
        return HostInfo(str(trt.__version__), name, capability, system, machine)

    def __enter__(self) -> TensorRTBackend:
        trt = _import_tensorrt()
        cudart = _cuda_runtime()
        host = self.host_info()
        for manifest in self.manifests.values():
            try:
                check_engine_compatible(manifest, host)
            except EngineBuildError as err:
                raise BackendError(str(err)) from err
        _check(cudart.cudaSetDevice(self.device), "cudaSetDevice")
        self._stream = _check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._trt_runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        if any(m.version_compatible for m in self.manifests.values()):
            # NOTE: version-compatible plans embed a lean runtime (host code); only trusted plans belong here.
            self._trt_runtime.engine_host_code_allowed = True
        try:
            for graph, chunk_input in ((Graph.TEXT, io_names.TEXT_TOKENS), (Graph.IMAGE, io_names.IMAGES)):
                self._runners[graph] = self._open(graph, chunk_input)
            for graph in PAPER_GRAPHS + TILE_GRAPHS:
                if graph in self.manifests:
                    self._paper[graph] = self._open_sized(graph)
            if Graph.PAPER_HEAD in self._paper:
                self._check_feature_dtypes()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _open(self, graph: Graph, chunk_input: str) -> _EngineRunner:
        trt = _import_tensorrt()
        cudart = _cuda_runtime()
        manifest = self.manifests[graph]
        if manifest.dla_core is not None:
            # NOTE: IRuntime.DLA_core defaults to -1; a DLA engine deserializes onto the core set here.
            self._trt_runtime.DLA_core = manifest.dla_core
        engine = self._deserialize(manifest)
        context = engine.create_execution_context()
        profile = manifest.profiles[0]
        inputs: list[str] = []
        outputs: list[str] = []
        dtypes: dict[str, np.dtype[Any]] = {}
        buffers: dict[str, _Buffer] = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (inputs if is_input else outputs).append(name)
            dtypes[name] = np.dtype(_NP_DTYPES[engine.get_tensor_dtype(name).name])
        # buffers are sized once every input shape is at its maximum
        set_input_shapes(context, {name: profile.shapes[name].max for name in inputs}, manifest.engine_file)
        for name, dtype in dtypes.items():
            max_shape = tuple(context.get_tensor_shape(name))
            nbytes = max(int(np.prod(max_shape, dtype=np.int64)) * dtype.itemsize, 1)
            device_ptr = _check(cudart.cudaMalloc(nbytes), "cudaMalloc")
            host_ptr = _check(cudart.cudaMallocHost(nbytes), "cudaMallocHost")
            buffers[name] = _Buffer(int(device_ptr), int(host_ptr), nbytes, dtype)
            context.set_tensor_address(name, int(device_ptr))

        def new_context() -> Any:
            """Another execution context on the same I/O buffers (one per captured CUDA graph)."""
            ctx = engine.create_execution_context()
            for name, buf in buffers.items():
                ctx.set_tensor_address(name, buf.device_ptr)
            return ctx

        return _EngineRunner(
            manifest=manifest,
            engine=engine,
            context=context,
            stream=self._stream,
            buffers=buffers,
            inputs=tuple(inputs),
            outputs=tuple(outputs),
            chunk_input=chunk_input,
            cuda_graphs=self.cuda_graphs,
            cudart=cudart,
            new_context=new_context,
        )

    def _deserialize(self, manifest: EngineManifest) -> Any:
        engine = self._trt_runtime.deserialize_cuda_engine((self.engine_dir / manifest.engine_file).read_bytes())
        if engine is None:
            raise BackendError(
                f"TensorRT could not load {self.engine_dir / manifest.engine_file}; rebuild it with `gsnet export build`."
            )
        return engine

    def _open_sized(self, graph: Graph) -> _PaperRunner:
        """A paper or tile runner: no buffers yet (they grow on use).

        Activation memory is ours (USER_MANAGED, sized per call) for every engine but the encoder.
        """
        trt = _import_tensorrt()
        manifest = self.manifests[graph]
        engine = self._deserialize(manifest)
        user_memory = graph is not Graph.PAPER_ENCODER
        if user_memory:
            context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        else:
            context = engine.create_execution_context()
        inputs: list[str] = []
        outputs: list[str] = []
        host_inputs: list[str] = []
        dtypes: dict[str, np.dtype[Any]] = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (inputs if is_input else outputs).append(name)
            if is_input and engine.get_tensor_location(name) == trt.TensorLocation.HOST:
                host_inputs.append(name)  # setTensorAddress takes a host pointer for a kHOST tensor
            dtypes[name] = np.dtype(_NP_DTYPES[engine.get_tensor_dtype(name).name])
        cudart = _cuda_runtime()
        return _PaperRunner(
            manifest=manifest,
            engine=engine,
            context=context,
            stream=self._stream,
            cudart=cudart,
            inputs=tuple(inputs),
            outputs=tuple(outputs),
            dtypes=dtypes,
            host_inputs=tuple(host_inputs),
            user_memory=user_memory,
            scratch=_GrowBuffer(cudart) if user_memory else None,
        )

    def _check_feature_dtypes(self) -> None:
        """Refuse a head whose feature inputs do not have the encoder's output types (the buffers are shared as they are)."""
        encoder, head = self._paper[Graph.PAPER_ENCODER], self._paper[Graph.PAPER_HEAD]
        for name in io_names.PAPER_FEATURES:
            if encoder.dtypes.get(name) != head.dtypes.get(name):
                raise BackendError(
                    f"{head.manifest.engine_file} takes {name!r} as {head.dtypes.get(name)} but {encoder.manifest.engine_file} "
                    f"writes {encoder.dtypes.get(name)}; rebuild both engines from one ONNX folder."
                )

    def __exit__(self, *exc: object) -> None:
        cudart = _cuda_runtime()
        for paper in self._paper.values():
            paper.close()
        self._paper.clear()
        for runner in self._runners.values():
            runner.close()
        self._runners.clear()
        if self._stream is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None
        self._trt_runtime = None
