"""The assembled model: shapes, finiteness, and one full-size view."""

from __future__ import annotations

import pytest
import torch

from gsnet_deploy.model import build_gsnet, paper_cfg
from gsnet_deploy.runtime.tokenizer import BpeTokenizer


@pytest.mark.parametrize(("views", "classes"), [(1, 1), (2, 3)])
def test_tiny_forward_shapes(tiny_gsnet, views: int, classes: int) -> None:
    tokens = torch.from_numpy(BpeTokenizer()([f"A photo of a class{i} in the scene" for i in range(classes)]))
    with torch.no_grad():
        text = tiny_gsnet.encode_text(tokens)
        logits = tiny_gsnet.forward_image(torch.rand(views, 3, 384, 384) * 255, text)
    assert text.shape == (classes, 512)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(classes))
    assert logits.shape == (views, classes, 96, 96)
    assert torch.isfinite(logits).all()


def test_views_are_independent(tiny_gsnet) -> None:
    """A view's logits do not depend on the other views in the batch."""
    images = torch.rand(3, 3, 384, 384) * 255
    text = torch.nn.functional.normalize(torch.randn(2, 512), dim=-1)
    with torch.no_grad():
        batch = tiny_gsnet.forward_image(images, text)
        single = tiny_gsnet.forward_image(images[1:2], text)
    torch.testing.assert_close(batch[1:2], single, rtol=1e-4, atol=1e-5)


def test_class_order_is_equivariant(tiny_gsnet) -> None:
    """Permuting the classes permutes the logits (the head treats classes as a set + padding)."""
    images = torch.rand(1, 3, 384, 384) * 255
    text = torch.nn.functional.normalize(torch.randn(3, 512), dim=-1)
    perm = torch.tensor([2, 0, 1])
    with torch.no_grad():
        a = tiny_gsnet.forward_image(images, text)
        b = tiny_gsnet.forward_image(images, text[perm])
    torch.testing.assert_close(a[:, perm], b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_full_size_forward_one_view() -> None:
    model = build_gsnet(paper_cfg())
    text = torch.nn.functional.normalize(torch.randn(2, 512), dim=-1)
    with torch.no_grad():
        logits = model.forward_image(torch.rand(1, 3, 384, 384) * 255, text)
    assert logits.shape == (1, 2, 96, 96) and torch.isfinite(logits).all()
