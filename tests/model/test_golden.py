"""Our GSNet against numbers recorded from the OFFICIAL code (github yecy749/GSNet).

``tests/data/golden_gsnet.npz`` was written by ``tools/golden/make_fixture.py``, which ran the
official modules on CPU with the deterministic weights of ``tools/golden/official_weights.py``
(official checkpoint layout), a synthetic 200x300 image and a vocabulary with a synonym, under
the paper's sliding-window protocol, for class-transformer pooling [1,1] and [2,2]. Here the same
weights go through OUR checkpoint loader into OUR model, the same image through OUR protocol,
and every recorded stage must match within 1e-5 of its own scale (absolute below 1, relative above:
the aggregator's outputs reach 13, where float32 rounding alone is 1e-6): text tokens and embeddings, CLIP blocks 3/7 and
the dense last block after ``proj``, DINO blocks 3/7/11 after the norm, QGFF, each aggregator
layer, logits and merged probabilities. A wrong eps, tap, shift, mapping, interpolation mode or
protocol step moves at least one stage far beyond that.

Full-size model on the CPU: about a minute (two 5-view forwards), marked ``slow``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from gsnet_deploy.model import GSNet, paper_cfg
from gsnet_deploy.model.checkpoint import checkpoint_filter_fn
from gsnet_deploy.runtime.protocol import merge_paper_logits, paper_views
from gsnet_deploy.runtime.tokenizer import BpeTokenizer
from gsnet_deploy.runtime.vocab import Vocabulary

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "data" / "golden_gsnet.npz"
ATOL = 1e-5
# Mutation runs only (tools/golden/run_mutations.py): a file of encoder features to write (first run)
# or to reuse, so that a bug planted in the head is checked without re-running the backbones.
ENCODER_CACHE = os.environ.get("GSNET_GOLDEN_ENCODER_CACHE")
ENCODER_STAGES = {"views", "clip_block3", "clip_block7", "clip_dense", "dino_block3", "dino_block7", "dino_block11"}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not FIXTURE.is_file(), reason="tests/data/golden_gsnet.npz not generated yet: see tools/golden/README.md"),
]


def official_weights() -> dict[str, torch.Tensor]:
    """The fixture's weights, from the committed generator (not from our model code)."""
    spec = importlib.util.spec_from_file_location("official_weights", ROOT / "tools" / "golden" / "official_weights.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.official_state_dict()


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as data:
        return {k: data[k] for k in data.files}


class Recorder:
    """Forward hooks that keep the stages of our model the fixture records."""

    def __init__(self, model: GSNet) -> None:
        self.rec: dict[str, torch.Tensor] = {}
        self.handles = [
            model.clip_visual.register_forward_pre_hook(self._input("views")),  # CLIP-normalized views
            model.clip_visual.register_forward_hook(self._output("clip")),  # (E_G, [block 3, block 7])
            model.dino_proj1.register_forward_pre_hook(self._input("dino_block3")),
            model.dino_proj2.register_forward_pre_hook(self._input("dino_block7")),
            model.dino_down.register_forward_pre_hook(self._input("dino_block11")),
            model.qgff.register_forward_hook(self._output("qgff")),
            model.aggregator.layers[0].register_forward_hook(self._output("agg_layer0")),
            model.aggregator.layers[1].register_forward_hook(self._output("agg_layer1")),
        ]

    def _input(self, name: str):
        return lambda module, args: self.rec.__setitem__(name, args[0])

    def _output(self, name: str):
        return lambda module, args, out: self.rec.__setitem__(name, out)

    def stages(self, batch: int, classes: int) -> dict[str, np.ndarray]:
        """What was recorded, as float32 numpy; per-class maps ``[B*N, ...]`` as ``[B, N, ...]``."""
        for h in self.handles:
            h.remove()
        out = dict(self.rec)
        if "clip" in out:
            out["clip_dense"], (out["clip_block3"], out["clip_block7"]) = out.pop("clip")
        for k in ("qgff", "agg_layer0", "agg_layer1"):
            out[k] = out[k].reshape(batch, classes, *out[k].shape[1:])
        return {k: v.float().numpy() for k, v in out.items()}


@pytest.fixture(scope="module")
def ours(golden) -> dict[str, np.ndarray]:
    """Our stages for pooling 1 and 2, sliced as the fixture stores them.

    The encoder runs once (it does not depend on pooling); the head of the pooling-2 model decodes
    the same features.
    """
    state = official_weights()
    views = paper_views(golden["image"])
    vocab = Vocabulary(tuple(str(v) for v in golden["vocab"]))
    tokens = BpeTokenizer()(vocab.prompts(paper_cfg().template))
    v = golden["slice_views"]
    ch768, ch512, ch128 = golden["slice_ch768"], golden["slice_ch512"], golden["slice_ch128"]
    result: dict[str, np.ndarray] = {"tokens": tokens}
    features = None
    cached = ENCODER_CACHE is not None and Path(ENCODER_CACHE).is_file()
    if cached:
        features = torch.load(ENCODER_CACHE, weights_only=True)
    previous = None
    with torch.no_grad():
        for pool in (1, 2):
            model = GSNet(paper_cfg((pool, pool))).eval()
            if previous is None:
                model.load_state_dict(checkpoint_filter_fn(state, model), strict=True)
                del state  # keeps the peak near two copies of the weights
            else:  # pooling has no weights: the pooling-2 model takes the pooling-1 model's
                model.load_state_dict(previous.state_dict(), strict=True)
                del previous
            text = model.encode_text(torch.from_numpy(tokens).long())
            recorder = Recorder(model)
            if features is None:
                features = model.encode_views(torch.from_numpy(views.views))
                if ENCODER_CACHE is not None:
                    torch.save(features, ENCODER_CACHE)
            logits = model.decode_views(features, text)
            full = recorder.stages(*logits.shape[:2])
            probs = merge_paper_logits(logits.numpy(), views.height, views.width)
            result[f"logits_pool{pool}"] = logits.numpy()[v]
            result[f"probs_pool{pool}"] = probs[:, ::2, ::2]
            result[f"agg_layer0_pool{pool}"] = full["agg_layer0"][v][:, :, ch128]
            result[f"agg_layer1_pool{pool}"] = full["agg_layer1"][v][:, :, ch128]
            if pool == 1 and not cached:
                result.update(
                    views=full["views"][:, :, ::8, ::8],
                    clip_block3=full["clip_block3"][v][:, ch768],
                    clip_block7=full["clip_block7"][v][:, ch768],
                    clip_dense=full["clip_dense"][v][:, ch512],
                    dino_block3=full["dino_block3"][v][:, ch768],
                    dino_block7=full["dino_block7"][v][:, ch768],
                    dino_block11=full["dino_block11"][v][:, ch768],
                )
            if pool == 1:
                result["text_embeds"] = text.numpy()
                result["qgff"] = full["qgff"][v][:, :, ch128]
                for i, layer in enumerate(model.aggregator.layers):  # the Swin masks as loaded from the checkpoint
                    result[f"attn_mask{i}"] = layer.swin.block2.attn_mask.numpy()
            previous = model
    return result


STAGES = [
    "views",
    "text_embeds",
    "clip_block3",
    "clip_block7",
    "clip_dense",
    "dino_block3",
    "dino_block7",
    "dino_block11",
    "qgff",
    "agg_layer0_pool1",
    "agg_layer1_pool1",
    "logits_pool1",
    "probs_pool1",
    "agg_layer0_pool2",
    "agg_layer1_pool2",
    "logits_pool2",
    "probs_pool2",
]


def test_tokens_match_the_official_tokenizer(golden, ours) -> None:
    """Template, lower-casing, synonym rule (first part of 'low vegetation, grass') and BPE."""
    np.testing.assert_array_equal(ours["tokens"], golden["tokens"])


@pytest.mark.parametrize("stage", STAGES)
def test_stage_matches_official(golden, ours, stage: str) -> None:
    if stage not in ours and ENCODER_CACHE is not None and stage in ENCODER_STAGES:
        pytest.skip("encoder features reused from GSNET_GOLDEN_ENCODER_CACHE")
    expected, actual = golden[stage], ours[stage]
    assert actual.shape == expected.shape, f"{stage}: shape {actual.shape} vs official {expected.shape}"
    diff = float(np.abs(actual.astype(np.float64) - expected.astype(np.float64)).max())
    scale = float(np.abs(expected).max())
    assert diff <= ATOL * max(1.0, scale), f"{stage}: max abs diff {diff:.3g} vs official (values up to {scale:.3g})"


def test_loaded_swin_masks_equal_the_official_modules_masks(golden, ours) -> None:
    """The attn_mask buffers loaded from the checkpoint vs the mask the official module computes itself."""
    for i in range(2):
        np.testing.assert_array_equal(ours[f"attn_mask{i}"], golden["swin_attn_mask"].astype(np.float32))


def test_fixture_is_not_degenerate(golden) -> None:
    """The recorded stages vary (a constant fixture would pass a broken model)."""
    for stage in STAGES:
        values = golden[stage]
        assert values.std() > 1e-3, f"{stage} is nearly constant in the fixture"
    for pool in (1, 2):  # classes are told apart: argmax differs between pixels
        assert len(np.unique(golden[f"probs_pool{pool}"].argmax(0))) > 1
    assert not np.allclose(golden["logits_pool1"], golden["logits_pool2"], atol=1e-3)
