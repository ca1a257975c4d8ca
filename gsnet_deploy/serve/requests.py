"""Decode and validate one serving request: image bytes or pixels, class names, options.

Torch-free and server-free, so that every rule is tested without a running Triton. A request that
breaks a rule raises ``RequestError`` with one sentence for the client; the server answers that
request with an error and goes on serving.

Inputs of the ``gsnet_segment`` model (names are the wire contract, see ``serve/server.py``):
- ``image``: BYTES ``[1]``, an encoded PNG, JPEG or TIFF; or
- ``pixels``: UINT8 ``[H, W, 3]`` (RGB) or ``[H, W]`` (gray); exactly one of the two;
- ``classes``: BYTES ``[N]``, one class per element; ``", "`` inside an element separates synonyms
  (``"low vegetation, grass"``), the rule of ``--classes-file`` lines and of the official code;
- ``probs``: BOOL ``[1]``, optional: also return per-class probabilities ``[N, H, W]``.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from gsnet_deploy.errors import GSNetError, VocabularyError
from gsnet_deploy.runtime.vocab import Vocabulary

IMAGE = "image"
PIXELS = "pixels"
CLASSES = "classes"
WANT_PROBS = "want_probs"
CLASS_MAP = "class_map"
PROBS = "probs"
TEXT_EMBEDS = "text_embeds"

DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000: a larger image belongs to `gsnet segment --mode tiled`
DEFAULT_MAX_CLASSES = 512
DEFAULT_MAX_BYTES = 256 << 20  # encoded image size limit


class RequestError(GSNetError):
    """A serving request that cannot be answered (bad image, bad classes, limits)."""


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; larger requests are refused before any decoding or inference."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_classes: int = DEFAULT_MAX_CLASSES
    max_bytes: int = DEFAULT_MAX_BYTES


@dataclass(frozen=True)
class SegmentRequest:
    """A validated ``gsnet_segment`` request."""

    rgb: np.ndarray  # [H, W, 3] uint8
    vocab: Vocabulary
    want_probs: bool


def _first(value: np.ndarray) -> object:
    """The single element of a ``[1]`` or ``[1, 1]`` array (a batch axis of 1 is allowed)."""
    flat = np.asarray(value).reshape(-1)
    if flat.size != 1:
        raise RequestError(f"expected one element, got shape {list(np.asarray(value).shape)}")
    return flat[0]


def decode_image(data: bytes, limits: Limits) -> np.ndarray:
    """RGB uint8 ``[H, W, 3]`` from encoded image bytes, refusing oversized images before decoding.

    Raises:
        RequestError: not an image, an empty image, or one over ``limits``.

    """
    if not data:
        raise RequestError("'image' is empty; send PNG, JPEG or TIFF bytes")
    if len(data) > limits.max_bytes:
        raise RequestError(f"'image' is {len(data)} bytes, over the server's limit of {limits.max_bytes}")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size  # header only: nothing decoded yet
            if width * height == 0:
                raise RequestError(f"'image' has {width}x{height} pixels; send a non-empty image")
            if width * height > limits.max_pixels:
                raise RequestError(
                    f"'image' declares {width}x{height} pixels, over the server's limit of {limits.max_pixels}; "
                    "segment it with `gsnet segment --mode tiled`"
                )
            rgb = np.asarray(img.convert("RGB"))
    except RequestError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
        raise RequestError(f"'image' is not a readable PNG, JPEG or TIFF ({exc})") from exc
    return np.ascontiguousarray(rgb)


def check_pixels(pixels: np.ndarray, limits: Limits) -> np.ndarray:
    """RGB uint8 ``[H, W, 3]`` from a ``pixels`` tensor (``[H, W, 3]`` RGB or ``[H, W]`` gray; a leading 1 is allowed).

    Raises:
        RequestError: wrong dtype, layout, an empty image or one over ``limits``.

    """
    array = np.asarray(pixels)
    if array.ndim in (3, 4) and array.shape[0] == 1 and (array.ndim == 4 or array.shape[-1] != 3):
        array = array[0]  # a batch axis of 1
    if array.dtype != np.uint8:
        raise RequestError(f"'pixels' must be UINT8, got {array.dtype}; send 0..255 RGB values")
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise RequestError(f"'pixels' must be [H, W, 3] (RGB) or [H, W] (gray), got shape {list(array.shape)}")
    height, width = array.shape[:2]
    if height * width == 0:
        raise RequestError(f"'pixels' has {width}x{height} pixels; send a non-empty image")
    if height * width > limits.max_pixels:
        raise RequestError(f"'pixels' has {width}x{height} pixels, over the server's limit of {limits.max_pixels}")
    return np.ascontiguousarray(array)


def parse_class_names(values: np.ndarray, limits: Limits) -> Vocabulary:
    """Vocabulary from a BYTES ``[N]`` tensor (one class per element, UTF-8).

    Raises:
        RequestError: no classes, too many, undecodable, blank or duplicate names.

    """
    flat = np.asarray(values).reshape(-1)
    if flat.size == 0:
        raise RequestError("'classes' is empty; send at least one class name")
    if flat.size > limits.max_classes:
        raise RequestError(f"'classes' has {flat.size} names, over the server's limit of {limits.max_classes}")
    names: list[str] = []
    for i, value in enumerate(flat):
        try:
            name = value.decode("utf-8") if isinstance(value, bytes | np.bytes_) else str(value)
        except UnicodeDecodeError as exc:
            raise RequestError(f"class {i + 1} of 'classes' is not UTF-8 text") from exc
        names.append(name.strip())
    try:
        return Vocabulary(tuple(names))
    except VocabularyError as exc:
        raise RequestError(str(exc).replace("--classes or --classes-file", "'classes'")) from exc


def parse_segment_request(inputs: Mapping[str, np.ndarray], limits: Limits) -> SegmentRequest:
    """Validate the inputs of one ``gsnet_segment`` request.

    Raises:
        RequestError: the request breaks a rule (one sentence saying which and what to send).

    """
    has_image, has_pixels = IMAGE in inputs, PIXELS in inputs
    if has_image == has_pixels:
        raise RequestError("send exactly one of 'image' (encoded bytes) and 'pixels' (UINT8 [H, W, 3])")
    if CLASSES not in inputs:
        raise RequestError("'classes' is missing; send the class names as a BYTES tensor, one name per element")
    if has_image:
        data = _first(inputs[IMAGE])
        if not isinstance(data, bytes | np.bytes_):
            raise RequestError("'image' must be a BYTES tensor holding the encoded file")
        rgb = decode_image(bytes(data), limits)
    else:
        rgb = check_pixels(inputs[PIXELS], limits)
    vocab = parse_class_names(inputs[CLASSES], limits)
    want_probs = bool(_first(inputs[WANT_PROBS])) if WANT_PROBS in inputs else False
    return SegmentRequest(rgb=rgb, vocab=vocab, want_probs=want_probs)
