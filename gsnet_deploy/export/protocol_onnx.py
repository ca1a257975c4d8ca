"""The paper protocol as two exportable graphs: ``paper_encoder.onnx`` and ``paper_head.onnx``.

``paper_encoder``: ``image`` uint8 ``[1, 3, h, w]`` (after ``ResizeShortestEdge``) -> the
class-independent features of the protocol's 5 views (``io_names.PAPER_FEATURES``).
``paper_head``: those features + ``text_embeds [N, 512]`` + ``out_size`` int64 ``[2]`` ->
``class_map`` int32 ``[H, W]`` and ``probs`` float32 ``[N, H, W]``.

The modules wrap ``model.protocol``; ``export.onnx`` traces them with the other graphs. The output
size is data: symbolic shape inference cannot know that ``out_size`` holds ``(H, W)``, so
``paper_head_symbols`` tells it (the graph checks then prove every shape is made of ``N``, ``H``
and ``W`` only).
"""

from __future__ import annotations

import torch
from torch import nn

from gsnet_deploy.contracts import io_names
from gsnet_deploy.model.gsnet import GSNet
from gsnet_deploy.model.protocol import PaperEncoder, PaperHead, feature_tuple

# traced example sizes: all different from each other and from the protocol's constants, none 1
_EXAMPLE_HW = (45, 70)
_EXAMPLE_OUT = (37, 53)
_EXAMPLE_CLASSES = 3


class PaperEncoderGraph(nn.Module):
    """``image [1, 3, h, w] uint8 -> PAPER_FEATURES`` (a tuple in that order)."""

    def __init__(self, model: GSNet) -> None:
        """Wrap ``model`` (weights shared, not copied)."""
        super().__init__()
        self.encoder = PaperEncoder(model)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Features of the 5 views."""
        return feature_tuple(self.encoder(image))


class PaperHeadGraph(nn.Module):
    """``*PAPER_FEATURES, text_embeds, out_size -> class_map, probs``."""

    def __init__(self, model: GSNet) -> None:
        """Wrap ``model`` (weights shared, not copied)."""
        super().__init__()
        self.head = PaperHead(model)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class map and probabilities; ``inputs`` are the graph inputs in ``PAPER_HEAD_INPUTS`` order."""
        *features, text_embeds, out_size = inputs
        return self.head(dict(zip(io_names.PAPER_FEATURES, features)), text_embeds, out_size)


def paper_example_inputs(model: GSNet) -> tuple[tuple[torch.Tensor], tuple[torch.Tensor, ...]]:
    """Seeded example inputs of the encoder (an image) and of the head (its features, embeddings, size)."""
    device = model.get_buffer("pixel_mean").device
    gen = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (1, 3, *_EXAMPLE_HW), generator=gen, dtype=torch.uint8).to(device)
    text = torch.nn.functional.normalize(torch.randn(_EXAMPLE_CLASSES, model.cfg.embed_dim, generator=gen), dim=-1)
    with torch.no_grad():
        features = PaperEncoderGraph(model)(image)
    out_size = torch.tensor(_EXAMPLE_OUT, dtype=torch.int64, device=device)
    return (image,), (*features, text.to(device), out_size)


def paper_head_symbols() -> dict[str, tuple[str, ...]]:
    """Symbolic values of the head's data inputs that become shapes: ``out_size`` is ``(H, W)``."""
    return {io_names.OUT_SIZE: (io_names.OUT_HEIGHT, io_names.OUT_WIDTH)}
