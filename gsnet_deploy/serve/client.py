"""A small client for ``gsnet serve`` and ``gsnet export triton`` servers (HTTP, through ``tritonclient``).

Example::

    from gsnet_deploy.serve.client import SegmentClient

    with SegmentClient("127.0.0.1:8000") as client:
        class_map = client.segment("scene.png", ["building", "road", "tree"]).class_map

Images are sent encoded (PNG bytes) so a request stays small; arrays are encoded on the client.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np
from PIL import Image

from gsnet_deploy.errors import GSNetError
from gsnet_deploy.serve.requests import CLASS_MAP, CLASSES, IMAGE, PROBS, TEXT_EMBEDS, WANT_PROBS

SEGMENT_MODEL = "gsnet_segment"
TEXT_MODEL = "gsnet_text"


@dataclass(frozen=True)
class ServedSegmentation:
    """A server's answer: the class map ``[H, W]`` int32 and, when asked, probabilities ``[N, H, W]``."""

    class_map: np.ndarray
    probs: np.ndarray | None


def encode_png(image: str | Path | np.ndarray | Image.Image) -> bytes:
    """PNG bytes of an image path (sent as it is when already PNG/JPEG/TIFF), an RGB array or a PIL image."""
    if isinstance(image, str | Path):
        return Path(image).read_bytes()
    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


class SegmentClient:
    """HTTP client of the ``gsnet_segment`` and ``gsnet_text`` models; one connection, use it as a context manager."""

    def __init__(self, url: str = "127.0.0.1:8000", timeout_s: float = 300.0) -> None:
        try:
            import tritonclient.http as httpclient
        except ImportError as exc:
            raise GSNetError("the serving client needs tritonclient: pip install 'gsnet-deploy[serve]'") from exc
        self._http = httpclient
        self._client = httpclient.InferenceServerClient(url, network_timeout=timeout_s, connection_timeout=timeout_s)

    def _names(self, classes: list[str] | tuple[str, ...], batched: bool = False) -> object:
        shape = [1, len(classes)] if batched else [len(classes)]  # gsnet_text takes a batch axis
        tensor = self._http.InferInput(CLASSES, shape, "BYTES")
        tensor.set_data_from_numpy(np.array([c.encode("utf-8") for c in classes], dtype=np.object_).reshape(shape))
        return tensor

    def segment(
        self, image: str | Path | np.ndarray | Image.Image, classes: list[str] | tuple[str, ...], probs: bool = False
    ) -> ServedSegmentation:
        """Segment one image with a vocabulary (one class per item; ``", "`` separates synonyms)."""
        data = self._http.InferInput(IMAGE, [1], "BYTES")
        data.set_data_from_numpy(np.array([encode_png(image)], dtype=np.object_))
        inputs = [data, self._names(classes)]
        outputs = [self._http.InferRequestedOutput(CLASS_MAP)]
        if probs:
            flag = self._http.InferInput(WANT_PROBS, [1], "BOOL")
            flag.set_data_from_numpy(np.array([True]))
            inputs.append(flag)
            outputs.append(self._http.InferRequestedOutput(PROBS))
        result = self._client.infer(SEGMENT_MODEL, inputs, outputs=outputs)
        return ServedSegmentation(result.as_numpy(CLASS_MAP), result.as_numpy(PROBS) if probs else None)

    def text_embeds(self, classes: list[str] | tuple[str, ...]) -> np.ndarray:
        """Text embeddings ``[N, 512]`` of a vocabulary (``gsnet serve`` only)."""
        return self._client.infer(TEXT_MODEL, [self._names(classes, batched=True)]).as_numpy(TEXT_EMBEDS)[0]

    def close(self) -> None:
        """Close the connection."""
        self._client.close()

    def __enter__(self) -> SegmentClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
