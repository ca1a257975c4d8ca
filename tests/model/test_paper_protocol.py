"""The paper protocol on the device (``model.protocol``) against the numpy reference (``runtime.protocol``).

The reference cuts the views with numpy, runs ``forward_image`` and merges the logits with numpy;
the device protocol does all of it in torch through the encoder/head split. Probabilities must
agree within 1e-6 and class maps wherever the reference's top two classes are more than 1e-6
apart (an exact tie may go either way).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gsnet_deploy.contracts.io_names import PAPER_FEATURES
from gsnet_deploy.model import build_gsnet, tiny_cfg
from gsnet_deploy.model.protocol import PaperEncoder, PaperHead, bilinear
from gsnet_deploy.runtime.protocol import merge_paper_logits, paper_views, resize_shortest_edge

PROB_TOL = 1e-6


def _text(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, 512, generator=gen), dim=-1)


def _chw(rgb: np.ndarray) -> torch.Tensor:
    """An RGB uint8 ``[H, W, 3]`` image after ResizeShortestEdge, as the encoder's ``[1, 3, h, w]`` uint8 input."""
    return torch.from_numpy(np.ascontiguousarray(resize_shortest_edge(rgb).transpose(2, 0, 1)))[None]


def _reference(model, rgb: np.ndarray, text: torch.Tensor) -> np.ndarray:
    """The numpy protocol around the torch image graph: probabilities ``[N, H, W]``."""
    views = paper_views(rgb)
    with torch.no_grad():
        logits = model.forward_image(torch.from_numpy(views.views), text).numpy()  # [5, N, 96, 96]
    return merge_paper_logits(logits, views.height, views.width)


def _device(model, rgb: np.ndarray, text: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The torch protocol: class map ``[H, W]`` and probabilities ``[N, H, W]``."""
    with torch.no_grad():
        features = PaperEncoder(model)(_chw(rgb))
        class_map, probs = PaperHead(model)(features, text, torch.tensor(rgb.shape[:2], dtype=torch.int64))
    return class_map.numpy(), probs.numpy()


def assert_same_protocol(class_map: np.ndarray, probs: np.ndarray, ref: np.ndarray) -> None:
    """Probabilities within ``PROB_TOL``; class maps equal away from near-ties of the reference."""
    assert probs.shape == ref.shape and probs.dtype == np.float32
    assert class_map.shape == ref.shape[1:] and class_map.dtype == np.int32
    np.testing.assert_allclose(probs, ref, rtol=0, atol=PROB_TOL)
    if ref.shape[0] == 1:
        assert (class_map == 0).all()
        return
    top2 = np.partition(ref, -2, axis=0)[-2:]  # [2, H, W]
    clear = top2[1] - top2[0] > 2 * PROB_TOL
    assert clear.mean() > 0.5, "too few pixels away from ties for the comparison to mean anything"
    np.testing.assert_array_equal(class_map[clear], ref.argmax(axis=0)[clear])


class StandInModel(nn.Module):
    """A cheap model with GSNet's encoder/head interface: logits depend on each view's pixels and the classes.

    Logits ``[B, N, 96, 96]`` are a class-weighted mix of the view's 4x4-pooled colours plus the
    square of the first one, so a swapped tile, a shifted crop or a wrong resize changes them.
    """

    def encode_views(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = F.avg_pool2d(images.float(), 4) / 255.0 - 0.5  # [B, 3, 96, 96]
        return {name: pooled * (i + 1) for i, name in enumerate(PAPER_FEATURES)}

    def decode_views(self, features: dict[str, torch.Tensor], text_embeds: torch.Tensor) -> torch.Tensor:
        f = features[PAPER_FEATURES[0]]  # [B, 3, 96, 96]
        weights = 40.0 * text_embeds[:, :3]  # [N, 3]
        mixed = (f[:, None] * weights[None, :, :, None, None]).sum(dim=2)  # [B, N, 96, 96]
        return mixed + 3.0 * f[:, None, 0] ** 2 * text_embeds[None, :, 3, None, None] * 20.0

    def forward_image(self, images: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        return self.decode_views(self.encode_views(images), text_embeds)


def _rgb(hw: tuple[int, int]) -> np.ndarray:
    """Smooth structure plus noise: the views differ from each other, so a swapped tile shows."""
    rng = np.random.default_rng(hw[0] * 7919 + hw[1])
    yy, xx = np.mgrid[0 : hw[0], 0 : hw[1]]
    base = 127 + 100 * np.sin(yy[..., None] / 37.0 + xx[..., None] / 23.0 + np.arange(3))
    return np.clip(base + rng.normal(0, 20, (*hw, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    ("classes", "hw"),
    [
        (5, (333, 517)),  # odd landscape: 640 x 994 after the resize rule
        (5, (517, 333)),  # odd portrait
        (1, (1, 1)),  # a single pixel becomes 640 x 640
        (5, (100, 5000)),  # long side capped at 2560: 51 x 2560
        (5, (3000, 60)),  # portrait capped: 2560 x 51
        (1, (640, 640)),  # no resize at all
        (40, (61, 47)),
        pytest.param(300, (37, 29), marks=pytest.mark.slow),  # more classes than the 256 padding; ~1 GB merge
    ],
)
def test_protocol_equals_numpy_reference(classes: int, hw: tuple[int, int]) -> None:
    """Views, merge and resize back: every size rule and class count, around a cheap stand-in model."""
    model = StandInModel()
    rgb = _rgb(hw)
    text = _text(classes, seed=classes)
    class_map, probs = _device(model, rgb, text)
    assert_same_protocol(class_map, probs, _reference(model, rgb, text))


@pytest.mark.parametrize(("pooling", "classes", "hw"), [(1, 5, (333, 517)), (2, 3, (1, 1))])
def test_device_protocol_equals_numpy_reference(tiny_gsnet, pooling: int, classes: int, hw: tuple[int, int]) -> None:
    """The same with the tiny GSNet through encode_views / decode_views, pooling 1 and 2."""
    model = tiny_gsnet if pooling == 1 else build_gsnet(tiny_cfg(pooling=(2, 2)))
    rgb = _rgb(hw)
    text = _text(classes, seed=classes)
    class_map, probs = _device(model, rgb, text)
    assert_same_protocol(class_map, probs, _reference(model, rgb, text))


def test_merge_equals_reference_on_large_logits(tiny_gsnet, rng: np.random.Generator) -> None:
    """The merge alone, on logits far from 0 and a large output: where torch's own bilinear is 1e-5 off."""
    logits = (rng.standard_normal((5, 2, 96, 96)) * 4).astype(np.float32)
    ref = merge_paper_logits(logits, 1500, 2001)
    with torch.no_grad():
        probs = PaperHead(tiny_gsnet).merge(torch.from_numpy(logits), (1500, 2001)).numpy()
    np.testing.assert_allclose(probs, ref, rtol=0, atol=PROB_TOL)


@pytest.mark.parametrize(
    ("src", "dst"), [((96, 96), (384, 384)), ((640, 994), (640, 640)), ((51, 2560), (384, 384)), ((1, 1), (3, 5))]
)
def test_bilinear_matches_float64_torch_rule(src: tuple[int, int], dst: tuple[int, int]) -> None:
    """The gather resize equals torch's bilinear rule written in float64 (an independent reference)."""
    x = torch.rand(1, 2, *src, dtype=torch.float64)
    ref = torch.nn.functional.interpolate(x, size=dst, mode="bilinear", align_corners=False)
    got = bilinear(x.float(), dst)
    # float32 source coordinates (as the reference computes them) are off by up to one ulp of 2560, 2.4e-4
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=3e-4)


def test_encode_decode_equals_forward_image(tiny_gsnet) -> None:
    """The split changes no number: decode_views(encode_views(x)) is forward_image(x), bit for bit."""
    images = torch.rand(3, 3, 384, 384) * 255
    text = _text(4, seed=0)
    with torch.no_grad():
        features = tiny_gsnet.encode_views(images)
        split = tiny_gsnet.decode_views(features, text)
        whole = tiny_gsnet.forward_image(images, text)
    assert tuple(features) == PAPER_FEATURES
    assert all(f.shape[0] == 3 for f in features.values())
    assert torch.equal(split, whole)


def test_features_do_not_depend_on_the_classes(tiny_gsnet) -> None:
    """Re-querying encoded views with another vocabulary equals a full run with it."""
    images = torch.rand(5, 3, 384, 384) * 255
    with torch.no_grad():
        features = tiny_gsnet.encode_views(images)
        for n in (2, 6):
            text = _text(n, seed=n)
            torch.testing.assert_close(
                tiny_gsnet.decode_views(features, text), tiny_gsnet.forward_image(images, text), rtol=0, atol=0
            )
