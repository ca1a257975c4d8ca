"""GSNet assembled: CLIP and DINO encoders, QGFF, aggregator and RIPD decoder.

Paper: "Towards Open-Vocabulary Remote Sensing Image Semantic Segmentation" (AAAI 2025);
reference code github.com/yecy749/GSNet (``gs_net/GSNet.py``). The model exposes exactly the two
graphs we export: ``encode_text(tokens) -> text_embeds`` (once per vocabulary) and
``forward_image(images, text_embeds) -> logits`` (every view). The image graph is split into a
class-independent encoder (``encode_views``: both backbones, guidance and appearance projections)
and a class-dependent head (``decode_views``: QGFF, aggregator, RIPD), so an encoded view can be
re-queried with another vocabulary for the price of the head.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from gsnet_deploy.contracts.io_names import PAPER_FEATURES
from gsnet_deploy.contracts.model_size import ModelSize
from gsnet_deploy.model.aggregator import Aggregator, AggregatorCfg
from gsnet_deploy.model.clip import ClipTextCfg, ClipVisionCfg, ClipVisual, build_text_tower, encode_text
from gsnet_deploy.model.dino import DinoCfg, DinoViT
from gsnet_deploy.model.qgff import Qgff, QgffCfg
from gsnet_deploy.model.ripd import Ripd, RipdCfg

# NOTE: both streams are normalized with CLIP's statistics (reference GSNet.py normalizes once with
# CLIP_PIXEL_MEAN/STD and feeds the result to CLIP and DINO), not the ImageNet ones of the config.
CLIP_MEAN = (122.7709383, 116.7460125, 104.09373615)
CLIP_STD = (68.5005327, 66.6321579, 70.3231630)

# the encoder's outputs (``encode_views``), in order: also the output names of paper_encoder.onnx
FEATURE_NAMES = PAPER_FEATURES
CLIP_FEATURES, DINO_FEATURES, APPEARANCE, CLIP_GUIDANCE_1, CLIP_GUIDANCE_2, DINO_GUIDANCE_1, DINO_GUIDANCE_2 = PAPER_FEATURES


@dataclass(frozen=True)
class GSNetCfg:
    """The whole model; defaults are the official checkpoint (ViT-B/16 CLIP, ViT-B/8 DINO)."""

    clip_vision: ClipVisionCfg = field(default_factory=ClipVisionCfg)
    clip_text: ClipTextCfg = field(default_factory=ClipTextCfg)
    dino: DinoCfg = field(default_factory=DinoCfg)
    qgff: QgffCfg = field(default_factory=QgffCfg)
    aggregator: AggregatorCfg = field(default_factory=AggregatorCfg)
    ripd: RipdCfg = field(default_factory=RipdCfg)
    clip_guidance_dims: tuple[int, int] = (256, 128)  # channels of upsample1 / upsample2 of CLIP blocks 3 / 7
    dino_guidance_dims: tuple[int, int] = (256, 128)  # channels of the DINO projections of blocks 3 / 7
    template: str = "A photo of a {} in the scene"  # the official single prompt template

    @property
    def embed_dim(self) -> int:
        """Width of the joint CLIP space (text embeddings, E_G, E_S)."""
        return self.clip_vision.output_dim

    @property
    def image_size(self) -> int:
        """Side of one view."""
        return self.clip_vision.image_size

    @property
    def feature_size(self) -> int:
        """Side of the cost maps (CLIP token grid)."""
        return self.clip_vision.grid

    @property
    def logit_size(self) -> int:
        """Side of the logits: the cost maps after two 2x up-blocks."""
        return 4 * self.feature_size


def paper_cfg(pooling: tuple[int, int] = (1, 1)) -> GSNetCfg:
    """The paper's model; ``pooling`` (2, 2) selects the class transformer's training setting."""
    cfg = GSNetCfg()
    return replace(cfg, aggregator=replace(cfg.aggregator, pooling=pooling))


def tiny_cfg(pooling: tuple[int, int] = (1, 1)) -> GSNetCfg:
    """A few-million-parameter model with the paper's shapes at every interface, for fast tests.

    Views stay 384 px, features 24x24, logits 96x96, text embeddings 512-d and the class padding
    256, so every protocol, export and runtime path is exercised as in the real model.
    """
    hidden = 32
    return GSNetCfg(
        clip_vision=ClipVisionCfg(width=64, layers=4, head_width=32, guidance_layers=(1, 2)),
        clip_text=ClipTextCfg(width=64, heads=2, layers=2),
        dino=DinoCfg(embed_dim=64, depth=4, num_heads=2, feature_layers=(1, 2, 3)),
        qgff=QgffCfg(hidden_dim=hidden),
        aggregator=AggregatorCfg(hidden_dim=hidden, num_heads=2, appearance_dim=hidden, text_dim=hidden, pooling=pooling),
        ripd=RipdCfg(in_dim=hidden, decoder_dims=(16, 16), guidance_dims=(32, 16), clip_proj_dims=(8, 4), dino_proj_dims=(8, 4)),
        clip_guidance_dims=(32, 16),
        dino_guidance_dims=(32, 16),
    )


def cfg_for(size: ModelSize, pooling: int = 1) -> GSNetCfg:
    """The architecture of ``size`` with the class transformer's ``pooling`` (1: inference, 2: training).

    The one place that maps ``--model-size`` and ``--pooling`` to a config.
    """
    pool = (pooling, pooling)
    return tiny_cfg(pool) if size is ModelSize.TINY else paper_cfg(pool)


class GSNet(nn.Module):
    """GSNet with its text graph and image graph as two methods."""

    def __init__(self, cfg: GSNetCfg) -> None:
        """Build every module from ``cfg`` (random init; see ``build_gsnet`` for weights)."""
        super().__init__()
        self.cfg = cfg
        self.digest = "untrained"  # names the weights; set by build_gsnet (checkpoint hash or demo seed)
        cv, dn = cfg.clip_vision, cfg.dino
        self.clip_visual = ClipVisual(cv)
        self.clip_text = build_text_tower(cfg.clip_text)
        self.dino = DinoViT(dn)
        # encoder guidance and DINO features (reference: upsample1/2, dino_decod_proj1/2, dino_down_sample)
        self.clip_up1 = nn.ConvTranspose2d(cv.width, cfg.clip_guidance_dims[0], 2, stride=2)  # 24 -> 48
        self.clip_up2 = nn.ConvTranspose2d(cv.width, cfg.clip_guidance_dims[1], 4, stride=4)  # 24 -> 96
        self.dino_proj1 = nn.Conv2d(dn.embed_dim, cfg.dino_guidance_dims[0], 1)  # 48 -> 48
        self.dino_proj2 = nn.ConvTranspose2d(dn.embed_dim, cfg.dino_guidance_dims[1], 2, stride=2)  # 48 -> 96
        self.dino_down = nn.Conv2d(dn.embed_dim, cfg.embed_dim, 2, stride=2)  # 48 -> 24: E_S
        # head
        self.qgff = Qgff(cfg.qgff)
        self.appearance_proj = nn.Conv2d(cfg.embed_dim, cfg.aggregator.appearance_dim, 3, padding=1)
        self.text_proj = nn.Linear(cfg.embed_dim, cfg.aggregator.text_dim)
        self.aggregator = Aggregator(cfg.aggregator)
        self.decoder = Ripd(cfg.ripd)
        self.register_buffer("pixel_mean", torch.tensor(CLIP_MEAN).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(CLIP_STD).reshape(1, 3, 1, 1), persistent=False)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Text graph: BPE tokens ``[N, 77]`` int64 -> L2-normalized embeddings ``[N, 512]``."""
        return encode_text(self.clip_text, tokens)

    def encode_views(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Encoder: raw RGB views ``[B, 3, 384, 384]`` (0..255) -> every class-independent tensor the head needs.

        Returns:
            Tensors keyed by ``FEATURE_NAMES`` (in that order): E_G and E_S ``[B, 512, 24, 24]``, the
            appearance guidance ``[B, G, 24, 24]`` (before the aggregator's LayerNorms) and the
            projected CLIP and DINO guidance ``[B, 32, 48, 48]``, ``[B, 16, 96, 96]`` (paper sizes).
        """
        # normalize in fp32, then run in the weights' dtype (fp16 on the fast GPU path)
        dtype = self.clip_visual.patch_embed.weight.dtype
        x = ((images.float() - self.pixel_mean.float()) / self.pixel_std.float()).to(dtype)
        e_clip, (clip_g1, clip_g2) = self.clip_visual(x)  # [B, 512, 24, 24], 2 x [B, 768, 24, 24]
        dino_g1, dino_g2, dino_last = self.dino.forward_intermediates(x)  # 3 x [B, 768, 48, 48]
        e_dino = self.dino_down(dino_last)  # [B, 512, 24, 24]
        clip_guidance = [self.clip_up1(clip_g1), self.clip_up2(clip_g2)]  # [B, 256, 48, 48], [B, 128, 96, 96]
        dino_guidance = [self.dino_proj1(dino_g1), self.dino_proj2(dino_g2)]  # same shapes
        clip_proj, dino_proj = self.decoder.project_guidance(clip_guidance, dino_guidance)  # [B, 32, 48, 48], [B, 16, 96, 96]
        appearance = F.relu(self.appearance_proj(e_clip))  # [B, G, 24, 24]
        tensors = (e_clip, e_dino, appearance, clip_proj[0], clip_proj[1], dino_proj[0], dino_proj[1])
        return dict(zip(FEATURE_NAMES, tensors))

    def decode_views(self, features: Mapping[str, torch.Tensor], text_embeds: torch.Tensor) -> torch.Tensor:
        """Head: features of ``encode_views`` and ``[N, 512]`` -> logits ``[B, N, 96, 96]``."""
        e_clip = features[CLIP_FEATURES]
        n = text_embeds.shape[0]
        text = text_embeds.to(e_clip.dtype)
        cost = self.qgff(e_clip, features[DINO_FEATURES], text)  # [B*N, C, 24, 24]
        # NOTE: the reference re-normalizes the (already unit) embeddings before the projection
        text_guidance = F.relu(self.text_proj(text / text.norm(dim=-1, keepdim=True)))  # [N, G]
        cost = self.aggregator(cost, features[APPEARANCE], text_guidance)  # [B*N, C, 24, 24]
        clip_proj = [features[CLIP_GUIDANCE_1], features[CLIP_GUIDANCE_2]]
        dino_proj = [features[DINO_GUIDANCE_1], features[DINO_GUIDANCE_2]]
        return self.decoder.decode(cost, clip_proj, dino_proj, n)  # [B, N, 96, 96]

    def forward_image(self, images: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Image graph: raw RGB views ``[B, 3, 384, 384]`` (0..255) and ``[N, 512]`` -> logits ``[B, N, 96, 96]``."""
        return self.decode_views(self.encode_views(images), text_embeds)

    def forward(self, images: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Same as ``forward_image``."""
        return self.forward_image(images, text_embeds)
