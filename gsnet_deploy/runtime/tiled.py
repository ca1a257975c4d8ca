"""Tiled inference at native resolution: streaming windows through a backend into a row sink.

The image is cut into 384x384 windows with overlap (``runtime.tiling``); a worker thread reads
strips of rows from a ``RowSource`` (a raster or an in-memory image), cuts and pads the windows and
queues them in batches of the backend's preferred view count while the calling thread runs the
image graph. Each window's logits are upsampled to 384 (torch-style bilinear), passed through a
sigmoid and merged with the ramp weights; rows are handed to a ``RowSink`` as soon as no later
window touches them, so memory holds one strip of rows, never the whole probability volume.

``--gsd-scale F`` resamples the image by F before tiling (F > 1 upsamples, giving the model more
pixels per object) and the merged probabilities back to the native grid, both streaming.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from gsnet_deploy.errors import BackendError, GSNetError, ImageError
from gsnet_deploy.io_names import IMAGES, LOGITS, TEXT_EMBEDS
from gsnet_deploy.runtime.backend import Backend
from gsnet_deploy.runtime.protocol import sigmoid
from gsnet_deploy.runtime.resize import axis_weights, resize_bilinear
from gsnet_deploy.runtime.tiling import (
    DEFAULT_OVERLAP,
    EMIT_ROWS,
    WINDOW,
    FinishedRows,
    StripAccumulator,
    Window,
    WindowGrid,
    pad_to_window,
)

DEFAULT_MAX_MEMORY = 2 << 30  # bytes (--max-memory default, 2 GiB)
DEFAULT_PREFETCH = 2  # batches queued ahead of inference
OVERLAY_SIDE = 4096  # long side of the overlay written for rasters


class RowSource(Protocol):
    """An image read by rectangles of rows and columns (RGB uint8 plus an optional validity mask).

    Attributes:
        height, width: image size.
        sample_bytes: bytes per pixel and band held while reading and converting (memory estimate).

    """

    height: int
    width: int

    @property
    def sample_bytes(self) -> int:
        """Bytes per pixel and band held while reading and converting."""
        ...

    def read(self, row_off: int, row_end: int, col_off: int, col_end: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The rectangle ``[row_off, row_end) x [col_off, col_end)``: uint8 ``[h, w, 3]``, mask or None."""
        ...


class RowSink(Protocol):
    """Receives merged probabilities, top to bottom, each row exactly once."""

    def write(self, rows: FinishedRows) -> None:
        """Take one band of finished rows."""
        ...


class ArraySource:
    """A ``RowSource`` over an in-memory RGB uint8 image ``[H, W, 3]``."""

    def __init__(self, rgb: np.ndarray) -> None:
        """Wrap ``rgb`` (uint8 ``[H, W, 3]``, H and W > 0)."""
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ImageError(f"expected an RGB uint8 image [H, W, 3], got {rgb.dtype} {rgb.shape}")
        if rgb.shape[0] == 0 or rgb.shape[1] == 0:
            raise ImageError(f"image has no pixels (shape {rgb.shape}); check the input")
        self.rgb = rgb
        self.height, self.width = int(rgb.shape[0]), int(rgb.shape[1])
        self.sample_bytes = 1

    def read(self, row_off: int, row_end: int, col_off: int, col_end: int) -> tuple[np.ndarray, np.ndarray | None]:
        """A view of the image rectangle; no mask."""
        return self.rgb[row_off:row_end, col_off:col_end], None


class ArraySink:
    """A ``RowSink`` gathering the full float32 ``[N, H, W]`` probabilities (small images only)."""

    def __init__(self, num_classes: int, height: int, width: int) -> None:
        """Allocate ``probs`` float32 ``[num_classes, height, width]``."""
        self.probs = np.zeros((num_classes, height, width), dtype=np.float32)  # [N, H, W]
        self.valid = np.zeros((height, width), dtype=bool)  # [H, W]

    def write(self, rows: FinishedRows) -> None:
        """Copy a band of rows into place."""
        h = rows.valid.shape[0]
        self.probs[:, rows.row_off : rows.row_off + h] = rows.probs
        self.valid[rows.row_off : rows.row_off + h] = rows.valid


def _nearest_of(i0: np.ndarray, i1: np.ndarray, w0: np.ndarray) -> np.ndarray:
    """Index of the bilinear tap with the larger weight (nearest neighbour for masks)."""
    return np.where(w0 >= 0.5, i0, i1)


class ScaledSource:
    """A ``RowSource`` presenting another source resampled (torch-style bilinear) to a new size."""

    def __init__(self, source: RowSource, height: int, width: int) -> None:
        """Resample ``source`` to ``height x width`` on the fly.

        Args:
            source: the native-resolution source.
            height: target height (> 0).
            width: target width (> 0).

        """
        self.source = source
        self.height, self.width = height, width
        self._rows = axis_weights(source.height, height)  # (i0, i1, w0, w1), each [height]
        self._cols = axis_weights(source.width, width)  # each [width]
        self.sample_bytes = source.sample_bytes + 3 * 4  # float32 copy, column pass, row pass

    def read(self, row_off: int, row_end: int, col_off: int, col_end: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Target pixels of the rectangle, interpolated from the native pixels around them."""
        i0, i1, w0, w1 = (a[row_off:row_end] for a in self._rows)
        c0, c1, cw0, cw1 = (a[col_off:col_end] for a in self._cols)
        top, bottom = int(i0.min()), int(i1.max()) + 1
        left, right = int(c0.min()), int(c1.max()) + 1
        rgb, valid = self.source.read(top, bottom, left, right)  # [h, w, 3]
        x = rgb.astype(np.float32)
        # rows first, then columns, in float32: the same operations as resize_bilinear on the whole image
        rows = x[i0 - top] * w0[:, None, None] + x[i1 - top] * w1[:, None, None]  # [h', w, 3]
        out = rows[:, c0 - left] * cw0[None, :, None] + rows[:, c1 - left] * cw1[None, :, None]  # [h', w', 3]
        rgb_out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
        valid_out = None
        if valid is not None:
            rows_nn = _nearest_of(i0, i1, w0) - top
            valid_out = valid[rows_nn][:, _nearest_of(c0, c1, cw0) - left]  # [h', w']
        return rgb_out, valid_out


class ScaledSink:
    """A ``RowSink`` resampling rows of a scaled grid back to the native grid before passing them on.

    Native rows are emitted as soon as both of their bilinear source rows have arrived; at most the
    last incoming band plus one row is buffered.
    """

    def __init__(self, sink: RowSink, scaled_hw: tuple[int, int], native_hw: tuple[int, int]) -> None:
        """Wrap ``sink`` (native ``native_hw``) to accept rows of size ``scaled_hw``."""
        self.sink = sink
        self._rows = axis_weights(scaled_hw[0], native_hw[0])  # each [H]
        self._cols = axis_weights(scaled_hw[1], native_hw[1])  # each [W]
        self._native_h = native_hw[0]
        self._next = 0  # next native row to emit
        self._top = 0  # scaled row held at buffer row 0
        self._probs: np.ndarray | None = None  # [N, k, Ws]
        self._valid: np.ndarray | None = None  # [k, Ws]

    def write(self, rows: FinishedRows) -> None:
        """Buffer scaled rows and emit every native row they complete."""
        if self._probs is None or self._valid is None:
            self._probs, self._valid, self._top = rows.probs, rows.valid, rows.row_off
        else:
            self._probs = np.concatenate([self._probs, rows.probs], axis=1)  # [N, k + h, Ws]
            self._valid = np.concatenate([self._valid, rows.valid], axis=0)  # [k + h, Ws]
        held_end = self._top + self._valid.shape[0]
        i0, i1, w0, w1 = self._rows
        end = self._next
        while end < self._native_h and i1[end] < held_end:
            end += 1
        if end > self._next:
            sl = slice(self._next, end)
            r0, r1 = i0[sl] - self._top, i1[sl] - self._top
            c0, c1, cw0, cw1 = self._cols
            p = self._probs
            rows_p = p[:, r0] * w0[sl][None, :, None] + p[:, r1] * w1[sl][None, :, None]  # [N, m, Ws]
            out = rows_p[:, :, c0] * cw0 + rows_p[:, :, c1] * cw1  # [N, m, W]
            valid = self._valid[_nearest_of(r0, r1, w0[sl])][:, _nearest_of(c0, c1, cw0)]  # [m, W]
            out[:, ~valid] = 0.0
            self.sink.write(FinishedRows(row_off=self._next, probs=out.astype(np.float32, copy=False), valid=valid))
            self._next = end
        if self._next < self._native_h:
            drop = int(i0[self._next]) - self._top
            if drop > 0:
                self._probs, self._valid = self._probs[:, drop:].copy(), self._valid[drop:].copy()
                self._top += drop


def tiled_memory_bytes(width: int, num_classes: int, batch: int, prefetch: int, sample_bytes: int = 8, size: int = WINDOW) -> int:
    """Upper estimate of the bytes tiled inference holds for an image ``width`` pixels wide.

    Counts the accumulator strip, one band of finished rows with the sink's conversions (argmax,
    scaled probabilities), two read chunks of ``batch`` windows (raw samples, conversions, masks),
    queued and in-flight view batches, one batch of logits and one window's upsampled
    probabilities with their temporaries.
    """
    strip = size * width
    band = min(size, EMIT_ROWS) * width
    chunk = size * min(width, batch * (size - DEFAULT_OVERLAP) + size)
    accumulator = (num_classes + 1) * strip * 4 + strip
    finished = num_classes * band * (4 + 4 + 1) + band * (8 + 2)
    reader = 2 * chunk * (3 * (sample_bytes + 1) + 4)
    views = (prefetch + 2) * batch * 3 * size * size * 4
    logits = batch * num_classes * (size // 4) ** 2 * 4
    per_window = num_classes * size * size * 4 * 3
    return accumulator + finished + reader + views + logits + per_window


def plan_batch(width: int, num_classes: int, backend: Backend, max_memory: int, sample_bytes: int = 8) -> tuple[int, int]:
    """Views per batch and batches to prefetch that fit ``max_memory``.

    Starts from ``backend.preferred_views`` (capped by ``backend.max_views``) and ``DEFAULT_PREFETCH``,
    then lowers the prefetch depth and the batch until the estimate fits.

    Raises:
        ImageError: even one view at a time does not fit.

    """
    batch = max(1, int(backend.preferred_views))
    if backend.max_views is not None:
        batch = max(1, min(batch, int(backend.max_views)))
    prefetch = DEFAULT_PREFETCH
    while tiled_memory_bytes(width, num_classes, batch, prefetch, sample_bytes) > max_memory:
        if prefetch > 1:
            prefetch -= 1
        elif batch > 1:
            batch //= 2
        else:
            need = tiled_memory_bytes(width, num_classes, 1, 1, sample_bytes) / 2**20
            raise ImageError(
                f"tiled inference of a {width}-pixel-wide image with {num_classes} classes needs about "
                f"{need:.0f} MiB, more than --max-memory {max_memory / 2**20:.0f} MiB; "
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


def run_tiled(
    source: RowSource,
    sink: RowSink,
    backend: Backend,
    text_embeds: np.ndarray,
    *,
    overlap: int = DEFAULT_OVERLAP,
    max_memory: int = DEFAULT_MAX_MEMORY,
    progress: bool = True,
    desc: str = "tiled",
) -> tuple[int, int]:
    """Stream every window of ``source`` through the image graph into ``sink``.

    The caller owns the sink's commit/abort and must have entered the backend (``with backend:``).
    An exception in reading or inference (KeyboardInterrupt included) stops the reader thread and
    propagates unchanged.

    Args:
        source: the image, possibly a ``ScaledSource``.
        sink: receives every image row once, top to bottom.
        backend: an entered backend; batches use ``preferred_views`` capped by ``max_views``.
        text_embeds: float32 ``[N, 512]``.
        overlap: window overlap in pixels (0 <= overlap < 384).
        max_memory: byte budget for the buffers (see ``tiled_memory_bytes``).
        progress: show a tqdm bar with windows per second and ETA.
        desc: label of the progress bar.

    Returns:
        (windows run through the graph, windows skipped as nodata).

    """
    if not 0 <= overlap < WINDOW:
        raise GSNetError(f"--overlap {overlap} must be between 0 and {WINDOW - 1} pixels; pick a smaller overlap")
    if text_embeds.ndim != 2 or text_embeds.shape[0] == 0:
        raise BackendError(f"text embeddings must be [N, D] with N > 0, got {text_embeds.shape}")
    text_embeds = np.ascontiguousarray(text_embeds, dtype=np.float32)
    num_classes = int(text_embeds.shape[0])
    grid = WindowGrid(source.height, source.width, WINDOW, overlap)
    batch, prefetch = plan_batch(source.width, num_classes, backend, max_memory, source.sample_bytes)
    from tqdm import tqdm  # NOTE: lazy, tqdm is only needed when tiling

    stop = threading.Event()
    batches: queue.Queue = queue.Queue(maxsize=prefetch)
    worker = threading.Thread(target=_reader, args=(source, grid, batch, batches, stop), name="gsnet-tile-reader", daemon=True)
    accumulator = StripAccumulator(grid, num_classes)
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
                logits = _run_views(backend, item.views[: len(item.windows)], text_embeds)  # [b, N, h, w]
                for i, win in enumerate(item.windows):
                    probs = sigmoid(resize_bilinear(logits[i], (WINDOW, WINDOW)))  # [N, S, S]
                    for rows in accumulator.add(win, probs, item.valids[i]):
                        sink.write(rows)
            ran += len(item.windows)
            skipped += item.skipped
            bar.update(len(item.windows) + item.skipped)
        for rows in accumulator.finish():
            sink.write(rows)
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


def _scaled_size(height: int, width: int, gsd_scale: float) -> tuple[int, int]:
    """Image size after ``--gsd-scale`` resampling (at least 1 pixel a side)."""
    if not gsd_scale > 0 or not np.isfinite(gsd_scale):
        raise GSNetError(f"--gsd-scale {gsd_scale} must be a positive number (1 keeps the native resolution)")
    return max(1, round(height * gsd_scale)), max(1, round(width * gsd_scale))


def _plan_source_sink(source: RowSource, sink: RowSink, gsd_scale: float) -> tuple[RowSource, RowSink]:
    """Wrap source and sink for ``--gsd-scale`` (unchanged when the scale keeps the size)."""
    size = _scaled_size(source.height, source.width, gsd_scale)
    if size == (source.height, source.width):
        return source, sink
    return ScaledSource(source, *size), ScaledSink(sink, size, (source.height, source.width))


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
    """Tiled inference on an in-memory (non-georeferenced) image.

    Args:
        rgb: uint8 ``[H, W, 3]``.
        backend: an entered backend.
        text_embeds: float32 ``[N, 512]``.
        overlap: window overlap in pixels.
        gsd_scale: resample by this factor before tiling (results come back at ``H x W``).
        max_memory: byte budget of the streaming buffers (the returned array is extra).
        progress: show a progress bar.

    Returns:
        float32 ``[N, H, W]`` probabilities.

    Raises:
        ImageError: the image is empty or not RGB uint8, or the budget is too small.

    """
    source = ArraySource(rgb)
    sink = ArraySink(int(text_embeds.shape[0]), source.height, source.width)
    src, snk = _plan_source_sink(source, sink, gsd_scale)
    run_tiled(src, snk, backend, text_embeds, overlap=overlap, max_memory=max_memory, progress=progress)
    return sink.probs


@dataclass
class TiledResult:
    """What ``segment_tiled`` wrote and did.

    Attributes:
        paths: files written (mask GeoTIFF first).
        notes: conversions applied to the input (bands, stretch, scale).
        windows: windows run through the image graph.
        skipped: windows skipped because they held only nodata.

    """

    paths: list[Path]
    notes: list[str]
    windows: int
    skipped: int


def segment_tiled(
    path: str | Path,
    backend: Backend,
    text_embeds: np.ndarray,
    *,
    out_dir: str | Path,
    class_names: list[str],
    palette: np.ndarray,
    bands: tuple[int, ...] | None = None,
    stem: str | None = None,
    overlap: int = DEFAULT_OVERLAP,
    gsd_scale: float = 1.0,
    max_memory: int = DEFAULT_MAX_MEMORY,
    save_probs: bool = False,
    overlay: bool = True,
    progress: bool = True,
) -> TiledResult:
    """Segment a raster window by window into ``<stem>_mask.tif`` (+ ``_probs.tif``, ``_overlay.png``).

    Outputs keep the input's CRS, transform and size; nodata pixels stay nodata. Files appear under
    their final names only when complete: on any exception (KeyboardInterrupt included) the reader
    stops, temporary files are deleted and the exception propagates.

    Args:
        path: any raster rasterio reads.
        backend: an entered backend.
        text_embeds: float32 ``[N, 512]``.
        out_dir: output folder (created if missing).
        class_names: N names (mask tags, legend).
        palette: uint8 ``[N, 3]`` class colors.
        bands: ``--bands`` (1-based), or None for the rules of ``runtime.raster``.
        stem: output stem (default: the input's stem).
        overlap: window overlap in pixels.
        gsd_scale: resample by this factor before tiling; outputs stay on the native grid.
        max_memory: byte budget of the streaming buffers.
        save_probs: also write per-class uint8 probability bands.
        overlay: also write a downscaled ``<stem>_overlay.png`` with a legend.
        progress: show a progress bar.

    Raises:
        RasterError: the raster cannot be read, bands cannot be chosen or outputs cannot be written.
        ImageError: the memory budget is too small for the image width.

    """
    from gsnet_deploy.runtime import raster
    from gsnet_deploy.runtime.outputs import prepare_out_dir, write_overlay

    path = Path(path)
    stem = stem or path.stem
    if palette.shape != (len(class_names), 3) or len(class_names) != text_embeds.shape[0]:
        raise GSNetError(
            f"{len(class_names)} class names, {text_embeds.shape[0]} text embeddings and a palette of "
            f"{palette.shape[0]} colors do not agree; pass one of each per class"
        )
    out = prepare_out_dir(out_dir)
    with raster.RasterReader(path, bands) as reader:
        notes = list(reader.notes)
        sink = raster.GeoTiffMaskSink(reader, out, stem, class_names, palette, save_probs=save_probs)
        try:
            src, snk = _plan_source_sink(reader, sink, gsd_scale)
            if src is not reader:
                notes.append(f"image resampled by --gsd-scale {gsd_scale:g} to {src.width}x{src.height} for tiling")
            ran, skipped = run_tiled(
                src,
                snk,
                backend,
                text_embeds,
                overlap=overlap,
                max_memory=max_memory,
                progress=progress,
                desc=path.name,
            )
            paths = sink.commit()
        except BaseException:
            sink.abort()
            raise
        if overlay:
            labels = raster.read_mask_preview(paths[0], OVERLAY_SIDE)
            rgb = reader.read_preview(OVERLAY_SIDE)
            paths.append(write_overlay(out / f"{stem}_overlay.png", rgb, labels, class_names, palette, nodata=sink.nodata))
    return TiledResult(paths=paths, notes=notes, windows=ran, skipped=skipped)
