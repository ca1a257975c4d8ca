"""Every official checkpoint tensor lands in the module the official code uses it in; constants pinned.

The expectations here are written from the official code's module structure (github
yecy749/GSNet at aca7224, recorded in ``tests/data/official_checkpoint_keys.json`` with each
tensor's owning ``module_class``), NOT from ``model/checkpoint.py``'s key table: a checkpoint whose
every tensor holds a value unique to its key goes through our loader, and each value must come
out in the module that plays the official module's role. A swapped pair in the loader's table
(QGFF conv1/conv2, upsample1/2, block_1/block_2, ...) puts a value in the wrong place and fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from open_clip.transformer import LayerNormFp32, TextTransformer
from torch import nn

from gsnet_deploy.model import GSNet, paper_cfg
from gsnet_deploy.model.aggregator import ClassAttention, SwinBlock, shifted_window_mask
from gsnet_deploy.model.checkpoint import checkpoint_filter_fn
from gsnet_deploy.model.clip import ClipVisual
from gsnet_deploy.model.dino import DinoViT
from gsnet_deploy.runtime.vocab import DEFAULT_TEMPLATE, Vocabulary, prompt_name

DATA = Path(__file__).resolve().parents[1] / "data"
KEYS = json.loads((DATA / "official_checkpoint_keys.json").read_text())["keys"]
GOLDEN = DATA / "golden_gsnet.npz"

_P = "sem_seg_head.predictor."
# Official module -> our module playing its role, one line per module of the official forward pass
# (GSNet.py, GSNetPredictor.py, RIPD.py, FusionAgg.py, model_vpt.py, vision_transformer.py). Longest
# prefix wins; the rest of the key is kept, except the split CLIP q/k/v (rows of in_proj_weight).
ROLES: dict[str, str] = {
    "dino_model.": "dino.",  # RSIB: vit_base(patch 8); timm names kept
    _P + "clip_model.visual.conv1.": "clip_visual.patch_embed.",  # CLIP stem
    _P + "clip_model.visual.class_embedding": "clip_visual.cls_token",
    _P + "clip_model.visual.positional_embedding": "clip_visual.pos_embed",  # 14x14, resized to 24x24
    _P + "clip_model.visual.ln_pre.": "clip_visual.norm_pre.",
    _P + "clip_model.visual.ln_post.": "clip_visual.norm.",  # after the dense last block
    _P + "clip_model.visual.proj": "clip_visual.proj",  # x @ proj: 768 -> 512, E_G
    _P + "clip_model.visual.transformer.resblocks.": "clip_visual.blocks.",
    _P + "clip_model.token_embedding.": "clip_text.token_embedding.",
    _P + "clip_model.positional_embedding": "clip_text.positional_embedding",
    _P + "clip_model.text_projection": "clip_text.text_projection",
    _P + "clip_model.ln_final.": "clip_text.ln_final.",
    _P + "clip_model.transformer.resblocks.": "clip_text.transformer.resblocks.",
    _P + "transformer.conv1.": "qgff.clip_embed.",  # corr_fusion_embed_seperate: conv1(CLIP cost)
    _P + "transformer.conv2.": "qgff.dino_embed.",  # conv2(DINO cost)
    _P + "transformer.fusion_corr.": "qgff.fusion.",  # conv on cat(sigmoid(conv1), sigmoid(conv2))
    _P + "transformer.guidance_projection.0.": "appearance_proj.",  # conv3x3 on E_G (res3)
    _P + "transformer.text_guidance_projection.0.": "text_proj.",
    _P + "transformer.CLIP_decoder_guidance_projection.": "decoder.clip_guidance.",  # on res4 (48px), res5 (96px)
    _P + "transformer.DINO_decoder_guidance_projection.": "decoder.dino_guidance.",
    _P + "transformer.Fusiondecoder1.up.": "decoder.up1.",
    _P + "transformer.Fusiondecoder1.conv.double_conv.": "decoder.conv1.",
    _P + "transformer.Fusiondecoder2.up.": "decoder.up2.",
    _P + "transformer.Fusiondecoder2.conv.double_conv.": "decoder.conv2.",
    _P + "transformer.head.": "decoder.head.",
    "upsample1.": "clip_up1.",  # ConvT k2 on CLIP block 3 (layer_indexes[0])
    "upsample2.": "clip_up2.",  # ConvT k4 on CLIP block 7
    "dino_decod_proj1.": "dino_proj1.",  # conv1x1 on DINO block 3 (dino_feat[3])
    "dino_decod_proj2.": "dino_proj2.",  # ConvT k2 on DINO block 7
    "dino_down_sample.": "dino_down.",  # conv k2 s2 on DINO block 11: E_S
}
for _i in range(2):  # aggregator layers: Swin pair (block_1 unshifted, block_2 shifted), class transformer
    _L = f"{_P}transformer.layers.{_i}."
    ROLES.update(
        {
            _L + "swin_block.block_1.": f"aggregator.layers.{_i}.swin.block1.",
            _L + "swin_block.block_2.": f"aggregator.layers.{_i}.swin.block2.",
            _L + "swin_block.guidance_norm.": f"aggregator.layers.{_i}.swin.guidance_norm.",
            _L + "attention.attention.": f"aggregator.layers.{_i}.class_attn.",  # AttentionLayer q, k, v
            _L + "attention.MLP.0.": f"aggregator.layers.{_i}.class_attn.mlp.fc1.",
            _L + "attention.MLP.2.": f"aggregator.layers.{_i}.class_attn.mlp.fc2.",
            _L + "attention.norm1.": f"aggregator.layers.{_i}.class_attn.norm1.",
            _L + "attention.norm2.": f"aggregator.layers.{_i}.class_attn.norm2.",
            _L + "attention.padding_": f"aggregator.layers.{_i}.class_attn.padding_",
        }
    )
UNUSED = {_P + "clip_model.logit_scale"}  # CLIP's contrastive temperature: no role in GSNet's forward

# the official module class of each tensor -> the class our module must have in that role
CLASSES: dict[str, type] = {
    "torch.nn.modules.conv.Conv2d": nn.Conv2d,
    "torch.nn.modules.conv.ConvTranspose2d": nn.ConvTranspose2d,
    "torch.nn.modules.linear.Linear": nn.Linear,
    "torch.nn.modules.linear.NonDynamicallyQuantizableLinear": nn.Linear,
    "torch.nn.modules.normalization.LayerNorm": nn.LayerNorm,
    "torch.nn.modules.normalization.GroupNorm": nn.GroupNorm,
    "torch.nn.modules.sparse.Embedding": nn.Embedding,
    "gs_net.third_party.model_vpt.LayerNorm": LayerNormFp32,  # CLIP's LayerNorm computes in fp32
    "gs_net.third_party.model_vpt.Attention": nn.MultiheadAttention,
    "gs_net.third_party.model_vpt.CLIP": TextTransformer,
    "gs_net.third_party.model_vpt.VisualTransformer": ClipVisual,
    "gs_net.vision_transformer.VisionTransformer": DinoViT,
    "gs_net.modeling.transformer.FusionAgg.ClassTransformerLayer": ClassAttention,
    "gs_net.modeling.transformer.FusionAgg.SwinTransformerBlock": SwinBlock,
}


def our_role(official: str) -> str:
    """Our name for an official key from ROLES (longest matching prefix)."""
    prefix = max((p for p in ROLES if official.startswith(p)), key=len, default=None)
    assert prefix is not None, f"no role written for official key {official}"
    return ROLES[prefix] + official[len(prefix) :]


@pytest.fixture(scope="module")
def meta_model() -> GSNet:
    with torch.device("meta"):
        return GSNet(paper_cfg())


def test_every_official_tensor_lands_in_its_role(meta_model: GSNet) -> None:
    # value i + 1 everywhere in tensor i (expanded scalars: no memory for 244M parameters)
    state = {e["key"]: torch.tensor(float(i + 1)).expand(e["shape"]) for i, e in enumerate(KEYS)}
    converted = checkpoint_filter_fn(state, meta_model)
    index = {e["key"]: i + 1 for i, e in enumerate(KEYS)}
    expected: dict[str, list[tuple[slice, float]]] = {}
    for entry in KEYS:
        key = entry["key"]
        if key in UNUSED:
            continue
        name = our_role(key)
        for j, part in enumerate("qkv"):  # split CLIP attention: rows j*D:(j+1)*D of in_proj_weight
            if name.endswith(f".attn.{part}_proj_weight"):
                dim = entry["shape"][0]
                name = name[: -len(f"{part}_proj_weight")] + "in_proj_weight"
                expected.setdefault(name, []).append((slice(j * dim, (j + 1) * dim), index[key]))
                break
        else:
            expected.setdefault(name, []).append((slice(None), index[key]))
        module = meta_model.get_submodule(name.rsplit(".", 1)[0])
        want = CLASSES[entry["module_class"]]
        assert isinstance(module, want), f"{key}: official {entry['module_class']}, ours {type(module).__name__} at {name}"
    assert set(converted) == set(expected), (
        f"loader keys differ from the official roles: extra {sorted(set(converted) - set(expected))[:5]}, "
        f"missing {sorted(set(expected) - set(converted))[:5]}"
    )
    wrong = []
    for name, parts in expected.items():
        for rows, value in parts:
            got = converted[name][rows]
            if not (float(got.min()) == value == float(got.max())):
                source = [e["key"] for e in KEYS if index[e["key"]] in {float(got.min()), float(got.max())}]
                wrong.append(f"{name}[{rows.start}:{rows.stop}] holds {source} instead of {KEYS[int(value) - 1]['key']}")
    assert not wrong, f"{len(wrong)} tensors in the wrong module, e.g. " + "; ".join(wrong[:4])


def test_roles_cover_the_official_layout_one_to_one() -> None:
    names = [our_role(e["key"]) for e in KEYS if e["key"] not in UNUSED]
    assert len(names) == len(set(names)), "two official tensors given the same role"


# ---------------------------------------------------------------- Swin attention masks
def _golden_weights_module():
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "tools" / "golden" / "official_weights.py"
    spec = importlib.util.spec_from_file_location("official_weights", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _official_mask() -> torch.Tensor:
    """The official module's own mask from the golden fixture; else the mask written from its definition."""
    if GOLDEN.is_file():
        with np.load(GOLDEN) as data:
            return torch.from_numpy(data["swin_attn_mask"].astype(np.float32))
    return torch.from_numpy(_golden_weights_module().swin_shift_mask())


def test_swin_mask_from_its_definition_equals_ours() -> None:
    """An independent numpy construction (tools/golden/official_weights.py) vs ``shifted_window_mask``."""
    np.testing.assert_array_equal(shifted_window_mask(24, 12, 6).numpy(), _golden_weights_module().swin_shift_mask())


@pytest.mark.skipif(not GOLDEN.is_file(), reason="tests/data/golden_gsnet.npz not generated yet: see tools/golden/README.md")
def test_computed_swin_mask_equals_the_official_modules_mask() -> None:
    """The official SwinTransformerBlock's own mask (recorded before loading weights) vs ours."""
    with np.load(GOLDEN) as data:
        official = data["swin_attn_mask"].astype(np.float32)  # [4, 144, 144], 0 / -100
    assert official.shape == (4, 144, 144) and set(np.unique(official)) == {0.0, -100.0}
    np.testing.assert_array_equal(shifted_window_mask(24, 12, 6).numpy(), official)


def test_model_masks_are_the_shifted_window_masks(tiny_gsnet) -> None:
    official = _official_mask()
    for layer in tiny_gsnet.aggregator.layers:  # same 24x24 maps, window 12 and shift as the paper model
        assert layer.swin.block1.attn_mask is None and layer.swin.block1.shift == 0
        assert layer.swin.block2.shift == 6 and layer.swin.block2.window == 12
        torch.testing.assert_close(layer.swin.block2.attn_mask, official, rtol=0, atol=0)


# ---------------------------------------------------------------- constants read from the official code
def test_eps_values(meta_model: GSNet) -> None:
    # DINO: vit_base(norm_layer=partial(nn.LayerNorm, eps=1e-6)); CLIP and the head: torch's default 1e-5
    for name, module in meta_model.named_modules():
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            want = 1e-6 if name.startswith("dino.") else 1e-5
            assert module.eps == want, f"{name}: eps {module.eps}, official {want}"
        if name.startswith("clip_") and isinstance(module, nn.LayerNorm):
            assert isinstance(module, LayerNormFp32), f"{name}: CLIP LayerNorms compute in float32"
    for layer in meta_model.aggregator.layers:
        assert layer.class_attn.eps == 1e-6  # LinearAttention(eps=1e-6)


def test_group_norm_groups(meta_model: GSNet) -> None:
    # DoubleConv: nn.GroupNorm(mid_channels // 16, mid_channels)
    norms = [m for m in meta_model.decoder.modules() if isinstance(m, nn.GroupNorm)]
    assert [(m.num_groups, m.num_channels) for m in norms] == [(4, 64), (4, 64), (2, 32), (2, 32)]


def test_taps_and_sizes() -> None:
    cfg = paper_cfg()
    assert cfg.clip_vision.guidance_layers == (3, 7)  # GSNet.layer_indexes for ViT-B/16
    assert cfg.dino.feature_layers == (3, 7, 11)  # dino_feat[3], dino_feat[7], dino_feat[-1] of 12
    assert cfg.dino.pos_scale == 1.717857142857143  # interpolate_pos_encoding's fixed scale
    assert cfg.aggregator.window_size == 12 and cfg.aggregator.pad_len == 256 and cfg.aggregator.num_heads == 4
    assert cfg.aggregator.pooling == (1, 1)  # scripts/eval.sh; (2, 2) is configs/vitb_384.yaml
    assert paper_cfg((2, 2)).aggregator.pooling == (2, 2)


def test_normalization_and_template(tiny_gsnet) -> None:
    # cfg.MODEL.CLIP_PIXEL_MEAN / CLIP_PIXEL_STD in gs_net/config.py, used for both streams
    mean = [122.7709383, 116.7460125, 104.09373615]
    std = [68.5005327, 66.6321579, 70.3231630]
    assert tiny_gsnet.pixel_mean.flatten().tolist() == pytest.approx(mean, abs=1e-4)
    assert tiny_gsnet.pixel_std.flatten().tolist() == pytest.approx(std, abs=1e-4)
    assert paper_cfg().template == DEFAULT_TEMPLATE == "A photo of a {} in the scene"  # prompt_ensemble "single"


@pytest.mark.parametrize(
    ("name", "prompted"),
    [("low vegetation, grass", "low vegetation"), ("a, b, c", "a"), ("road,street", "road,street"), ("tree", "tree")],
)
def test_synonym_rule(name: str, prompted: str) -> None:
    # get_text_embeds: `if ', ' in classname: classname_splits[0]` (comma WITH space only)
    assert prompt_name(name) == prompted
    assert Vocabulary((name,)).prompts() == [f"A photo of a {prompted} in the scene"]


def test_dino_taps_are_block_outputs_through_the_final_norm() -> None:
    # get_intermediate_layers: output.append(self.norm(x)) after blocks 3, 7 and 11 (0-based), CLS dropped
    from gsnet_deploy.model.dino import DinoCfg

    cfg = DinoCfg(image_size=64, embed_dim=32, depth=4, num_heads=2, pretrain_grid=8, pos_scale=1.0, feature_layers=(0, 2, 3))
    torch.manual_seed(0)
    dino = DinoViT(cfg).eval()
    with torch.no_grad():
        for p in dino.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        x = torch.randn(2, 3, 64, 64)
        taps = dino.forward_intermediates(x)
        tokens = torch.cat([dino.cls_token.expand(2, -1, -1), dino.patch_embed(x)], dim=1) + dino.pos_embed_resized
        for i, block in enumerate(dino.blocks):
            tokens = block(tokens)
            if i in cfg.feature_layers:
                ln = torch.nn.functional.layer_norm(tokens[:, 1:], (32,), dino.norm.weight, dino.norm.bias, eps=1e-6)
                want = ln.transpose(1, 2).reshape(2, 32, 8, 8)
                torch.testing.assert_close(taps[cfg.feature_layers.index(i)], want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- head wiring read from the official code
def test_class_attention_pooling_upsamples_with_align_corners_true() -> None:
    # ClassTransformerLayer: x + F.interpolate(updated pooled tokens, mode='bilinear', align_corners=True)
    from gsnet_deploy.model.aggregator import AggregatorCfg

    torch.manual_seed(0)
    pooled_layer = ClassAttention(AggregatorCfg(hidden_dim=8, num_heads=2, text_dim=4, pad_len=8, pooling=(2, 2)))
    plain_layer = ClassAttention(AggregatorCfg(hidden_dim=8, num_heads=2, text_dim=4, pad_len=8, pooling=(1, 1)))
    with torch.no_grad():
        for p in pooled_layer.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        plain_layer.load_state_dict(pooled_layer.state_dict())
        x, guid = torch.randn(6, 8, 4, 6), torch.randn(3, 4)
        small = torch.nn.functional.avg_pool2d(x, 2)  # [6, 8, 2, 3]
        # unpooled, the layer returns small + (small + delta) (the official residual adds the updated tokens)
        updated = (plain_layer(small, guid, 2) - small).double()  # pooled tokens after attention and MLP

    # bilinear with align_corners=True, float64: output i samples input position i * (in - 1) / (out - 1)
    def axis(n_in: int, n_out: int) -> np.ndarray:
        m = np.zeros((n_out, n_in))
        for i in range(n_out):
            src = i * (n_in - 1) / (n_out - 1)
            lo = min(int(np.floor(src)), n_in - 2)
            m[i, lo], m[i, lo + 1] = 1 - (src - lo), src - lo
        return m

    up = np.einsum("hy,bcyx,wx->bchw", axis(2, 4), updated.numpy(), axis(3, 6))
    expected = x.double().numpy() + up
    np.testing.assert_allclose(pooled_layer(x, guid, 2).detach().double().numpy(), expected, rtol=1e-5, atol=1e-5)


def test_swin_guidance_is_layer_normed() -> None:
    # SwinTransformerBlockWrapper: guidance_norm(appearance) before both blocks; a LayerNorm ignores a*g + b per token
    from gsnet_deploy.model.aggregator import AggregatorCfg, SwinPair

    torch.manual_seed(0)
    pair = SwinPair(AggregatorCfg(hidden_dim=8, num_heads=2, appearance_dim=4, window_size=12, feature_size=24)).eval()
    x, g = torch.randn(3, 24, 24, 8), torch.randn(1, 24, 24, 4)
    with torch.no_grad():
        torch.testing.assert_close(pair(x, 3.0 * g + 1.0, 3), pair(x, g, 3), rtol=1e-4, atol=1e-4)
        assert (pair(x, g + torch.randn_like(g), 3) - pair(x, g, 3)).abs().max() > 1e-3  # guidance matters


def test_ripd_concatenates_upsampled_clip_then_dino() -> None:
    # FusionUP: cat([up(x), clip_guidance]) then cat([..., dino_guidance]); zero the DINO slice of each first conv
    from gsnet_deploy.model.ripd import Ripd, RipdCfg

    torch.manual_seed(0)
    cfg = RipdCfg(in_dim=32, decoder_dims=(16, 16), guidance_dims=(32, 16), clip_proj_dims=(8, 4), dino_proj_dims=(8, 4))
    ripd = Ripd(cfg).eval()
    with torch.no_grad():
        ripd.conv1[0].weight[:, cfg.in_dim :] = 0.0  # up1 gives in_dim - 8 channels, + 8 CLIP: DINO starts at in_dim
        ripd.conv2[0].weight[:, cfg.decoder_dims[0] :] = 0.0
        x = torch.randn(2, 32, 6, 6)
        clip = [torch.randn(1, 32, 12, 12), torch.randn(1, 16, 24, 24)]
        dino = [torch.randn(1, 32, 12, 12), torch.randn(1, 16, 24, 24)]
        other = [torch.randn(1, 32, 12, 12), torch.randn(1, 16, 24, 24)]
        base = ripd(x, clip, dino, 2)
        torch.testing.assert_close(ripd(x, clip, other, 2), base)  # DINO enters only through the zeroed slice
        assert (ripd(x, other, dino, 2) - base).abs().max() > 1e-4  # CLIP does enter


def test_paper_views_follow_the_official_sliding_window() -> None:
    # GSNet.forward (sliding_window): 640x640 canvas of the ResizeShortestEdge output, unfold 384 stride 256,
    # global view = that same (un-squared) image resized to 384; torch bilinear, align_corners=False
    from PIL import Image

    from gsnet_deploy.runtime.protocol import paper_views

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)
    resized = np.asarray(Image.fromarray(image).resize((960, 640), Image.BILINEAR))  # detectron2 ResizeShortestEdge(640)
    t = torch.from_numpy(resized.transpose(2, 0, 1).astype(np.float32))[None]  # [1, 3, 640, 960]
    canvas = torch.nn.functional.interpolate(t, size=(640, 640), mode="bilinear", align_corners=False)
    tiles = torch.nn.functional.unfold(canvas, 384, stride=256).reshape(3, 384, 384, 4).permute(3, 0, 1, 2)
    global_view = torch.nn.functional.interpolate(t, size=(384, 384), mode="bilinear", align_corners=False)
    want = torch.cat([tiles, global_view]).numpy()  # [5, 3, 384, 384]
    np.testing.assert_allclose(paper_views(image).views, want, rtol=0, atol=2e-3)
