"""QGFF: query-guided feature fusion of the CLIP and DINO cost volumes (GSNet, AAAI 2025).

Per view and class (reference code: RIPD ``correlation`` + ``corr_fusion_embed_seperate``)::

    C_G = <norm(E_G), norm(T)>,  C_S = <norm(E_S), norm(T)>          [B*N, 1, 24, 24]
    Z_G = sigmoid(conv7x7(C_G)), Z_S = sigmoid(conv7x7(C_S))          [B*N, C, 24, 24]
    Z_F = sigmoid(conv7x7(Z_G ++ Z_S)) + Z_G                          [B*N, C, 24, 24]

The front (cost volumes, 1-channel convolutions, sigmoids) is ``kernels.cost_volume_reference``, the
plain PyTorch ops, by default (they also export to ONNX). ``QgffCfg.fused_kernel`` selects
``kernels.fused_cost_volume`` instead, the fused Triton kernel on CUDA: it is slower than
``torch.compile`` of the plain ops (345 vs 246 us at N=40 on an H100,
benchmarks/results/kernel_cost_volume.md) and changed nothing end to end, so it is opt-in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gsnet_deploy.kernels.cost_volume import cost_volume_reference, fused_cost_volume


@dataclass(frozen=True)
class QgffCfg:
    """Sizes of the QGFF convolutions."""

    hidden_dim: int = 128  # channels of Z_G, Z_S and Z_F
    kernel_size: int = 7  # side of all three convolutions
    fused_kernel: bool = False  # the front as the Triton kernel on CUDA (opt-in: not faster, see above)


class Qgff(nn.Module):
    """Fuses the CLIP and DINO cost volumes of every (view, class) pair."""

    def __init__(self, cfg: QgffCfg) -> None:
        """Build the three convolutions of QGFF."""
        super().__init__()
        pad = cfg.kernel_size // 2
        self.clip_embed = nn.Conv2d(1, cfg.hidden_dim, cfg.kernel_size, padding=pad)
        self.dino_embed = nn.Conv2d(1, cfg.hidden_dim, cfg.kernel_size, padding=pad)
        self.fusion = nn.Conv2d(2 * cfg.hidden_dim, cfg.hidden_dim, cfg.kernel_size, padding=pad)
        self.fused_kernel = cfg.fused_kernel

    def forward(self, e_clip: torch.Tensor, e_dino: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Fused cost-volume embedding.

        Args:
            e_clip: CLIP dense features E_G ``[B, E, H, W]``.
            e_dino: DINO features E_S ``[B, E, H, W]``.
            text: class embeddings ``[N, E]``.

        Returns:
            Z_F ``[B*N, C, H, W]``, b-major then n.

        """
        front = fused_cost_volume if self.fused_kernel else cost_volume_reference
        z = front(
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
