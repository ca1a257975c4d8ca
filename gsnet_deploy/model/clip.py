"""CLIP ViT-B/16 towers as GSNet uses them: dense visual features and class-name embeddings.

Paper: GSNet, "Towards Open-Vocabulary Remote Sensing Image Semantic Segmentation" (AAAI 2025);
reference code github.com/yecy749/GSNet (CAT-Seg lineage, MIT licence). CLIP: Radford et al. 2021.
The blocks are open_clip's (``ResidualAttentionBlock``, ``TextTransformer``, ``LayerNormFp32``,
``QuickGELU``); the forwards are ours, because GSNet needs what plain CLIP does not give:

- block outputs 3 and 7 of the visual tower as ``[B, C, 24, 24]`` maps (decoder guidance);
- a *dense* last block that skips attention (value and output projections of every token, the
  residual taken from the CLS token's input), then ``ln_post`` and ``proj`` on every token;
- the 14x14 positional grid resized to 24x24 once when the weights are loaded, never per forward.

Attention is computed with ``F.scaled_dot_product_attention`` on the blocks' own weights, which
exports to ONNX cleanly and runs fused kernels on GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.transformer import LayerNormFp32, QuickGELU, ResidualAttentionBlock, TextTransformer
from torch import nn


@dataclass(frozen=True)
class ClipVisionCfg:
    """Visual tower of CLIP ViT-B/16 at GSNet's 384-px input."""

    image_size: int = 384  # input side; 384 / 16 = 24x24 tokens
    patch_size: int = 16  # patch side of the stem convolution
    width: int = 768  # token width
    layers: int = 12  # residual attention blocks
    head_width: int = 64  # channels per attention head
    mlp_ratio: float = 4.0  # MLP hidden width / token width
    output_dim: int = 512  # joint embedding width after ``proj``
    pretrain_grid: int = 14  # positional grid stored in the checkpoint (224 / 16)
    guidance_layers: tuple[int, int] = (3, 7)  # blocks whose outputs feed the decoder

    @property
    def grid(self) -> int:
        """Token grid side at ``image_size``."""
        return self.image_size // self.patch_size

    @property
    def heads(self) -> int:
        """Attention heads."""
        return self.width // self.head_width


@dataclass(frozen=True)
class ClipTextCfg:
    """Text tower of CLIP ViT-B/16."""

    context_length: int = 77  # tokens per prompt
    vocab_size: int = 49408  # OpenAI BPE vocabulary
    width: int = 512  # token width
    heads: int = 8  # attention heads
    layers: int = 12  # residual attention blocks
    output_dim: int = 512  # joint embedding width after ``text_projection``


def resize_clip_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """Resize a CLIP positional table ``[1 + g*g, D]`` to ``[1 + grid*grid, D]``.

    The CLS row is kept; the g x g grid is resized with bicubic interpolation
    (``align_corners=False``), as the reference code's ``resized_pos_embed`` does.
    """
    length, dim = pos_embed.shape
    src = round((length - 1) ** 0.5)
    if src == grid:
        return pos_embed.clone()
    cls_pos = pos_embed[:1]  # [1, D]
    table = pos_embed[1:].reshape(1, src, src, dim).permute(0, 3, 1, 2)  # [1, D, g, g]
    table = F.interpolate(table.float(), size=(grid, grid), mode="bicubic", align_corners=False)
    table = table.squeeze(0).reshape(dim, grid * grid).T.to(pos_embed.dtype)  # [grid*grid, D]
    return torch.cat([cls_pos, table], dim=0)


def _attention(block: ResidualAttentionBlock, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head self-attention of an open_clip block on ``x [B, L, D]`` (already ``ln_1``-normed)."""
    attn = block.attn
    bsz, length, dim = x.shape
    heads = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)  # [B, L, 3D]
    qkv = qkv.reshape(bsz, length, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)  # [3, B, h, L, d]
    q, k, v = qkv.unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [B, h, L, d]
    out = out.transpose(1, 2).reshape(bsz, length, dim)  # [B, L, D]
    return attn.out_proj(out)


def _block_forward(block: ResidualAttentionBlock, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One pre-norm residual attention block on ``x [B, L, D]``."""
    x = x + _attention(block, block.ln_1(x), attn_mask)
    return x + block.mlp(block.ln_2(x))


def _block_forward_dense(block: ResidualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """The last visual block in dense mode: no attention mixing between tokens.

    Each token goes through the value projection and the output projection; the residual added
    is the CLS token's *input* broadcast to every token (reference code, model_vpt.py
    ``forward_dense``: ``v.transpose(1, 0) + x[:1]``), then the usual MLP residual.
    """
    attn = block.attn
    dim = x.shape[-1]
    y = block.ln_1(x)
    v = F.linear(y, attn.in_proj_weight[2 * dim :], attn.in_proj_bias[2 * dim :])  # [B, L, D]
    v = attn.out_proj(v) + x[:, :1]  # [B, L, D]
    return v + block.mlp(block.ln_2(v))


class ClipVisual(nn.Module):
    """CLIP's visual tower with GSNet's dense output and intermediate feature maps."""

    def __init__(self, cfg: ClipVisionCfg) -> None:
        """Build the tower from its config (random init; weights come from the checkpoint)."""
        super().__init__()
        self.cfg = cfg
        width = cfg.width
        scale = width**-0.5
        self.patch_embed = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.cls_token = nn.Parameter(scale * torch.randn(width))
        # NOTE: the parameter keeps the checkpoint's 14x14 grid; forward uses ``pos_embed_resized``,
        # a buffer recomputed whenever weights are loaded (never inside the exported graph).
        self.pos_embed = nn.Parameter(scale * torch.randn(cfg.pretrain_grid**2 + 1, width))
        self.register_buffer("pos_embed_resized", resize_clip_pos_embed(self.pos_embed.detach(), cfg.grid), persistent=False)
        self.norm_pre = LayerNormFp32(width)
        self.blocks = nn.ModuleList(
            [
                ResidualAttentionBlock(width, cfg.heads, cfg.mlp_ratio, act_layer=QuickGELU, norm_layer=LayerNormFp32)
                for _ in range(cfg.layers)
            ]
        )
        self.norm = LayerNormFp32(width)
        self.proj = nn.Parameter(scale * torch.randn(width, cfg.output_dim))
        self.register_load_state_dict_post_hook(lambda module, _keys: module.refresh_pos_embed())

    @torch.no_grad()
    def refresh_pos_embed(self) -> None:
        """Recompute the 24x24 positional table from the loaded 14x14 one."""
        self.pos_embed_resized.copy_(resize_clip_pos_embed(self.pos_embed.detach(), self.cfg.grid))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Dense features and guidance maps of normalized images ``x [B, 3, H, W]``.

        Returns:
            ``E_G [B, output_dim, g, g]`` and the outputs of ``cfg.guidance_layers`` as
            ``[B, width, g, g]`` maps (CLS token dropped).

        """
        bsz = x.shape[0]
        grid = self.cfg.grid
        x = self.patch_embed(x)  # [B, D, g, g]
        x = x.flatten(2).transpose(1, 2)  # [B, g*g, D]
        cls = self.cls_token.to(x.dtype).reshape(1, 1, -1).expand(bsz, 1, -1)  # [B, 1, D]
        x = torch.cat([cls, x], dim=1) + self.pos_embed_resized.to(x.dtype)  # [B, 1+g*g, D]
        x = self.norm_pre(x)
        guidance: list[torch.Tensor] = []
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = _block_forward_dense(block, x) if i == last else _block_forward(block, x)
            if i in self.cfg.guidance_layers:
                guidance.append(x[:, 1:].transpose(1, 2).reshape(bsz, -1, grid, grid))  # [B, D, g, g]
        x = self.norm(x[:, 1:]) @ self.proj.to(x.dtype)  # [B, g*g, E]
        dense = x.transpose(1, 2).reshape(bsz, -1, grid, grid)  # [B, E, g, g]
        return dense, guidance


def build_text_tower(cfg: ClipTextCfg) -> TextTransformer:
    """open_clip's text transformer configured as OpenAI CLIP (QuickGELU, fp32 LayerNorm, argmax pooling)."""
    return TextTransformer(
        context_length=cfg.context_length,
        vocab_size=cfg.vocab_size,
        width=cfg.width,
        heads=cfg.heads,
        layers=cfg.layers,
        output_dim=cfg.output_dim,
        act_layer=QuickGELU,
        norm_layer=LayerNormFp32,
        pool_type="argmax",
        proj_type="linear",
    )


def encode_text(tower: TextTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """L2-normalized text embeddings ``[N, E]`` of BPE tokens ``[N, L]`` (int64).

    The end-of-text token has the largest id in each row, so ``argmax`` finds the pooled position.
    """
    n, length = tokens.shape
    x = tower.token_embedding(tokens) + tower.positional_embedding[:length]  # [N, L, D]
    mask = tower.attn_mask[:length, :length].to(x.dtype)  # [L, L] causal, -inf above the diagonal
    for block in tower.transformer.resblocks:
        x = _block_forward(block, x, mask)
    x = tower.ln_final(x)  # [N, L, D]
    eot = tokens.argmax(dim=-1)  # [N]
    pooled = x[torch.arange(n, device=x.device), eot] @ tower.text_projection  # [N, E]
    return pooled / pooled.norm(dim=-1, keepdim=True)
