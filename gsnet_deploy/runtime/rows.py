"""Rows in and out of tiled inference: where windows are read from and where merged rows go.

A ``RowSource`` is read by rectangles (an in-memory image, a raster, or either resampled by
``--gsd-scale``); a ``RowSink`` receives the merged probabilities top to bottom, each row once, and
a ``LabelSink`` the class map (when the blending runs on the device, probabilities only if saved).
``ScaledSource``/``ScaledSink`` resample there and back, streaming (torch-style bilinear).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from gsnet_deploy.errors import GSNetError, ImageError
from gsnet_deploy.runtime.resize import axis_weights
from gsnet_deploy.runtime.tiling import FinishedRows


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


class LabelSink(Protocol):
    """Receives final rows as a class map, top to bottom, each row once (tiled mode blending on the device).

    ``outputs.PlainMaskSink`` and ``raster.GeoTiffMaskSink`` are both a ``RowSink`` and a
    ``LabelSink``; ``runtime.tiled.run_tiled`` hands a device blender's rows to ``write_labels``.
    """

    def write_labels(self, row_off: int, labels: np.ndarray, valid: np.ndarray | None, probs: np.ndarray | None) -> None:
        """Take class indices ``[h, W]`` from ``row_off``, validity ``[h, W]`` and, when saved, probabilities ``[N, h, W]``."""
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


def scaled_size(height: int, width: int, gsd_scale: float) -> tuple[int, int]:
    """Image size after ``--gsd-scale`` resampling (at least 1 pixel a side)."""
    if not gsd_scale > 0 or not np.isfinite(gsd_scale):
        raise GSNetError(f"--gsd-scale {gsd_scale} must be a positive number (1 keeps the native resolution)")
    return max(1, round(height * gsd_scale)), max(1, round(width * gsd_scale))


def plan_source_sink(source: RowSource, sink: RowSink, gsd_scale: float) -> tuple[RowSource, RowSink]:
    """Wrap source and sink for ``--gsd-scale`` (unchanged when the scale keeps the size)."""
    size = scaled_size(source.height, source.width, gsd_scale)
    if size == (source.height, source.width):
        return source, sink
    return ScaledSource(source, *size), ScaledSink(sink, size, (source.height, source.width))
