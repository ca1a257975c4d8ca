"""RIPD: GSNet's progressive decoder from 24x24 cost embeddings to 96x96 logits.

Reference: github.com/yecy749/GSNet ``modeling/transformer/RIPD.py`` (``FusionUP``,
``DoubleConv``). Two up-blocks, each a stride-2 transposed convolution followed by the
projected CLIP and DINO guidance of that resolution (shared by the N classes of a view) and a
DoubleConv (conv3x3 without bias, GroupNorm with 16 channels per group, ReLU, twice); a 3x3 head
gives one logit per pixel and class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class RipdCfg:
    """Channel plan of the decoder (defaults: the paper's ViT-B/16 model)."""

    in_dim: int = 128  # channels of the aggregated cost embedding
    decoder_dims: tuple[int, int] = (64, 32)  # output channels of the two up-blocks
    guidance_dims: tuple[int, int] = (256, 128)  # encoder guidance channels at 48 and 96 px
    clip_proj_dims: tuple[int, int] = (32, 16)  # projected CLIP guidance per up-block
    dino_proj_dims: tuple[int, int] = (32, 16)  # projected DINO guidance per up-block
    group_size: int = 16  # channels per GroupNorm group


def double_conv(in_dim: int, out_dim: int, group_size: int) -> nn.Sequential:
    """(conv3x3 without bias -> GroupNorm -> ReLU) twice."""
    groups = out_dim // group_size
    return nn.Sequential(
        nn.Conv2d(in_dim, out_dim, 3, padding=1, bias=False),
        nn.GroupNorm(groups, out_dim),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_dim, out_dim, 3, padding=1, bias=False),
        nn.GroupNorm(groups, out_dim),
        nn.ReLU(inplace=True),
    )


def _guidance_proj(in_dim: int, out_dim: int) -> nn.Sequential:
    """ReLU(conv3x3) projection of one encoder guidance map."""
    return nn.Sequential(nn.Conv2d(in_dim, out_dim, 3, padding=1), nn.ReLU())


class Ripd(nn.Module):
    """Two guided up-blocks and a logit head."""

    def __init__(self, cfg: RipdCfg) -> None:
        """Build the guidance projections, up-convolutions, DoubleConvs and head."""
        super().__init__()
        d1, d2 = cfg.decoder_dims
        self.clip_guidance = nn.ModuleList([_guidance_proj(g, p) for g, p in zip(cfg.guidance_dims, cfg.clip_proj_dims)])
        self.dino_guidance = nn.ModuleList([_guidance_proj(g, p) for g, p in zip(cfg.guidance_dims, cfg.dino_proj_dims)])
        # NOTE: the up-convolution leaves room for the CLIP guidance: out = in - clip_proj (reference FusionUP)
        up1 = cfg.in_dim - cfg.clip_proj_dims[0]
        up2 = d1 - cfg.clip_proj_dims[1]
        self.up1 = nn.ConvTranspose2d(cfg.in_dim, up1, 2, stride=2)
        self.conv1 = double_conv(cfg.in_dim + cfg.dino_proj_dims[0], d1, cfg.group_size)
        self.up2 = nn.ConvTranspose2d(d1, up2, 2, stride=2)
        self.conv2 = double_conv(d1 + cfg.dino_proj_dims[1], d2, cfg.group_size)
        self.head = nn.Conv2d(d2, 1, 3, padding=1)

    @staticmethod
    def _per_class(g: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Repeat a view's guidance ``[B, C, H, W]`` for its classes: ``[B*N, C, H, W]``, b-major."""
        b, c, h, w = g.shape
        return g[:, None].expand(b, num_classes, c, h, w).reshape(b * num_classes, c, h, w)

    def project_guidance(
        self, clip_guidance: list[torch.Tensor], dino_guidance: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The class-independent half: ReLU(conv3x3) of each guidance map, once per view.

        Args:
            clip_guidance: CLIP maps ``[B, 256, 48, 48]`` and ``[B, 128, 96, 96]``.
            dino_guidance: DINO maps of the same shapes.

        Returns:
            Projected CLIP maps ``[B, 32, 48, 48]``, ``[B, 16, 96, 96]`` and DINO maps of the same shapes.
        """
        clip = [proj(g) for proj, g in zip(self.clip_guidance, clip_guidance)]
        dino = [proj(g) for proj, g in zip(self.dino_guidance, dino_guidance)]
        return clip, dino

    def decode(
        self, x: torch.Tensor, clip_projected: list[torch.Tensor], dino_projected: list[torch.Tensor], num_classes: int
    ) -> torch.Tensor:
        """The class-dependent half: up-blocks on ``x [B*N, C, 24, 24]`` with projected guidance -> ``[B, N, 96, 96]``."""
        stages = ((self.up1, self.conv1), (self.up2, self.conv2))
        for i, (up, conv) in enumerate(stages):
            cg = self._per_class(clip_projected[i], num_classes)
            dg = self._per_class(dino_projected[i], num_classes)
            x = conv(torch.cat([up(x), cg, dg], dim=1))  # [B*N, d_i, 2H, 2W]
        logits = self.head(x)  # [B*N, 1, 96, 96]
        return logits.reshape(-1, num_classes, logits.shape[-2], logits.shape[-1])  # [B, N, 96, 96]

    def forward(
        self, x: torch.Tensor, clip_guidance: list[torch.Tensor], dino_guidance: list[torch.Tensor], num_classes: int
    ) -> torch.Tensor:
        """Decode (``project_guidance`` then ``decode``).

        Args:
            x: ``[B*N, C, 24, 24]`` aggregated cost embedding.
            clip_guidance: CLIP maps ``[B, 256, 48, 48]`` and ``[B, 128, 96, 96]``.
            dino_guidance: DINO maps of the same shapes.
            num_classes: N.

        Returns:
            Logits ``[B, N, 96, 96]``.

        """
        clip, dino = self.project_guidance(clip_guidance, dino_guidance)
        return self.decode(x, clip, dino, num_classes)
