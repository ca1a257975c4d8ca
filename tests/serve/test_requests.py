import numpy as np
import pytest
from PIL import Image

from gsnet_deploy.serve.requests import (
    CLASSES,
    IMAGE,
    PIXELS,
    WANT_PROBS,
    Limits,
    RequestError,
    parse_segment_request,
)
from tests.serve.conftest import declared_png, png_bytes


def classes(*names: str) -> np.ndarray:
    return np.array([n.encode() for n in names], dtype=np.object_)


def test_request_decodes_image_and_keeps_synonym_rule():
    req = parse_segment_request(
        {IMAGE: np.array([png_bytes(5, 7)], dtype=np.object_), CLASSES: classes("road", "low vegetation, grass")}, Limits()
    )
    assert req.rgb.shape == (5, 7, 3) and req.rgb.dtype == np.uint8
    assert req.vocab.names == ("road", "low vegetation, grass")
    assert req.vocab.display_names == ("road", "low vegetation")
    assert req.want_probs is False


def test_request_pixels_gray_and_batch_axis():
    req = parse_segment_request(
        {PIXELS: np.zeros((1, 4, 6), np.uint8), CLASSES: classes("a"), WANT_PROBS: np.array([True])}, Limits()
    )
    assert req.rgb.shape == (4, 6, 3) and req.want_probs


@pytest.mark.parametrize(
    ("inputs", "match"),
    [
        ({IMAGE: np.array([b"not an image"], dtype=np.object_), CLASSES: classes("a")}, "not a readable"),
        ({IMAGE: np.array([b""], dtype=np.object_), CLASSES: classes("a")}, "empty"),
        ({PIXELS: np.zeros((4, 4, 3), np.float32), CLASSES: classes("a")}, "UINT8"),
        ({PIXELS: np.zeros((0, 4, 3), np.uint8), CLASSES: classes("a")}, "non-empty"),
        ({PIXELS: np.zeros((4, 4, 5), np.uint8), CLASSES: classes("a")}, "RGB"),
        ({IMAGE: np.array([declared_png(50_000, 50_000)], dtype=np.object_), CLASSES: classes("a")}, "limit"),
        ({PIXELS: np.zeros((4, 4, 3), np.uint8), CLASSES: classes()}, "empty"),
        ({PIXELS: np.zeros((4, 4, 3), np.uint8), CLASSES: classes(*[f"c{i}" for i in range(10_000)])}, "limit"),
        ({PIXELS: np.zeros((4, 4, 3), np.uint8), CLASSES: classes("a", "A")}, "same prompt"),
        ({PIXELS: np.zeros((4, 4, 3), np.uint8), CLASSES: classes("a", " ")}, "blank"),
        ({CLASSES: classes("a")}, "exactly one"),
        ({PIXELS: np.zeros((4, 4, 3), np.uint8)}, "missing"),
        (
            {IMAGE: np.array([png_bytes(2, 2)], dtype=np.object_), PIXELS: np.zeros((4, 4, 3), np.uint8), CLASSES: classes("a")},
            "exactly one",
        ),
    ],
)
def test_request_bad_inputs_are_one_line_errors(inputs, match):
    with pytest.raises(RequestError, match=match) as info:
        parse_segment_request(inputs, Limits())
    assert "\n" not in str(info.value)


def test_request_declared_size_refused_before_decoding(monkeypatch):
    # a bomb must be refused from its header: decoding it would allocate 7.5 GB
    def boom(*_args, **_kwargs):
        raise AssertionError("decoded a refused image")

    monkeypatch.setattr(Image.Image, "convert", boom)
    with pytest.raises(RequestError, match="limit"):
        parse_segment_request(
            {IMAGE: np.array([declared_png(50_000, 50_000)], dtype=np.object_), CLASSES: classes("a")}, Limits()
        )
