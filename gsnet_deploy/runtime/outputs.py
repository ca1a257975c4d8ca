"""Output files of one input: class map, overlay PNG with legend, probabilities.

Names (one convention for both modes; the input type decides, not the mode):
- plain images: ``<stem>_mask.png`` (uint8 class index), ``<stem>_overlay.png``, and with
  ``--save-probs`` ``<stem>.probs.npy`` (float32 ``[N, H, W]``, streamed to disk in tiled mode);
- georeferenced rasters: ``<stem>_mask.tif`` and ``<stem>_probs.tif`` (``runtime.raster``), and
  ``<stem>_overlay.png``.
Every file of an input is written through one ``contracts.atomic.AtomicFiles``: the set appears
together, with the umask's permissions, or not at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from gsnet_deploy.contracts.atomic import AtomicFiles
from gsnet_deploy.errors import ImageError
from gsnet_deploy.runtime.tiling import FinishedRows

OVERLAY_MAX_SIDE = 4096  # overlays of larger images are downscaled to this long side
OVERLAY_ALPHA = 0.5  # weight of the mask colors in the overlay
MAX_CLASSES = 255  # uint8 class maps; one value stays free for nodata in rasters


def prepare_out_dir(out_dir: str | Path, option: str = "--out") -> Path:
    """Create the output folder if needed and check that a file can be created in it.

    Raises:
        ImageError: the folder cannot be created or written.

    """
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = AtomicFiles()
        probe.part(out / ".gsnet-probe")
        probe.discard()
    except OSError as exc:
        raise ImageError(f"cannot write to output folder {out} ({exc.strerror or exc}); pass a writable {option}") from exc
    return out


def prepare_out_file(path: str | Path, option: str) -> Path:
    """Check, before any work, that ``path`` can be written later (its folder is created)."""
    path = Path(path)
    try:
        prepare_out_dir(path.parent, option)
    except ImageError as exc:
        raise ImageError(f"{option} {path} cannot be written: {exc}") from exc
    if path.is_dir():
        raise ImageError(f"{option} {path} is a folder; pass a file name")
    return path


def labels_from_probs(probs: np.ndarray) -> np.ndarray:
    """Argmax over classes of ``[N, H, W]`` probabilities as a uint8 class index ``[H, W]``.

    Raises:
        ImageError: more than 255 classes (a uint8 mask cannot hold them).

    """
    if probs.shape[0] > MAX_CLASSES:
        raise ImageError(f"{probs.shape[0]} classes do not fit a uint8 mask (at most {MAX_CLASSES}); use fewer classes")
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
    files: AtomicFiles,
    path: Path,
    rgb: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    palette: np.ndarray,
    *,
    nodata: int | None = None,
) -> Path:
    """Write ``render_overlay(...)`` as PNG to ``path``'s temporary in ``files`` (renamed on commit)."""
    image = render_overlay(rgb, labels, class_names, palette, nodata=nodata)
    image.save(files.part(path), format="PNG")
    return path


class MaskSink(Protocol):
    """Where an input's class map (and probabilities) go: ``PlainMaskSink`` or ``raster.GeoTiffMaskSink``."""

    nodata: int | None

    def write(self, rows: FinishedRows) -> None:
        """Take a band of merged probabilities (tiled mode)."""
        ...

    def write_labels(self, row_off: int, labels: np.ndarray, valid: np.ndarray | None, probs: np.ndarray | None) -> None:
        """Take a band of class indices and, when saved, probabilities."""
        ...

    def close(self) -> list[Path]:
        """Finish the temporaries; returns the final paths, mask first."""
        ...

    def preview(self, max_side: int) -> np.ndarray:
        """The class map for the overlay (after ``close``)."""
        ...

    def abort(self) -> None:
        """Release what the temporaries hold (``AtomicFiles`` deletes them)."""
        ...


class PlainMaskSink:
    """A ``RowSink`` for plain images: class map held in memory, probabilities streamed to ``.probs.npy``.

    The class map (uint8 ``[H, W]``) is saved as ``<stem>_mask.png`` on ``close``; the
    probabilities go straight into a memory-mapped ``.npy`` temporary, so a large image in tiled
    mode never holds ``[N, H, W]`` in memory. All files are temporaries of ``files``.
    """

    nodata: int | None = None  # plain class maps have no nodata value

    def __init__(
        self, files: AtomicFiles, out_dir: Path, stem: str, num_classes: int, height: int, width: int, *, save_probs: bool
    ) -> None:
        """Allocate the class map and, with ``save_probs``, the probabilities file."""
        if num_classes > MAX_CLASSES:
            raise ImageError(f"{num_classes} classes do not fit a uint8 mask (at most {MAX_CLASSES}); use fewer classes")
        self.files = files
        self.num_classes = num_classes
        self.mask_path = out_dir / f"{stem}_mask.png"
        self.probs_path = out_dir / f"{stem}.probs.npy" if save_probs else None
        self.labels = np.zeros((height, width), dtype=np.uint8)  # [H, W]
        self._probs: np.memmap | None = None
        if self.probs_path is not None:
            shape = (num_classes, height, width)
            self._probs = np.lib.format.open_memmap(files.part(self.probs_path), mode="w+", dtype=np.float32, shape=shape)

    def write(self, rows: FinishedRows) -> None:
        """Take a band of merged probabilities (tiled mode)."""
        labels = np.argmax(rows.probs, axis=0).astype(np.uint8)  # [h, W]
        self.write_labels(rows.row_off, labels, rows.valid, rows.probs)

    def write_labels(self, row_off: int, labels: np.ndarray, valid: np.ndarray | None, probs: np.ndarray | None) -> None:
        """Take a band of class indices ``[h, W]`` and, when saved, its probabilities ``[N, h, W]``."""
        h = labels.shape[0]
        self.labels[row_off : row_off + h] = labels
        if self._probs is not None:
            if probs is None:
                raise ImageError("probabilities were asked for but the backend returned none; re-export the model")
            self._probs[:, row_off : row_off + h] = probs

    def close(self) -> list[Path]:
        """Finish the temporaries (mask PNG written, probabilities flushed); returns final paths, mask first."""
        Image.fromarray(self.labels).save(self.files.part(self.mask_path), format="PNG")
        paths = [self.mask_path]
        if self._probs is not None and self.probs_path is not None:
            self._probs.flush()
            self._probs = None
            paths.append(self.probs_path)
        return paths

    def abort(self) -> None:
        """Drop the memory map (the temporaries are removed by ``files``)."""
        self._probs = None

    def preview(self, max_side: int) -> np.ndarray:
        """The class map for the overlay (``render_overlay`` downscales it)."""
        return self.labels


def write_outputs(
    stem: str,
    out_dir: str | Path,
    rgb: np.ndarray,
    probs: np.ndarray,
    class_names: list[str],
    palette: np.ndarray,
    save_probs: bool,
) -> list[Path]:
    """Write the mask, overlay and (optionally) probabilities of one plain image, as one set.

    Args:
        stem: file name stem (the input's stem).
        out_dir: output folder (created if missing).
        rgb: uint8 ``[H, W, 3]`` input image.
        probs: float32 ``[N, H, W]`` per-class probabilities.
        class_names: N names.
        palette: uint8 ``[N, 3]``.
        save_probs: also write ``<stem>.probs.npy``.

    Returns:
        The paths written: mask, overlay, then probabilities.

    Raises:
        ImageError: the folder cannot be written, shapes disagree, or N > 255.

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
    try:
        with AtomicFiles() as files:
            sink = PlainMaskSink(files, out, stem, probs.shape[0], *rgb.shape[:2], save_probs=save_probs)
            sink.write_labels(0, labels, None, probs)
            paths = sink.close()
            paths.insert(1, write_overlay(files, out / f"{stem}_overlay.png", rgb, labels, class_names, palette))
    except OSError as exc:
        reason = exc.strerror or exc
        raise ImageError(f"cannot write outputs of {stem} in {out} ({reason}); check free space and permissions") from exc
    return paths
