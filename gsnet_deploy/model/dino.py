"""DINO ViT-B/8 ("RSIB" in the GSNet paper), built from timm blocks.

GSNet feeds the CLIP-normalized 384-px view to a DINO ViT-B/8 fine-tuned on remote-sensing
imagery, takes every block's output through the final LayerNorm (DINO's
``get_intermediate_layers``), and uses blocks 3, 7 and 11 as ``[B, 768, 48, 48]`` maps.
Reference code: github.com/yecy749/GSNet ``gs_net/vision_transformer.py`` (from DINO, Apache-2.0).

The checkpoint's 28x28 positional grid is resized once at load time with bicubic interpolation and
the reference code's fixed scale factor 48.1 / 28 (which is what sets the sampling positions, not
the 48 / 28 size ratio), never inside the exported graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn


@dataclass(frozen=True)
class DinoCfg:
    """DINO ViT-B/8 at GSNet's 384-px input."""

    image_size: int = 384  # input side; 384 / 8 = 48x48 tokens
    patch_size: int = 8  # patch side
    embed_dim: int = 768  # token width
    depth: int = 12  # transformer blocks
    num_heads: int = 12  # attention heads
    mlp_ratio: float = 4.0  # MLP hidden width / token width
    norm_eps: float = 1e-6  # LayerNorm epsilon of DINO's ViTs
    pretrain_grid: int = 28  # positional grid stored in the checkpoint (224 / 8)
    pos_scale: float = 1.717857142857143  # bicubic scale factor of the reference code (48.1 / 28)
    feature_layers: tuple[int, int, int] = (3, 7, 11)  # blocks used: guidance 1, guidance 2, features

    @property
    def grid(self) -> int:
        """Token grid side at ``image_size``."""
        return self.image_size // self.patch_size


def resize_dino_pos_embed(pos_embed: torch.Tensor, grid: int, scale: float) -> torch.Tensor:
    """Resize DINO's positional table ``[1, 1 + g*g, D]`` to ``[1, 1 + grid*grid, D]``.

    Uses ``scale_factor`` (not ``size``) as the reference code does, so the bicubic sampling
    positions are those of the reference; the resulting side must equal ``grid``.
    """
    _, length, dim = pos_embed.shape
    src = round((length - 1) ** 0.5)
    if src == grid:
        return pos_embed.clone()
    cls_pos = pos_embed[:, :1]  # [1, 1, D]
    table = pos_embed[:, 1:].reshape(1, src, src, dim).permute(0, 3, 1, 2)  # [1, D, g, g]
    table = F.interpolate(table.float(), scale_factor=(scale, scale), mode="bicubic")  # [1, D, grid, grid]
    if table.shape[-1] != grid or table.shape[-2] != grid:
        raise ValueError(f"positional grid {src} scaled by {scale} gives {tuple(table.shape[-2:])}, not {grid}x{grid}")
    table = table.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos_embed.dtype)  # [1, grid*grid, D]
    return torch.cat([cls_pos, table], dim=1)


class DinoViT(nn.Module):
    """DINO ViT returning normed intermediate token maps."""

    def __init__(self, cfg: DinoCfg) -> None:
        """Build the ViT from its config (random init; weights come from the checkpoint)."""
        super().__init__()
        self.cfg = cfg
        dim = cfg.embed_dim
        norm_layer = partial(nn.LayerNorm, eps=cfg.norm_eps)
        self.patch_embed = PatchEmbed(img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=3, embed_dim=dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        # NOTE: as for CLIP, the parameter keeps the checkpoint's grid and forward uses the buffer.
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.pretrain_grid**2 + 1, dim) * 0.02)
        self.register_buffer(
            "pos_embed_resized",
            resize_dino_pos_embed(self.pos_embed.detach(), cfg.grid, cfg.pos_scale),
            persistent=False,
        )
        self.blocks = nn.ModuleList(
            [
                Block(dim, cfg.num_heads, cfg.mlp_ratio, qkv_bias=True, norm_layer=norm_layer, act_layer=nn.GELU)
                for _ in range(cfg.depth)
            ]
        )
        self.norm = norm_layer(dim)
        self.register_load_state_dict_post_hook(lambda module, _keys: module.refresh_pos_embed())

    @torch.no_grad()
    def refresh_pos_embed(self) -> None:
        """Recompute the 48x48 positional table from the loaded 28x28 one."""
        self.pos_embed_resized.copy_(resize_dino_pos_embed(self.pos_embed.detach(), self.cfg.grid, self.cfg.pos_scale))

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Normed outputs of ``cfg.feature_layers`` for normalized images ``x [B, 3, H, W]``.

        Returns:
            One ``[B, D, g, g]`` map per feature layer (CLS token dropped).

        """
        bsz = x.shape[0]
        grid = self.cfg.grid
        x = self.patch_embed(x)  # [B, g*g, D]
        x = torch.cat([self.cls_token.expand(bsz, -1, -1).to(x.dtype), x], dim=1)  # [B, 1+g*g, D]
        x = x + self.pos_embed_resized.to(x.dtype)
        outputs: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.cfg.feature_layers:
                y = self.norm(x[:, 1:])  # [B, g*g, D]
                outputs.append(y.transpose(1, 2).reshape(bsz, -1, grid, grid))  # [B, D, g, g]
            if i >= max(self.cfg.feature_layers):
                break
        return outputs
