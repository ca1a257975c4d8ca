"""The official GSNet checkpoint <-> our module layout. The only module that knows its key names.

The official checkpoint (github.com/yecy749/GSNet, ``configs/vitb_384.yaml``) is a detectron2
checkpoint: a dict whose ``model`` entry is the state dict, with prefixes
``sem_seg_head.predictor.clip_model.``, ``sem_seg_head.predictor.transformer.``, ``dino_model.``,
``upsample1.``, ``upsample2.``, ``dino_decod_proj1.``, ``dino_decod_proj2.``, ``dino_down_sample.``.

The conversion is an ordered table of anchored regular expressions (research name -> our name)
plus one named tensor step: CLIP's attention weights are stored split (``q_proj_weight``,
``k_proj_weight``, ``v_proj_weight``) and our open_clip blocks hold them fused (``in_proj_weight``).
Every source key is used or listed in ``DROPPED_KEYS`` with a reason; anything else is an error.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from gsnet_deploy.errors import CheckpointError

_CLIP = r"sem_seg_head\.predictor\.clip_model\."
_HEAD = r"sem_seg_head\.predictor\.transformer\."

# (source regex, target template); the first full match wins. Groups are substituted with \g<n>.
KEY_TABLE: tuple[tuple[str, str], ...] = (
    # DINO ViT-B/8: timm-compatible names already
    (r"dino_model\.(cls_token|pos_embed)", r"dino.\g<1>"),
    (r"dino_model\.patch_embed\.proj\.(weight|bias)", r"dino.patch_embed.proj.\g<1>"),
    (r"dino_model\.blocks\.(\d+)\.(.+)", r"dino.blocks.\g<1>.\g<2>"),
    (r"dino_model\.norm\.(weight|bias)", r"dino.norm.\g<1>"),
    # CLIP visual tower -> timm-style names
    (_CLIP + r"visual\.class_embedding", "clip_visual.cls_token"),
    (_CLIP + r"visual\.positional_embedding", "clip_visual.pos_embed"),
    (_CLIP + r"visual\.proj", "clip_visual.proj"),
    (_CLIP + r"visual\.conv1\.weight", "clip_visual.patch_embed.weight"),
    (_CLIP + r"visual\.ln_pre\.(weight|bias)", r"clip_visual.norm_pre.\g<1>"),
    (_CLIP + r"visual\.ln_post\.(weight|bias)", r"clip_visual.norm.\g<1>"),
    (_CLIP + r"visual\.transformer\.resblocks\.(\d+)\.(.+)", r"clip_visual.blocks.\g<1>.\g<2>"),
    # CLIP text tower -> open_clip TextTransformer names
    (_CLIP + r"(token_embedding\.weight|positional_embedding|text_projection)", r"clip_text.\g<1>"),
    (_CLIP + r"ln_final\.(weight|bias)", r"clip_text.ln_final.\g<1>"),
    (_CLIP + r"transformer\.resblocks\.(\d+)\.(.+)", r"clip_text.transformer.resblocks.\g<1>.\g<2>"),
    # aggregator
    (_HEAD + r"layers\.(\d+)\.swin_block\.block_1\.(.+)", r"aggregator.layers.\g<1>.swin.block1.\g<2>"),
    (_HEAD + r"layers\.(\d+)\.swin_block\.block_2\.(.+)", r"aggregator.layers.\g<1>.swin.block2.\g<2>"),
    (
        _HEAD + r"layers\.(\d+)\.swin_block\.guidance_norm\.(weight|bias)",
        r"aggregator.layers.\g<1>.swin.guidance_norm.\g<2>",
    ),
    (
        _HEAD + r"layers\.(\d+)\.attention\.(padding_tokens|padding_guidance)",
        r"aggregator.layers.\g<1>.class_attn.\g<2>",
    ),
    (
        _HEAD + r"layers\.(\d+)\.attention\.attention\.(q|k|v)\.(weight|bias)",
        r"aggregator.layers.\g<1>.class_attn.\g<2>.\g<3>",
    ),
    (_HEAD + r"layers\.(\d+)\.attention\.MLP\.0\.(weight|bias)", r"aggregator.layers.\g<1>.class_attn.mlp.fc1.\g<2>"),
    (_HEAD + r"layers\.(\d+)\.attention\.MLP\.2\.(weight|bias)", r"aggregator.layers.\g<1>.class_attn.mlp.fc2.\g<2>"),
    (
        _HEAD + r"layers\.(\d+)\.attention\.(norm1|norm2)\.(weight|bias)",
        r"aggregator.layers.\g<1>.class_attn.\g<2>.\g<3>",
    ),
    # QGFF
    (_HEAD + r"conv1\.(weight|bias)", r"qgff.clip_embed.\g<1>"),
    (_HEAD + r"conv2\.(weight|bias)", r"qgff.dino_embed.\g<1>"),
    (_HEAD + r"fusion_corr\.(weight|bias)", r"qgff.fusion.\g<1>"),
    # guidance projections of the head
    (_HEAD + r"guidance_projection\.0\.(weight|bias)", r"appearance_proj.\g<1>"),
    (_HEAD + r"text_guidance_projection\.0\.(weight|bias)", r"text_proj.\g<1>"),
    # RIPD decoder
    (_HEAD + r"CLIP_decoder_guidance_projection\.(\d)\.0\.(weight|bias)", r"decoder.clip_guidance.\g<1>.0.\g<2>"),
    (_HEAD + r"DINO_decoder_guidance_projection\.(\d)\.0\.(weight|bias)", r"decoder.dino_guidance.\g<1>.0.\g<2>"),
    (_HEAD + r"Fusiondecoder(1|2)\.up\.(weight|bias)", r"decoder.up\g<1>.\g<2>"),
    (_HEAD + r"Fusiondecoder(1|2)\.conv\.double_conv\.(\d)\.(weight|bias)", r"decoder.conv\g<1>.\g<2>.\g<3>"),
    (_HEAD + r"head\.(weight|bias)", r"decoder.head.\g<1>"),
    # encoder guidance and DINO features (top level of the detectron2 model)
    (r"upsample1\.(weight|bias)", r"clip_up1.\g<1>"),
    (r"upsample2\.(weight|bias)", r"clip_up2.\g<1>"),
    (r"dino_decod_proj1\.(weight|bias)", r"dino_proj1.\g<1>"),
    (r"dino_decod_proj2\.(weight|bias)", r"dino_proj2.\g<1>"),
    (r"dino_down_sample\.(weight|bias)", r"dino_down.\g<1>"),
)
_COMPILED = tuple((re.compile(src), dst) for src, dst in KEY_TABLE)

# keys of the official checkpoint that GSNet's inference never reads
DROPPED_KEYS: dict[str, str] = {
    "sem_seg_head.predictor.clip_model.logit_scale": "CLIP's contrastive temperature; GSNet never uses it",
}

# split attention weights of the reference CLIP blocks, fused into open_clip's in_proj_weight
_SPLIT_QKV = re.compile(r"(.+)\.attn\.(q|k|v)_proj_weight")


def _rename(key: str) -> str | None:
    """Our name for an official key, or None when no table entry matches."""
    for pattern, target in _COMPILED:
        if pattern.fullmatch(key):
            return pattern.sub(target, key)
    return None


def _fuse_qkv(state: dict[str, torch.Tensor], pending: dict[str, dict[str, torch.Tensor]]) -> list[str]:
    """Concatenate split q/k/v weights into ``in_proj_weight`` (the order of nn.MultiheadAttention).

    Returns the names of blocks whose q, k or v part is missing.
    """
    incomplete: list[str] = []
    for prefix, parts in pending.items():
        if set(parts) != {"q", "k", "v"}:
            incomplete.append(f"{prefix}.attn.{{q,k,v}}_proj_weight (have {sorted(parts)})")
            continue
        state[f"{prefix}.attn.in_proj_weight"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return incomplete


def _summarize(label: str, keys: list[str], limit: int = 5) -> str:
    """'label: a, b, c (and 12 more)'."""
    shown = ", ".join(keys[:limit])
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{label} {shown}{more}"


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Convert an official GSNet state dict to ``model``'s layout, checking names and shapes.

    Raises:
        CheckpointError: unmatched, missing or mis-shaped keys (the first few of each, and counts).

    """
    out: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    unexpected: list[str] = []
    for key, value in state_dict.items():
        if key in DROPPED_KEYS:
            continue
        name = _rename(key)
        if name is None:
            unexpected.append(key)
            continue
        split = _SPLIT_QKV.fullmatch(name)
        if split is not None:
            pending.setdefault(split.group(1), {})[split.group(2)] = value
            continue
        out[name] = value
    incomplete = _fuse_qkv(out, pending)

    expected = model.state_dict()
    missing = [k for k in expected if k not in out]
    unexpected += [k for k in out if k not in expected]
    misshaped = [
        f"{k} {tuple(out[k].shape)} vs {tuple(expected[k].shape)}"
        for k in out
        if k in expected and tuple(out[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing or incomplete:
        problems.append(_summarize(f"{len(missing) + len(incomplete)} missing:", incomplete + missing))
    if unexpected:
        problems.append(_summarize(f"{len(unexpected)} unexpected:", unexpected))
    if misshaped:
        problems.append(_summarize(f"{len(misshaped)} mis-shaped:", misshaped))
    if problems:
        raise CheckpointError(
            "checkpoint does not match the GSNet ViT-B/16 model: "
            + "; ".join(problems)
            + "; pass the official GSNet checkpoint (configs/vitb_384.yaml)"
        )
    return out


def _groups(pattern: str) -> list[tuple[int, int]]:
    """Spans ``(start, end)`` of the top-level capture groups of ``pattern`` (parentheses included)."""
    spans, depth, start = [], 0, 0
    for i, ch in enumerate(pattern):
        if ch == "(" and pattern[i - 1 : i] != "\\":
            if depth == 0:
                start = i
            depth += 1
        elif ch == ")" and pattern[i - 1 : i] != "\\":
            depth -= 1
            if depth == 0:
                spans.append((start, i + 1))
    return spans


def _invert_rule(src: str, dst: str) -> tuple[re.Pattern[str], str]:
    """Turn (official regex, our template) into (our-name regex, official template with {gN} fields)."""
    spans = _groups(src)
    pieces = re.split(r"\\g<(\d+)>", dst)  # literal, group index, literal, ...
    ours = "".join(
        re.escape(p) if i % 2 == 0 else f"(?P<g{p}>{src[spans[int(p) - 1][0] + 1 : spans[int(p) - 1][1] - 1]})"
        for i, p in enumerate(pieces)
    )
    official, last = "", 0
    for idx, (a, b) in enumerate(spans, start=1):
        official += src[last:a].replace("\\.", ".") + "{g" + str(idx) + "}"
        last = b
    official += src[last:].replace("\\.", ".")
    return re.compile(ours), official


_INVERSE = tuple(_invert_rule(src, dst) for src, dst in KEY_TABLE)


def _official_name(name: str) -> str:
    """Official key of one of our keys."""
    for pattern, template in _INVERSE:
        match = pattern.fullmatch(name)
        if match is not None:
            return template.format(**match.groupdict())
    raise KeyError(f"no official name for {name}")


def to_official_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s weights in the official checkpoint's key layout (inverse of ``checkpoint_filter_fn``).

    Writes the split q/k/v CLIP weights and a ``logit_scale``, so the result looks like the
    official state dict (used for demo checkpoints and tests).
    """
    out: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        official = _official_name(name)
        if official.endswith(".attn.in_proj_weight"):
            base = official[: -len("in_proj_weight")]
            for part, tensor in zip("qkv", value.chunk(3, dim=0)):
                out[f"{base}{part}_proj_weight"] = tensor.clone()
        else:
            out[official] = value.clone()
    out["sem_seg_head.predictor.clip_model.logit_scale"] = torch.tensor(4.6052)  # ln(100), CLIP's value
    return out


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a detectron2 checkpoint safely (``weights_only=True``) and return its ``model`` state dict.

    Raises:
        CheckpointError: missing file, not a torch file, truncated, contains non-tensor objects that
            a weights-only load refuses, or has no ``model`` dict of tensors.

    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass the path of the official GSNet model_final.pth")
    with open(path, "rb") as fh:
        head = fh.read(4)
    # torch.save writes a zip archive; the legacy format is a raw pickle (protocol 2+ starts with 0x80)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise CheckpointError(f"cannot read checkpoint {path}: the file is not a PyTorch checkpoint (empty or another format)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = [line.strip() for line in str(exc).splitlines() if "Unsupported global" in line or "GLOBAL" in line]
        what = refused[0][:160] if refused else "objects a weights-only load refuses"
        raise CheckpointError(
            f"checkpoint {path} holds objects other than tensors and is refused for safety ({what}); "
            "pass a plain state-dict checkpoint"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(
            f"cannot read checkpoint {path} ({type(exc).__name__}); the file is not a PyTorch checkpoint or is truncated"
        ) from exc
    state = obj.get("model") if isinstance(obj, dict) and "model" in obj else obj
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"checkpoint {path} has no state dict of tensors (expected a dict with a 'model' entry, as detectron2 writes)"
        )
    return state


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load the official checkpoint at ``path`` into ``model`` (strict; every tensor checked)."""
    state = checkpoint_filter_fn(read_state_dict(path), model)
    model.load_state_dict(state, strict=True)
