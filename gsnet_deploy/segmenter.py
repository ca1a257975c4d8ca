"""The Python API: ``Segmenter`` segments images with any vocabulary, on any backend, in a few lines.

Example::

    from gsnet_deploy import Segmenter

    with Segmenter.from_onnx("gsnet_onnx") as seg:
        result = seg.segment("scene.png", "building,road,tree")
        result.save("out", "scene")

Open vocabulary is used interactively: one scene is asked "building, road", then "solar panel,
swimming pool". The two backbones (about 1,800 of the 2,160 GFLOPs of one image, design.md
section 1) do not depend on the classes, so ``Segmenter.encode`` keeps the class-independent
features of an image (``EncodedImage``) and ``segment`` on an encoded image runs only the
class-dependent head and the paper protocol's merge. Encoded images are also cached by image
content (least recently used first out, bounded in bytes), so ``segment(same_array, other_classes)``
reuses the encoding without the caller keeping it. The split follows NanoOWL's encode_image /
decode (github.com/NVIDIA-AI-IOT/nanoowl).

Torch-free unless the torch backend is used: the heavy package of a backend is imported when that
backend is opened.
"""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np
from PIL import Image

from gsnet_deploy.backends import BackendKind, BackendOptions, backend_pooling, open_backend, require_pooling
from gsnet_deploy.contracts.model_size import ModelSize
from gsnet_deploy.encoded_cache import DEFAULT_MAX_BYTES, EncodedCache, content_key
from gsnet_deploy.errors import BackendError, GSNetError, ImageError
from gsnet_deploy.runtime.backend import Backend
from gsnet_deploy.runtime.images import _to_rgb_array, load_image
from gsnet_deploy.runtime.paper_path import PaperPath, paper_path
from gsnet_deploy.runtime.protocol import resize_shortest_edge, shortest_edge_size
from gsnet_deploy.runtime.segment import encode_vocabulary
from gsnet_deploy.runtime.tokenizer import BpeTokenizer
from gsnet_deploy.runtime.vocab import DEFAULT_TEMPLATE, TextEmbeddingCache, Vocabulary, parse_classes

__all__ = ["EncodedImage", "Segmentation", "Segmenter"]

ImageLike = str | Path | np.ndarray | Image.Image  # a file path, a PIL image or an RGB uint8 array [H, W, 3]
ClassesLike = str | Sequence[str] | Vocabulary  # "building,road" or ["building", "low vegetation, grass"]
_SEAL_SAMPLES = 4096  # elements sampled from each feature array for the seal


@dataclass(frozen=True, eq=False)
class EncodedImage:
    """The class-independent features of one image, reusable with any vocabulary on the same Segmenter.

    Attributes:
        features: feature arrays by name (read-only), as the encoder returns them.
        image_size: (height, width) of the input image.
        resized_size: (height, width) after detectron2's ``ResizeShortestEdge(640, max 2560)``.
        model_digest: digest of the weights that made the features.
        pooling: class-transformer pooling of the Segmenter that made them (None: unknown).
        key: content hash of the image's pixels (the cache key).
        image: the RGB uint8 image ``[H, W, 3]`` (read-only; overlays are drawn on it).
        notes: conversions applied when loading the image (grayscale to RGB, ...).
        seal: fingerprint binding the fields above together (set by ``Segmenter.encode``).

    """

    features: Mapping[str, np.ndarray]
    image_size: tuple[int, int]
    resized_size: tuple[int, int]
    model_digest: str
    pooling: int | None
    key: str
    image: np.ndarray
    notes: tuple[str, ...] = ()
    seal: str = ""

    @property
    def nbytes(self) -> int:
        """Memory held: every feature array and the image."""
        return sum(int(a.nbytes) for a in self.features.values()) + int(self.image.nbytes)

    def expected_seal(self) -> str:
        """The seal these fields should carry (a sample of every feature array, sizes, model, key)."""
        h = hashlib.blake2b(digest_size=16)
        h.update(repr((self.image_size, self.resized_size, self.model_digest, self.pooling, self.key)).encode())
        h.update(repr(self.image.shape).encode())
        for name in sorted(self.features):
            array = self.features[name]
            flat = array.reshape(-1)
            step = max(1, flat.size // _SEAL_SAMPLES)
            h.update(f"{name}{array.dtype.str}{array.shape}".encode())
            h.update(np.ascontiguousarray(flat[::step]).tobytes())
        return h.hexdigest()


@dataclass(frozen=True, eq=False)
class Segmentation:
    """The result of ``Segmenter.segment`` on one image.

    Attributes:
        class_map: ``[H, W]`` class index per pixel (uint8 for up to 255 classes, int32 beyond).
        class_names: the N class names, as legends show them (first synonym).
        probs: float32 ``[N, H, W]`` per-class probabilities, or None unless asked for.
        image: the RGB uint8 input ``[H, W, 3]``.
        notes: conversions applied when loading the image.

    """

    class_map: np.ndarray
    class_names: tuple[str, ...]
    probs: np.ndarray | None
    image: np.ndarray
    notes: tuple[str, ...] = ()

    def palette(self, palette: str | Path | np.ndarray | None = None) -> np.ndarray:
        """Class colors uint8 ``[N, 3]``: the default palette, a palette file (as ``--palette``) or an array."""
        from gsnet_deploy.runtime.palette import resolve_palette

        if isinstance(palette, np.ndarray):
            if palette.shape != (len(self.class_names), 3):
                raise ImageError(f"palette has shape {palette.shape} but {len(self.class_names)} classes need [N, 3] colors")
            return palette.astype(np.uint8)
        return resolve_palette(list(self.class_names), palette)

    def to_image(self, palette: str | Path | np.ndarray | None = None) -> Image.Image:
        """The colour overlay with legend, as ``gsnet segment`` writes it to ``<stem>_overlay.png``."""
        from gsnet_deploy.runtime.outputs import render_overlay

        return render_overlay(self.image, self._labels_uint8(), list(self.class_names), self.palette(palette))

    def save(self, out_dir: str | Path, stem: str, palette: str | Path | np.ndarray | None = None) -> list[Path]:
        """Write what ``gsnet segment`` writes for this image: mask, overlay, and probabilities when present.

        The files go through the CLI's writers (``runtime.outputs``) as one atomic set.

        Args:
            out_dir: output folder (created if missing).
            stem: file name stem (``<stem>_mask.png``, ``<stem>_overlay.png``, ``<stem>.probs.npy``).
            palette: class colors (default palette, palette file or ``[N, 3]`` array).

        Returns:
            The paths written: mask, overlay, then probabilities.

        Raises:
            ImageError: the folder cannot be written, or more than 255 classes for a PNG mask.

        """
        from gsnet_deploy.contracts.atomic import AtomicFiles
        from gsnet_deploy.runtime.outputs import PlainMaskSink, prepare_out_dir, write_overlay

        colors = self.palette(palette)
        labels = self._labels_uint8()
        out = prepare_out_dir(out_dir)
        height, width = labels.shape
        try:
            with AtomicFiles() as files:
                sink = PlainMaskSink(files, out, stem, len(self.class_names), height, width, save_probs=self.probs is not None)
                sink.write_labels(0, labels, None, self.probs)
                paths = sink.close()
                overlay = write_overlay(files, out / f"{stem}_overlay.png", self.image, labels, list(self.class_names), colors)
                paths.insert(1, overlay)
        except OSError as exc:
            reason = exc.strerror or exc
            raise ImageError(f"cannot write outputs of {stem} in {out} ({reason}); check free space and permissions") from exc
        return paths

    def _labels_uint8(self) -> np.ndarray:
        """The class map as a uint8 PNG mask holds it."""
        from gsnet_deploy.runtime.outputs import MAX_CLASSES

        n = len(self.class_names)
        if n > MAX_CLASSES:
            raise ImageError(f"{n} classes do not fit a uint8 mask (at most {MAX_CLASSES}); use fewer classes")
        return self.class_map.astype(np.uint8, copy=False)


def load_rgb(image: ImageLike) -> tuple[np.ndarray, tuple[str, ...]]:
    """An image as RGB uint8 ``[H, W, 3]`` plus the conversions applied, converted as the CLI does.

    Args:
        image: a file path, a PIL image, or an array: ``[H, W, 3]`` RGB, ``[H, W]`` grayscale,
            ``[H, W, 4]`` RGBA (uint8; 16-bit grayscale is stretched to 8 bits like a 16-bit file).

    Raises:
        ImageError: the file cannot be read or the array has an unusable shape or dtype.

    """
    if isinstance(image, (str, Path)):
        loaded = load_image(image)
        return loaded.rgb, tuple(loaded.notes)
    notes: list[str] = []
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
            rgb = image
        else:
            if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4))):
                raise ImageError(f"image array has shape {image.shape}; pass RGB [H, W, 3], grayscale [H, W] or RGBA [H, W, 4]")
            if image.dtype not in (np.uint8, np.uint16) or (image.ndim == 3 and image.dtype != np.uint8):
                raise ImageError(
                    f"image array has dtype {image.dtype} and shape {image.shape}; pass uint8 RGB (or uint8/uint16 grayscale)"
                )
            try:
                pil = Image.fromarray(image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image)
            except (TypeError, ValueError) as exc:
                raise ImageError(f"cannot read image array of dtype {image.dtype}, shape {image.shape} ({exc})") from exc
            rgb = _to_rgb_array(pil, notes)
    elif isinstance(image, Image.Image):
        rgb = _to_rgb_array(image, notes)
    else:
        raise ImageError(f"cannot segment a {type(image).__name__}; pass a file path, a PIL image or an RGB uint8 array")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageError(f"image has no pixels (shape {rgb.shape})")
    return np.ascontiguousarray(rgb, dtype=np.uint8), tuple(notes)


def as_vocabulary(classes: ClassesLike) -> Vocabulary:
    """A Vocabulary from ``"a,b,c"`` (as ``--classes``), a list of names (``"a, b"`` = synonyms) or a Vocabulary."""
    if isinstance(classes, Vocabulary):
        return classes
    if isinstance(classes, str):
        return parse_classes(classes)
    return Vocabulary(tuple(str(name) for name in classes))


def _read_only(array: np.ndarray) -> np.ndarray:
    """``array`` with writing disabled (cached features and images must not change under the cache)."""
    array = np.asarray(array)
    if array.flags.writeable:
        array = array.view()
        array.setflags(write=False)
    return array


class Segmenter:
    """GSNet open-vocabulary segmentation of images, on torch, ONNX Runtime or TensorRT.

    Make one with ``from_checkpoint``, ``from_onnx`` or ``from_engine`` (or wrap a backend);
    it opens the backend at once and releases it on ``close()`` or at the end of a ``with`` block.
    Images are segmented under the paper's sliding-window protocol.

    Attributes:
        backend: the open backend.
        model_digest: digest of the weights.
        pooling: class-transformer pooling (1 = the paper's evaluation setting; None: unknown).
        template: prompt template of the text embeddings.
        encoded_cache: encoded images by content (least recently used evicted past its byte budget).
        encoder_split: whether the backend has encoder and head runners (else ``encode`` keeps only the
            preprocessed views and ``segment`` on an encoded image runs the whole image graph).

    """

    def __init__(
        self,
        backend: Backend,
        *,
        pooling: int | None = None,
        template: str = DEFAULT_TEMPLATE,
        text_cache_dir: str | Path | None = None,
        encoded_cache_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        """Open ``backend`` (a constructed, not yet entered backend; the Segmenter owns it from now on).

        Args:
            backend: from ``gsnet_deploy.backends.open_backend`` or a backend class.
            pooling: class-transformer pooling the backend runs (None: what the backend says: the torch
                model's config, or the manifest of the ONNX folder or engines; None there for older exports).
            template: prompt template for class names.
            text_cache_dir: folder for text embeddings on disk (None: in memory only).
            encoded_cache_bytes: byte budget of the encoded-image cache (0 disables it).

        Raises:
            BackendError: ``pooling`` contradicts the pooling the backend says it runs.

        """
        known = backend_pooling(require_pooling(backend, pooling))
        self.pooling = known if pooling is None else pooling
        self.template = template
        self.text_cache = TextEmbeddingCache(text_cache_dir)
        self.encoded_cache: EncodedCache[EncodedImage] = EncodedCache(encoded_cache_bytes)
        self._text_embeds: dict[tuple[str, ...], np.ndarray] = {}
        self._tokenizer: BpeTokenizer | None = None
        self._feature_shapes: dict[str, tuple[int, ...]] | None = None
        self.backend = backend.__enter__()
        self.model_digest = self.backend.model_digest
        path = paper_path(self.backend)  # the protocol runs as in `gsnet segment` (runtime.segment.predict_paper)
        if not path.split:
            warnings.warn(
                f"the {self.backend.name} backend has no paper encoder/head (an ONNX folder or engines made before them); "
                "re-querying an encoded image runs the whole image graph: re-export for the fast path",
                RuntimeWarning,
                stacklevel=2,
            )
        self._path: PaperPath | None = path
        self.encoder_split = path.split  # False: encode() keeps the 5 views

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path | None = None,
        *,
        device: str | None = None,
        fp16: bool = False,
        pooling: int = 1,
        model_size: ModelSize = ModelSize.PAPER,
        warn: bool = True,
        template: str = DEFAULT_TEMPLATE,
        text_cache_dir: str | Path | None = None,
        encoded_cache_bytes: int = DEFAULT_MAX_BYTES,
    ) -> Segmenter:
        """GSNet in PyTorch from the official checkpoint, or from demo weights (with a warning) when ``path`` is None.

        Args:
            path: the official ``model_final.pth``; None: deterministic demo weights (the masks mean nothing).
            device: torch device ("cpu", "cuda", "cuda:1"); default CUDA when available.
            fp16: half precision (CUDA only).
            pooling: class-transformer pooling, 1 (the paper's evaluation) or 2 (training).
            model_size: ``ModelSize.TINY`` for quick smoke runs with demo weights.
            warn: print the demo-weights warning to stderr.
            template: prompt template for class names.
            text_cache_dir: folder for text embeddings on disk (None: in memory only).
            encoded_cache_bytes: byte budget of the encoded-image cache (0 disables it).

        """
        options = BackendOptions(
            kind=BackendKind.TORCH, checkpoint=None if path is None else Path(path), device=device, pooling=pooling,
            size=model_size, fp16=fp16,
        )  # fmt: skip
        return cls(
            open_backend(options, warn=warn), pooling=pooling, template=template, text_cache_dir=text_cache_dir,
            encoded_cache_bytes=encoded_cache_bytes,
        )  # fmt: skip

    @classmethod
    def from_onnx(
        cls,
        onnx_dir: str | Path,
        *,
        pooling: int | None = None,
        template: str = DEFAULT_TEMPLATE,
        text_cache_dir: str | Path | None = None,
        encoded_cache_bytes: int = DEFAULT_MAX_BYTES,
    ) -> Segmenter:
        """GSNet on ONNX Runtime from a folder made by ``gsnet export onnx`` (CUDA when available, else CPU).

        Args:
            onnx_dir: the ONNX folder.
            pooling: class-transformer pooling the graphs were exported with (None: from the folder's manifest;
                one that contradicts the manifest is refused, for folders that do not record it it is taken).
            template: prompt template for class names.
            text_cache_dir: folder for text embeddings on disk (None: in memory only).
            encoded_cache_bytes: byte budget of the encoded-image cache (0 disables it).

        """
        options = BackendOptions(kind=BackendKind.ONNXRUNTIME, onnx_dir=Path(onnx_dir))
        return cls._from_options(options, pooling, template, text_cache_dir, encoded_cache_bytes)

    @classmethod
    def from_engine(
        cls,
        engine_dir: str | Path,
        *,
        pooling: int | None = None,
        template: str = DEFAULT_TEMPLATE,
        text_cache_dir: str | Path | None = None,
        encoded_cache_bytes: int = DEFAULT_MAX_BYTES,
    ) -> Segmenter:
        """GSNet on TensorRT from a folder made by ``gsnet export build``.

        Args:
            engine_dir: the engine folder.
            pooling: class-transformer pooling the graphs were exported with (None: from the folder's manifest;
                one that contradicts the manifest is refused, for folders that do not record it it is taken).
            template: prompt template for class names.
            text_cache_dir: folder for text embeddings on disk (None: in memory only).
            encoded_cache_bytes: byte budget of the encoded-image cache (0 disables it).

        """
        options = BackendOptions(kind=BackendKind.TENSORRT, engine_dir=Path(engine_dir))
        return cls._from_options(options, pooling, template, text_cache_dir, encoded_cache_bytes)

    @classmethod
    def _from_options(
        cls,
        options: BackendOptions,
        pooling: int | None,
        template: str,
        text_cache_dir: str | Path | None,
        encoded_cache_bytes: int,
    ) -> Segmenter:
        """A Segmenter on the backend ``options`` describe (the one backend factory opens it)."""
        return cls(
            open_backend(options), pooling=pooling, template=template, text_cache_dir=text_cache_dir,
            encoded_cache_bytes=encoded_cache_bytes,
        )  # fmt: skip

    def __enter__(self) -> Segmenter:
        """The Segmenter itself (already open)."""
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        """Close the backend."""
        self.close()

    def close(self) -> None:
        """Release the backend and drop cached encodings (safe to call twice)."""
        if self._path is None:
            return
        self._path = None
        self.encoded_cache.clear()
        self.backend.__exit__(None, None, None)

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
        return self._path is None

    def _paper(self) -> PaperPath:
        if self._path is None:
            raise BackendError("this Segmenter is closed; make a new one (or use it inside its 'with' block)")
        return self._path

    def encode_classes(self, classes: ClassesLike) -> np.ndarray:
        """Text embeddings float32 ``[N, 512]`` of a vocabulary (cached in memory and, if configured, on disk)."""
        vocab = as_vocabulary(classes)
        prompts = tuple(vocab.prompts(self.template))
        cached = self._text_embeds.get(prompts)
        if cached is not None:
            return cached
        self._paper()  # raises when closed
        if self._tokenizer is None:
            self._tokenizer = BpeTokenizer()
        # NOTE: no class limit here: beyond 255 classes the class map is int32
        embeds = encode_vocabulary(
            self.backend, vocab, self.template, self.text_cache, max_classes=None, tokenizer=self._tokenizer
        )
        self._text_embeds[prompts] = embeds
        return embeds

    def encode(self, image: ImageLike) -> EncodedImage:
        """The class-independent features of ``image``, from the cache when this image was seen.

        Args:
            image: a file path, a PIL image or an RGB uint8 array ``[H, W, 3]``.

        Returns:
            The encoded image; pass it to ``segment`` with any vocabulary.

        Raises:
            ImageError: the image cannot be read.

        """
        path = self._paper()
        rgb, notes = load_rgb(image)
        key = content_key(rgb)
        cached = self.encoded_cache.get(key)
        if cached is not None:
            return cached
        resized = resize_shortest_edge(rgb)
        # NOTE: features stay writable (torch.from_numpy warns on read-only arrays); the seal notices changes
        features = path.encode(resized)
        if self._feature_shapes is None:
            self._feature_shapes = {name: tuple(a.shape) for name, a in features.items()}
        encoded = EncodedImage(
            features=features, image_size=(int(rgb.shape[0]), int(rgb.shape[1])), resized_size=resized.shape[:2],
            model_digest=self.model_digest, pooling=self.pooling, key=key, image=_read_only(rgb), notes=notes,
        )  # fmt: skip
        encoded = dataclasses.replace(encoded, seal=encoded.expected_seal())
        self.encoded_cache.put(key, encoded)
        return encoded

    def check_encoded(self, encoded: EncodedImage) -> None:
        """Refuse an encoded image this Segmenter cannot decode into a correct mask.

        Raises:
            BackendError: the features come from another model or pooling, or their fields do not
                belong together (features of another image or image size).

        """
        if encoded.model_digest != self.model_digest:
            raise BackendError(
                f"the encoded image comes from model {encoded.model_digest} but this Segmenter runs {self.model_digest}; "
                "encode the image with this Segmenter"
            )
        if encoded.pooling != self.pooling:
            raise BackendError(
                f"the encoded image was made with {_pooling_text(encoded.pooling)} but this Segmenter uses "
                f"{_pooling_text(self.pooling)}; encode the image with this Segmenter"
            )
        h, w = encoded.image_size
        if encoded.image.shape[:2] != (h, w) or tuple(encoded.resized_size) != shortest_edge_size(h, w):
            raise BackendError(
                f"the encoded image says {w}x{h} but holds a {encoded.image.shape[1]}x{encoded.image.shape[0]} image resized to "
                f"{encoded.resized_size[1]}x{encoded.resized_size[0]}; encode the image again with seg.encode"
            )
        names = tuple(sorted(encoded.features))
        if names != tuple(sorted(self._paper().feature_names)):
            raise BackendError(
                f"the encoded image holds features {list(names)} but this Segmenter's encoder makes "
                f"{sorted(self._paper().feature_names)}; encode the image with this Segmenter"
            )
        if self._feature_shapes is not None:
            shapes = {name: tuple(a.shape) for name, a in encoded.features.items()}
            if shapes != self._feature_shapes:
                raise BackendError(
                    f"the encoded image holds features {shapes} but this Segmenter's encoder makes {self._feature_shapes}; "
                    "encode the image with this Segmenter"
                )
        if encoded.seal != encoded.expected_seal():
            raise BackendError(
                f"the encoded {w}x{h} image holds features of another image or image size (its fields were changed after "
                "encoding); encode the image again with seg.encode"
            )

    def segment(self, image: ImageLike | EncodedImage, classes: ClassesLike, probs: bool = False) -> Segmentation:
        """Segment an image (or an encoded image) with a vocabulary under the paper's protocol.

        Args:
            image: a file path, a PIL image, an RGB uint8 array ``[H, W, 3]`` (grayscale and RGBA are
                converted), or an ``EncodedImage`` from ``encode`` (only the head runs).
            classes: ``"building,road,tree"``, a list of names (``"low vegetation, grass"`` is one class
                with a synonym) or a ``Vocabulary``.
            probs: also return the float32 ``[N, H, W]`` probabilities.

        Returns:
            The class map, class names, optional probabilities and the image.

        Raises:
            GSNetError: unreadable image, bad vocabulary, or an encoded image from another model,
                pooling or image size.

        """
        path = self._paper()
        vocab = as_vocabulary(classes)
        encoded = image if isinstance(image, EncodedImage) else self.encode(image)
        self.check_encoded(encoded)
        text_embeds = self.encode_classes(vocab)
        class_map, prob_map = path.decode(encoded.features, text_embeds, encoded.image_size, probs)
        return Segmentation(
            class_map=class_map, class_names=vocab.display_names, probs=prob_map, image=encoded.image, notes=encoded.notes
        )

    def segment_many(
        self, image: ImageLike | EncodedImage, vocabularies: Sequence[ClassesLike], probs: bool = False
    ) -> list[Segmentation]:
        """Segment one image with several vocabularies, encoding it once.

        Args:
            image: as for ``segment``.
            vocabularies: one ``classes`` argument per vocabulary.
            probs: also return the probabilities.

        Returns:
            One result per vocabulary, in order.

        """
        if not vocabularies:
            raise GSNetError("no vocabularies given; pass at least one, e.g. ['building,road']")
        vocabs = [as_vocabulary(v) for v in vocabularies]  # every vocabulary is checked before the image is encoded
        encoded = image if isinstance(image, EncodedImage) else self.encode(image)
        return [self.segment(encoded, vocab, probs=probs) for vocab in vocabs]


def _pooling_text(pooling: int | None) -> str:
    """``pooling 2``, or what an unknown pooling is."""
    return "an unknown pooling (an export older than its manifest's pooling field)" if pooling is None else f"pooling {pooling}"
