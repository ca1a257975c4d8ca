"""QGFF: query-guided feature fusion of the CLIP and DINO cost volumes (GSNet, AAAI 2025).

Per view and class (reference code: RIPD ``correlation`` + ``corr_fusion_embed_seperate``)::

    C_G = <norm(E_G), norm(T)>,  C_S = <norm(E_S), norm(T)>          [B*N, 1, 24, 24]
    Z_G = sigmoid(conv7x7(C_G)), Z_S = sigmoid(conv7x7(C_S))          [B*N, C, 24, 24]
    Z_F = sigmoid(conv7x7(Z_G ++ Z_S)) + Z_G                          [B*N, C, 24, 24]

The front (cost volumes, 1-channel convolutions, sigmoids) is ``kernels.fused_cost_volume``: a
fused Triton kernel on CUDA, the plain PyTorch reference elsewhere and in exported graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gsnet_deploy.kernels.cost_volume import fused_cost_volume


@dataclass(frozen=True)
class QgffCfg:
    """Sizes of the QGFF convolutions."""

    hidden_dim: int = 128  # channels of Z_G, Z_S and Z_F
    kernel_size: int = 7  # side of all three convolutions


class Qgff(nn.Module):
    """Fuses the CLIP and DINO cost volumes of every (view, class) pair."""

    def __init__(self, cfg: QgffCfg) -> None:
        """Build the three convolutions of QGFF."""
        super().__init__()
        pad = cfg.kernel_size // 2
        self.clip_embed = nn.Conv2d(1, cfg.hidden_dim, cfg.kernel_size, padding=pad)
        self.dino_embed = nn.Conv2d(1, cfg.hidden_dim, cfg.kernel_size, padding=pad)
        self.fusion = nn.Conv2d(2 * cfg.hidden_dim, cfg.hidden_dim, cfg.kernel_size, padding=pad)

    def forward(self, e_clip: torch.Tensor, e_dino: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Fused cost-volume embedding.

        Args:
            e_clip: CLIP dense features E_G ``[B, E, H, W]``.
            e_dino: DINO features E_S ``[B, E, H, W]``.
            text: class embeddings ``[N, E]``.

        Returns:
            Z_F ``[B*N, C, H, W]``, b-major then n.

        """
        z = fused_cost_volume(
            e_clip,
            e_dino,
            text,
            self.clip_embed.weight,
            self.clip_embed.bias,
            self.dino_embed.weight,
            self.dino_embed.bias,
        )  # [B*N, 2C, H, W]
        z_g = z[:, : self.clip_embed.out_channels]  # [B*N, C, H, W]
        return torch.sigmoid(self.fusion(z)) + z_g
