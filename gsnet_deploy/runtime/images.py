"""Reading ordinary images (PNG, JPEG, TIFF) into RGB uint8 arrays, with notes on conversions.

Grayscale and RGBA inputs are converted to RGB and 16-bit inputs are stretched to 8 bits; each
conversion is reported as a note so the CLI can tell the user what happened to their pixels.
Rasters with georeferencing go through ``runtime.raster`` instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from gsnet_deploy.errors import ImageError

# Largest image we accept through PIL (pixels); larger ones belong to the tiled raster path.
MAX_PIXELS = 40_000 * 40_000

STRETCH_PERCENTILES = (2.0, 98.0)


@dataclass
class LoadedImage:
    """An RGB uint8 image and what was done to it on loading.

    Attributes:
        rgb: uint8 ``[H, W, 3]``.
        notes: human-readable conversions applied (empty when the file was already 8-bit RGB).

    """

    rgb: np.ndarray
    notes: list[str] = field(default_factory=list)


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
    if sample.size == 0:
        return np.zeros(values.shape, dtype=np.uint8), (0.0, 0.0)
    lo, hi = (float(v) for v in np.percentile(sample, percentiles))
    if hi <= lo:
        hi = lo + 1.0
    scaled = (data - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8), (lo, hi)


def _to_rgb_array(img: Image.Image, notes: list[str]) -> np.ndarray:
    """Convert a PIL image of any common mode to RGB uint8, recording conversions in ``notes``."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img)
        out, (lo, hi) = stretch_to_uint8(arr)
        notes.append(f"{mode} image stretched to 8 bits between percentiles 2 and 98 ({lo:g}..{hi:g})")
        return np.repeat(out[:, :, None], 3, axis=2)
    if mode in ("L", "1", "LA"):
        notes.append(f"{'grayscale' if mode in ('L', 'LA') else mode} image converted to RGB")
        return np.asarray(img.convert("RGB"))
    if mode == "P":
        has_alpha = "transparency" in img.info
        notes.append("palette image converted to RGB" + (" (transparency dropped)" if has_alpha else ""))
        return np.asarray(img.convert("RGB"))
    if mode in ("RGBA", "RGBa"):
        notes.append("RGBA image converted to RGB (alpha dropped)")
        return np.asarray(img.convert("RGB"))
    if mode == "CMYK":
        notes.append("CMYK image converted to RGB")
        return np.asarray(img.convert("RGB"))
    if mode == "RGB":
        return np.asarray(img)
    notes.append(f"{mode} image converted to RGB")
    return np.asarray(img.convert("RGB"))


def _read_16bit_tiff(path: Path, notes: list[str]) -> np.ndarray | None:
    """Read a multi-band 16-bit TIFF that PIL cannot decode, through tifffile-free numpy paths.

    Returns None when the file is not such a TIFF; PIL then reports the error.
    """
    try:
        from gsnet_deploy.runtime import raster
    except ImportError:
        return None
    return raster.read_small_rgb(path, notes)


def load_image(path: str | Path) -> LoadedImage:
    """Read an image file into RGB uint8, applying EXIF orientation like detectron2's reader.

    Raises:
        ImageError: the file is missing, unreadable, truncated, empty or absurdly large.

    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image {path} does not exist or is not a file; check the path")
    notes: list[str] = []
    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_PIXELS:
                raise ImageError(
                    f"image {path} is {img.width}x{img.height}, too large to load whole; use --mode tiled on a GeoTIFF"
                )
            img.load()
            img = ImageOps.exif_transpose(img) or img
            rgb = _to_rgb_array(img, notes)
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        fallback = _read_16bit_tiff(path, notes) if path.suffix.lower() in (".tif", ".tiff") else None
        if fallback is None:
            raise ImageError(f"cannot read image {path} ({exc}); is it a valid PNG, JPEG or TIFF?") from exc
        rgb = fallback
    if rgb.ndim != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageError(f"image {path} has no pixels (shape {rgb.shape})")
    return LoadedImage(rgb=np.ascontiguousarray(rgb, dtype=np.uint8), notes=notes)
