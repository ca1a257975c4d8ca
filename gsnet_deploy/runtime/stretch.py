"""Percentile stretch of high-bit-depth pixels to uint8, shared by plain images and rasters.

Its own module so that ``runtime.images`` (PIL) and ``runtime.raster`` (rasterio) both import it
downward instead of each other. Pure numpy.
"""

from __future__ import annotations

import numpy as np

STRETCH_PERCENTILES = (2.0, 98.0)


def stretch_to_uint8(
    values: np.ndarray, percentiles: tuple[float, float] = STRETCH_PERCENTILES, valid: np.ndarray | None = None
) -> tuple[np.ndarray, tuple[float, float]]:
    """Linearly stretch high-bit-depth values to uint8 between two percentiles.

    Args:
        values: array of any numeric dtype (``[H, W]`` or ``[H, W, C]``).
        percentiles: low and high percentiles mapped to 0 and 255.
        valid: optional boolean mask ``[H, W]`` of pixels to take the percentiles from (nodata excluded).

    Returns:
        The uint8 array and the (low, high) values that were mapped to 0 and 255.

    """
    data = values.astype(np.float64, copy=False)
    sample = data[valid] if valid is not None else data
    sample = sample[np.isfinite(sample)]  # NaN/inf are no value: never let them into the percentiles
    if sample.size == 0:
        return np.zeros(values.shape, dtype=np.uint8), (0.0, 0.0)
    lo, hi = (float(v) for v in np.percentile(sample, percentiles))
    if hi <= lo:
        hi = lo + 1.0
    scaled = np.nan_to_num((data - lo) * (255.0 / (hi - lo)), nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8), (lo, hi)
