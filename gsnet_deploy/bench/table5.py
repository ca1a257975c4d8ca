"""Parameters, trainable parameters and GFLOPs of GSNet against the paper's Table 5.

FLOPs follow fvcore's convention (one multiply-add counts one flop), for one image under the
sliding-window protocol (5 views of 384 px), text embeddings cached (the text encoder excluded).
Two counts are reported:

- *architecture* FLOPs: the class transformer's 256-class padding materialized as the paper's
  code runs it; this is the number comparable to Table 5;
- *executed* FLOPs: what our implementation runs (padding in closed form, dense CLIP block
  computing only the value path).

Trainable parameters follow the official fine-tuning rule: the q and v projections of all 24
CLIP attention blocks and every head module; the rest of CLIP and all of DINO frozen.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import torch

from gsnet_deploy.model.gsnet import GSNet, GSNetCfg, paper_cfg

# Table 5 of the paper: params (M), trainable (M), GFLOPs
PAPER_TABLE5: tuple[tuple[str, float, float, float], ...] = (
    ("CAT-SEG", 154, 25, 660),
    ("OVSeg", 531, 410, 8500),
    ("SAN", 437, 9, 64),
    ("SCAN", 890, 158, 8290),
    ("SED", 180, 90, 192),
    ("EBSeg", 262, 27, 312),
    ("GSNet", 243, 29, 2160),
)
# the official code counted the same way (design.md): params, trainable, GFLOPs at N=5 pooling [1,1]
OFFICIAL_COUNTS = {"params": 243_988_242, "trainable": 29_006_865, "gflops_n5": 2158.65}

HEAD_MODULES = (
    "qgff",
    "appearance_proj",
    "text_proj",
    "aggregator",
    "decoder",
    "clip_up1",
    "clip_up2",
    "dino_proj1",
    "dino_proj2",
    "dino_down",
)
STAGES = {
    "clip_visual": ("clip_visual",),
    "dino": ("dino",),
    "encoder_projections": ("clip_up1", "clip_up2", "dino_proj1", "dino_proj2", "dino_down"),
    "qgff": ("qgff",),
    "aggregator": ("aggregator", "appearance_proj", "text_proj"),
    "ripd": ("decoder",),
}


def count_params(model: GSNet) -> tuple[int, int]:
    """(all parameters, trainable under the official rule); the checkpoint's unused logit_scale is added back."""
    total = sum(p.numel() for p in model.parameters()) + 1  # + CLIP logit_scale, present in the official model
    trainable = 0
    for name, p in model.named_parameters():
        top = name.split(".")[0]
        if top in HEAD_MODULES:
            trainable += p.numel()
        elif top in ("clip_visual", "clip_text") and name.endswith("attn.in_proj_weight"):
            trainable += 2 * p.numel() // 3  # q and v rows of the fused q/k/v weight
    return total, trainable


def _sdpa_flops(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore handle for scaled_dot_product_attention: q @ k^T and attn @ v as two matmuls."""
    from fvcore.nn.jit_handles import get_shape

    q, k = get_shape(inputs[0]), get_shape(inputs[1])
    batch = 1
    for d in q[:-2]:
        batch *= d
    return 2 * batch * q[-2] * k[-2] * q[-1]


def count_flops(
    model: GSNet, num_classes: int, views: int = 5, architecture: bool = True, include_text: bool = False
) -> dict[str, float]:
    """GFLOPs per stage of ``forward_image`` for ``views`` views and ``num_classes`` classes."""
    from fvcore.nn import FlopCountAnalysis

    for layer in model.aggregator.layers:
        layer.class_attn.materialize_padding = architecture
    size = model.cfg.image_size
    images = torch.rand(views, 3, size, size) * 255
    text = torch.nn.functional.normalize(torch.randn(num_classes, model.cfg.embed_dim), dim=-1)
    try:
        with torch.no_grad():
            analysis = FlopCountAnalysis(model, (images, text))
            analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_flops)
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            by_module = analysis.by_module()
            result = {stage: sum(by_module.get(m, 0) for m in mods) / 1e9 for stage, mods in STAGES.items()}
            result["total"] = analysis.total() / 1e9
            if include_text:
                tokens = torch.zeros(num_classes, 77, dtype=torch.long)
                tokens[:, 0], tokens[:, 1], tokens[:, 2] = 49406, 320, 49407
                text_analysis = FlopCountAnalysis(_TextGraph(model), (tokens,))
                text_analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_flops)
                text_analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
                result["text_encoder"] = text_analysis.total() / 1e9
                result["total"] += result["text_encoder"]
    finally:
        for layer in model.aggregator.layers:
            layer.class_attn.materialize_padding = False
    return result


class _TextGraph(torch.nn.Module):
    """The text graph as a module (fvcore traces modules)."""

    def __init__(self, model: GSNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)


@dataclass
class Table5Report:
    """Our counts beside the paper's."""

    params: int
    trainable: int
    gflops: dict[str, dict[str, float]]  # setting -> stage -> GFLOPs
    official: dict[str, float]
    paper_rows: list[tuple[str, float, float, float]]

    def to_json(self) -> str:
        """The report as JSON."""
        return json.dumps(asdict(self), indent=2)

    def format(self) -> str:
        """Table 5 with our measured row, then FLOPs per stage and the head's share by N."""
        lines = ["Table 5 (paper) and our measured GSNet row", f"{'model':<18}{'params':>10}{'trainable':>11}{'GFLOPs':>10}"]
        for name, p, t, g in self.paper_rows:
            lines.append(f"{name + ' (paper)':<18}{p:>9.0f}M{t:>10.0f}M{g:>10,.0f}")
        arch = self.gflops["N=5 architecture"]["total"]
        lines.append(f"{'GSNet (ours)':<18}{self.params / 1e6:>9.1f}M{self.trainable / 1e6:>10.1f}M{arch:>10,.2f}")
        lines.append(
            f"ours vs the official code counted the same way: params {self.params:,} vs {self.official['params']:,.0f} "
            f"({100 * (self.params / self.official['params'] - 1):+.3f}%), trainable {self.trainable:,} vs "
            f"{self.official['trainable']:,.0f} ({100 * (self.trainable / self.official['trainable'] - 1):+.3f}%), "
            f"GFLOPs {arch:,.2f} vs {self.official['gflops_n5']:,.2f} ({100 * (arch / self.official['gflops_n5'] - 1):+.2f}%)"
        )
        stages = [*STAGES, "total"]
        lines.append("")
        lines.append("GFLOPs per stage (one image, 5 views, text embeddings cached)")
        lines.append(f"{'setting':<22}" + "".join(f"{s:>12}" for s in ["head share", *stages]))
        for setting, row in self.gflops.items():
            head = sum(row.get(s, 0.0) for s in ("qgff", "aggregator", "ripd"))
            share = f"{100 * head / row['total']:.1f}%"
            lines.append(f"{setting:<22}{share:>12}" + "".join(f"{row.get(s, 0.0):>12,.2f}" for s in stages))
        return "\n".join(lines)


def table5(cfg: GSNetCfg | None = None, classes: tuple[int, ...] = (5, 40), growth: tuple[int, ...] = ()) -> Table5Report:
    """Count params and FLOPs of ``cfg`` (default: the paper's model, pooling [1, 1])."""
    model = GSNet(cfg or paper_cfg()).eval()
    params, trainable = count_params(model)
    gflops: dict[str, dict[str, float]] = {}
    for n in classes:
        gflops[f"N={n} architecture"] = count_flops(model, n, architecture=True)
        gflops[f"N={n} executed"] = count_flops(model, n, architecture=False)
    for n in growth:
        if n not in classes:
            gflops[f"N={n} architecture"] = count_flops(model, n, architecture=True)
    return Table5Report(params, trainable, gflops, dict(OFFICIAL_COUNTS), [list(r) for r in PAPER_TABLE5])  # type: ignore[misc]
