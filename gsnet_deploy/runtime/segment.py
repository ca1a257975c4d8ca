"""``gsnet segment`` as a library: the one orchestrator from inputs to output files, any backend.

For a run: check everything that does not need the model first (``validate_run``: option ranges,
class count, prompt lengths, ``--bands``, output-name clashes), encode the vocabulary once (cached
on disk), then per input:

1. what the input is (``InputKind``): a georeferenced raster, a plain image PIL decodes whole, or
   a plain image too large for that, read in windows through rasterio;
2. which protocol runs (``choose_mode``, the only place the mode is decided): the paper's
   sliding-window protocol or tiled windows at native resolution;
3. one output convention, decided by the input kind and never by the mode (``runtime.outputs``):
   rasters get georeferenced ``_mask.tif`` (+ ``_probs.tif``), plain images ``_mask.png``
   (+ ``.probs.npy`` float32 ``[N, H, W]``); both get ``_overlay.png``. An input's files are
   written through one ``AtomicFiles`` and appear together or not at all.

A failing input is reported and counted; the others are still processed.

A folder of plain images in paper mode is pipelined (``segment_files``): while the backend runs
image i on one worker thread, the calling thread decodes image i+1 and then writes image i-1's
outputs. At most one image is ahead of the device and one behind it. With ``batch_images`` K > 1
(``--batch-images``), up to K consecutive images of one size share one device call where the
backend allows it (the torch backend), and the pipeline moves by such groups instead of images;
a failing group call is retried one image at a time, so the image at fault is the one reported.
Files are written and committed only by the calling thread, so Ctrl-C/SIGTERM still discard the
input in progress; log lines keep the input order.
"""

from __future__ import annotations

import enum
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from gsnet_deploy.contracts.atomic import AtomicFiles, signals_to_main_thread
from gsnet_deploy.contracts.io_names import TEXT_EMBEDS, TEXT_TOKENS
from gsnet_deploy.errors import GSNetError, ImageError, VocabularyError
from gsnet_deploy.runtime import outputs
from gsnet_deploy.runtime.backend import Backend
from gsnet_deploy.runtime.images import MAX_PIXELS, LoadedImage, decodes_whole, load_image
from gsnet_deploy.runtime.paper_path import OnePiecePath, PaperPath, paper_path
from gsnet_deploy.runtime.protocol import resize_shortest_edge
from gsnet_deploy.runtime.tiling import WINDOW
from gsnet_deploy.runtime.tokenizer import BpeTokenizer
from gsnet_deploy.runtime.vocab import DEFAULT_TEMPLATE, TextEmbeddingCache, Vocabulary

PAPER_MAX_SIDE = 1024  # --mode auto: paper protocol up to this long side, tiled above
PAPER_MAX_PIXELS = 100_000_000  # --mode paper reads the whole image; refuse beyond this
RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2", ".img")
DEMO_DIGEST_PREFIX = "demo-"  # model digests of demo weights (model.demo_digest)
DEMO_MODEL_WARNING = "this model was exported from deterministic demo weights (no --checkpoint): its masks mean nothing"
MAX_GSD_SCALE = 16.0  # --gsd-scale beyond this is almost surely a typo (256x the pixels)
MAX_BATCH_IMAGES = 64  # --batch-images: the folder pipeline holds up to about twice this many decoded images


class Mode(enum.Enum):
    """How an image is cut into views."""

    AUTO = "auto"  # paper up to 1024 px on the long side for plain images; tiled beyond and for rasters
    PAPER = "paper"  # the paper's sliding-window protocol (image resized to 640x640, 4 tiles + global view)
    TILED = "tiled"  # 384-px windows at native resolution, overlapping, blended


class InputKind(enum.Enum):
    """How an input is read and which output convention it gets."""

    RASTER = "raster"  # georeferenced: read in windows by rasterio, GeoTIFF outputs with its georeferencing
    IMAGE = "image"  # plain image decoded whole by PIL, PNG/NPY outputs
    WINDOWED_IMAGE = "windowed image"  # plain image too large for PIL (or --bands on a TIFF): rasterio windows, PNG/NPY


@dataclass
class SegmentOptions:
    """Options of a segment run (parsed once by the CLI)."""

    out_dir: Path
    mode: Mode = Mode.AUTO
    save_probs: bool = False
    overlap: int = 128
    gsd_scale: float = 1.0
    max_memory: int = 2 << 30
    bands: tuple[int, ...] | None = None
    palette: Path | None = None
    template: str = DEFAULT_TEMPLATE
    progress: bool = True
    overlay: bool = True  # library use only (benchmarks time inference without it); the CLI always writes it
    batch_images: int = 1  # paper mode: up to this many consecutive images of one size share one device call


@dataclass
class SegmentReport:
    """What a run did: written files per input and failures (input, message)."""

    written: dict[Path, list[Path]] = field(default_factory=dict)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    seconds: dict[Path, float] = field(default_factory=dict)


@dataclass
class InputResult:
    """What ``segment_one`` wrote for one input.

    Attributes:
        paths: files written: mask, overlay, then probabilities when asked.
        notes: conversions applied to the input (bands, stretch, scale).
        kind: how the input was read.
        mode: the protocol that ran.
        windows: windows run through the image graph (tiled mode; 5 views count as 1 in paper mode).
        skipped: windows skipped because they held only nodata.

    """

    paths: list[Path]
    notes: list[str]
    kind: InputKind
    mode: Mode
    windows: int = 0
    skipped: int = 0


def validate_run(paths: Sequence[Path], vocab: Vocabulary, options: SegmentOptions) -> None:
    """Every check that needs neither the model nor the pixels, so a bad run fails in a second.

    Raises:
        GSNetError: an option is out of range, the vocabulary does not fit, ``--bands`` is given
            for a plain image, or two inputs would write the same output names.

    """
    if not 0 <= options.overlap < WINDOW:
        raise GSNetError(f"--overlap {options.overlap} must be between 0 and {WINDOW - 1} pixels; pick a smaller overlap")
    if not (math.isfinite(options.gsd_scale) and 0 < options.gsd_scale <= MAX_GSD_SCALE):
        raise GSNetError(f"--gsd-scale {options.gsd_scale} must be in (0, {MAX_GSD_SCALE:g}]; 1 keeps the native resolution")
    if not options.max_memory > 0:
        raise GSNetError(f"--max-memory {options.max_memory / 2**30:g} GiB must be positive; pass e.g. --max-memory 2")
    if not 1 <= options.batch_images <= MAX_BATCH_IMAGES:
        raise GSNetError(f"--batch-images {options.batch_images} must be from 1 to {MAX_BATCH_IMAGES}; 1 is one image per call")
    validate_vocabulary(vocab, options.template)
    if options.bands is not None:
        plain = [p for p in paths if p.suffix.lower() not in RASTER_SUFFIXES]
        if plain:
            raise GSNetError(
                f"--bands applies to rasters ({', '.join(RASTER_SUFFIXES)}), not to {plain[0]}; "
                "drop --bands or segment the plain images in a separate run"
            )
    seen: dict[str, Path] = {}
    for path in paths:
        key = path.stem
        if key in seen:
            raise GSNetError(
                f"inputs {seen[key]} and {path} would both write {key}_* outputs in {options.out_dir}; "
                "rename one or segment them into different --out folders"
            )
        seen[key] = path


def validate_vocabulary(
    vocab: Vocabulary,
    template: str = DEFAULT_TEMPLATE,
    *,
    max_classes: int | None = outputs.MAX_CLASSES,
    tokenizer: BpeTokenizer | None = None,
) -> None:
    """Refuse vocabularies the class maps or CLIP's 77-token context cannot hold.

    Args:
        vocab: the classes.
        template: prompt template.
        max_classes: most classes the outputs can hold (the CLI's uint8 masks: 255); None: no limit
            (the Python API returns int32 class maps beyond 255 classes).
        tokenizer: a loaded tokenizer to reuse (None: load one).

    Raises:
        VocabularyError: more than ``max_classes`` classes, or a prompt over 77 tokens.

    """
    if max_classes is not None and len(vocab) > max_classes:
        raise VocabularyError(f"{len(vocab)} classes do not fit the uint8 class map (at most {max_classes}); use fewer classes")
    tokenizer = BpeTokenizer() if tokenizer is None else tokenizer
    for name, prompt in zip(vocab.names, vocab.prompts(template), strict=True):
        count = len(tokenizer.encode(prompt)) + 2  # start and end tokens
        if count > tokenizer.context_length:
            raise VocabularyError(
                f"class {name!r} makes a prompt of {count} tokens, more than CLIP's {tokenizer.context_length}; shorten it"
            )


def encode_vocabulary(
    backend: Backend,
    vocab: Vocabulary,
    template: str,
    cache: TextEmbeddingCache,
    *,
    max_classes: int | None = outputs.MAX_CLASSES,
    tokenizer: BpeTokenizer | None = None,
) -> np.ndarray:
    """Text embeddings ``[N, 512]`` of ``vocab``: from the cache, or the backend's text graph.

    The one way a vocabulary becomes embeddings (CLI, evaluation and ``Segmenter``); the vocabulary
    is validated first (``validate_vocabulary`` with ``max_classes``).
    """
    tokenizer = BpeTokenizer() if tokenizer is None else tokenizer
    validate_vocabulary(vocab, template, max_classes=max_classes, tokenizer=tokenizer)

    def compute(prompts: list[str]) -> np.ndarray:
        return backend.text.run({TEXT_TOKENS: tokenizer(prompts)})[TEXT_EMBEDS]

    return cache.get_or_compute(vocab, template, backend.model_digest, compute)


def segment_paper(backend: Backend, rgb: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
    """Per-class probabilities ``[N, H, W]`` of an RGB uint8 image under the paper's numpy protocol (the reference)."""
    path = OnePiecePath(backend)
    return path.probs(path.encode(resize_shortest_edge(rgb)), text_embeds, (rgb.shape[0], rgb.shape[1]))


PAPER_FALLBACK_NOTE = (
    "the {name} backend has no paper protocol graphs (paper_encoder.onnx, paper_head.onnx): the paper "
    "protocol runs in numpy on the host, which is slower; re-export the ONNX folder to run it on the device"
)


def predict_paper(
    backend: Backend, rgb: np.ndarray, text_embeds: np.ndarray, want_probs: bool, *, path: PaperPath | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """The paper protocol on one image: class map ``[H, W]`` and, when asked, probabilities ``[N, H, W]``.

    The one seam between the orchestrator and the protocol's implementation (``runtime.paper_path``,
    shared with the ``Segmenter``): detectron2's ``ResizeShortestEdge`` (one PIL resize) on the host,
    then the backend's paper path. With encoder and head runners, views, merge, resize and argmax
    run in the backend's graphs (its ``segment_paper`` when it has one, which keeps the features on
    the device) and probabilities cross to the host only when ``want_probs``; otherwise the numpy
    protocol runs around the image graph (the reference). It writes nothing.

    Args:
        backend: an entered backend.
        rgb: the image, RGB uint8 ``[H, W, 3]``.
        text_embeds: float32 ``[N, 512]``.
        want_probs: also return the probabilities.
        path: ``paper_path(backend)``, chosen once by a caller running many images (default: chosen here).

    """
    path = paper_path(backend) if path is None else path
    return path.segment(resize_shortest_edge(rgb), text_embeds, (rgb.shape[0], rgb.shape[1]), want_probs)


def predict_paper_batch(
    backend: Backend,
    rgbs: Sequence[np.ndarray],
    text_embeds: np.ndarray,
    want_probs: bool,
    *,
    path: PaperPath | None = None,
) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """``predict_paper`` of several images of one size, in one device call where the backend allows it.

    Each image is resized on the host (``ResizeShortestEdge``), then the path's ``segment_batch``
    runs them together (the torch backend: one encoder and one head call on the 5B views) or one
    at a time (ONNX Runtime, TensorRT, the numpy protocol).

    Raises:
        GSNetError: the images do not share one size.

    """
    sizes = {rgb.shape[:2] for rgb in rgbs}
    if len(sizes) != 1:
        raise GSNetError(f"images of one batch must share one size, got {sorted(sizes)}")
    path = paper_path(backend) if path is None else path
    height, width = rgbs[0].shape[:2]
    return path.segment_batch([resize_shortest_edge(rgb) for rgb in rgbs], text_embeds, (height, width), want_probs)


def is_raster(path: Path) -> bool:
    """A file for the raster path: a TIFF-like suffix and georeferencing."""
    if path.suffix.lower() not in RASTER_SUFFIXES:
        return False
    try:
        from gsnet_deploy.runtime import raster
    except ImportError:
        return False
    try:
        return raster.is_georeferenced(path)
    except (GSNetError, ImportError):
        return False


def input_kind(path: Path, bands: tuple[int, ...] | None = None) -> InputKind:
    """How ``path`` is read: georeferenced raster, whole plain image, or plain image in windows."""
    if is_raster(path):
        return InputKind.RASTER
    if bands is not None and path.suffix.lower() in RASTER_SUFFIXES:
        return InputKind.WINDOWED_IMAGE  # --bands needs rasterio's band access
    return InputKind.WINDOWED_IMAGE if decodes_whole(path) is False else InputKind.IMAGE


_KIND_NOTE = {InputKind.RASTER: "georeferenced raster", InputKind.IMAGE: "", InputKind.WINDOWED_IMAGE: "read in windows"}


def choose_mode(requested: Mode, kind: InputKind, height: int, width: int) -> Mode:
    """The protocol for an input (the only place the mode is decided).

    ``AUTO``: rasters and windowed images are tiled; plain images use the paper protocol up to
    ``PAPER_MAX_SIDE`` on the long side and are tiled beyond. An explicit mode is kept, but the
    paper protocol reads the whole image, so it is refused beyond ``PAPER_MAX_PIXELS``.

    Raises:
        ImageError: ``--mode paper`` on an image too large to read whole.

    """
    if requested is Mode.AUTO:
        if kind is InputKind.IMAGE and max(height, width) <= PAPER_MAX_SIDE:
            return Mode.PAPER
        return Mode.TILED
    if requested is Mode.PAPER and height * width > PAPER_MAX_PIXELS:
        raise ImageError(
            f"{width}x{height} is too large for --mode paper (it reads the whole image; at most "
            f"{PAPER_MAX_PIXELS // 1_000_000} MP); use --mode tiled"
        )
    return requested


def segment_one(
    path: str | Path,
    backend: Backend,
    text_embeds: np.ndarray,
    class_names: list[str],
    options: SegmentOptions,
    palette: np.ndarray | None = None,
    kind: InputKind | None = None,
    log: Callable[[str], None] | None = None,
    loaded: LoadedImage | None = None,
    paper: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]] | None = None,
) -> InputResult:
    """Segment one input and write its outputs as one set (see the module docstring).

    Args:
        path: the input file.
        backend: an entered backend.
        text_embeds: float32 ``[N, 512]``.
        class_names: N display names (legend, GeoTIFF tags).
        options: the run's options (``out_dir`` must exist).
        palette: uint8 ``[N, 3]`` colors (default: ``palette.default_palette``).
        kind: how to read the input (default: ``input_kind``).
        log: where to say which mode runs (default: nowhere).
        loaded: the input already decoded (``InputKind.IMAGE`` only; default: decode it here).
        paper: class map and probabilities of the whole RGB image under the paper protocol
            (default: ``predict_paper`` on ``backend``; the folder pipeline passes a finished result).

    Raises:
        GSNetError: the input cannot be read, is too large for the mode, or its outputs cannot be
            written; no output of this input is left behind.

    """
    from gsnet_deploy.runtime.palette import default_palette
    from gsnet_deploy.runtime.rows import ArraySource, RowSource, plan_source_sink
    from gsnet_deploy.runtime.tiled import run_tiled

    path = Path(path)
    out = Path(options.out_dir)
    stem = path.stem
    num_classes = len(class_names)
    palette = default_palette(num_classes) if palette is None else palette
    if palette.shape != (num_classes, 3) or num_classes != text_embeds.shape[0]:
        raise GSNetError(
            f"{num_classes} class names, {text_embeds.shape[0]} text embeddings and a palette of "
            f"{palette.shape[0]} colors do not agree; pass one of each per class"
        )
    kind = input_kind(path, options.bands) if kind is None else kind
    notes: list[str] = []
    reader = None
    rgb_whole: np.ndarray | None = None
    try:
        with AtomicFiles() as files:
            if kind is InputKind.IMAGE:
                loaded = load_image(path) if loaded is None else loaded
                notes += loaded.notes
                rgb_whole = loaded.rgb
                source: RowSource = ArraySource(loaded.rgb)
            else:
                from gsnet_deploy.runtime import raster

                reader = raster.RasterReader(path, options.bands).__enter__()
                if kind is InputKind.WINDOWED_IMAGE and reader.height * reader.width > MAX_PIXELS:
                    raise ImageError(
                        f"image {path} claims {reader.width}x{reader.height} pixels, more than the "
                        f"{MAX_PIXELS // 1_000_000} MP a plain image may have; is it a decompression bomb?"
                    )
                notes += reader.notes
                source = reader
            height, width = source.height, source.width
            mode = choose_mode(options.mode, kind, height, width)
            if log is not None:
                extra = f" ({_KIND_NOTE[kind]})" if _KIND_NOTE[kind] else (" (long side > 1024)" if mode is Mode.TILED else "")
                log(f"{path}: {width}x{height}, {mode.value} mode{extra}")
            sink: outputs.MaskSink
            if kind is InputKind.RASTER:
                from gsnet_deploy.runtime import raster

                assert reader is not None
                sink = raster.GeoTiffMaskSink(reader, files, out, stem, class_names, palette, save_probs=options.save_probs)
            else:
                sink = outputs.PlainMaskSink(files, out, stem, num_classes, height, width, save_probs=options.save_probs)
            ran = skipped = 0
            try:
                if mode is Mode.PAPER:
                    rgb, valid = source.read(0, height, 0, width)  # [H, W, 3]
                    rgb = np.ascontiguousarray(rgb)
                    if paper is None:
                        class_map, probs = predict_paper(backend, rgb, text_embeds, options.save_probs)
                    else:
                        class_map, probs = paper(rgb)
                    sink.write_labels(0, class_map, valid, probs)
                    ran = 1
                else:
                    src, snk = plan_source_sink(source, sink, options.gsd_scale)
                    if src is not source:
                        notes.append(f"resampled by --gsd-scale {options.gsd_scale:g} to {src.width}x{src.height} for tiling")
                    ran, skipped = run_tiled(
                        src, snk, backend, text_embeds, overlap=options.overlap, max_memory=options.max_memory,
                        progress=options.progress, desc=path.name, save_probs=options.save_probs, notes=notes,
                    )  # fmt: skip
                paths = sink.close()
                if options.overlay:
                    labels = sink.preview(outputs.OVERLAY_MAX_SIDE)
                    rgb_preview = reader.read_preview(outputs.OVERLAY_MAX_SIDE) if reader is not None else rgb_whole
                    assert rgb_preview is not None
                    overlay = outputs.write_overlay(
                        files, out / f"{stem}_overlay.png", rgb_preview, labels, class_names, palette, nodata=sink.nodata
                    )
                    paths.insert(1, overlay)
            except BaseException:
                sink.abort()
                raise
    except OSError as exc:
        reason = exc.strerror or exc
        raise ImageError(f"cannot write outputs of {path} in {out} ({reason}); check free space and permissions") from exc
    finally:
        if reader is not None:
            reader.close()
    return InputResult(paths=paths, notes=notes, kind=kind, mode=mode, windows=ran, skipped=skipped)


def segment_raster(
    path: str | Path,
    backend: Backend,
    text_embeds: np.ndarray,
    *,
    out_dir: str | Path,
    class_names: list[str],
    palette: np.ndarray,
    bands: tuple[int, ...] | None = None,
    overlap: int = 128,
    gsd_scale: float = 1.0,
    max_memory: int = 2 << 30,
    save_probs: bool = False,
    overlay: bool = True,
    progress: bool = True,
) -> InputResult:
    """Tiled mode on one raster into ``<stem>_mask.tif`` (+ ``_overlay.png``, ``_probs.tif``): ``segment_one`` for scripts.

    Raises:
        GSNetError: as ``segment_one``; the budget or an option is out of range.

    """
    options = SegmentOptions(
        out_dir=Path(out_dir), mode=Mode.TILED, save_probs=save_probs, overlap=overlap, gsd_scale=gsd_scale,
        max_memory=max_memory, bands=bands, progress=progress, overlay=overlay,
    )  # fmt: skip
    if not 0 <= overlap < WINDOW:
        raise GSNetError(f"--overlap {overlap} must be between 0 and {WINDOW - 1} pixels; pick a smaller overlap")
    outputs.prepare_out_dir(out_dir)
    return segment_one(path, backend, text_embeds, class_names, options, palette, kind=InputKind.RASTER)


def demo_warning(backend: Backend) -> str | None:
    """The demo-weights warning for an ONNX or TensorRT model made from demo weights, else None.

    (The torch backend prints its own when it builds the demo model.)
    """
    if backend.name != "torch" and str(backend.model_digest).startswith(DEMO_DIGEST_PREFIX):
        return DEMO_MODEL_WARNING
    return None


def segment_files(
    paths: Sequence[Path],
    backend: Backend,
    vocab: Vocabulary,
    options: SegmentOptions,
    cache: TextEmbeddingCache,
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
) -> SegmentReport:
    """Segment every input with an entered ``backend``; one input's failure does not stop the others."""
    from gsnet_deploy.runtime.palette import resolve_palette

    validate_run(paths, vocab, options)
    report = SegmentReport()
    class_names = list(vocab.display_names)
    palette = resolve_palette(class_names, options.palette)
    outputs.prepare_out_dir(options.out_dir)
    warning = demo_warning(backend)
    if warning:
        log(f"warning: {warning}")
    text_embeds = encode_vocabulary(backend, vocab, options.template, cache)
    protocol = paper_path(backend)  # chosen once for the run
    fallback_said = protocol.split
    for path, run in _pipelined(paths, backend, protocol, text_embeds, options):
        start = time.perf_counter()
        try:
            result = run(class_names, palette, log)
        except GSNetError as exc:
            report.failed.append((path, str(exc)))
            log(f"{path}: error: {exc}")
            continue
        if result.mode is Mode.PAPER and not fallback_said:
            log(f"note: {PAPER_FALLBACK_NOTE.format(name=backend.name)}")
            fallback_said = True
        for note in result.notes:
            log(f"{path}: note: {note}")
        report.written[path] = result.paths
        report.seconds[path] = time.perf_counter() - start
        log(f"{path}: wrote {result.paths[0]} ({report.seconds[path]:.1f} s)")
    return report


_Run = Callable[[list[str], np.ndarray, Callable[[str], None]], InputResult]
_Result = tuple[np.ndarray, np.ndarray | None]


@dataclass
class _Staged:
    """One input of the folder pipeline: decoded (paper mode) or left to ``segment_one`` whole."""

    path: Path
    loaded: LoadedImage | None = None  # decoded plain image bound for paper mode
    error: GSNetError | None = None  # decoding failed: reported in its turn
    device: Future[Any] | None = None  # its result, or its group's results (``_run_group``) at ``index``
    index: int | None = None  # its place in a group's device call (None: it ran alone)

    def paper_result(self) -> _Result:
        """The finished device result (call after ``device`` is done); an error of this image is raised here."""
        assert self.device is not None
        result = self.device.result()
        if self.index is None:
            return cast(_Result, result)
        mine = result[self.index]
        if isinstance(mine, Exception):
            raise mine
        return cast(_Result, mine)


def _stage(path: Path, options: SegmentOptions) -> _Staged:
    """Decode ``path`` ahead of its turn when it is a plain image bound for paper mode (the host-before step)."""
    try:
        if options.bands is not None or input_kind(path, options.bands) is not InputKind.IMAGE:
            return _Staged(path)
        loaded = load_image(path)
        height, width = loaded.rgb.shape[:2]
        if choose_mode(options.mode, InputKind.IMAGE, height, width) is not Mode.PAPER:
            return _Staged(path)  # tiled: segment_one reads it again (rare: long side over 1024)
        return _Staged(path, loaded=loaded)
    except GSNetError as exc:
        return _Staged(path, error=exc)


class _Groups:
    """The inputs staged in groups: up to ``limit`` consecutive paper-mode images of one size, else one input.

    A group ends at ``limit`` images, before an input that is not a decoded paper-mode image, and
    before an image of another size; the input that ended it (already decoded) starts the next
    group. With ``limit`` 1 every group is one input, decoded when its group is asked for.
    """

    def __init__(self, paths: Sequence[Path], options: SegmentOptions) -> None:
        self.paths, self.options = paths, options
        self.limit = max(1, options.batch_images)
        self.next_index = 0
        self.pending: _Staged | None = None  # decoded, not yet in a group

    def _take(self) -> _Staged | None:
        if self.pending is not None:
            staged, self.pending = self.pending, None
            return staged
        if self.next_index >= len(self.paths):
            return None
        self.next_index += 1
        return _stage(self.paths[self.next_index - 1], self.options)

    def next(self) -> list[_Staged]:
        """The next group (empty when every input was handed out)."""
        group: list[_Staged] = []
        while len(group) < self.limit:
            staged = self._take()
            if staged is None:
                break
            if staged.loaded is None:  # not paper mode, or unreadable: alone, in its turn
                if group:
                    self.pending = staged
                    break
                return [staged]
            if group and staged.loaded.rgb.shape != group[0].loaded.rgb.shape:  # type: ignore[union-attr]
                self.pending = staged
                break
            group.append(staged)
        return group


def _run_group(
    backend: Backend, rgbs: list[np.ndarray], text_embeds: np.ndarray, want_probs: bool, path: PaperPath
) -> list[_Result | Exception]:
    """One device call for a group of images of one size; if it fails, each image alone (its own error kept)."""
    try:
        return list(predict_paper_batch(backend, rgbs, text_embeds, want_probs, path=path))
    except Exception:  # retried per image below, so that the failing image is the one reported
        results: list[_Result | Exception] = []
        for rgb in rgbs:
            try:
                results.append(predict_paper(backend, rgb, text_embeds, want_probs, path=path))
            except Exception as exc:  # raised in that image's turn
                results.append(exc)
        return results


def _pipelined(
    paths: Sequence[Path], backend: Backend, protocol: PaperPath, text_embeds: np.ndarray, options: SegmentOptions
) -> Iterator[tuple[Path, _Run]]:
    """Yield each input with a function that finishes it (writes its outputs), in input order.

    Paper-mode images run on the backend in one worker thread, in groups (``_Groups``: one image,
    or up to ``options.batch_images`` consecutive images of one size in one device call): group
    g+1 is decoded while group g is on the device, and group g is written (by the caller, on
    return from the yielded functions) while group g+1 is on the device, so at most about two
    groups of decoded images are held. Everything else runs whole in ``segment_one`` in its turn.
    """
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gsnet-device", initializer=signals_to_main_thread)

    def submit(group: list[_Staged]) -> None:
        paper = [staged for staged in group if staged.loaded is not None]
        if len(paper) == 1:
            rgb = np.ascontiguousarray(paper[0].loaded.rgb)  # type: ignore[union-attr]
            paper[0].device = worker.submit(predict_paper, backend, rgb, text_embeds, options.save_probs, path=protocol)
        elif paper:
            rgbs = [np.ascontiguousarray(staged.loaded.rgb) for staged in paper]  # type: ignore[union-attr]
            future = worker.submit(_run_group, backend, rgbs, text_embeds, options.save_probs, protocol)
            for index, staged in enumerate(paper):
                staged.device, staged.index = future, index

    def finisher(staged: _Staged) -> _Run:
        def run(class_names: list[str], palette: np.ndarray, log: Callable[[str], None]) -> InputResult:
            if staged.error is not None:
                raise staged.error
            paper = None if staged.device is None else (lambda rgb: staged.paper_result())
            return segment_one(
                staged.path, backend, text_embeds, class_names, options, palette, log=log,
                kind=InputKind.IMAGE if staged.loaded is not None else None, loaded=staged.loaded, paper=paper,
            )  # fmt: skip

        return run

    groups = _Groups(paths, options)
    try:
        current = groups.next()
        submit(current)
        while current:
            following = groups.next()  # decode group g+1
            if current[0].device is not None:
                wait([current[0].device])  # group g done on the device (its errors surface when written)
            early = current[0].loaded is not None  # group g only has its outputs left to write: the device is free
            if early and following:
                submit(following)  # device on group g+1 ...
            for staged in current:
                yield staged.path, finisher(staged)  # ... while group g is written
            if not early and following:
                submit(following)  # the input ran whole on the backend: group g+1 only now
            current = following
    finally:
        worker.shutdown(wait=False, cancel_futures=True)
