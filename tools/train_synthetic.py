"""Train the tiny GSNet config on synthetic textured scenes; write a small checkpoint for the accuracy tests.

Why: on demo (random) weights every class scores almost the same, so an accuracy check cannot tell
a good FP16 / INT8 model from a broken one. This model, trained briefly on the scenes of
``gsnet_deploy.eval.synthetic`` (six textures named "stripes", "checkers", "dots", "plain",
"noise", "rings"), segments them with high mIoU, so a precision's damage shows as lost mIoU and
argmax agreement.

Training: every step draws a vocabulary (a random subset of 3..6 class names in random order) and
scenes whose regions use only those classes, so the text side decides which channel is which.
Loss: cross entropy over the vocabulary of the 96x96 logits against the labels at the logits'
grid. Trained: everything but the DINO tower (frozen, as in the official fine-tuning rule) and the
text tower's token embedding. Start: the seed-0 demo weights of ``tiny_cfg()``.

The checkpoint is the official detectron2 layout (``model_final.pth`` style, loaded by
``gsnet_deploy.model.build_gsnet(tiny_cfg(), checkpoint=...)``) stored in float16, with the
token-embedding rows of tokens that the six prompts never use set to zero: the model knows only
its six words, and git stores the zero rows compressed.

Run (about 15 minutes on one CPU core; deterministic for a given torch build and thread count):

    .venv/bin/python tools/train_synthetic.py --out tests/data/synthetic_tiny.pth
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gsnet_deploy.contracts.atomic import write_bytes_atomic
from gsnet_deploy.eval.synthetic import CLASS_NAMES, HELD_OUT_SEED, TRAIN_SEED, make_scene, synthetic_scenes
from gsnet_deploy.export.check import label_miou, labels_at
from gsnet_deploy.model import GSNet, build_gsnet, tiny_cfg
from gsnet_deploy.model.checkpoint import to_official_state_dict
from gsnet_deploy.runtime.tokenizer import BpeTokenizer
from gsnet_deploy.runtime.vocab import Vocabulary


def class_tokens(model: GSNet, names: tuple[str, ...], tokenizer: BpeTokenizer) -> torch.Tensor:
    """BPE tokens ``[N, 77]`` of the prompts of ``names``."""
    return torch.from_numpy(tokenizer(Vocabulary(names).prompts(model.cfg.template)))


def trainable_parameters(model: GSNet) -> list[torch.nn.Parameter]:
    """Everything but DINO and the token embedding; sets ``requires_grad`` accordingly."""
    model.requires_grad_(True)
    model.dino.requires_grad_(False)
    model.clip_text.token_embedding.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def train_batch(rng: np.random.Generator, batch: int) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """A random vocabulary and ``batch`` scenes over it: ``(names, images [B,3,384,384], labels [B,384,384])``."""
    count = int(rng.integers(3, len(CLASS_NAMES) + 1))
    names = tuple(CLASS_NAMES[i] for i in rng.permutation(len(CLASS_NAMES))[:count])
    scenes = [make_scene(rng, names, int(rng.integers(3, 7))) for _ in range(batch)]
    return names, np.stack([s[0] for s in scenes]), np.stack([s[1] for s in scenes])


@torch.no_grad()
def evaluate(model: GSNet, tokenizer: BpeTokenizer, num_scenes: int) -> float:
    """fp32 mIoU (percent) on held-out scenes over all six classes, at the logits' 96x96 grid."""
    model.eval()
    scenes = synthetic_scenes(num_scenes, seed=HELD_OUT_SEED)
    embeds = model.encode_text(class_tokens(model, CLASS_NAMES, tokenizer))  # [6, 512]
    preds = [
        model.forward_image(torch.from_numpy(scenes.images[i : i + 4]), embeds).argmax(1).numpy() for i in range(0, num_scenes, 4)
    ]
    return label_miou(np.concatenate(preds), labels_at(scenes.labels, model.cfg.logit_size), len(CLASS_NAMES))


def checkpoint_bytes(model: GSNet, tokenizer: BpeTokenizer) -> bytes:
    """The official-layout checkpoint in float16, unused token-embedding rows zeroed."""
    used = torch.from_numpy(np.unique(tokenizer(Vocabulary(CLASS_NAMES).prompts(model.cfg.template))))
    state = to_official_state_dict(model)
    key = "sem_seg_head.predictor.clip_model.token_embedding.weight"
    table = torch.zeros_like(state[key])
    table[used] = state[key][used]
    state[key] = table
    buf = io.BytesIO()
    torch.save({"model": {k: v.half().contiguous() for k, v in state.items()}}, buf)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    """Train, evaluate, write the checkpoint; print the held-out mIoU."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tests/data/synthetic_tiny.pth"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-scenes", type=int, default=24)
    parser.add_argument("--init", type=Path, help="continue from this checkpoint instead of the seed-0 demo weights")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(TRAIN_SEED)
    tokenizer = BpeTokenizer()
    model = build_gsnet(tiny_cfg(), checkpoint=args.init)
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)),
    )
    rng = np.random.default_rng(TRAIN_SEED)
    side = model.cfg.logit_size
    start = time.time()
    model.train()
    for step in range(args.steps):
        names, images, labels = train_batch(rng, args.batch)
        embeds = model.encode_text(class_tokens(model, names, tokenizer))  # [N, 512]
        logits = model.forward_image(torch.from_numpy(images), embeds)  # [B, N, 96, 96]
        target = torch.from_numpy(labels_at(labels, side).astype(np.int64))  # [B, 96, 96]
        loss = F.cross_entropy(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if step % 10 == 0 or step == args.steps - 1:
            acc = float((logits.argmax(1) == target).float().mean())
            print(f"step {step:4d}  loss {loss.item():.4f}  pixel acc {acc:.3f}  {time.time() - start:6.0f} s", file=sys.stderr)
    model.eval().requires_grad_(False)
    miou = evaluate(model, tokenizer, args.eval_scenes)
    print(f"held-out fp32 mIoU {miou:.2f} on {args.eval_scenes} scenes (seed {HELD_OUT_SEED})", file=sys.stderr)
    write_bytes_atomic(args.out, checkpoint_bytes(model, tokenizer))
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
