"""Raster I/O for tiled inference: windowed reads, band choice, nodata, stretch, GeoTIFF writing.

The only module of the package that imports rasterio, and only inside functions, so that
``import gsnet_deploy.runtime`` works where rasterio is not installed. Reads follow the rasterio
windowed-I/O guide (docs/topics/windowed-rw.rst, rasterio, BSD-3-Clause): rectangles of a few
consecutive windows (GDAL's block cache serves the blocks shared by overlapping reads), never the
whole raster.

Band rules (``--bands``):
- 3 bands: used as R, G, B.
- 4 or more bands: the bands whose color interpretation is red, green and blue when the file says
  so (a note tells which); otherwise a ``RasterError`` asks for ``--bands``.
- 1 or 2 bands: a ``RasterError`` asks for ``--bands`` (``--bands 1`` repeats one band as gray).
- ``--bands`` takes 3 indices (1-based), or 1 index for a gray image.

Nodata: a pixel is nodata when every selected band is masked (GDAL's nodata value, alpha band or
internal mask, read with ``read_masks``), or when any selected band holds NaN or infinity (float
rasters: NaN is the usual "no value", and one NaN would poison the stretch).
Output class maps hold the input's nodata value when it is an integer in ``[N, 255]``, else 255
(the input's value is kept in the ``GSNET_INPUT_NODATA`` tag).

Sparse GeoTIFFs: blocks that were never written (``SPARSE_OK``; GDAL reports no offset for them)
hold no data. In a file without nodata or mask they are treated as nodata: a window lying wholly
in such blocks is neither read nor run through the model, and the class map holds nodata there.

Non-8-bit imagery is stretched linearly between the 2nd and 98th percentiles of all selected
bands, computed once from a decimated read (GDAL uses overviews when present); the stretch is
written into the output's metadata tags.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

import numpy as np

from gsnet_deploy.contracts.atomic import AtomicFiles
from gsnet_deploy.errors import RasterError
from gsnet_deploy.runtime.stretch import STRETCH_PERCENTILES, stretch_to_uint8
from gsnet_deploy.runtime.tiling import FinishedRows

PREVIEW_SIDE = 1024  # long side of the decimated read used for percentiles
BLOCK = 256  # block size of the written GeoTIFFs
DEFAULT_MASK_NODATA = 255
MAX_SPARSE_SCAN = 1 << 20  # blocks per band whose presence is checked on opening (a 256-px-block 260k^2 raster)
_COLOR_RGB = ("red", "green", "blue")


def _rasterio() -> ModuleType:
    """Import rasterio or raise a RasterError saying how to install it."""
    try:
        import rasterio
    except ImportError as exc:
        raise RasterError("rasterio is not installed, so GeoTIFF and other rasters cannot be read; pip install rasterio") from exc
    return rasterio


def parse_bands(spec: str) -> tuple[int, ...]:
    """Parse ``--bands`` text such as ``"4,3,2"`` into 1-based band indices.

    Raises:
        RasterError: not 1 or 3 positive integers.

    """
    try:
        bands = tuple(int(p) for p in spec.split(","))
    except ValueError:
        bands = ()
    if len(bands) not in (1, 3) or any(b < 1 for b in bands):
        raise RasterError(f"--bands {spec!r} is not 3 band numbers like 1,2,3 (or one band like 1); fix --bands")
    return bands


def select_bands(
    count: int, colorinterp: list[str], bands: tuple[int, ...] | None, path: Path, notes: list[str]
) -> tuple[int, int, int]:
    """Choose the three 1-based bands to read as R, G, B (rules in the module docstring).

    Args:
        count: number of bands in the file.
        colorinterp: lower-case color interpretation name per band.
        bands: ``--bands`` as parsed, or None.
        path: the file, for messages.
        notes: list to append a note to when a choice was made for the user.

    Raises:
        RasterError: the bands cannot be chosen without ``--bands`` or a band is out of range.

    """
    if bands is not None:
        bad = [b for b in bands if b > count]
        if bad:
            raise RasterError(f"--bands asks for band {bad[0]} but {path} has {count} bands; pick bands 1..{count}")
        if len(bands) == 1:
            notes.append(f"band {bands[0]} used as a gray image")
            return bands[0], bands[0], bands[0]
        return bands[0], bands[1], bands[2]
    if count == 3:
        return 1, 2, 3
    if count >= 4:
        found = [colorinterp.index(c) + 1 if c in colorinterp else 0 for c in _COLOR_RGB]
        if all(found):
            notes.append(f"{count}-band raster: using bands {found[0]},{found[1]},{found[2]} (color interpretation RGB)")
            return found[0], found[1], found[2]
        raise RasterError(
            f"{path} has {count} bands without red/green/blue color interpretation; "
            "pass --bands R,G,B (for example --bands 1,2,3)"
        )
    raise RasterError(
        f"{path} has {count} band{'s' if count > 1 else ''}, not RGB; pass --bands (e.g. --bands 1 for a gray image)"
    )


def mask_nodata_value(input_nodata: float | None, has_mask: bool, num_classes: int) -> int | None:
    """Nodata value of the output class map (None when the input has no nodata at all).

    Raises:
        RasterError: nodata is needed but every uint8 value is a class (N > 255).

    """
    if not has_mask:
        return None
    if num_classes > 255:
        raise RasterError(f"{num_classes} classes leave no uint8 value for nodata; use at most 255 classes")
    if input_nodata is not None and float(input_nodata).is_integer() and num_classes <= input_nodata <= 255:
        return int(input_nodata)
    return DEFAULT_MASK_NODATA


def apply_stretch(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map ``low..high`` linearly to 0..255 (clipped, rounded) as ``stretch_to_uint8`` does."""
    scaled = (values.astype(np.float32) - np.float32(low)) * np.float32(255.0 / (high - low))
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)  # non-finite pixels are nodata anyway
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


class RasterReader:
    """An open raster read as RGB uint8 strips of rows, with validity masks.

    Use as a context manager. ``read`` may be called from one worker thread at a time.

    Attributes:
        path: the file.
        height, width: raster size.
        bands: the 1-based bands read as R, G, B.
        has_mask: whether any selected band has nodata, an alpha band or a mask.
        nodata: the input's nodata value of the first selected band (None if unset).
        stretch: ``(low, high)`` mapped to 0..255 for non-uint8 data, else None.
        notes: conversions applied, for the user.

    """

    def __init__(self, path: str | Path, bands: tuple[int, ...] | None = None) -> None:
        """Record the arguments; the file is opened on ``__enter__``.

        Args:
            path: any file rasterio can open.
            bands: ``--bands`` (1-based), or None for the rules in the module docstring.

        """
        self.path = Path(path)
        self._bands_arg = bands
        self._ds: Any = None
        self.notes: list[str] = []
        self.height = 0
        self.width = 0
        self.bands: tuple[int, int, int] = (1, 2, 3)
        self.has_mask = False
        self.nodata: float | None = None
        self.stretch: tuple[float, float] | None = None
        self.dtype = "uint8"
        self.floating = False
        self._masked = False  # GDAL nodata, alpha band or internal mask on a selected band
        self._absent: np.ndarray | None = None  # [rows, cols] of blocks never written (sparse GeoTIFF), or None
        self._block = (0, 0)  # block height, width

    def __enter__(self) -> RasterReader:
        rasterio = _rasterio()
        if not self.path.is_file():
            raise RasterError(f"raster {self.path} does not exist or is not a file; check the path")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                self._ds = rasterio.open(self.path)
        except rasterio.errors.RasterioError as exc:
            raise RasterError(f"cannot open raster {self.path} ({exc}); is it a valid GeoTIFF or raster file?") from exc
        try:
            self._inspect()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the dataset (idempotent)."""
        if self._ds is not None:
            self._ds.close()
            self._ds = None

    @property
    def dataset(self) -> Any:
        """The open rasterio dataset (for georeferencing)."""
        if self._ds is None:
            raise RuntimeError("RasterReader used outside its with-block")
        return self._ds

    def _inspect(self) -> None:
        """Check sizes, choose bands, find masks and compute the stretch."""
        ds = self._ds
        self.height, self.width = int(ds.height), int(ds.width)
        if self.height <= 0 or self.width <= 0:
            raise RasterError(f"raster {self.path} has no pixels ({self.width}x{self.height}); check the file")
        colorinterp = [ci.name.lower() for ci in ds.colorinterp]
        self.bands = select_bands(ds.count, colorinterp, self._bands_arg, self.path, self.notes)
        dtypes = {ds.dtypes[b - 1] for b in self.bands}
        if len(dtypes) != 1:
            raise RasterError(f"bands {self.bands} of {self.path} have different types {sorted(dtypes)}; pick other --bands")
        self.dtype = dtypes.pop()
        flags = [ds.mask_flag_enums[b - 1] for b in self.bands]
        self.floating = np.dtype(self.dtype).kind == "f"
        self._masked = any(f != [_rasterio().enums.MaskFlags.all_valid] for f in flags)
        if not self._masked:
            self._absent = self._scan_sparse()
        self.has_mask = self.floating or self._masked or self._absent is not None
        self.nodata = ds.nodatavals[self.bands[0] - 1]
        if self.dtype != "uint8":
            self._compute_stretch()

    def _scan_sparse(self) -> np.ndarray | None:
        """Blocks of a GeoTIFF that were never written, in every selected band; None if there are none."""
        ds = self._ds
        shapes = {tuple(ds.block_shapes[b - 1]) for b in self.bands}
        if ds.driver != "GTiff" or len(shapes) != 1:
            return None
        bh, bw = shapes.pop()
        rows, cols = -(-self.height // bh), -(-self.width // bw)
        if rows * cols > MAX_SPARSE_SCAN:
            return None
        absent = np.ones((rows, cols), dtype=bool)
        for band in sorted(set(self.bands)):
            for y, x in zip(*np.nonzero(absent), strict=True):
                if ds.get_tag_item(f"BLOCK_OFFSET_{x}_{y}", "TIFF", bidx=band) is not None:
                    absent[y, x] = False
        if not absent.any():
            return None
        self._block = (bh, bw)
        self.notes.append(f"{int(absent.sum())} of {absent.size} blocks were never written (sparse GeoTIFF): treated as nodata")
        return absent

    def _present(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Validity ``[len(rows), len(cols)]`` from the sparse-block map (pixel rows and columns)."""
        assert self._absent is not None
        bh, bw = self._block
        return ~self._absent[np.ix_(rows // bh, cols // bw)]

    def _compute_stretch(self) -> None:
        """Percentile stretch from a decimated read of the selected bands (masked pixels excluded)."""
        scale = min(1.0, PREVIEW_SIDE / max(self.height, self.width))
        shape = (3, max(1, round(self.height * scale)), max(1, round(self.width * scale)))
        data, valid = self._read(None, out_shape=shape)
        _, (low, high) = stretch_to_uint8(data.transpose(1, 2, 0), STRETCH_PERCENTILES, valid)  # [h, w, 3]
        self.stretch = (low, high)
        lo_p, hi_p = STRETCH_PERCENTILES
        self.notes.append(
            f"{self.dtype} bands stretched to 8 bits between percentiles {lo_p:g} and {hi_p:g} "
            f"({low:g}..{high:g}), from a {shape[2]}x{shape[1]} decimated read"
        )

    def _read(self, window: Any, out_shape: tuple[int, int, int] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Read the selected bands ``[3, h, w]`` and the validity mask ``[h, w]`` (None: all valid)."""
        rasterio = _rasterio()
        kwargs: dict[str, Any] = {"window": window}
        if out_shape is not None:
            kwargs.update(out_shape=out_shape, resampling=rasterio.enums.Resampling.nearest)
        try:
            data = self.dataset.read(list(self.bands), **kwargs)  # [3, h, w]
            valid = None
            if self._masked:
                masks = self.dataset.read_masks(list(self.bands), **kwargs)  # [3, h, w]
                valid = np.any(masks > 0, axis=0)  # [h, w]
            if self.floating:
                finite = np.isfinite(data).all(axis=0)  # NaN / inf in any band is nodata
                valid = finite if valid is None else valid & finite
            if self._absent is not None:
                h, w = data.shape[1:]
                if window is None:  # a decimated whole-raster read: nearest source pixel of each sample
                    rows = ((np.arange(h) + 0.5) * self.height / h).astype(np.int64)
                    cols = ((np.arange(w) + 0.5) * self.width / w).astype(np.int64)
                else:
                    rows = np.arange(int(window.row_off), int(window.row_off) + h)
                    cols = np.arange(int(window.col_off), int(window.col_off) + w)
                present = self._present(rows, cols)
                valid = present if valid is None else valid & present
        except rasterio.errors.RasterioError as exc:
            where = "" if window is None else f" window {window.col_off},{window.row_off} {window.width}x{window.height}"
            detail = exc.__cause__ or exc  # rasterio wraps GDAL's message as the cause
            raise RasterError(
                f"cannot read{where} of raster {self.path} ({detail}); the file may be truncated or corrupt"
            ) from exc
        return data, valid

    @property
    def sample_bytes(self) -> int:
        """Bytes per pixel and band held while reading and converting (raw, float32 stretch, uint8)."""
        return int(np.dtype(self.dtype).itemsize) + (4 if self.stretch is not None else 0) + 1

    def read(self, row_off: int, row_end: int, col_off: int, col_end: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Read the rectangle ``[row_off, row_end) x [col_off, col_end)``.

        Returns:
            RGB uint8 ``[h, w, 3]`` and the validity mask bool ``[h, w]`` (None when the raster has no mask).

        """
        if self._absent is not None:
            bh, bw = self._block
            if self._absent[row_off // bh : (row_end - 1) // bh + 1, col_off // bw : (col_end - 1) // bw + 1].all():
                shape = (row_end - row_off, col_end - col_off)
                return np.zeros((*shape, 3), dtype=np.uint8), np.zeros(shape, dtype=bool)  # never written: no read
        window = _rasterio().windows.Window(col_off, row_off, col_end - col_off, row_end - row_off)
        data, valid = self._read(window)
        if self.stretch is not None:
            rgb = apply_stretch(data, *self.stretch)
        else:
            rgb = data.astype(np.uint8, copy=False)
        return np.ascontiguousarray(rgb.transpose(1, 2, 0)), valid  # [h, w, 3]

    def read_preview(self, max_side: int) -> np.ndarray:
        """A decimated RGB uint8 ``[h, w, 3]`` of the whole raster (long side at most ``max_side``)."""
        scale = min(1.0, max_side / max(self.height, self.width))
        shape = (3, max(1, round(self.height * scale)), max(1, round(self.width * scale)))
        data, _ = self._read(None, out_shape=shape)
        rgb = apply_stretch(data, *self.stretch) if self.stretch is not None else data.astype(np.uint8, copy=False)
        return np.ascontiguousarray(rgb.transpose(1, 2, 0))  # [h, w, 3]

    def stretch_tags(self) -> dict[str, str]:
        """Metadata tags describing the input conversion (stretch, bands)."""
        tags = {"GSNET_BANDS": ",".join(str(b) for b in self.bands)}
        if self.stretch is not None:
            lo_p, hi_p = STRETCH_PERCENTILES
            tags["GSNET_STRETCH"] = json.dumps(
                {
                    "percentiles": [lo_p, hi_p],
                    "low": self.stretch[0],
                    "high": self.stretch[1],
                    "dtype": self.dtype,
                }
            )
        return tags


class GeoTiffMaskSink:
    """A ``RowSink`` writing ``<stem>_mask.tif`` (and ``<stem>_probs.tif``) as temporaries of an ``AtomicFiles``.

    The class map is uint8, tiled 256x256, deflate-compressed, with a color table, the class names
    in the band description and tags, and the input's CRS, transform and nodata. ``close`` finishes
    the temporaries (the caller's ``AtomicFiles`` renames them with the input's other outputs);
    ``abort`` closes them so that ``AtomicFiles`` can delete them.
    """

    def __init__(
        self,
        reader: RasterReader,
        files: AtomicFiles,
        out_dir: str | Path,
        stem: str,
        class_names: list[str],
        palette: np.ndarray,
        *,
        save_probs: bool = False,
    ) -> None:
        """Create the temporary GeoTIFFs.

        Args:
            reader: the open input raster (georeferencing, nodata, stretch tags).
            files: the input's set of outputs; the GeoTIFFs are its temporaries.
            out_dir: output folder (created if missing).
            stem: output file stem.
            class_names: N names.
            palette: uint8 ``[N, 3]``.
            save_probs: also write one uint8 band per class (probability * 255).

        Raises:
            RasterError: the folder or files cannot be written, or the classes do not fit uint8.

        """
        rasterio = _rasterio()
        self.num_classes = len(class_names)
        if self.num_classes > 255:
            raise RasterError(f"{self.num_classes} classes do not fit a uint8 class map; use at most 255 classes")
        self.nodata = mask_nodata_value(reader.nodata, reader.has_mask, self.num_classes)
        self.out_dir = Path(out_dir)
        self.final_paths = [self.out_dir / f"{stem}_mask.tif"]
        if save_probs:
            self.final_paths.append(self.out_dir / f"{stem}_probs.tif")
        self._files = files
        self._tmp_paths: list[Path] = []
        self._datasets: list[Any] = []
        ds = reader.dataset
        base = {
            "driver": "GTiff",
            "width": reader.width,
            "height": reader.height,
            "dtype": "uint8",
            "crs": ds.crs,
            "transform": ds.transform,
            "tiled": True,
            "blockxsize": BLOCK,
            "blockysize": BLOCK,
            "compress": "deflate",
            "BIGTIFF": "IF_SAFER",
        }
        tags = {
            "GSNET_CLASS_NAMES": json.dumps(class_names),
            "GSNET_INPUT": reader.path.name,
            "GSNET_INPUT_NODATA": "none" if reader.nodata is None else repr(reader.nodata),
            **reader.stretch_tags(),
        }
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            mask_ds = self._create(self.final_paths[0], dict(base, count=1, nodata=self.nodata))
            colormap = {i: (int(c[0]), int(c[1]), int(c[2]), 255) for i, c in enumerate(palette)}
            if self.nodata is not None:
                colormap[self.nodata] = (0, 0, 0, 0)
            mask_ds.write_colormap(1, colormap)
            mask_ds.set_band_description(1, "class index: " + ", ".join(f"{i}={n}" for i, n in enumerate(class_names)))
            mask_ds.update_tags(**tags, **{f"CLASS_{i}": name for i, name in enumerate(class_names)})
            if save_probs:
                probs_ds = self._create(self.final_paths[1], dict(base, count=self.num_classes, interleave="band"))
                for i, name in enumerate(class_names):
                    probs_ds.set_band_description(i + 1, name)
                probs_ds.update_tags(**tags, GSNET_PROBS_SCALE="probability = value / 255; 0 at nodata pixels")
        except (OSError, rasterio.errors.RasterioError) as exc:
            self.abort()
            raise RasterError(f"cannot write outputs in {self.out_dir} ({exc}); pass a writable --out") from exc
        except BaseException:
            self.abort()
            raise

    def _create(self, final: Path, profile: dict[str, Any]) -> Any:
        """Open the temporary GeoTIFF of ``final`` for writing and remember it."""
        rasterio = _rasterio()
        tmp = self._files.part(final)
        self._tmp_paths.append(tmp)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            dst = rasterio.open(tmp, "w", **profile)
        self._datasets.append(dst)
        return dst

    def write(self, rows: FinishedRows) -> None:
        """Write a band of finished rows (class index and, if asked, probabilities)."""
        labels = np.argmax(rows.probs, axis=0).astype(np.uint8)  # [h, W]
        self.write_labels(rows.row_off, labels, rows.valid, rows.probs)

    def write_labels(self, row_off: int, labels: np.ndarray, valid: np.ndarray | None, probs: np.ndarray | None) -> None:
        """Write class indices ``[h, W]`` from ``row_off`` (nodata where not ``valid``) and probabilities ``[N, h, W]``."""
        rasterio = _rasterio()
        h, w = labels.shape
        window = rasterio.windows.Window(0, row_off, w, h)
        labels = labels.astype(np.uint8, copy=True)
        if self.nodata is not None and valid is not None:
            labels[~valid] = self.nodata
        try:
            self._datasets[0].write(labels, 1, window=window)
            if len(self._datasets) > 1:
                if probs is None:
                    raise RasterError("probabilities were asked for but the backend returned none; re-export the model")
                scaled = np.clip(np.rint(probs * np.float32(255.0)), 0, 255).astype(np.uint8)  # [N, h, W]
                if valid is not None:
                    scaled[:, ~valid] = 0
                self._datasets[1].write(scaled, window=window)
        except rasterio.errors.RasterioError as exc:
            raise RasterError(f"cannot write rows of {self.final_paths[0]} ({exc}); check free space") from exc

    def close(self) -> list[Path]:
        """Finish the temporary GeoTIFFs; returns the final paths (mask first), renamed by ``files``."""
        rasterio = _rasterio()
        try:
            for dst in self._datasets:
                dst.close()
            self._datasets = []
        except (OSError, rasterio.errors.RasterioError) as exc:
            self.abort()
            raise RasterError(f"cannot finish {self.final_paths[0]} ({exc}); check free space and permissions") from exc
        return list(self.final_paths)

    def preview(self, max_side: int) -> np.ndarray:
        """A decimated read of the finished class map (call after ``close``)."""
        return read_mask_preview(self._tmp_paths[0], max_side)

    def abort(self) -> None:
        """Close the temporary files (idempotent); ``files`` deletes them, GDAL side files go here."""
        for dst in self._datasets:
            # NOTE: closing a half-written file may fail; the file is deleted next, so the error is moot
            with contextlib.suppress(Exception):
                dst.close()
        self._datasets = []
        for tmp in self._tmp_paths:
            Path(str(tmp) + ".aux.xml").unlink(missing_ok=True)


def read_mask_preview(path: str | Path, max_side: int) -> np.ndarray:
    """A decimated (nearest) read of a written class map, uint8 ``[h, w]``."""
    rasterio = _rasterio()
    with rasterio.open(path) as ds:
        scale = min(1.0, max_side / max(ds.height, ds.width))
        shape = (max(1, round(ds.height * scale)), max(1, round(ds.width * scale)))
        return ds.read(1, out_shape=shape, resampling=rasterio.enums.Resampling.nearest)


def read_small_rgb(path: str | Path, notes: list[str]) -> np.ndarray | None:
    """Read a whole small raster that PIL cannot decode (16-bit RGB TIFF, ...) as RGB uint8.

    Used by ``runtime.images.load_image`` as a fallback. One band is repeated as gray, more than
    three bands use the first three; non-uint8 data is stretched (a note is appended).

    Returns:
        uint8 ``[H, W, 3]``, or None when rasterio is not installed or cannot read the file.

    """
    try:
        rasterio = _rasterio()
    except RasterError:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with rasterio.open(path) as ds:
                count = int(ds.count)
                if count == 0 or ds.height == 0 or ds.width == 0:
                    return None
                bands = [1, 1, 1] if count < 3 else [1, 2, 3]
                data = ds.read(bands)  # [3, H, W]
                masks = ds.read_masks(bands)  # [3, H, W]
    except rasterio.errors.RasterioError:
        return None
    if count < 3:
        notes.append(f"{count}-band raster: band 1 used as a gray image")
    elif count > 3:
        notes.append(f"{count}-band raster: bands 1,2,3 used as RGB")
    hwc = data.transpose(1, 2, 0)  # [H, W, 3]
    if data.dtype == np.uint8:
        return np.ascontiguousarray(hwc)
    valid = np.any(masks > 0, axis=0) & np.isfinite(data).all(axis=0)  # [H, W]
    rgb, (low, high) = stretch_to_uint8(hwc, STRETCH_PERCENTILES, valid)
    lo_p, hi_p = STRETCH_PERCENTILES
    notes.append(f"{data.dtype} raster stretched to 8 bits between percentiles {lo_p:g} and {hi_p:g} ({low:g}..{high:g})")
    return rgb


def read_first_band(path: str | Path) -> np.ndarray:
    """Band 1 of a raster, whole (label masks Pillow cannot decode, e.g. LZW or 16-bit TIFF masks).

    Raises:
        RasterError: rasterio is missing or cannot read the file.

    """
    rasterio = _rasterio()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with rasterio.open(path) as ds:
                return ds.read(1)
    except rasterio.errors.RasterioError as exc:
        raise RasterError(f"cannot read raster {path} ({exc})") from exc


def is_georeferenced(path: str | Path) -> bool:
    """Whether ``path`` is a raster with a CRS or a non-identity geotransform (False if unreadable)."""
    try:
        rasterio = _rasterio()
    except RasterError:
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with rasterio.open(path) as ds:
                return ds.crs is not None or not ds.transform.is_identity or bool(ds.gcps[0])
    except rasterio.errors.RasterioError:
        return False
