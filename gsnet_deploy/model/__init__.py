"""GSNet in plain PyTorch: build, load the official checkpoint, or make demo weights."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch

from gsnet_deploy.model.checkpoint import load_checkpoint
from gsnet_deploy.model.gsnet import GSNet, GSNetCfg, cfg_for, paper_cfg, tiny_cfg

__all__ = [
    "DEMO_WARNING",
    "GSNet",
    "GSNetCfg",
    "build_gsnet",
    "cfg_for",
    "file_digest",
    "load_gsnet",
    "paper_cfg",
    "tiny_cfg",
]

DEMO_SEED = 0
DEMO_WARNING = (
    "no checkpoint given: running GSNet on deterministic demo weights (random, seed 0); "
    "the masks mean nothing. Pass --checkpoint with the official model_final.pth for real results."
)


def file_digest(path: str | Path, length: int = 16) -> str:
    """First ``length`` hex digits of the SHA-256 of a file (identifies the weights)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


def demo_digest(cfg: GSNetCfg, seed: int = DEMO_SEED) -> str:
    """Digest naming the demo weights of ``cfg`` and ``seed``."""
    text = f"demo:{seed}:{cfg!r}"
    return "demo-" + hashlib.sha256(text.encode()).hexdigest()[:11]


def build_gsnet(cfg: GSNetCfg | None = None, checkpoint: str | Path | None = None, seed: int = DEMO_SEED) -> GSNet:
    """The one constructor: GSNet in eval mode, with the official checkpoint's or demo weights.

    Args:
        cfg: architecture (default: the paper's, pooling [1, 1]).
        checkpoint: official detectron2 checkpoint; None gives seeded demo weights.
        seed: seed of the demo weights.

    Returns:
        The model with ``model.digest`` naming its weights.

    """
    cfg = cfg or paper_cfg()
    if checkpoint is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = GSNet(cfg)
        model.digest = demo_digest(cfg, seed)
    else:
        model = GSNet(cfg)
        load_checkpoint(model, checkpoint)
        model.digest = file_digest(checkpoint)
    return model.eval().requires_grad_(False)


def load_gsnet(path: str | Path, cfg: GSNetCfg | None = None) -> GSNet:
    """GSNet with the official checkpoint at ``path`` (raises ``CheckpointError`` on any mismatch)."""
    return build_gsnet(cfg, checkpoint=path)


def warn_demo() -> None:
    """Emit the demo-weights warning."""
    warnings.warn(DEMO_WARNING, stacklevel=2)
