"""The tiled window pipeline: windows of a ``RowSource`` through a backend into a ``RowSink``.

The image is cut into 384x384 windows with overlap (``runtime.tiling``); a worker thread reads
strips of rows from the source, cuts and pads the windows and queues them in batches of the
backend's preferred view count while the calling thread runs the image graph. Each window's
logits are upsampled to 384 (torch-style bilinear), passed through a sigmoid and merged with the
ramp weights; rows are handed to the sink as soon as no later window touches them, one band at a
time, so memory holds one strip of rows, never the whole probability volume (nor a whole run of
skipped nodata rows). A backend with a ``tile_blender`` (torch; ONNX Runtime and TensorRT when
their folder has the tile graphs or engines) does the upsampling, sigmoid, blending, normalization
and argmax on its device and hands back class-map rows; otherwise (an older export, or an image
the device blender cannot take, e.g. wider than TensorRT's tile engines) the numpy path above
runs, with a note saying why.

Memory: ``--max-memory`` bounds the host and device buffers together (``tiled_memory``); on a CPU
device they are the same memory, on a GPU the sum bounds each part.

Sources, sinks and ``--gsd-scale`` resampling live in ``runtime.rows``; what is written for an
input is decided by ``runtime.segment``.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from gsnet_deploy.contracts.atomic import signals_to_main_thread
from gsnet_deploy.contracts.io_names import IMAGES, LOGITS, TEXT_EMBEDS
from gsnet_deploy.errors import BackendError, DeviceBlendUnavailable, GSNetError, ImageError
from gsnet_deploy.runtime.backend import Backend
from gsnet_deploy.runtime.protocol import sigmoid
from gsnet_deploy.runtime.resize import resize_bilinear
from gsnet_deploy.runtime.rows import ArraySink, ArraySource, LabelSink, RowSink, RowSource, plan_source_sink
from gsnet_deploy.runtime.tiling import (
    DEFAULT_OVERLAP,
    EMIT_ROWS,
    WINDOW,
    DeviceStrip,
    FinishedRows,
    LabelRows,
    StripAccumulator,
    Window,
    WindowBlender,
    WindowGrid,
    pad_to_window,
)

DEFAULT_MAX_MEMORY = 2 << 30  # bytes (--max-memory default, 2 GiB)
DEFAULT_PREFETCH = 2  # batches queued ahead of inference


@dataclass(frozen=True)
class TiledMemory:
    """Bytes tiled inference holds, on the host and on the backend's device.

    ``--max-memory`` bounds ``total``, the sum of both parts: on a CPU device they are the same
    memory, and on a GPU the sum is a safe bound for each. The image graph's own weights and
    activations are not counted (they do not grow with the image).
    """

    host: int
    device: int

    @property
    def total(self) -> int:
        """Host plus device bytes."""
        return self.host + self.device


def tiled_memory(
    width: int,
    num_classes: int,
    batch: int,
    prefetch: int,
    sample_bytes: int = 8,
    size: int = WINDOW,
    *,
    device_blend: bool = False,
    with_probs: bool = True,
) -> TiledMemory:
    """Upper estimate of the bytes tiled inference holds for an image ``width`` pixels wide.

    Host, both paths: two read chunks of ``batch`` windows (raw samples, conversions, masks) and
    the queued and in-flight view batches. Host, numpy blending (``device_blend`` False): the
    accumulator strip, one band of finished rows with the sink's conversions (argmax, scaled
    probabilities), one batch of logits and one window's upsampled probabilities with their
    temporaries. Device blending: the host holds only a band of class map and validity (plus the
    band's probabilities and their conversions when ``with_probs``); the device holds the strip,
    its next state and one full-strip temporary (the shift, or ONNX Runtime's padded window), one
    batch of views and logits, one window's upsampled probabilities with their temporaries and one
    band being normalized.
    """
    strip = size * width
    band = min(size, EMIT_ROWS) * width
    chunk = size * min(width, batch * (size - DEFAULT_OVERLAP) + size)
    reader = 2 * chunk * (3 * (sample_bytes + 1) + 4)
    views = (prefetch + 2) * batch * 3 * size * size * 4
    logits = batch * num_classes * (size // 4) ** 2 * 4
    band_probs = num_classes * band * (4 + 4 + 1)  # probabilities, normalization temporaries, scaled copy
    if not device_blend:
        accumulator = (num_classes + 1) * strip * 4 + strip
        finished = band_probs + band * (8 + 2)
        per_window = num_classes * size * size * 4 * 3
        return TiledMemory(host=accumulator + finished + reader + views + logits + per_window, device=0)
    host_band = band * (4 + 1 + 1) + (band_probs if with_probs else 0)  # labels, validity, the sink's copy
    strip_bytes = (num_classes + 1) * strip * 4 + strip
    device_views = batch * 3 * size * size * 4
    per_window = num_classes * size * size * 4 * 4  # row pass, upsampled, sigmoid, weighted
    emitting = num_classes * band * 4 * 2 + band * (8 + 4 + 1)  # normalized and masked band, argmax, labels, validity
    device = 3 * strip_bytes + device_views + logits + per_window + emitting
    return TiledMemory(host=host_band + reader + views, device=device)


def plan_batch(
    width: int,
    num_classes: int,
    backend: Backend,
    max_memory: int,
    sample_bytes: int = 8,
    *,
    device_blend: bool = False,
    with_probs: bool = True,
) -> tuple[int, int]:
    """Views per batch and batches to prefetch whose host plus device estimate fits ``max_memory``.

    Starts from ``backend.preferred_views`` (capped by ``backend.max_views``) and ``DEFAULT_PREFETCH``,
    then lowers the prefetch depth and the batch until ``tiled_memory(...).total`` fits.

    Raises:
        ImageError: even one view at a time does not fit.

    """

    def need(batch: int, prefetch: int) -> int:
        return tiled_memory(
            width, num_classes, batch, prefetch, sample_bytes, device_blend=device_blend, with_probs=with_probs
        ).total

    batch = max(1, int(backend.preferred_views))
    if backend.max_views is not None:
        batch = max(1, min(batch, int(backend.max_views)))
    prefetch = DEFAULT_PREFETCH
    while need(batch, prefetch) > max_memory:
        if prefetch > 1:
            prefetch -= 1
        elif batch > 1:
            batch //= 2
        else:
            raise ImageError(
                f"tiled inference of a {width}-pixel-wide image with {num_classes} classes needs about "
                f"{need(1, 1) / 2**20:.0f} MiB, more than --max-memory {max_memory / 2**20:.0f} MiB; "
                "raise --max-memory or use fewer classes"
            )
    return batch, prefetch


@dataclass
class _Batch:
    """Windows cut by the reader thread: views ``[b, 3, S, S]`` (first ``len(windows)`` used)."""

    windows: list[Window] = field(default_factory=list)
    views: np.ndarray | None = None
    valids: list[np.ndarray | None] = field(default_factory=list)
    skipped: int = 0


@dataclass
class _Failure:
    """An exception raised in the reader thread, handed to the inference thread."""

    exc: BaseException


def _cut_windows(source: RowSource, grid: WindowGrid, batch: int) -> Iterator[_Batch]:
    """Read the source a chunk of ``batch`` windows at a time; yield batches of padded windows.

    Windows holding only nodata are skipped (counted in ``_Batch.skipped``).
    """
    size = grid.size
    current = _Batch(views=np.empty((batch, 3, size, size), dtype=np.float32))  # [b, 3, S, S]
    row_windows: list[Window] = []
    windows = list(grid)
    for k, win in enumerate(windows):
        row_windows.append(win)
        row_ends = k + 1 == len(windows) or windows[k + 1].row != win.row
        if len(row_windows) < batch and not row_ends:
            continue
        first, last = row_windows[0], row_windows[-1]
        left, right = first.col_off, last.col_off + last.width
        rgb, valid = source.read(first.row_off, first.row_off + first.height, left, right)  # [h, w, 3]
        for w in row_windows:
            cols = slice(w.col_off - left, w.col_off - left + w.width)
            win_valid = None if valid is None else valid[:, cols]
            if win_valid is not None and not win_valid.any():
                current.skipped += 1
                continue
            assert current.views is not None
            current.views[len(current.windows)] = pad_to_window(rgb[:, cols], size).transpose(2, 0, 1)  # [3, S, S]
            current.windows.append(w)
            current.valids.append(None if win_valid is None else win_valid.copy())
            if len(current.windows) == batch:
                yield current
                current = _Batch(views=np.empty((batch, 3, size, size), dtype=np.float32))
        row_windows = []
    if current.windows or current.skipped:
        yield current


def _reader(source: RowSource, grid: WindowGrid, batch: int, out: queue.Queue, stop: threading.Event) -> None:
    """Reader thread body: queue batches, then None; on error queue a ``_Failure``."""
    signals_to_main_thread()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        for item in _cut_windows(source, grid, batch):
            if not put(item):
                return
        put(None)
    except BaseException as exc:
        put(_Failure(exc))


def _run_views(backend: Backend, views: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
    """Run the image graph on ``views`` ``[b, 3, S, S]``; returns logits float32 ``[b, N, h, w]``."""
    out = backend.image.run({IMAGES: views, TEXT_EMBEDS: text_embeds})
    if LOGITS not in out:
        raise BackendError(f"the {backend.name} image graph returned {sorted(out)} without {LOGITS!r}; re-export the model")
    logits = np.asarray(out[LOGITS], dtype=np.float32)
    expected = (views.shape[0], text_embeds.shape[0])
    if logits.ndim != 4 or logits.shape[:2] != expected:
        raise BackendError(
            f"the {backend.name} image graph returned logits {logits.shape}, expected {expected} + (H, W); re-export the model"
        )
    return logits


TILED_FALLBACK_NOTE = (
    "the {name} backend has no device window blender (tile_blend.onnx, tile_emit.onnx, or their engines): tiled "
    "windows are blended in numpy on the host, which is slower; re-export an older ONNX folder (and rebuild the "
    "engines) to blend on the device"
)
TILED_DECLINED_NOTE = "{why}: tiled windows are blended in numpy on the host, which is slower"


def tile_blender_of(backend: Backend) -> Callable[[WindowGrid, np.ndarray], WindowBlender] | None:
    """The backend's ``tile_blender(grid, text_embeds)`` factory (blending on its device), or None."""
    factory = getattr(backend, "tile_blender", None)
    return factory if callable(factory) else None


def run_tiled(
    source: RowSource,
    sink: RowSink | LabelSink,
    backend: Backend,
    text_embeds: np.ndarray,
    *,
    overlap: int = DEFAULT_OVERLAP,
    max_memory: int = DEFAULT_MAX_MEMORY,
    progress: bool = True,
    desc: str = "tiled",
    save_probs: bool = False,
    device_blend: bool | None = None,
    notes: list[str] | None = None,
) -> tuple[int, int]:
    """Stream every window of ``source`` through the image graph into ``sink``.

    With a backend that blends on its device (``tile_blender_of``), the image graph, upsampling,
    sigmoid, blending, normalization and argmax run there: a ``LabelSink`` gets class-map rows
    (probabilities only with ``save_probs``), a plain ``RowSink`` (which needs probabilities, e.g.
    ``ScaledSink``) gets normalized bands ``[N, h, W]``; per-window ``[N, 384, 384]`` arrays never
    reach the host. Otherwise the windows' logits are merged in numpy (``StripAccumulator``, the
    reference) and a note says so.

    The caller owns the sink's commit/abort and must have entered the backend (``with backend:``).
    An exception in reading or inference (KeyboardInterrupt included) stops the reader thread and
    propagates unchanged.

    Args:
        source: the image, possibly a ``ScaledSource``.
        sink: receives every image row once, top to bottom.
        backend: an entered backend; batches use ``preferred_views`` capped by ``max_views``.
        text_embeds: float32 ``[N, 512]``.
        overlap: window overlap in pixels (0 <= overlap < 384).
        max_memory: byte budget of host plus device buffers (see ``tiled_memory``).
        progress: show a tqdm bar with windows per second and ETA.
        desc: label of the progress bar.
        save_probs: the label sink also writes probabilities (they cross to the host).
        device_blend: blend on the backend's device (None: when it can; False: the numpy reference;
            True: raise when it cannot).
        notes: where to append the note when blending falls back to numpy (and why).

    Returns:
        (windows run through the graph, windows skipped as nodata).

    """
    if not 0 <= overlap < WINDOW:
        raise GSNetError(f"--overlap {overlap} must be between 0 and {WINDOW - 1} pixels; pick a smaller overlap")
    if text_embeds.ndim != 2 or text_embeds.shape[0] == 0:
        raise BackendError(f"text embeddings must be [N, D] with N > 0, got {text_embeds.shape}")
    text_embeds = np.ascontiguousarray(text_embeds, dtype=np.float32)
    grid = WindowGrid(source.height, source.width, WINDOW, overlap)
    factory = tile_blender_of(backend) if device_blend is not False else None
    if device_blend and factory is None:
        raise BackendError(f"the {backend.name} backend cannot blend tiled windows on its device")
    blender: WindowBlender | None = None
    fallback = TILED_FALLBACK_NOTE.format(name=backend.name)
    if factory is not None:
        try:
            blender = factory(grid, text_embeds)  # allocates the strip on the device
        except DeviceBlendUnavailable as why:
            if device_blend:
                raise
            fallback = TILED_DECLINED_NOTE.format(why=why)
    if blender is None and notes is not None:
        notes.append(fallback)
    try:
        return _run_windows(source, sink, backend, text_embeds, grid, blender, max_memory, progress, desc, save_probs)
    finally:
        if blender is not None:
            blender.close()


def _run_windows(
    source: RowSource,
    sink: RowSink | LabelSink,
    backend: Backend,
    text_embeds: np.ndarray,
    grid: WindowGrid,
    blender: WindowBlender | None,
    max_memory: int,
    progress: bool,
    desc: str,
    save_probs: bool,
) -> tuple[int, int]:
    """``run_tiled`` once the blending is chosen: on the device with ``blender``, else in numpy."""
    num_classes = int(text_embeds.shape[0])
    labels_out = callable(getattr(sink, "write_labels", None))
    with_probs = save_probs or not labels_out
    batch, prefetch = plan_batch(
        source.width, num_classes, backend, max_memory, source.sample_bytes, device_blend=blender is not None,
        with_probs=with_probs,
    )  # fmt: skip
    from tqdm import tqdm  # NOTE: lazy, tqdm is only needed when tiling

    def deliver(rows: FinishedRows | LabelRows) -> None:
        if isinstance(rows, FinishedRows):
            sink.write(rows)  # type: ignore[union-attr]
        elif labels_out:
            sink.write_labels(rows.row_off, rows.labels, rows.valid, rows.probs)  # type: ignore[union-attr]
        else:
            assert rows.probs is not None
            sink.write(FinishedRows(row_off=rows.row_off, probs=rows.probs, valid=rows.valid))  # type: ignore[union-attr]

    stop = threading.Event()
    batches: queue.Queue = queue.Queue(maxsize=prefetch)
    worker = threading.Thread(target=_reader, args=(source, grid, batch, batches, stop), name="gsnet-tile-reader", daemon=True)
    strip: StripAccumulator | DeviceStrip
    if blender is None:
        strip = StripAccumulator(grid, num_classes)
    else:
        strip = DeviceStrip(grid, blender, with_probs=with_probs)
    bar = tqdm(total=len(grid), unit="win", desc=desc, disable=not progress, dynamic_ncols=True)
    ran = skipped = 0
    worker.start()
    try:
        while True:
            item = batches.get()
            if item is None:
                break
            if isinstance(item, _Failure):
                raise item.exc
            if item.windows:
                assert item.views is not None
                views = item.views[: len(item.windows)]  # [b, 3, S, S]
                if isinstance(strip, DeviceStrip):
                    strip.infer(views)
                else:
                    logits = _run_views(backend, views, text_embeds)  # [b, N, h, w]
                for i, win in enumerate(item.windows):
                    if win.row > strip.row:
                        for rows in strip.advance(win.row):  # lazily: a nodata gap is never held whole
                            deliver(rows)
                    if isinstance(strip, DeviceStrip):
                        finished: list = strip.add(i, win, item.valids[i])
                    else:
                        probs = sigmoid(resize_bilinear(logits[i], (WINDOW, WINDOW)))  # [N, S, S]
                        finished = strip.add(win, probs, item.valids[i])
                    for rows in finished:
                        deliver(rows)
            ran += len(item.windows)
            skipped += item.skipped
            bar.update(len(item.windows) + item.skipped)
        for rows in strip.finish():
            deliver(rows)
    finally:
        stop.set()
        while True:  # free queued batches so the reader's put returns at once
            try:
                batches.get_nowait()
            except queue.Empty:
                break
        worker.join()
        bar.close()
    return ran, skipped


def segment_tiled_array(
    rgb: np.ndarray,
    backend: Backend,
    text_embeds: np.ndarray,
    *,
    overlap: int = DEFAULT_OVERLAP,
    gsd_scale: float = 1.0,
    max_memory: int = DEFAULT_MAX_MEMORY,
    progress: bool = False,
) -> np.ndarray:
    """Tiled inference on an in-memory image; returns float32 ``[N, H, W]`` probabilities.

    Args:
        rgb: uint8 ``[H, W, 3]``.
        backend: an entered backend.
        text_embeds: float32 ``[N, 512]``.
        overlap: window overlap in pixels.
        gsd_scale: resample by this factor before tiling (results come back at ``H x W``).
        max_memory: byte budget of the streaming buffers (the returned array is extra).
        progress: show a progress bar.

    Raises:
        ImageError: the image is empty or not RGB uint8, or the budget is too small.

    """
    source = ArraySource(rgb)
    sink = ArraySink(int(text_embeds.shape[0]), source.height, source.width)
    src, snk = plan_source_sink(source, sink, gsd_scale)
    run_tiled(src, snk, backend, text_embeds, overlap=overlap, max_memory=max_memory, progress=progress)
    return sink.probs
