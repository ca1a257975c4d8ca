"""The paper's sliding-window protocol as two torch modules around the image graph: encoder and head.

The same steps as the numpy reference ``runtime.protocol`` (design.md section 1), on the model's
device and exportable to ONNX (``export.protocol_onnx``):

- ``PaperEncoder``: the uint8 image ``[1, 3, h, w]`` (or ``[B, 3, h, w]``: B images of one size)
  after detectron2's ``ResizeShortestEdge`` (done on the host with PIL) -> the 640x640 canvas
  (bilinear, align_corners False) -> 4 tiles of 384 at stride 256 (row-major) + the global view
  (the ``[h, w]`` image resized to 384, not the canvas) -> ``GSNet.encode_views`` -> the
  class-independent features of the 5 views (of each image).
- ``PaperHead``: features + text embeddings ``[N, 512]`` + the output size ``(H, W)`` ->
  ``GSNet.decode_views`` -> logits upsampled 96 -> 384 (bilinear), sigmoid, tiles averaged where
  they overlap, averaged with the global view upsampled to 640, resized to ``(H, W)`` -> the
  probabilities ``[N, H, W]`` and the class map (argmax, int32) ``[H, W]``.

The overlap average is written with ``Pad`` and a constant count map instead of slice
assignment, so the exported graph has no ``ScatterND`` and the sums run in the reference's order.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.onnx.operators import shape_as_tensor

from gsnet_deploy.contracts.io_names import PAPER_FEATURES
from gsnet_deploy.model.gsnet import GSNet
from gsnet_deploy.runtime.protocol import CANVAS, NUM_VIEWS, VIEW_SIZE, tile_offsets


def _as_size(value: int | torch.Tensor) -> torch.Tensor:
    """A size as a 0-d int64 tensor (sizes traced from shapes or inputs stay symbolic in an exported graph)."""
    if isinstance(value, torch.Tensor):
        return value.to(torch.int64)
    return torch.tensor(value, dtype=torch.int64)


def axis_weights(
    in_size: torch.Tensor, out_size: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Neighbours and weights ``(i0, i1, w0, w1)``, each ``[out_size]``, of one axis of a bilinear resize.

    torch's rule (align_corners False, no antialiasing), with the source coordinate computed in
    float32 exactly as the numpy reference computes it: ``(dst + 0.5) * (in / out) - 0.5``,
    clamped at 0. ``F.interpolate`` computes it otherwise and differs by up to 1e-5 on
    probabilities when upsampling to thousands of pixels.

    Args:
        in_size: 0-d int64 tensor, the input length.
        out_size: 0-d int64 tensor, the output length.
        device: where the indices and weights are made.
    """
    scale = in_size.to(torch.float32) / out_size.to(torch.float32)
    dst = torch.arange(out_size, dtype=torch.float32, device=device)  # type: ignore[call-overload]  # a 0-d tensor end
    src = torch.clamp((dst + 0.5) * scale - 0.5, min=0.0)  # [out]
    last = in_size - 1
    i0 = torch.minimum(torch.floor(src).to(torch.int64), last)  # [out]
    i1 = torch.minimum(i0 + 1, last)  # [out]
    w1 = src - i0.to(torch.float32)  # [out]
    w0 = 1.0 - w1  # [out]
    return i0, i1, w0, w1


def _resize_axis(x: torch.Tensor, dim: int, size: int | torch.Tensor) -> torch.Tensor:
    """Bilinear resize of axis ``dim`` (-2 or -1) of ``x`` to ``size``: two gathers and a weighted sum."""
    in_size = shape_as_tensor(x)[dim]  # a traced size, not a constant, in an export
    i0, i1, w0, w1 = axis_weights(in_size, _as_size(size), x.device)
    if dim == -2:
        w0, w1 = w0[:, None], w1[:, None]  # [out, 1]: broadcast over the columns
    return x.index_select(dim, i0) * w0 + x.index_select(dim, i1) * w1


def bilinear(x: torch.Tensor, size: tuple[int | torch.Tensor, int | torch.Tensor]) -> torch.Tensor:
    """Resize the last two axes of float32 ``x [..., h, w]`` to ``size``: rows first, then columns (as the reference)."""
    return _resize_axis(_resize_axis(x, -2, size[0]), -1, size[1])


class PaperEncoder(nn.Module):
    """Image after ``ResizeShortestEdge`` -> features of the paper's 5 views (4 tiles + global)."""

    def __init__(self, model: GSNet) -> None:
        """Wrap ``model`` (weights shared, not copied)."""
        super().__init__()
        self.model = model

    @staticmethod
    def views(image: torch.Tensor) -> torch.Tensor:
        """The 5 views ``[5B, 3, 384, 384]`` float32 (raw 0..255) of B images ``[B, 3, h, w]`` (uint8 or float).

        View-major: tile 0 of every image, then tile 1, ..., then the global views, so that one
        image (B = 1, the exported graph) gives its 5 views in the protocol's order and view ``v``
        of image ``b`` sits at ``v * B + b`` (``PaperHead.forward_batch`` relies on it).
        """
        chw = image.float()  # [B, 3, h, w]
        canvas = bilinear(chw, (CANVAS, CANVAS))  # [B, 3, 640, 640]
        tiles = [canvas[:, :, r : r + VIEW_SIZE, c : c + VIEW_SIZE] for r, c in tile_offsets()]  # 4 x [B, 3, 384, 384]
        global_view = bilinear(chw, (VIEW_SIZE, VIEW_SIZE))  # [B, 3, 384, 384]: from the [h, w] image
        return torch.cat([*tiles, global_view], dim=0)  # [5B, 3, 384, 384]

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Features keyed by ``PAPER_FEATURES``, each with the 5B views on axis 0 (in ``views`` order)."""
        return self.model.encode_views(self.views(image))


class PaperHead(nn.Module):
    """Features of the 5 views + text embeddings + output size -> class map and probabilities."""

    def __init__(self, model: GSNet) -> None:
        """Wrap ``model`` (weights shared, not copied); the tile count map is a constant buffer."""
        super().__init__()
        self.model = model
        count = torch.zeros(CANVAS, CANVAS)
        for r, c in tile_offsets():
            count[r : r + VIEW_SIZE, c : c + VIEW_SIZE] += 1.0
        self.register_buffer("count", count, persistent=False)  # [640, 640] tiles covering each pixel

    def merge(self, logits: torch.Tensor, out_size: tuple[int | torch.Tensor, int | torch.Tensor]) -> torch.Tensor:
        """Logits ``[5, N, 96, 96]`` -> probabilities ``[N, H, W]`` float32 (the protocol's merge)."""
        probs = torch.sigmoid(bilinear(logits.float(), (VIEW_SIZE, VIEW_SIZE)))  # [5, N, 384, 384]
        acc: torch.Tensor | None = None  # [N, 640, 640]
        for t, (r, c) in enumerate(tile_offsets()):
            pad = (c, CANVAS - VIEW_SIZE - c, r, CANVAS - VIEW_SIZE - r)  # left, right, top, bottom
            placed = F.pad(probs[t], pad)  # [N, 640, 640], zeros outside the tile
            acc = placed if acc is None else acc + placed
        assert acc is not None
        tiled = acc / self.get_buffer("count")  # [N, 640, 640]
        global_prob = bilinear(probs[NUM_VIEWS - 1], (CANVAS, CANVAS))  # [N, 640, 640]
        merged = (tiled + global_prob) / 2.0  # [N, 640, 640]
        return bilinear(merged, out_size)  # [N, H, W]

    def forward(
        self, features: Mapping[str, torch.Tensor], text_embeds: torch.Tensor, out_size: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Class map ``[H, W]`` int32 and probabilities ``[N, H, W]`` float32.

        Args:
            features: ``PaperEncoder`` outputs (every name of ``PAPER_FEATURES``).
            text_embeds: ``[N, 512]``.
            out_size: int64 ``[2]``: the original image's (H, W).
        """
        logits = self.model.decode_views(features, text_embeds)  # [5, N, 96, 96]
        probs = self.merge(logits, (out_size[0], out_size[1]))  # [N, H, W]
        class_map = torch.argmax(probs, dim=0).to(torch.int32)  # [H, W]
        return class_map, probs

    def forward_batch(
        self, features: Mapping[str, torch.Tensor], text_embeds: torch.Tensor, out_size: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """B images of one size at once: class maps ``[B, H, W]`` int32 and probabilities ``[B, N, H, W]`` float32.

        One ``decode_views`` call on the 5B views (``PaperEncoder`` of a ``[B, 3, h, w]`` batch, view
        major), then each image's own 5 views merged as in ``forward``, one image at a time (the
        merge's ``[N, 640, 640]`` intermediates stay those of one image).

        Args:
            features: ``PaperEncoder`` outputs of B images (every name of ``PAPER_FEATURES``).
            text_embeds: ``[N, 512]``.
            out_size: int64 ``[2]``: the original images' (H, W), shared by the batch.
        """
        logits = self.model.decode_views(features, text_embeds)  # [5B, N, 96, 96]
        per_image = logits.unflatten(0, (NUM_VIEWS, -1))  # [5, B, N, 96, 96]
        size = (out_size[0], out_size[1])
        probs = torch.stack([self.merge(per_image[:, b], size) for b in range(per_image.shape[1])])  # [B, N, H, W]
        class_map = torch.argmax(probs, dim=1).to(torch.int32)  # [B, H, W]
        return class_map, probs


def feature_tuple(features: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Features in ``PAPER_FEATURES`` order (the graphs' I/O order)."""
    return tuple(features[name] for name in PAPER_FEATURES)
