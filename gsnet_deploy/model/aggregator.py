"""Cost aggregator of GSNet (CAT-Seg style): spatial Swin blocks, then a class transformer.

Reference: CAT-Seg (Cho et al., CVPR 2024) as modified in github.com/yecy749/GSNet
(``modeling/transformer/FusionAgg.py``, MIT). Each layer runs, per (view, class) cost map:

- a pair of Swin blocks (window 12, the second shifted by 6) whose queries and keys see the
  LayerNorm-ed appearance guidance concatenated to the tokens (values do not);
- a class transformer over the class axis at every position: linear attention (elu + 1 feature
  map) with the text guidance concatenated to queries and keys. The reference pads the class axis
  to ``pad_len`` (256) with a learned token and a learned guidance vector; padded tokens take part
  in the attention (they change the numbers) and are cropped afterwards. We add their keys and
  values in closed form instead of materializing them: same numbers, 256/N times less work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn


@dataclass(frozen=True)
class AggregatorCfg:
    """Sizes of the aggregator."""

    hidden_dim: int = 128  # channels of the cost embedding
    num_layers: int = 2  # Swin pair + class transformer layers
    num_heads: int = 4  # heads of both attentions
    window_size: int = 12  # Swin window side
    appearance_dim: int = 128  # projected appearance guidance channels
    text_dim: int = 128  # projected text guidance channels
    pooling: tuple[int, int] = (1, 1)  # class transformer pooling: (1, 1) inference (paper), (2, 2) training
    pad_len: int = 256  # class axis padded to this many tokens
    feature_size: int = 24  # side of the cost maps
    mlp_ratio: float = 4.0  # MLP hidden / hidden_dim
    linear_attn_eps: float = 1e-6  # epsilon of the linear attention's normalizer


def shifted_window_mask(size: int, window: int, shift: int) -> torch.Tensor:
    """Additive mask ``[num_windows, window*window, window*window]`` of a shifted Swin block.

    Tokens that come from different regions of the cyclically shifted map get -100 (Swin's value).
    """
    region = torch.zeros(size, size)
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for hs in bounds:
        for ws in bounds:
            region[hs, ws] = label
            label += 1
    n = size // window
    windows = region.reshape(n, window, n, window).permute(0, 2, 1, 3).reshape(n * n, window * window)  # [nW, w*w]
    diff = windows[:, None, :] - windows[:, :, None]  # [nW, w*w, w*w]
    return torch.where(diff != 0, torch.tensor(-100.0), torch.tensor(0.0))


class WindowAttention(nn.Module):
    """Window self-attention whose queries and keys also see appearance guidance."""

    def __init__(self, dim: int, guidance_dim: int, num_heads: int) -> None:
        """Build the projections (q and k read ``dim + guidance_dim`` channels, v reads ``dim``)."""
        super().__init__()
        self.num_heads = num_heads
        self.dim = dim
        self.q = nn.Linear(dim + guidance_dim, dim)
        self.k = nn.Linear(dim + guidance_dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attend within windows.

        Args:
            x: ``[S, nW, L, dim + guidance_dim]`` tokens of ``nW`` windows of ``L`` tokens each.
            mask: additive ``[nW, L, L]`` mask or None.

        Returns:
            ``[S, nW, L, dim]``.

        """
        s, nw, length, _ = x.shape
        heads = self.num_heads
        q = self.q(x).reshape(s, nw, length, heads, -1).transpose(2, 3)  # [S, nW, h, L, d]
        k = self.k(x).reshape(s, nw, length, heads, -1).transpose(2, 3)  # [S, nW, h, L, d]
        v = self.v(x[..., : self.dim]).reshape(s, nw, length, heads, -1).transpose(2, 3)  # [S, nW, h, L, d]
        attn_mask = mask[:, None].to(q.dtype) if mask is not None else None  # [nW, 1, L, L]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [S, nW, h, L, d]
        out = out.transpose(2, 3).reshape(s, nw, length, self.dim)  # [S, nW, L, dim]
        return self.proj(out)


class SwinBlock(nn.Module):
    """A Swin block with guidance concatenated to its attention inputs."""

    def __init__(self, dim: int, guidance_dim: int, num_heads: int, size: int, window: int, shift: int, mlp_ratio: float) -> None:
        """Build one block; ``shift > 0`` makes it a shifted-window block with its mask buffer."""
        super().__init__()
        if size <= window:
            window, shift = size, 0  # a map no larger than the window is one window, unshifted
        self.size, self.window, self.shift = size, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, guidance_dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        if shift > 0:
            # NOTE: persistent, as in the reference checkpoint (which stores it); loaded, not trusted blindly:
            # tests compare it with ``shifted_window_mask``.
            self.register_buffer("attn_mask", shifted_window_mask(size, window, shift))
        else:
            self.attn_mask = None

    def _partition(self, x: torch.Tensor) -> torch.Tensor:
        """``[S, H, W, C] -> [S, nW, w*w, C]``."""
        s, h, w, c = x.shape
        win = self.window
        x = x.reshape(s, h // win, win, w // win, win, c).permute(0, 1, 3, 2, 4, 5)  # [S, nh, nw, w, w, C]
        return x.reshape(s, (h // win) * (w // win), win * win, c)  # [S, nW, w*w, C]

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        """``[S, nW, w*w, C] -> [S, H, W, C]``."""
        s, _, _, c = x.shape
        win, n = self.window, self.size // self.window
        x = x.reshape(s, n, n, win, win, c).permute(0, 1, 3, 2, 4, 5)  # [S, n, w, n, w, C]
        return x.reshape(s, self.size, self.size, c)

    def forward(self, x: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """One block on ``x [S, H, W, C]`` with guidance ``[S, H, W, G]``."""
        shortcut = x
        y = torch.cat([self.norm1(x), guidance], dim=-1)  # [S, H, W, C+G]
        if self.shift > 0:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = self._merge(self.attn(self._partition(y), self.attn_mask))  # [S, H, W, C]
        if self.shift > 0:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = shortcut + y
        return x + self.mlp(self.norm2(x))


class SwinPair(nn.Module):
    """Regular then shifted Swin block, sharing one normalized appearance guidance."""

    def __init__(self, cfg: AggregatorCfg) -> None:
        """Build the two blocks and the guidance LayerNorm."""
        super().__init__()
        args = (cfg.hidden_dim, cfg.appearance_dim, cfg.num_heads, cfg.feature_size, cfg.window_size)
        self.block1 = SwinBlock(*args, shift=0, mlp_ratio=cfg.mlp_ratio)
        self.block2 = SwinBlock(*args, shift=cfg.window_size // 2, mlp_ratio=cfg.mlp_ratio)
        self.guidance_norm = nn.LayerNorm(cfg.appearance_dim)

    def forward(self, x: torch.Tensor, guidance: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Spatial aggregation of every cost map.

        Args:
            x: ``[B*N, H, W, C]`` cost embeddings.
            guidance: appearance guidance ``[B, H, W, G]`` (shared by the N classes of a view).
            num_classes: N.

        Returns:
            ``[B*N, H, W, C]``.

        """
        g = self.guidance_norm(guidance)  # LayerNorm per token: same as normalizing each class's copy
        bsz, h, w, gd = g.shape
        g = g[:, None].expand(bsz, num_classes, h, w, gd).reshape(-1, h, w, gd)  # [B*N, H, W, G]
        x = self.block1(x, g)
        return self.block2(x, g)


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eps: float,
    pad_k: torch.Tensor,
    pad_v: torch.Tensor,
    num_pad: torch.Tensor,
) -> torch.Tensor:
    """Linear attention (elu + 1 feature map, "Transformers are RNNs") over real and padding tokens.

    The class axis holds T = N + P tokens: N real ones and P identical padding tokens. Padding
    tokens are the same at every position, so their keys and values enter the sums in closed form
    (P times one outer product) instead of being materialized; their own outputs are cropped by
    the reference anyway. The result equals the reference's padded attention up to rounding.

    Args:
        q: queries of the real tokens ``[S, h, N, d]``, before the feature map.
        k: keys of the real tokens ``[S, h, N, d]``, before the feature map.
        v: values of the real tokens ``[S, h, N, d]``.
        eps: added to the normalizer.
        pad_k: the padding token's key ``[h, d]``, before the feature map.
        pad_v: the padding token's value ``[h, d]``.
        num_pad: P as a 0-d float tensor (computed from shapes, so exported graphs keep N dynamic).

    Returns:
        ``[S, h, N, d]``. Values are divided by T before and multiplied after, as the reference
        does to keep fp16 from overflowing.

    """
    q = F.elu(q) + 1.0
    k = F.elu(k) + 1.0
    pad_k = F.elu(pad_k) + 1.0  # [h, d]
    length = num_pad + k.shape[2]  # T
    v = v / length
    pad_v = pad_v / length
    kv = torch.matmul(k.transpose(-2, -1), v) + num_pad * (pad_k[:, :, None] * pad_v[:, None, :])  # [S, h, d, d]
    k_sum = k.sum(dim=2) + num_pad * pad_k  # [S, h, d]
    z = 1.0 / (torch.matmul(q, k_sum[..., None]) + eps)  # [S, h, N, 1]
    return torch.matmul(q, kv) * z * length  # [S, h, N, d]


class ClassAttention(nn.Module):
    """Transformer layer across the class axis with text guidance and class padding."""

    def __init__(self, cfg: AggregatorCfg) -> None:
        """Build the attention projections, the MLP, the norms and the padding tokens."""
        super().__init__()
        dim, gdim = cfg.hidden_dim, cfg.text_dim
        self.num_heads = cfg.num_heads
        self.pad_len = cfg.pad_len
        self.pooling = cfg.pooling
        self.eps = cfg.linear_attn_eps
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, dim))
        self.padding_guidance = nn.Parameter(torch.zeros(1, 1, gdim))
        self.q = nn.Linear(dim + gdim, dim)
        self.k = nn.Linear(dim + gdim, dim)
        self.v = nn.Linear(dim, dim)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), act_layer=nn.ReLU)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        # NOTE: True runs the reference's materialized padding (256 tokens through every op); only FLOP
        # counting uses it, to count the architecture as the paper does. Same outputs up to rounding.
        self.materialize_padding = False

    def _padding_kv(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value ``[h, d]`` of the learned padding token (with its learned guidance)."""
        tok = self.norm1(self.padding_tokens.to(dtype)).reshape(1, -1)  # [1, C]
        tg = torch.cat([tok, self.padding_guidance.to(dtype).reshape(1, -1)], dim=-1)  # [1, C+G]
        heads = self.num_heads
        return self.k(tg).reshape(heads, -1), self.v(tok).reshape(heads, -1)

    def forward(self, x: torch.Tensor, text_guidance: torch.Tensor, batch: int) -> torch.Tensor:
        """Class-axis attention at every (possibly pooled) position.

        Args:
            x: ``[B*N, C, H, W]`` cost embeddings.
            text_guidance: ``[N, G]`` projected text embeddings.
            batch: B.

        Returns:
            ``[B*N, C, H, W]``.

        """
        bn, c, h, w = x.shape
        n = text_guidance.shape[0]
        pooled = F.avg_pool2d(x, self.pooling) if self.pooling != (1, 1) else x  # [B*N, C, h', w']
        hp, wp = pooled.shape[-2:]
        seq = pooled.reshape(batch, n, c, hp * wp).permute(0, 3, 1, 2).reshape(batch * hp * wp, n, c)  # [S, N, C]
        s = seq.shape[0]
        guid = text_guidance[None].expand(s, n, text_guidance.shape[-1])  # [S, N, G]
        y = self.norm1(seq)
        yg = torch.cat([y, guid], dim=-1)  # [S, N, C+G]
        heads = self.num_heads
        q = self.q(yg).reshape(s, n, heads, -1).transpose(1, 2)  # [S, h, N, d]
        k = self.k(yg).reshape(s, n, heads, -1).transpose(1, 2)  # [S, h, N, d]
        v = self.v(y).reshape(s, n, heads, -1).transpose(1, 2)  # [S, h, N, d]
        if self.materialize_padding:
            return x + self._forward_padded(seq, guid, batch, (bn, c, h, w), (hp, wp))
        pad_k, pad_v = self._padding_kv(seq.dtype)
        # P = max(pad_len - N, 0) as a tensor op on the shape, so that an exported graph keeps N dynamic
        num_pad = torch.clamp(torch.ones((), dtype=seq.dtype, device=seq.device) * (self.pad_len - n), min=0.0)
        attn = linear_attention(q, k, v, self.eps, pad_k, pad_v, num_pad)  # [S, h, N, d]
        seq = seq + attn.transpose(1, 2).reshape(s, n, c)  # [S, N, C]
        seq = seq + self.mlp(self.norm2(seq))
        out = seq.reshape(batch, hp, wp, n, c).permute(0, 3, 4, 1, 2).reshape(bn, c, hp, wp)  # [B*N, C, h', w']
        if (hp, wp) != (h, w):
            out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=True)
        return x + out

    def _forward_padded(
        self, seq: torch.Tensor, guid: torch.Tensor, batch: int, shape: tuple[int, int, int, int], pooled: tuple[int, int]
    ) -> torch.Tensor:
        """The reference's computation with the padding materialized (for FLOP counting)."""
        bn, c, h, w = shape
        hp, wp = pooled
        s, n, _ = seq.shape
        pad = max(self.pad_len - n, 0)
        seq = torch.cat([seq, self.padding_tokens.expand(s, pad, c)], dim=1)  # [S, T, C]
        guid = torch.cat([guid, self.padding_guidance.expand(s, pad, guid.shape[-1])], dim=1)  # [S, T, G]
        t = seq.shape[1]
        y = self.norm1(seq)
        yg = torch.cat([y, guid], dim=-1)
        heads = self.num_heads
        q = F.elu(self.q(yg).reshape(s, t, heads, -1).transpose(1, 2)) + 1.0  # [S, h, T, d]
        k = F.elu(self.k(yg).reshape(s, t, heads, -1).transpose(1, 2)) + 1.0
        v = self.v(y).reshape(s, t, heads, -1).transpose(1, 2) / t
        kv = torch.matmul(k.transpose(-2, -1), v)  # [S, h, d, d]
        z = 1.0 / (torch.matmul(q, k.sum(dim=2)[..., None]) + self.eps)  # [S, h, T, 1]
        seq = seq + (torch.matmul(q, kv) * z * t).transpose(1, 2).reshape(s, t, c)
        seq = seq + self.mlp(self.norm2(seq))
        out = seq[:, :n].reshape(batch, hp, wp, n, c).permute(0, 3, 4, 1, 2).reshape(bn, c, hp, wp)  # [B*N, C, h', w']
        if (hp, wp) != (h, w):
            out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=True)
        return out


class AggregatorLayer(nn.Module):
    """Spatial (Swin pair) then class (linear attention) aggregation."""

    def __init__(self, cfg: AggregatorCfg) -> None:
        """Build one layer."""
        super().__init__()
        self.swin = SwinPair(cfg)
        self.class_attn = ClassAttention(cfg)

    def forward(self, x: torch.Tensor, appearance: torch.Tensor, text_guidance: torch.Tensor) -> torch.Tensor:
        """``x [B*N, C, H, W]``, appearance ``[B, G, H, W]``, text guidance ``[N, G]`` -> ``[B*N, C, H, W]``."""
        bsz = appearance.shape[0]
        n = text_guidance.shape[0]
        y = self.swin(x.permute(0, 2, 3, 1), appearance.permute(0, 2, 3, 1), n)  # [B*N, H, W, C]
        return self.class_attn(y.permute(0, 3, 1, 2), text_guidance, bsz)


class Aggregator(nn.Module):
    """The stack of aggregator layers."""

    def __init__(self, cfg: AggregatorCfg) -> None:
        """Build ``cfg.num_layers`` layers."""
        super().__init__()
        self.layers = nn.ModuleList([AggregatorLayer(cfg) for _ in range(cfg.num_layers)])

    def forward(self, x: torch.Tensor, appearance: torch.Tensor, text_guidance: torch.Tensor) -> torch.Tensor:
        """Aggregate ``x [B*N, C, H, W]``."""
        for layer in self.layers:
            x = layer(x, appearance, text_guidance)
        return x
