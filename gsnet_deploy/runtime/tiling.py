"""Window grid, blending weights and the streaming strip of tiled inference (numpy reference, device interface).

Tiled mode runs the image graph on square windows (384 px, the graph's view size) cut from the
image at its native resolution with an overlap, and merges the per-window probabilities with a
weight that falls off toward each window's edges so that no seams remain. This module knows
nothing about files or engines; ``runtime.tiled`` drives it and ``runtime.raster`` feeds it.

Conventions:
- Windows start at multiples of ``stride = window - overlap``; the last row and column of windows
  are aligned to the image's bottom and right edges, so every pixel is covered and no window
  leaves the image (except on a side shorter than the window, see below).
- A side shorter than the window gets one window starting at 0; the pixels past the image are
  filled by reflection (``pad_to_window``) and their predictions are dropped when accumulating.
- Windows are visited row by row (row-major). Once every window of a window row has been added,
  the image rows above the next window row's start are final and are emitted, so only a strip of
  ``window`` rows of float accumulators is ever held (``StripAccumulator``).
- The same strip may live on a backend's device (``WindowBlender``, e.g. ``model.tile_blend``):
  ``DeviceStrip`` keeps the bookkeeping here and gets finished rows back as a class map
  (``LabelRows``); ``StripAccumulator`` stays the reference the device blenders are tested against.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import numpy as np

WINDOW = 384  # side of one view fed to the image graph
DEFAULT_OVERLAP = 128
EMIT_ROWS = 128  # finished rows are handed out in bands of at most this many rows (bounds temporaries)


def axis_starts(length: int, window: int, overlap: int) -> list[int]:
    """Start offsets of windows along one axis of ``length`` pixels.

    Args:
        length: image size along the axis (> 0).
        window: window size (> 0).
        overlap: pixels shared by consecutive windows (0 <= overlap < window).

    Returns:
        Increasing starts; the first is 0 and, when ``length >= window``, the last is
        ``length - window`` (aligned to the image edge). Consecutive windows overlap by at least
        ``overlap`` pixels.

    """
    if length <= 0 or window <= 0:
        raise ValueError(f"length and window must be positive, got {length} and {window}")
    if not 0 <= overlap < window:
        raise ValueError(f"overlap must be in [0, {window}), got {overlap}")
    if length <= window:
        return [0]
    stride = window - overlap
    starts = list(range(0, length - window, stride))
    starts.append(length - window)
    return starts


@dataclass(frozen=True)
class Window:
    """One window of the grid.

    Attributes:
        index: position in visiting order (row-major).
        row: window-row index in the grid.
        row_off: first image row covered (may extend past the image when the image is short).
        col_off: first image column covered.
        height: image rows inside the window (``<= size``).
        width: image columns inside the window (``<= size``).

    """

    index: int
    row: int
    row_off: int
    col_off: int
    height: int
    width: int


@dataclass(frozen=True)
class WindowGrid:
    """The windows over an ``height x width`` image.

    Attributes:
        height: image height in pixels.
        width: image width in pixels.
        size: window side (384 for the GSNet image graph).
        overlap: minimum overlap between neighbouring windows, in pixels.

    """

    height: int
    width: int
    size: int = WINDOW
    overlap: int = DEFAULT_OVERLAP

    def __post_init__(self) -> None:
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"image size must be positive, got {self.height}x{self.width}")
        if not 0 <= self.overlap < self.size:
            raise ValueError(f"overlap must be in [0, {self.size}), got {self.overlap}")

    @property
    def row_starts(self) -> list[int]:
        """Start rows of the window rows."""
        return axis_starts(self.height, self.size, self.overlap)

    @property
    def col_starts(self) -> list[int]:
        """Start columns of the window columns."""
        return axis_starts(self.width, self.size, self.overlap)

    def __len__(self) -> int:
        return len(self.row_starts) * len(self.col_starts)

    def __iter__(self) -> Iterator[Window]:
        cols = self.col_starts
        index = 0
        for row, r0 in enumerate(self.row_starts):
            for c0 in cols:
                yield Window(
                    index=index,
                    row=row,
                    row_off=r0,
                    col_off=c0,
                    height=min(self.size, self.height - r0),
                    width=min(self.size, self.width - c0),
                )
                index += 1

    def rows_of(self, row: int) -> list[Window]:
        """The windows of one window row, left to right."""
        return [w for w in self if w.row == row]


def pad_to_window(patch: np.ndarray, size: int = WINDOW) -> np.ndarray:
    """Pad an ``[h, w, ...]`` patch to ``[size, size, ...]`` at the bottom/right by reflection.

    Reflection (``numpy.pad(mode="reflect")``, mirror without repeating the edge pixel) keeps
    image statistics near the border, unlike zero padding which the model would read as a dark
    object. A side of 1 pixel cannot be reflected and is repeated instead.
    """
    h, w = patch.shape[:2]
    if h > size or w > size or h == 0 or w == 0:
        raise ValueError(f"patch {patch.shape[:2]} does not fit a {size}x{size} window")
    if (h, w) == (size, size):
        return patch
    pads = [(0, size - h), (0, size - w)] + [(0, 0)] * (patch.ndim - 2)
    if min(h, w) > 1:
        return np.pad(patch, pads, mode="reflect")
    return np.pad(patch, pads, mode="edge")


def ramp_profile(size: int, overlap: int) -> np.ndarray:
    """1-D blending profile of a window: a linear ramp over ``overlap`` pixels at each end.

    ``p[i] = min(1, (min(i, size - 1 - i) + 0.5) / overlap)``: strictly positive (the smallest value
    is ``0.5 / overlap`` at the window border) and flat in the middle. Two windows overlapping by
    exactly ``overlap`` pixels have ramps that sum to 1; any other overlap is fixed by the
    normalization in ``StripAccumulator``.

    Returns:
        float32 ``[size]``.

    """
    if overlap <= 0:
        return np.ones(size, dtype=np.float32)
    i = np.arange(size, dtype=np.float64)
    dist = np.minimum(i, size - 1 - i) + 0.5
    return np.minimum(1.0, dist / overlap).astype(np.float32)


def blend_weights(size: int = WINDOW, overlap: int = DEFAULT_OVERLAP) -> np.ndarray:
    """2-D blending weights of one window: outer product of two ramp profiles, float32 ``[size, size]``."""
    p = ramp_profile(size, overlap)
    return np.outer(p, p).astype(np.float32)  # [size, size]


@dataclass(frozen=True)
class FinishedRows:
    """A band of image rows whose merged probabilities are final.

    Attributes:
        row_off: first image row of the band.
        probs: float32 ``[N, h, W]`` normalized probabilities (0 where ``valid`` is False).
        valid: bool ``[h, W]``; False where no window contributed (nodata) or the source said nodata.

    """

    row_off: int
    probs: np.ndarray
    valid: np.ndarray


@dataclass(frozen=True)
class LabelRows:
    """A band of final image rows as a class map, from a device blender (``WindowBlender``).

    Attributes:
        row_off: first image row of the band.
        labels: class index ``[h, W]``: uint8 for N <= 255, int32 beyond (``protocol.host_class_map``);
            0 where ``valid`` is False.
        valid: bool ``[h, W]``; False where no window contributed (nodata) or the source said nodata.
        probs: float32 ``[N, h, W]`` normalized probabilities (0 where not valid), or None when not asked for.

    """

    row_off: int
    labels: np.ndarray
    valid: np.ndarray
    probs: np.ndarray | None


class WindowBlender(Protocol):
    """One image's window blending on a backend's device: the strip lives there, finished rows come back.

    The host keeps the bookkeeping (``DeviceStrip``: which rows are final, where the strip's top
    is); the blender runs the image graph on a batch of views and, per window, the upsampling
    96 -> 384, the sigmoid, the ramp weights and the accumulation into the strip, and on ``emit``
    the normalization, the argmax and the shift of the strip. Logits and per-window
    probabilities never leave the device. Strip coordinates: row 0 is the strip's top image row.
    """

    def infer(self, views: np.ndarray) -> None:
        """Run the image graph on views float32 ``[b, 3, S, S]``; the logits stay on the device for ``blend``."""
        ...

    def blend(self, index: int, row: int, col: int, height: int, width: int, valid: np.ndarray | None) -> None:
        """Accumulate window ``index`` of the last ``infer`` at strip row ``row``, image column ``col``.

        Only its top-left ``height x width`` pixels (inside the image) count; ``valid``: bool
        ``[height, width]`` source validity, None for all valid.
        """
        ...

    def emit(self, count: int, with_probs: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Normalize the top ``count`` strip rows, shift the strip up by ``count``; host arrays.

        Returns:
            (labels ``[count, W]`` uint8/int32, valid bool ``[count, W]``, probs float32
            ``[N, count, W]`` or None unless ``with_probs``).

        """
        ...

    def close(self) -> None:
        """Free the device buffers now (the blender is not used afterwards)."""
        ...


BandT = TypeVar("BandT", "FinishedRows", "LabelRows")  # what a strip hands out: probabilities or class maps


class _StripRows(Generic[BandT]):
    """Bookkeeping of a strip of ``size`` image rows: which rows are final as windows come row by row.

    Subclasses hold the buffers and implement ``_emit_chunk``; windows must be added in the grid's
    visiting order (window rows non-decreasing; windows may be skipped). Finished rows come out in
    bands of at most ``EMIT_ROWS`` rows.
    """

    def __init__(self, grid: WindowGrid) -> None:
        self.grid = grid
        self._row_starts = grid.row_starts
        self._strip = min(grid.size, grid.height)  # rows held
        self._top = 0  # image row held at strip row 0
        self._row = 0  # current window row
        self._done = False

    def _enter_row(self, window: Window) -> list[BandT]:
        """Check the order, move to the window's row; returns the bands this finishes."""
        if self._done:
            raise RuntimeError("accumulator already finished")
        if window.row < self._row:
            raise ValueError(f"windows must come in row order: got row {window.row} after row {self._row}")
        return list(self.advance(window.row)) if window.row > self._row else []

    @property
    def row(self) -> int:
        """The window row the strip is at."""
        return self._row

    def finish(self) -> Iterator[BandT]:
        """Emit every remaining row (call once, after the last window); bands come lazily."""
        if self._done:
            return iter(())
        self._done = True
        return self._emit(self.grid.height - self._top)

    def advance(self, row: int) -> Iterator[BandT]:
        """Move to window row ``row``: yield the rows above its start and shift the strip up.

        Bands are made one at a time as the caller iterates, so a long run of skipped (nodata)
        window rows never sits in memory whole; consume the iterator before the next ``add``.
        """
        if self._done:
            raise RuntimeError("accumulator already finished")
        self._row = row
        new_top = self._row_starts[row]
        return self._emit(new_top - self._top)

    def _emit(self, count: int) -> Iterator[BandT]:
        """Yield the top ``count`` rows, in bands of at most ``EMIT_ROWS`` rows."""
        chunk = min(self._strip, EMIT_ROWS)
        while count > 0:
            n = min(count, chunk)
            band = self._emit_chunk(n)
            self._top += n
            yield band
            count -= n

    def _emit_chunk(self, count: int) -> BandT:
        """The top ``count`` strip rows (``count <= strip``), normalized; shifts the strip up by ``count``."""
        raise NotImplementedError


class StripAccumulator(_StripRows[FinishedRows]):
    """Weighted average of overlapping window probabilities, held one strip of rows at a time, in numpy.

    The host reference of the device blenders (``WindowBlender``). Windows must be added in the
    grid's visiting order (window rows non-decreasing; windows may be skipped). Memory:
    ``(N + 1) * size * width`` float32 plus a bool strip; finished rows come out in bands of at
    most ``EMIT_ROWS`` rows.
    """

    def __init__(self, grid: WindowGrid, num_classes: int) -> None:
        """Create the strip buffers.

        Args:
            grid: the window grid being visited.
            num_classes: N, the number of probability channels per window.

        """
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        super().__init__(grid)
        self.num_classes = num_classes
        self.weights = blend_weights(grid.size, grid.overlap)  # [S, S]
        self._acc = np.zeros((num_classes, self._strip, grid.width), dtype=np.float32)  # [N, S, W]
        self._wsum = np.zeros((self._strip, grid.width), dtype=np.float32)  # [S, W]
        self._valid = np.zeros((self._strip, grid.width), dtype=bool)  # [S, W]

    @property
    def nbytes(self) -> int:
        """Bytes held by the strip buffers."""
        return self._acc.nbytes + self._wsum.nbytes + self._valid.nbytes

    def add(self, window: Window, probs: np.ndarray, valid: np.ndarray | None = None) -> list[FinishedRows]:
        """Add one window's probabilities and return the rows that became final.

        Args:
            window: the window (from this accumulator's grid).
            probs: float32 ``[N, size, size]`` probabilities of the whole (padded) window.
            valid: optional bool ``[window.height, window.width]`` source validity (None: all valid).

        Returns:
            Zero or more bands of final rows, top to bottom.

        """
        finished = self._enter_row(window)
        h, w = window.height, window.width
        r = window.row_off - self._top
        cols = slice(window.col_off, window.col_off + w)
        wgt = self.weights[:h, :w]  # [h, w]
        self._acc[:, r : r + h, cols] += probs[:, :h, :w] * wgt  # [N, h, w]
        self._wsum[r : r + h, cols] += wgt
        self._valid[r : r + h, cols] |= True if valid is None else valid
        return finished

    def _emit_chunk(self, count: int) -> FinishedRows:
        """Normalize the top ``count`` strip rows (``count <= strip``) and shift the strip up by ``count``."""
        wsum = self._wsum[:count]
        valid = self._valid[:count] & (wsum > 0)
        probs = np.divide(self._acc[:, :count], np.where(wsum > 0, wsum, 1.0), dtype=np.float32)  # [N, count, W]
        probs[:, ~valid] = 0.0
        out = FinishedRows(row_off=self._top, probs=probs, valid=valid.copy())
        keep = self._wsum.shape[0] - count
        if keep > 0:
            # overlapping slice assignment: numpy buffers the source, so rows move up intact
            self._acc[:, :keep] = self._acc[:, count:]
            self._wsum[:keep] = self._wsum[count:]
            self._valid[:keep] = self._valid[count:]
        self._acc[:, keep:] = 0.0
        self._wsum[keep:] = 0.0
        self._valid[keep:] = False
        return out


class DeviceStrip(_StripRows[LabelRows]):
    """The strip bookkeeping of ``StripAccumulator`` driving a device ``WindowBlender``.

    ``infer`` a batch of views, then ``add`` its windows in visiting order; finished rows come
    back as ``LabelRows`` (class map and validity; probabilities only with ``with_probs``).
    """

    def __init__(self, grid: WindowGrid, blender: WindowBlender, with_probs: bool) -> None:
        """Drive ``blender`` (made for ``grid``); ``with_probs``: bring the probabilities to the host too."""
        super().__init__(grid)
        self.blender = blender
        self.with_probs = with_probs

    def infer(self, views: np.ndarray) -> None:
        """Run the image graph on views ``[b, 3, S, S]`` (the next ``add`` calls index them)."""
        self.blender.infer(views)

    def add(self, index: int, window: Window, valid: np.ndarray | None = None) -> list[LabelRows]:
        """Blend view ``index`` of the last ``infer`` as ``window``; returns the rows that became final."""
        finished = self._enter_row(window)
        self.blender.blend(index, window.row_off - self._top, window.col_off, window.height, window.width, valid)
        return finished

    def _emit_chunk(self, count: int) -> LabelRows:
        labels, valid, probs = self.blender.emit(count, self.with_probs)
        return LabelRows(row_off=self._top, labels=labels, valid=valid, probs=probs)
