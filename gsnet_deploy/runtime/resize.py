"""Bilinear resizing in numpy, equal to ``torch.nn.functional.interpolate(mode="bilinear")``.

The runtime must not import torch, yet the paper protocol resizes views and logits with torch's
bilinear rule (``align_corners=False``, no antialiasing). This module reproduces that rule: source
coordinate ``(dst + 0.5) * in / out - 0.5`` clamped at 0, neighbours ``floor`` and ``floor + 1``
(clamped to the last pixel), weights computed in float32.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


def axis_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Neighbour indices and weights of one axis: (i0, i1, w0, w1), each [out_size]."""
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float32)
    src = (dst + np.float32(0.5)) * scale - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.floor(src).astype(np.int64)
    i0 = np.minimum(i0, in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = (src - i0.astype(np.float32)).astype(np.float32)
    w0 = (np.float32(1.0) - w1).astype(np.float32)
    return i0, i1, w0, w1


@lru_cache(maxsize=64)
def interpolation_matrix(in_size: int, out_size: int) -> np.ndarray:
    """The ``[out_size, in_size]`` float32 matrix of one axis' bilinear resize (two non-zeros per row)."""
    i0, i1, w0, w1 = axis_weights(in_size, out_size)
    rows = np.arange(out_size)
    matrix = np.zeros((out_size, in_size), dtype=np.float32)
    np.add.at(matrix, (rows, i0), w0)
    np.add.at(matrix, (rows, i1), w1)
    matrix.setflags(write=False)
    return matrix


def resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize the last two axes of ``x`` to ``size`` (height, width), torch-style bilinear.

    Computed as two matrix products with the per-axis interpolation matrices (each row holds the
    two bilinear weights): BLAS does in milliseconds what gathering the neighbours does in seconds.
    Zeros add exactly nothing, so the result is torch's up to the rounding of one multiply-add.

    Args:
        x: float array ``[..., H, W]`` (float32 keeps the result float32).
        size: output ``(height, width)``.

    Returns:
        Array ``[..., size[0], size[1]]`` of the dtype of ``x`` (float32 for integer input).
    """
    out_h, out_w = int(size[0]), int(size[1])
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"resize target must be positive, got {size}")
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    in_h, in_w = x.shape[-2], x.shape[-1]
    if (in_h, in_w) == (out_h, out_w):
        return x.copy()
    dtype = x.dtype
    rows = interpolation_matrix(in_h, out_h).astype(dtype, copy=False)  # [out_h, H]
    cols = interpolation_matrix(in_w, out_w).astype(dtype, copy=False)  # [out_w, W]
    out = np.matmul(np.matmul(rows, x), cols.T)  # [..., out_h, out_w]
    return out.astype(dtype, copy=False)
