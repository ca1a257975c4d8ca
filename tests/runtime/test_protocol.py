"""The paper's sliding-window protocol, checked on inputs worked by hand and against torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gsnet_deploy.runtime.protocol import (
    merge_paper_logits,
    paper_views,
    resize_shortest_edge,
    shortest_edge_size,
    tile_offsets,
)
from gsnet_deploy.runtime.resize import resize_bilinear


@pytest.mark.parametrize(
    ("hw", "expected"),
    [
        ((512, 768), (640, 960)),  # design.md's example
        ((640, 640), (640, 640)),
        ((3000, 1000), (1920, 640)),
        ((100, 5000), (51, 2560)),  # 640 x 32000 capped by max 2560: scale 0.08
    ],
)
def test_shortest_edge_size_worked_examples(hw: tuple[int, int], expected: tuple[int, int]) -> None:
    assert shortest_edge_size(*hw) == expected


def test_tile_offsets_follow_unfold_order() -> None:
    assert tile_offsets() == [(0, 0), (0, 256), (256, 0), (256, 256)]


def test_paper_views_are_crops_of_the_640_canvas(rng: np.random.Generator) -> None:
    img = rng.integers(0, 256, size=(640, 640, 3), dtype=np.uint8)  # already 640: no resize at all
    views = paper_views(img).views
    chw = img.transpose(2, 0, 1).astype(np.float32)
    assert views.shape == (5, 3, 384, 384) and views.dtype == np.float32
    np.testing.assert_array_equal(views[1], chw[:, 0:384, 256:640])
    np.testing.assert_array_equal(views[2], chw[:, 256:640, 0:384])
    ref = F.interpolate(torch.from_numpy(chw)[None], size=(384, 384), mode="bilinear", align_corners=False)[0]
    np.testing.assert_allclose(views[4], ref.numpy(), atol=1e-3)


def test_resize_shortest_edge_uses_pil_bilinear_size(rng: np.random.Generator) -> None:
    img = rng.integers(0, 256, size=(100, 150, 3), dtype=np.uint8)
    assert resize_shortest_edge(img).shape == (640, 960, 3)


def test_merge_worked_by_hand() -> None:
    # constant logits per view: tile t has probability p[t], the global view pg, one class
    p = np.array([0.1, 0.3, 0.6, 0.8])
    pg = 0.5
    logit = lambda q: np.log(q / (1 - q))  # noqa: E731
    logits = np.empty((5, 1, 96, 96), dtype=np.float32)
    for t in range(4):
        logits[t] = logit(p[t])
    logits[4] = logit(pg)
    probs = merge_paper_logits(logits, 640, 640)[0]
    # (0, 0): tile 0 only; (0, 300): tiles 0 and 1; (300, 300): all four; (639, 639): tile 3 only
    np.testing.assert_allclose(probs[0, 0], (p[0] + pg) / 2, atol=1e-6)
    np.testing.assert_allclose(probs[0, 300], ((p[0] + p[1]) / 2 + pg) / 2, atol=1e-6)
    np.testing.assert_allclose(probs[300, 0], ((p[0] + p[2]) / 2 + pg) / 2, atol=1e-6)
    np.testing.assert_allclose(probs[300, 300], (p.mean() + pg) / 2, atol=1e-6)
    np.testing.assert_allclose(probs[639, 639], (p[3] + pg) / 2, atol=1e-6)


def test_merge_resizes_to_the_original_size(rng: np.random.Generator) -> None:
    logits = rng.standard_normal((5, 3, 96, 96)).astype(np.float32)
    probs = merge_paper_logits(logits, 123, 457)
    assert probs.shape == (3, 123, 457) and probs.dtype == np.float32
    assert np.isfinite(probs).all() and probs.min() >= 0 and probs.max() <= 1


@pytest.mark.parametrize(
    ("src", "dst"), [((96, 96), (384, 384)), ((640, 960), (640, 640)), ((384, 384), (640, 640)), ((7, 5), (3, 11))]
)
def test_resize_bilinear_equals_torch(rng: np.random.Generator, src: tuple[int, int], dst: tuple[int, int]) -> None:
    x = rng.standard_normal((2, 3, *src)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x), size=dst, mode="bilinear", align_corners=False).numpy()
    np.testing.assert_allclose(resize_bilinear(x, dst), ref, rtol=1e-5, atol=1e-5)
