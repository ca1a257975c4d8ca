"""The four test benchmarks of the GSNet paper: layouts, class lists, ignore labels, mask reading.

GSNet: "Towards Open-Vocabulary Remote Sensing Image Semantic Segmentation" (Ye, Zhuge, Zhang,
AAAI 2025). Every fact below was read from the public reference code, github.com/yecy749/GSNet
(no licence file in the repository), and is re-stated here, not copied:

* Folder layout: the README section "Expected data structure" (``$DETECTRON2_DATASETS`` holding
  ``PotsdamSplit/{img_dir,ann_dir}``, ``FloodNet/val+test/{img,lbl}``, ``FLAIR/test/{image,mask}``,
  ``FAST/val/{images,semlabels}``) and, for the exact sub-folders and extensions, the register
  files ``gs_net/data/datasets/register_ISPRS.py``, ``register_floodnet.py``, ``register_FLAIR.py``
  and ``register_FAST_val.py``.
* ``stuff_classes`` (the evaluator's class axis) and ``ignore_label``: the same register files.
* The vocabulary handed to the model (the text prompts): ``datasets/potsdam.json``,
  ``floodnet.json``, ``flair.json``, ``fast.json``, selected by ``scripts/eval.sh`` through
  ``MODEL.SEM_SEG_HEAD.TEST_CLASS_JSON``. It is a prefix of ``stuff_classes`` in all four cases
  (FLAIR spells two names with hyphens in the JSON), so a predicted index is a class index.

What the official evaluation does with "background" (the paper says a generic background class
is left out of the mean). All four datasets register ``evaluator_type="sem_seg"``, so
``train_net.py`` builds detectron2's plain ``SemSegEvaluator``: no class is removed by name. The
exclusion happens only through the ignore label, which in three datasets *is* the background-like
class: Potsdam ignores 5 ('clutter'), FloodNet ignores 0 ('Background'), FLAIR ignores 12
('other'); FAST ignores 255 (unlabelled pixels, not a class). Ground-truth pixels with the ignore
label leave the confusion matrix, so that class has no ground-truth pixels, its IoU is NaN, and
detectron2 leaves it out of the mean. Potsdam's 'clutter' and FLAIR's 'other' are also absent from
the model's vocabulary. FloodNet's 'Background' stays in the vocabulary: the model may predict it,
and such pixels count as misses of their true class, exactly as in the official run. We make the
exclusion explicit per dataset (``DatasetSpec.excluded_classes``); for the official data it does
not change any number, because those classes are NaN anyway.

No label remapping happens in the official code (no reduce-zero-label, no lookup table): masks
are read as stored. Where the register file and the README disagree we accept both: FAST is
registered under ``SAMRS/FAST`` with masks in ``val/semlabels/gray``, the README shows ``FAST``
and ``val/semlabels``.

Pairing: detectron2's ``load_sem_seg`` sorts images and masks by name and zips them when the
counts match, without comparing names. We pair by file stem instead, and raise on an image without
a mask. The original FloodNet release names masks ``<id>_lab.png``, so FloodNet also accepts that
suffix. Masks without an image are not evaluated (detectron2 drops them too).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from gsnet_deploy.errors import DatasetError, ImageError, RasterError


class DatasetName(enum.Enum):
    """The four benchmarks of the paper's Table 2."""

    POTSDAM = "potsdam"
    FLOODNET = "floodnet"
    FLAIR = "flair"
    FAST = "fast"


@dataclass(frozen=True)
class DatasetSpec:
    """Where a benchmark lives on disk and how the official code evaluates it.

    Attributes:
        name: Which benchmark.
        stuff_classes: Class names in label order, as the official register file sets the
            metadata ``stuff_classes``; its length is the evaluator's number of classes.
        vocabulary: Class names given to the model as prompts (official ``datasets/<name>.json``);
            a prefix of ``stuff_classes``, so predicted index ``i`` means ``stuff_classes[i]``.
        ignore_label: Mask value left out of the confusion matrix (register file ``ignore_label``).
        excluded_classes: Class indices left out of the mean IoU / accuracy even if they have
            ground-truth pixels (the background-like class; see the module docstring).
        dataset_dirs: Folder names under ``--root`` that may hold the dataset, tried in order.
        image_dir: Image folder relative to the dataset folder.
        mask_dirs: Mask folders relative to the dataset folder, tried in order.
        image_ext: Image file extension, with the dot.
        mask_ext: Mask file extension, with the dot.
        mask_suffixes: Stem suffixes a mask may carry beyond the image stem, tried in order.
        paper_miou: GSNet's mIoU in the paper's Table 2 (official checkpoint), in percent.
    """

    name: DatasetName
    stuff_classes: tuple[str, ...]
    vocabulary: tuple[str, ...]
    ignore_label: int
    excluded_classes: tuple[int, ...]
    dataset_dirs: tuple[str, ...]
    image_dir: str
    mask_dirs: tuple[str, ...]
    image_ext: str
    mask_ext: str
    mask_suffixes: tuple[str, ...]
    paper_miou: float

    def __post_init__(self) -> None:
        # Internal invariants of the constants below (and of specs a test builds).
        assert len(self.vocabulary) <= len(self.stuff_classes), "vocabulary longer than stuff_classes"
        assert all(0 <= c < len(self.stuff_classes) for c in self.excluded_classes)
        assert self.image_ext.startswith(".") and self.mask_ext.startswith(".")

    @property
    def num_classes(self) -> int:
        """Size of the evaluator's class axis (``len(stuff_classes)``)."""
        return len(self.stuff_classes)


POTSDAM = DatasetSpec(
    name=DatasetName.POTSDAM,
    stuff_classes=("impervious surface", "building", "low vegetation", "tree", "car", "clutter"),
    vocabulary=("impervious surface", "building", "low vegetation", "tree", "car"),
    ignore_label=5,
    excluded_classes=(5,),
    dataset_dirs=("PotsdamSplit",),
    image_dir="img_dir/val",
    mask_dirs=("ann_dir/val",),
    image_ext=".png",
    mask_ext=".png",
    mask_suffixes=("",),
    paper_miou=45.75,
)

FLOODNET = DatasetSpec(
    name=DatasetName.FLOODNET,
    stuff_classes=(
        "Background",
        "building-flooded",
        "building-non-flooded",
        "road-flooded",
        "road-non-flooded",
        "water",
        "tree",
        "vehicle",
        "pool",
        "grass",
    ),
    vocabulary=(
        "Background",
        "building-flooded",
        "building-non-flooded",
        "road-flooded",
        "road-non-flooded",
        "water",
        "tree",
        "vehicle",
        "pool",
        "grass",
    ),
    ignore_label=0,
    excluded_classes=(0,),
    dataset_dirs=("FloodNet/val+test",),
    image_dir="img",
    mask_dirs=("lbl",),
    image_ext=".jpg",
    mask_ext=".png",
    mask_suffixes=("", "_lab"),
    paper_miou=42.63,
)

FLAIR = DatasetSpec(
    name=DatasetName.FLAIR,
    stuff_classes=(
        "building",
        "pervious surface",
        "impervious surface",
        "bare soil",
        "water",
        "coniferous",
        "deciduous",
        "brushwood",
        "vineyard",
        "herbaceous vegetation",
        "agricultural land",
        "plowed land",
        "other",
    ),
    vocabulary=(
        "building",
        "pervious-surface",
        "impervious-surface",
        "bare soil",
        "water",
        "coniferous",
        "deciduous",
        "brushwood",
        "vineyard",
        "herbaceous vegetation",
        "agricultural land",
        "plowed land",
    ),
    ignore_label=12,
    excluded_classes=(12,),
    dataset_dirs=("FLAIR/test",),
    image_dir="image",
    mask_dirs=("mask",),
    image_ext=".png",
    mask_ext=".png",
    mask_suffixes=("",),
    paper_miou=20.00,
)

_FAST_CLASSES = (
    "A220",
    "A321",
    "A330",
    "A350",
    "ARJ21",
    "Baseball-Field",
    "Basketball-Court",
    "Boeing737",
    "Boeing747",
    "Boeing777",
    "Boeing787",
    "Bridge",
    "Bus",
    "C919",
    "Cargo-Truck",
    "Dry-Cargo-Ship",
    "Dump-Truck",
    "Engineering-Ship",
    "Excavator",
    "Fishing-Boat",
    "Football-Field",
    "Intersection",
    "Liquid-Cargo-Ship",
    "Motorboat",
    "other-airplane",
    "other-ship",
    "other-vehicle",
    "Passenger-Ship",
    "Roundabout",
    "Small-Car",
    "Tennis-Court",
    "Tractor",
    "Trailer",
    "Truck-Tractor",
    "Tugboat",
    "Van",
    "Warship",
)

FAST = DatasetSpec(
    name=DatasetName.FAST,
    stuff_classes=_FAST_CLASSES,
    vocabulary=_FAST_CLASSES,
    ignore_label=255,
    excluded_classes=(),
    # NOTE: the README shows FAST/val/{images,semlabels}; register_FAST_val.py reads
    # SAMRS/FAST/val/images and val/semlabels/gray. Both are accepted, in this order.
    dataset_dirs=("FAST", "SAMRS/FAST"),
    image_dir="val/images",
    mask_dirs=("val/semlabels/gray", "val/semlabels"),
    image_ext=".png",
    mask_ext=".png",
    mask_suffixes=("",),
    paper_miou=16.61,
)


def dataset_spec(name: DatasetName) -> DatasetSpec:
    """Return the spec of one benchmark.

    Args:
        name: Which benchmark.

    Returns:
        The module-level constant for that benchmark.
    """
    match name:
        case DatasetName.POTSDAM:
            return POTSDAM
        case DatasetName.FLOODNET:
            return FLOODNET
        case DatasetName.FLAIR:
            return FLAIR
        case DatasetName.FAST:
            return FAST
    raise AssertionError(f"unhandled dataset {name!r}")


class SamplePair(NamedTuple):
    """One evaluation sample: an image file and its ground-truth mask file."""

    image: Path
    mask: Path


def resolve_dataset_dir(spec: DatasetSpec, root: Path) -> Path:
    """Find the dataset folder under ``root`` (or accept ``root`` itself as that folder).

    Args:
        spec: The benchmark.
        root: The ``--root`` folder: the ``$DETECTRON2_DATASETS``-style parent, or the dataset
            folder itself (the one holding ``spec.image_dir``).

    Returns:
        The folder that holds ``spec.image_dir``.

    Raises:
        DatasetError: If ``root`` does not exist or no candidate holds the image folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(
            f"Dataset root {str(root)!r} is not a folder; pass --root the folder holding {spec.dataset_dirs[0]!r}."
        )
    candidates = [root / d for d in spec.dataset_dirs] + [root]
    for cand in candidates:
        if (cand / spec.image_dir).is_dir():
            return cand
    tried = ", ".join(repr(str(c / spec.image_dir)) for c in candidates)
    raise DatasetError(
        f"Image folder of {spec.name.value} not found (tried {tried}); download the "
        f"official preprocessed test set and pass --root the folder holding "
        f"{spec.dataset_dirs[0]!r}."
    )


def _mask_dir(spec: DatasetSpec, dataset_dir: Path) -> Path:
    for rel in spec.mask_dirs:
        if (dataset_dir / rel).is_dir():
            return dataset_dir / rel
    tried = ", ".join(repr(str(dataset_dir / rel)) for rel in spec.mask_dirs)
    raise DatasetError(
        f"Mask folder of {spec.name.value} not found (tried {tried}); restore the mask folder of the official test set."
    )


def _files_with_ext(folder: Path, ext: str) -> list[Path]:
    # Non-recursive, like detectron2's load_sem_seg; extension matched case-insensitively.
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ext.lower())


def list_pairs(spec: DatasetSpec, root: Path) -> list[SamplePair]:
    """List the (image, mask) pairs of a benchmark, sorted by image name.

    Args:
        spec: The benchmark.
        root: The ``--root`` folder (see ``resolve_dataset_dir``).

    Returns:
        One ``SamplePair`` per image, sorted by image file name.

    Raises:
        DatasetError: If a folder is missing, the image folder holds no image, or an image has
            no mask (the message names the image file).
    """
    dataset_dir = resolve_dataset_dir(spec, root)
    image_dir = dataset_dir / spec.image_dir
    mask_dir = _mask_dir(spec, dataset_dir)
    images = _files_with_ext(image_dir, spec.image_ext)
    if not images:
        raise DatasetError(f"No {spec.image_ext} image in {str(image_dir)!r}; check --root and the {spec.name.value} layout.")
    masks = {p.stem: p for p in _files_with_ext(mask_dir, spec.mask_ext)}
    pairs: list[SamplePair] = []
    for image in images:
        mask = next((masks[image.stem + s] for s in spec.mask_suffixes if image.stem + s in masks), None)
        if mask is None:
            want = str(mask_dir / (image.stem + spec.mask_suffixes[0] + spec.mask_ext))
            raise DatasetError(f"Image {str(image)!r} has no mask (expected {want!r}); restore the mask or remove the image.")
        pairs.append(SamplePair(image=image, mask=mask))
    return pairs


def read_image(path: Path) -> np.ndarray:
    """Read an image file as RGB.

    The EXIF orientation is applied, as detectron2's ``read_image`` does for the official run.

    Args:
        path: Image file (PNG, JPEG, TIFF: whatever Pillow reads).

    Returns:
        uint8 array ``[H, W, 3]``.

    Raises:
        ImageError: If the file cannot be opened or decoded.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            upright = ImageOps.exif_transpose(img)
            rgb = np.array(upright.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise ImageError(f"Cannot read image {str(path)!r} ({exc}); replace or remove the file.") from exc
    return rgb


def _read_mask_array(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return np.array(img)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as pil_exc:
        if path.suffix.lower() not in (".tif", ".tiff"):
            raise ImageError(f"Cannot read mask {str(path)!r} ({pil_exc}); replace or remove the file.") from pil_exc
        from gsnet_deploy.runtime.raster import read_first_band

        try:
            return read_first_band(path)
        except RasterError as exc:
            raise ImageError(f"Cannot read mask {str(path)!r} with Pillow ({pil_exc}) nor rasterio ({exc}).") from exc


def read_mask(path: Path, spec: DatasetSpec) -> np.ndarray:
    """Read a ground-truth mask as integer class labels and check its values.

    Values are used as stored (the official code does no remapping).

    Args:
        path: Single-channel PNG or TIFF mask (palette PNGs give their indices).
        spec: The benchmark: valid values are ``0 .. num_classes-1`` and ``ignore_label``.

    Returns:
        int64 array ``[H, W]``.

    Raises:
        ImageError: If the file cannot be opened or decoded.
        DatasetError: If the mask has several channels or a value outside the class list that is
            not the ignore label (the message names the file).
    """
    raw = _read_mask_array(Path(path))
    if raw.ndim != 2:
        raise DatasetError(f"Mask {str(path)!r} has shape {raw.shape}, not [H, W]; masks must be single-channel label images.")
    if not np.issubdtype(raw.dtype, np.integer) and raw.dtype != np.bool_:
        raise DatasetError(f"Mask {str(path)!r} has dtype {raw.dtype}, not an integer type; masks must hold class indices.")
    mask = raw.astype(np.int64)
    bad = (mask < 0) | ((mask >= spec.num_classes) & (mask != spec.ignore_label))
    if bad.any():
        values = np.unique(mask[bad])
        shown = ", ".join(str(v) for v in values[:8]) + (", ..." if values.size > 8 else "")
        raise DatasetError(
            f"Mask {str(path)!r} holds label values {shown} outside the "
            f"{spec.num_classes} classes of {spec.name.value} (0..{spec.num_classes - 1}, "
            f"ignore {spec.ignore_label}); check that --dataset matches the data."
        )
    return mask


def check_mask_size(image: np.ndarray, mask: np.ndarray, mask_path: Path) -> None:
    """Raise if a mask does not cover its image pixel for pixel.

    Args:
        image: ``[H, W, 3]`` image.
        mask: ``[H', W']`` mask.
        mask_path: The mask file, named in the error.

    Raises:
        DatasetError: If ``(H, W) != (H', W')``.
    """
    if image.shape[:2] != mask.shape:
        raise DatasetError(
            f"Mask {str(mask_path)!r} is {mask.shape[1]}x{mask.shape[0]} but its image is "
            f"{image.shape[1]}x{image.shape[0]} (WxH); masks must match their image size."
        )
