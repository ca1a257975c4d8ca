"""Loading the official checkpoint layout: every key used, clear errors for anything else."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from gsnet_deploy.errors import CheckpointError
from gsnet_deploy.model import build_gsnet, load_gsnet, paper_cfg, tiny_cfg
from gsnet_deploy.model.checkpoint import checkpoint_filter_fn, read_state_dict, to_official_state_dict
from gsnet_deploy.model.gsnet import GSNet

KEYS = Path(__file__).parents[1] / "data" / "official_checkpoint_keys.json"


def _official_random_state() -> dict[str, torch.Tensor]:
    """Random tensors with every key and shape of the official checkpoint (from its key list)."""
    keys = json.loads(KEYS.read_text())["keys"]
    g = torch.Generator().manual_seed(0)
    return {k["key"]: torch.randn(k["shape"], generator=g) for k in keys}


def test_official_key_list_loads_into_the_paper_model() -> None:
    state = _official_random_state()
    model = GSNet(paper_cfg())
    converted = checkpoint_filter_fn(state, model)
    model.load_state_dict(converted, strict=True)
    # fused q/k/v: rows [0:768] are q, [768:1536] k, [1536:] v, as nn.MultiheadAttention expects
    prefix = "sem_seg_head.predictor.clip_model.visual.transformer.resblocks.5.attn."
    fused = model.clip_visual.blocks[5].attn.in_proj_weight
    for i, part in enumerate("qkv"):
        torch.testing.assert_close(fused[768 * i : 768 * (i + 1)], state[prefix + f"{part}_proj_weight"])
    torch.testing.assert_close(model.dino.pos_embed, state["dino_model.pos_embed"])
    torch.testing.assert_close(model.decoder.head.weight, state["sem_seg_head.predictor.transformer.head.weight"])
    # positional tables resized on load (not left at the init values)
    assert model.dino.pos_embed_resized.shape == (1, 48 * 48 + 1, 768)
    torch.testing.assert_close(model.dino.pos_embed_resized[:, 0], state["dino_model.pos_embed"][:, 0])


def _tiny_checkpoint(tmp_path: Path, seed: int = 3) -> tuple[Path, GSNet]:
    source = build_gsnet(tiny_cfg(), seed=seed)
    path = tmp_path / "model_final.pth"
    torch.save({"model": to_official_state_dict(source), "iteration": 29999}, path)
    return path, source


def test_tiny_checkpoint_file_round_trip(tmp_path: Path) -> None:
    path, source = _tiny_checkpoint(tmp_path)
    loaded = load_gsnet(path, tiny_cfg())
    assert loaded.digest != source.digest and len(loaded.digest) == 16
    tokens = torch.zeros(2, 77, dtype=torch.long)
    tokens[:, 0], tokens[0, 1], tokens[1, 1], tokens[:, 2] = 49406, 320, 321, 49407
    torch.testing.assert_close(loaded.encode_text(tokens), source.encode_text(tokens))
    images = torch.rand(1, 3, 384, 384) * 255
    text = source.encode_text(tokens)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_image(images, text), source.forward_image(images, text))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda s: s.pop("dino_model.norm.weight"), "1 missing: dino.norm.weight"),
        (lambda s: s.__setitem__("extra.weight", torch.zeros(1)), "1 unexpected: extra.weight"),
        (lambda s: s.__setitem__("upsample1.bias", torch.zeros(7)), r"mis-shaped: clip_up1.bias \(7,\)"),
        (
            lambda s: s.pop("sem_seg_head.predictor.clip_model.transformer.resblocks.0.attn.k_proj_weight"),
            r"clip_text.transformer.resblocks.0.attn.\{q,k,v\}_proj_weight",
        ),
    ],
)
def test_mismatched_checkpoint_names_the_keys(edit, match: str) -> None:
    model = GSNet(tiny_cfg())
    state = to_official_state_dict(model)
    edit(state)
    with pytest.raises(CheckpointError, match=match):
        checkpoint_filter_fn(state, model)


def test_paper_checkpoint_into_tiny_model_is_mis_shaped() -> None:
    with pytest.raises(CheckpointError, match=r"mis-shaped.*and \d+ more"):
        checkpoint_filter_fn(_official_random_state(), GSNet(tiny_cfg()))


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize(
    ("writer", "match"),
    [
        (lambda p: p.write_text("not a checkpoint\n"), "not a PyTorch checkpoint"),
        (lambda p: p.write_bytes(b""), "not a PyTorch checkpoint"),
        (lambda p: torch.save({"model": {"a": _Evil()}}, p), "refused for safety"),
        (lambda p: p.write_bytes(pickle.dumps({"model": 1})), "not a PyTorch checkpoint|refused|no state dict"),
        (lambda p: torch.save({"model": {"a": 3}}, p), "no state dict of tensors"),
        (lambda p: torch.save([1, 2], p), "no state dict of tensors"),
    ],
)
def test_bad_files_give_one_line_errors(tmp_path: Path, writer, match: str) -> None:
    path = tmp_path / "bad.pth"
    writer(path)
    with pytest.raises(CheckpointError, match=match) as info:
        read_state_dict(path)
    assert "\n" not in str(info.value)


def test_truncated_checkpoint(tmp_path: Path) -> None:
    path, _ = _tiny_checkpoint(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        read_state_dict(path)


def test_missing_checkpoint_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_gsnet(tmp_path / "nope.pth")


def test_demo_weights_are_deterministic() -> None:
    a, b = build_gsnet(tiny_cfg()), build_gsnet(tiny_cfg())
    assert a.digest == b.digest and a.digest.startswith("demo-")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert build_gsnet(tiny_cfg(), seed=1).digest != a.digest
    assert not np.array_equal(build_gsnet(tiny_cfg(), seed=1).qgff.fusion.weight.numpy(), a.qgff.fusion.weight.numpy())
