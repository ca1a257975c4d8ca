"""Output files of plain (non-georeferenced) images: mask PNG, overlay PNG with legend, probabilities.

Every file is written to a temporary file in the output folder and moved into place with
``os.replace``, so a file with the final name is always complete.
Files: ``<stem>_mask.png`` (uint8 class index), ``<stem>_overlay.png`` (mask colors blended over the
image, with a legend), ``<stem>.probs.npy`` (float32 ``[N, H, W]``, with ``--save-probs``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from gsnet_deploy.errors import ImageError

OVERLAY_MAX_SIDE = 4096  # overlays of larger images are downscaled to this long side
OVERLAY_ALPHA = 0.5  # weight of the mask colors in the overlay
MAX_CLASSES_PNG = 256  # a uint8 class index holds at most 256 classes


def prepare_out_dir(out_dir: str | Path) -> Path:
    """Create the output folder if needed and check that it can be written.

    Raises:
        ImageError: the folder cannot be created or written.

    """
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".gsnet-probe-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ImageError(f"cannot write to output folder {out} ({exc.strerror or exc}); pass a writable --out") from exc
    return out


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``.

    Raises:
        ImageError: the file cannot be written.

    """
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise ImageError(f"cannot write {path} ({exc.strerror or exc}); pass a writable --out") from exc
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ImageError(f"cannot write {path} ({exc.strerror or exc}); check free space and permissions") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def labels_from_probs(probs: np.ndarray) -> np.ndarray:
    """Argmax over classes of ``[N, H, W]`` probabilities as a uint8 class index ``[H, W]``.

    Raises:
        ImageError: more than 256 classes (a uint8 mask cannot hold them).

    """
    if probs.shape[0] > MAX_CLASSES_PNG:
        raise ImageError(f"{probs.shape[0]} classes do not fit a uint8 mask (at most {MAX_CLASSES_PNG}); use fewer classes")
    return np.argmax(probs, axis=0).astype(np.uint8)  # [H, W]


def _legend(class_names: list[str], palette: np.ndarray, height: int) -> Image.Image:
    """A white panel listing each class with its color swatch, in as many columns as needed."""
    font = ImageFont.load_default()
    line_h, swatch, pad = 18, 12, 6
    per_col = max(1, (max(height, line_h + 2 * pad) - 2 * pad) // line_h)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max(int(probe.textlength(name, font=font)) for name in class_names)
    col_w = pad + swatch + pad + text_w + pad
    ncols = -(-len(class_names) // per_col)
    panel = Image.new("RGB", (ncols * col_w, max(height, 1)), (255, 255, 255))
    draw = ImageDraw.Draw(panel)
    for i, name in enumerate(class_names):
        x = (i // per_col) * col_w + pad
        y = (i % per_col) * line_h + pad
        color = tuple(int(v) for v in palette[i])
        draw.rectangle([x, y + 2, x + swatch, y + 2 + swatch], fill=color, outline=(0, 0, 0))
        draw.text((x + swatch + pad, y), name, fill=(0, 0, 0), font=font)
    return panel


def render_overlay(
    rgb: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    palette: np.ndarray,
    *,
    nodata: int | None = None,
) -> Image.Image:
    """Blend the colored mask over the image and put a legend at its right.

    Args:
        rgb: uint8 ``[H, W, 3]``.
        labels: uint8 ``[H', W']`` class index (resized to the image with nearest neighbour if different).
        class_names: N names in class order.
        palette: uint8 ``[N, 3]``.
        nodata: label value drawn without color (the image shows through).

    Returns:
        The overlay image (long side at most ``OVERLAY_MAX_SIDE`` plus the legend).

    """
    h, w = rgb.shape[:2]
    scale = min(1.0, OVERLAY_MAX_SIDE / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    base = Image.fromarray(rgb)
    if base.size != size:
        base = base.resize(size, Image.Resampling.BILINEAR)
    lab_img = Image.fromarray(labels)
    if lab_img.size != size:
        lab_img = lab_img.resize(size, Image.Resampling.NEAREST)
    lab = np.asarray(lab_img)  # [h, w]
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(palette)] = palette
    colored = lut[lab].astype(np.float32)  # [h, w, 3]
    img = np.asarray(base).astype(np.float32)
    blend = np.full(lab.shape, OVERLAY_ALPHA, dtype=np.float32)  # [h, w]
    if nodata is not None:
        blend[lab == nodata] = 0.0
    out = img * (1.0 - blend[..., None]) + colored * blend[..., None]
    overlay = Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))
    legend = _legend(class_names, palette, overlay.height)
    canvas = Image.new("RGB", (overlay.width + legend.width, max(overlay.height, legend.height)), (255, 255, 255))
    canvas.paste(overlay, (0, 0))
    canvas.paste(legend, (overlay.width, 0))
    return canvas


def write_overlay(
    path: Path,
    rgb: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    palette: np.ndarray,
    *,
    nodata: int | None = None,
) -> Path:
    """Write ``render_overlay(...)`` to ``path`` as PNG, atomically."""
    image = render_overlay(rgb, labels, class_names, palette, nodata=nodata)
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def write_outputs(
    stem: str,
    out_dir: str | Path,
    rgb: np.ndarray,
    probs: np.ndarray,
    class_names: list[str],
    palette: np.ndarray,
    save_probs: bool,
) -> list[Path]:
    """Write the mask, overlay and (optionally) probabilities of one plain image.

    Args:
        stem: file name stem (the input's stem).
        out_dir: output folder (created if missing).
        rgb: uint8 ``[H, W, 3]`` input image.
        probs: float32 ``[N, H, W]`` per-class probabilities.
        class_names: N names.
        palette: uint8 ``[N, 3]``.
        save_probs: also write ``<stem>.probs.npy``.

    Returns:
        The paths written, mask first.

    Raises:
        ImageError: the folder cannot be written, shapes disagree, or N > 256.

    """
    if probs.ndim != 3 or probs.shape[1:] != rgb.shape[:2]:
        raise ImageError(f"probabilities {probs.shape} do not match the image {rgb.shape[:2]}")
    if len(class_names) != probs.shape[0] or palette.shape != (probs.shape[0], 3):
        raise ImageError(
            f"{probs.shape[0]} probability channels, {len(class_names)} class names and a palette of "
            f"{palette.shape[0]} colors do not agree"
        )
    out = prepare_out_dir(out_dir)
    labels = labels_from_probs(probs)
    paths = [atomic_write(out / f"{stem}_mask.png", lambda tmp: Image.fromarray(labels).save(tmp, format="PNG"))]
    paths.append(write_overlay(out / f"{stem}_overlay.png", rgb, labels, class_names, palette))
    if save_probs:
        data = np.ascontiguousarray(probs, dtype=np.float32)

        def _save(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.save(f, data)

        paths.append(atomic_write(out / f"{stem}.probs.npy", _save))
    return paths
