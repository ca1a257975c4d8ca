"""The ONNX Runtime backend: both exported graphs behind the runtime's ``Backend`` protocol.

Construction opens and validates the ONNX folder (``contracts.onnx_manifest``) without loading the
graphs; ``__enter__`` creates the two sessions and ``__exit__`` releases them. Providers: CPU by
default; with onnxruntime-gpu installed *and* a CUDA device present, CUDA first (CPU after it for
any op CUDA lacks). The providers the sessions really got are in ``.providers``; when CUDA was
chosen automatically but did not come up, a warning says so (no silent fallback), and when it was
asked for explicitly, opening fails.

Torch-free: imports numpy and, on enter, onnxruntime.
"""

from __future__ import annotations

import ctypes
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gsnet_deploy.contracts import io_names
from gsnet_deploy.contracts.onnx_manifest import OnnxDir, OnnxManifest, open_onnx_dir
from gsnet_deploy.errors import BackendError
from gsnet_deploy.runtime.ort_session import CPU_PROVIDER, CUDA_PROVIDER, import_onnxruntime, open_session
from gsnet_deploy.runtime.protocol import host_class_map
from gsnet_deploy.runtime.tiling import WindowGrid, blend_weights

_NUMPY_TYPES: dict[str, type] = {
    "tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(float16)": np.float16, "tensor(uint8)": np.uint8,
}  # fmt: skip


def cuda_device_count() -> int:
    """Number of CUDA devices the driver reports (0 without a driver), asked through ``libcuda`` directly."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return int(count.value)
    return 0


def default_providers(available: Sequence[str]) -> list[str]:
    """CUDA then CPU when the CUDA provider is built in and a CUDA device exists, else CPU only."""
    if CUDA_PROVIDER in available and cuda_device_count() > 0:
        return [CUDA_PROVIDER, CPU_PROVIDER]
    return [CPU_PROVIDER]


class OnnxGraphRunner:
    """One ONNX Runtime session with the input checks of its graph."""

    def __init__(
        self, session: Any, path: Path, expected: Mapping[str, tuple[int | str, ...]], dtypes: Mapping[str, type]
    ) -> None:
        """Wrap ``session`` (from ``path``); ``expected`` gives each input's shape, symbols for dynamic axes."""
        self.session = session
        self.path = path
        self.expected = dict(expected)
        self.dtypes = dict(dtypes)
        self.output_names = [o.name for o in session.get_outputs()]

    def _check(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Feeds converted to the graph's dtypes, or a BackendError naming the bad input."""
        missing = sorted(set(self.expected) - set(feeds))
        if missing:
            raise BackendError(f"{self.path.name} needs inputs {sorted(self.expected)} but got no {missing}; pass every input.")
        checked: dict[str, np.ndarray] = {}
        symbols: dict[str, int] = {}
        for name, shape in self.expected.items():
            array: np.ndarray = np.ascontiguousarray(feeds[name], dtype=self.dtypes[name])
            if array.ndim != len(shape):
                raise BackendError(
                    f"input {name!r} of {self.path.name} has shape {array.shape} but the graph takes {list(shape)}; "
                    "fix the caller's array layout."
                )
            for axis, (size, want) in enumerate(zip(array.shape, shape)):
                if isinstance(want, str):
                    if size < 1:
                        raise BackendError(f"input {name!r} of {self.path.name} has {want}={size}; pass at least one.")
                    if symbols.setdefault(want, size) != size:
                        raise BackendError(
                            f"input {name!r} of {self.path.name} has {want}={size} but another input has {want}={symbols[want]}."
                        )
                elif size != want:
                    raise BackendError(
                        f"input {name!r} of {self.path.name} has shape {array.shape} but axis {axis} must be {want}; "
                        f"the graph takes {list(shape)}."
                    )
            checked[name] = array
        return checked

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run the graph on host arrays (converted to the graph's dtypes); ``outputs``: only these (None: all)."""
        checked = self._check(feeds)
        names = list(outputs) if outputs is not None else self.output_names
        unknown = [n for n in names if n not in self.output_names]
        if unknown:
            raise BackendError(f"{self.path.name} has no outputs {unknown} (it has {self.output_names}).")
        results = self.session.run(names, checked)
        arrays = {name: np.asarray(value) for name, value in zip(names, results)}
        if io_names.CLASS_MAP in arrays and io_names.TEXT_EMBEDS in checked:
            arrays[io_names.CLASS_MAP] = host_class_map(arrays[io_names.CLASS_MAP], checked[io_names.TEXT_EMBEDS].shape[0])
        return arrays


class OrtWindowBlender:
    """Tiled mode's blending on the sessions' device (``runtime.tiling.WindowBlender``), with IOBinding.

    The image graph's logits and the strip (``acc``, ``valid``: ``tile_blend.onnx`` /
    ``tile_emit.onnx``, see ``export.tile_onnx``) stay ``OrtValue``s on the device between calls;
    only class-map rows and validity are copied to the host, probabilities only when asked for.
    """

    def __init__(
        self, image: Any, blend: Any, emit: Any, text_embeds: np.ndarray, grid: WindowGrid, device: tuple[str, int]
    ) -> None:
        """Create the strip on ``device`` (``("cpu", 0)`` or ``("cuda", id)``) for one image of ``grid``."""
        ort = import_onnxruntime()
        self.image, self.blend_session, self.emit_session, self.grid, self.device = image, blend, emit, grid, device
        self.num_classes = int(text_embeds.shape[0])
        strip = min(grid.size, grid.height)

        def on_device(array: np.ndarray) -> Any:
            return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), *device)

        self._acc = on_device(np.zeros((self.num_classes + 1, strip, grid.width), np.float32))  # [N + 1, R, W]
        self._valid = on_device(np.zeros((strip, grid.width), np.float32))  # [R, W]
        self._weights = on_device(blend_weights(grid.size, grid.overlap))  # [S, S]
        self._text = on_device(np.asarray(text_embeds, dtype=np.float32))  # [N, 512]
        self._all_valid = np.ones((grid.size, grid.size), np.float32)
        self._logits: Any = None  # OrtValue [b, N, 96, 96]

    def infer(self, views: np.ndarray) -> None:
        """Run the image graph on views ``[b, 3, S, S]``; its logits stay an OrtValue on the device."""
        binding = self.image.io_binding()
        binding.bind_cpu_input(io_names.IMAGES, np.ascontiguousarray(views, dtype=np.float32))
        binding.bind_ortvalue_input(io_names.TEXT_EMBEDS, self._text)
        binding.bind_output(io_names.LOGITS, *self.device)
        self.image.run_with_iobinding(binding)
        self._logits = binding.get_outputs()[0]

    def blend(self, index: int, row: int, col: int, height: int, width: int, valid: np.ndarray | None) -> None:
        """Blend view ``index`` of the last ``infer`` into the strip (``tile_blend.onnx``)."""
        if self._logits is None:
            raise RuntimeError("blend before infer")
        window_valid = self._all_valid
        if valid is not None:
            window_valid = np.zeros_like(self._all_valid)
            window_valid[:height, :width] = valid
        binding = self.blend_session.io_binding()
        binding.bind_ortvalue_input(io_names.TILE_ACC, self._acc)
        binding.bind_ortvalue_input(io_names.TILE_VALID, self._valid)
        binding.bind_ortvalue_input(io_names.LOGITS, self._logits)
        binding.bind_cpu_input(io_names.TILE_PLACE, np.array([index, row, col, height, width], dtype=np.int64))
        binding.bind_cpu_input(io_names.TILE_WINDOW_VALID, window_valid)
        binding.bind_ortvalue_input(io_names.TILE_WEIGHTS, self._weights)
        for name in io_names.TILE_BLEND_OUTPUTS:
            binding.bind_output(name, *self.device)
        self.blend_session.run_with_iobinding(binding)
        self._acc, self._valid = binding.get_outputs()

    def emit(self, count: int, with_probs: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Normalize, argmax and shift the strip on the device (``tile_emit.onnx``); class map and validity to the host."""
        binding = self.emit_session.io_binding()
        binding.bind_ortvalue_input(io_names.TILE_ACC, self._acc)
        binding.bind_ortvalue_input(io_names.TILE_VALID, self._valid)
        binding.bind_cpu_input(io_names.TILE_COUNT, np.array([count], dtype=np.int64))
        for name in io_names.TILE_EMIT_OUTPUTS:
            host = name in (io_names.TILE_LABELS, io_names.TILE_VALID_ROWS) or (name == io_names.PROBS and with_probs)
            binding.bind_output(name, *(("cpu", 0) if host else self.device))
        self.emit_session.run_with_iobinding(binding)
        labels, valid_rows, probs, self._acc, self._valid = binding.get_outputs()
        labels_host = host_class_map(labels.numpy(), self.num_classes)  # [count, W]
        return labels_host, valid_rows.numpy() > 0.5, probs.numpy() if with_probs else None

    def close(self) -> None:
        """Drop the strip's device values (ONNX Runtime frees them with the last reference)."""
        self._acc = self._valid = self._logits = None


class OnnxRuntimeBackend:
    """GSNet's text and image graphs on ONNX Runtime.

    Attributes:
        name: "onnxruntime".
        model_digest: digest of the exported weights (from the folder's manifest).
        max_views: None (any view batch).
        preferred_views: 5 (the paper protocol's batch).
        manifest: the folder's manifest (template, normalization, sizes, tool versions).
        providers: execution providers the sessions use, best first (set on enter).
    """

    name = "onnxruntime"
    max_views: int | None = None
    preferred_views = 5

    def __init__(self, onnx_dir: str | Path, providers: Sequence[str] | None = None) -> None:
        """Open and validate ``onnx_dir``; sessions are created on ``__enter__``.

        Args:
            onnx_dir: folder written by ``gsnet export onnx``.
            providers: ONNX Runtime execution providers, best first (None: CUDA when available, else CPU).

        Raises:
            ExportError: the folder is incomplete, mixes exports or holds graphs that are not ours.
        """
        self.onnx_dir: OnnxDir = open_onnx_dir(onnx_dir)
        self.manifest: OnnxManifest = self.onnx_dir.manifest
        self.model_digest = self.manifest.model_digest
        self.requested_providers = list(providers) if providers is not None else None
        self.providers: list[str] = []
        self._text: OnnxGraphRunner | None = None
        self._image: OnnxGraphRunner | None = None
        self._encoder: OnnxGraphRunner | None = None
        self._head: OnnxGraphRunner | None = None
        self._tile_sessions: tuple[Any, Any, Any] | None = None  # image, tile_blend, tile_emit

    def __enter__(self) -> OnnxRuntimeBackend:
        """Create both sessions and record the providers they got."""
        ort = import_onnxruntime()
        available = list(ort.get_available_providers())
        if self.requested_providers is not None:
            unknown = [p for p in self.requested_providers if p not in available]
            if unknown:
                raise BackendError(f"ONNX Runtime here has no {unknown} (available: {available}); pick from those.")
            wanted = self.requested_providers
        else:
            wanted = default_providers(available)
        text_session = open_session(self.onnx_dir.text_path, wanted)
        image_session = open_session(self.onnx_dir.image_path, wanted)
        got = list(image_session.get_providers())
        if wanted[0] not in got:
            if self.requested_providers is not None:
                raise BackendError(
                    f"ONNX Runtime could not start {wanted[0]} (sessions got {got}); check the GPU driver and CUDA libraries "
                    f"or pass providers=[{CPU_PROVIDER!r}]."
                )
            warnings.warn(f"ONNX Runtime could not start {wanted[0]}; running on {got} instead.", RuntimeWarning, stacklevel=2)
        self.providers = got
        self._text = self._runner(text_session, self.onnx_dir.text_path, io_names.TEXT_INPUTS)
        self._image = self._runner(image_session, self.onnx_dir.image_path, io_names.IMAGE_INPUTS)
        if self.onnx_dir.paper_encoder_path is not None and self.onnx_dir.paper_head_path is not None:
            encoder, head = self.onnx_dir.paper_encoder_path, self.onnx_dir.paper_head_path
            self._encoder = self._runner(open_session(encoder, wanted), encoder, io_names.PAPER_ENCODER_INPUTS)
            self._head = self._runner(open_session(head, wanted), head, io_names.PAPER_HEAD_INPUTS)
        blend, emit = (self.onnx_dir.path / name for name in (io_names.TILE_BLEND_FILE, io_names.TILE_EMIT_FILE))
        float32 = all(v.type == "tensor(float)" for v in (*image_session.get_inputs(), *image_session.get_outputs()))
        if blend.is_file() and emit.is_file() and float32:
            tile = (open_session(blend, wanted), open_session(emit, wanted))
            for path, session, names in zip((blend, emit), tile, (io_names.TILE_BLEND_INPUTS, io_names.TILE_EMIT_INPUTS)):
                if sorted(i.name for i in session.get_inputs()) != sorted(names):
                    raise BackendError(f"{path} is not this version's tile graph; re-run `gsnet export onnx`.")
            self._tile_sessions = (image_session, *tile)
        return self

    @staticmethod
    def _runner(session: Any, path: Path, inputs: Sequence[str]) -> OnnxGraphRunner:
        """A runner whose input checks come from the session's own input shapes and types."""
        found = {i.name: i for i in session.get_inputs()}
        if sorted(found) != sorted(inputs):
            raise BackendError(f"{path} has inputs {sorted(found)}, expected {sorted(inputs)}; re-export the folder.")
        shapes = {name: tuple(found[name].shape) for name in inputs}
        dtypes = {name: _NUMPY_TYPES.get(found[name].type, np.float32) for name in inputs}
        return OnnxGraphRunner(session, path, shapes, dtypes)

    def __exit__(self, *exc: object) -> None:
        """Release both sessions."""
        self._text = self._image = self._encoder = self._head = None
        self._tile_sessions = None
        self.providers = []

    @property
    def text(self) -> OnnxGraphRunner:
        """The text graph's runner (tokens -> text_embeds)."""
        if self._text is None:
            raise BackendError("the onnxruntime backend is not open; use it in a 'with' block")
        return self._text

    @property
    def image(self) -> OnnxGraphRunner:
        """The image graph's runner (images, text_embeds -> logits)."""
        if self._image is None:
            raise BackendError("the onnxruntime backend is not open; use it in a 'with' block")
        return self._image

    def _paper_runner(self, runner: OnnxGraphRunner | None) -> OnnxGraphRunner:
        """``runner``, or why there is none."""
        if self._text is None:
            raise BackendError("the onnxruntime backend is not open; use it in a 'with' block")
        if runner is None:
            raise BackendError(
                f"ONNX folder {self.onnx_dir.path} has no {io_names.PAPER_ENCODER_FILE} / {io_names.PAPER_HEAD_FILE} "
                "(exported before the device protocol); re-run `gsnet export onnx`."
            )
        return runner

    @property
    def tile_blender(self) -> Callable[[WindowGrid, np.ndarray], OrtWindowBlender] | None:
        """Tiled mode's device blender factory, or None (folder without ``tile_blend.onnx``/``tile_emit.onnx``)."""
        if self._tile_sessions is None:
            return None
        image, blend, emit = self._tile_sessions
        device = ("cuda", 0) if self.providers and self.providers[0] == CUDA_PROVIDER else ("cpu", 0)

        def make(grid: WindowGrid, text_embeds: np.ndarray) -> OrtWindowBlender:
            return OrtWindowBlender(image, blend, emit, text_embeds, grid, device)

        return make

    @property
    def encoder(self) -> OnnxGraphRunner:
        """The paper protocol's encoder (image -> PAPER_FEATURES)."""
        return self._paper_runner(self._encoder)

    @property
    def head(self) -> OnnxGraphRunner:
        """The paper protocol's head (features, text_embeds, out_size -> class_map, probs)."""
        return self._paper_runner(self._head)
