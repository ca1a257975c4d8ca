"""Reading ordinary images (PNG, JPEG, TIFF) into RGB uint8 arrays, with notes on conversions.

Grayscale and RGBA inputs are converted to RGB and 16-bit inputs are stretched to 8 bits; each
conversion is reported as a note so the CLI can tell the user what happened to their pixels.
Rasters with georeferencing go through ``runtime.raster`` instead.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from gsnet_deploy.errors import ImageError
from gsnet_deploy.runtime.stretch import stretch_to_uint8

# Largest plain image we accept at all (pixels); a header claiming more is treated as a decompression bomb.
MAX_PIXELS = 40_000 * 40_000


@dataclass
class LoadedImage:
    """An RGB uint8 image and what was done to it on loading.

    Attributes:
        rgb: uint8 ``[H, W, 3]``.
        notes: human-readable conversions applied (empty when the file was already 8-bit RGB).

    """

    rgb: np.ndarray
    notes: list[str] = field(default_factory=list)


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


def whole_image_limit() -> int:
    """Pixels up to which a plain image is decoded whole by PIL: Pillow's own bomb-warning limit.

    Read at call time (``PIL.Image.MAX_IMAGE_PIXELS``, about 89 MP by default) so that a user or
    test who changes Pillow's limit moves this one too. Larger images are read in windows.
    """
    limit = Image.MAX_IMAGE_PIXELS
    return MAX_PIXELS if limit is None else int(limit)


def decodes_whole(path: str | Path) -> bool | None:
    """Whether PIL should decode ``path`` whole (read from its header, no pixels decoded).

    True up to ``whole_image_limit()`` pixels, False above (Pillow's bomb error included), None
    when PIL cannot read the header (``load_image`` then says why).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return img.width * img.height <= whole_image_limit()
    except Image.DecompressionBombError:
        return False
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None


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
            upright: Image.Image = ImageOps.exif_transpose(img) or img
            rgb = _to_rgb_array(upright, notes)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image {path} is over Pillow's decompression-bomb limit; segment it in tiled mode") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        fallback = _read_16bit_tiff(path, notes) if path.suffix.lower() in (".tif", ".tiff") else None
        if fallback is None:
            raise ImageError(f"cannot read image {path} ({exc}); is it a valid PNG, JPEG or TIFF?") from exc
        rgb = fallback
    if rgb.ndim != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageError(f"image {path} has no pixels (shape {rgb.shape})")
    return LoadedImage(rgb=np.ascontiguousarray(rgb, dtype=np.uint8), notes=notes)
