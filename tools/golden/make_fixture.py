r"""Regenerate ``tests/data/golden_gsnet.npz`` by running the OFFICIAL GSNet code on CPU.

Not run in CI. Needs a local copy of github.com/yecy749/GSNet (never committed here), e.g.::

    git --git-dir=/path/to/GSNet.git worktree add /tmp/golden/GSNet   # or: git archive HEAD | tar -x
    pip install --target /tmp/golden/site einops                       # the official code's only missing import
    flock /tmp/gsnet-heavy.lock .venv/bin/python tools/golden/make_fixture.py \\
        --official /tmp/golden/GSNet --site /tmp/golden/site --out tests/data/golden_gsnet.npz

What it does (about 10 GB of RAM and a few minutes on 2 cores):

1. Puts minimal stand-ins for the few detectron2 names the official modules import on
   ``sys.path`` (written to a temporary folder; detectron2 is not on PyPI). Only
   ``configurable`` (pass-through), the registries (no-op ``register``) and
   ``sem_seg_postprocess`` (crop, then bilinear resize) take part in the forward pass.
2. Builds the official ``GSNet`` meta-architecture with the ViT-B/16 config
   (``configs/vitb_384.yaml``) through its own constructors; ``clip.load`` is replaced by the
   official ``model_vpt.CLIP`` built with ViT-B/16's sizes (no download), then every tensor of
   ``official_weights.official_state_dict()`` is loaded with ``strict=True``, which also proves
   that the key list matches the official modules.
3. Runs the official sliding-window inference on a synthetic 200x300 image (resized with PIL
   as detectron2's ``ResizeShortestEdge(640)`` does) with a vocabulary holding a synonym, for
   class-transformer pooling [1,1] (paper evaluation) and [2,2] (config / training), and records
   the stages with forward hooks. Only numbers from the official run are written.

Large stages are stored as fixed slices (listed in the file as ``slice_*``): views 1 and 4
(a tile and the global view), every 48th/32nd/16th channel, all positions; logits of those
views in full; merged probabilities at every second pixel.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from official_weights import official_state_dict

VOCAB = ["impervious surfaces", "building", "low vegetation, grass", "tree", "car"]
HEIGHT, WIDTH = 200, 300
VIEWS = np.array([1, 4])
CH768 = np.arange(0, 768, 48)
CH512 = np.arange(0, 512, 32)
CH128 = np.arange(0, 128, 16)


def synthetic_image(height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """A deterministic RGB uint8 scene: gradients, rectangles, a disc and mild noise."""
    rng = np.random.default_rng(20250101)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    img = np.stack([60 + 120 * xx / width, 80 + 100 * yy / height, 150 - 60 * (xx + yy) / (width + height)], axis=-1)
    img[30:90, 40:140] = (200, 60, 50)
    img[120:180, 180:280] = (40, 160, 70)
    img[((yy - 60) ** 2 + (xx - 230) ** 2) < 30**2] = (230, 230, 90)
    img[:, 150:160] = (120, 120, 120)
    img += rng.normal(0.0, 12.0, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def resize_shortest_edge(image: np.ndarray, short: int = 640, max_size: int = 2560) -> np.ndarray:
    """detectron2's test-time ResizeShortestEdge on a uint8 image (PIL bilinear)."""
    h, w = image.shape[:2]
    scale = short / min(h, w)
    nh, nw = (short, scale * w) if h < w else (scale * h, short)
    if max(nh, nw) > max_size:
        s = max_size / max(nh, nw)
        nh, nw = nh * s, nw * s
    size = (int(nw + 0.5), int(nh + 0.5))
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))


STUBS = {
    "detectron2/__init__.py": "",
    "detectron2/config.py": "def configurable(init):\n    return init\n",
    "detectron2/data/__init__.py": "class MetadataCatalog:\n    pass\n",
    "detectron2/modeling/__init__.py": (
        "class _Registry:\n"
        "    def register(self):\n"
        "        return lambda obj: obj\n"
        "META_ARCH_REGISTRY = _Registry()\n"
        "SEM_SEG_HEADS_REGISTRY = _Registry()\n"
        "def build_backbone(*args):\n    raise NotImplementedError\n"
        "def build_sem_seg_head(*args):\n    raise NotImplementedError\n"
    ),
    "detectron2/modeling/backbone/__init__.py": "from torch.nn import Module as Backbone\n",
    "detectron2/modeling/postprocessing.py": (
        "import torch.nn.functional as F\n"
        "def sem_seg_postprocess(result, img_size, output_height, output_width):\n"
        "    result = result[:, : img_size[0], : img_size[1]][None]\n"
        "    return F.interpolate(result, size=(output_height, output_width), mode='bilinear', align_corners=False)[0]\n"
    ),
    "detectron2/structures.py": "class ImageList:\n    pass\n",
    "detectron2/utils/__init__.py": "",
    "detectron2/utils/memory.py": "def _ignore_torch_cuda_oom():\n    raise NotImplementedError\n",
    "detectron2/layers.py": "from torch.nn import Conv2d\nShapeSpec = None\nget_norm = None\n",
}


def install_stubs(root: Path) -> None:
    """Write the detectron2 stand-ins under ``root`` and put it first on ``sys.path``."""
    for rel, text in STUBS.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    sys.path.insert(0, str(root))


def bare_packages(official: Path) -> None:
    """Register the official packages without running their ``__init__`` (dataset registration, Swin backbone)."""
    for name in ("gs_net", "gs_net.modeling", "gs_net.modeling.heads", "gs_net.modeling.transformer", "gs_net.third_party"):
        mod = types.ModuleType(name)
        mod.__path__ = [str(official / name.replace(".", "/"))]
        sys.modules[name] = mod
    sys.path.insert(0, str(official))


def build_official(workdir: Path, pooling: tuple[int, int]) -> nn.Module:
    """The official GSNet meta-architecture with the ViT-B/16 config (``configs/vitb_384.yaml``)."""
    from gs_net.GSNet import GSNet
    from gs_net.modeling.heads.GSNet_head import GSNetHead
    from gs_net.modeling.transformer import GSNetPredictor as predictor_module
    from gs_net.third_party import clip, model_vpt
    from gs_net.vision_transformer import vit_base

    def fake_load(
        name: str, device: str = "cpu", jit: bool = False, prompt_depth: int = 0, prompt_length: int = 0
    ) -> tuple[nn.Module, None]:
        assert name == "ViT-B/16"
        # ViT-B/16: embed 512, 224 px, 12 layers of width 768, patch 16; text 77 tokens, 49408 words, width 512, 8 heads, 12 lay.
        sizes = (512, 224, 12, 768, 16, 77, 49408, 512, 8, 12)
        model = model_vpt.CLIP(*sizes, prompt_depth=prompt_depth, prompt_length=prompt_length)
        return model.eval(), None

    clip.load = fake_load
    classes = workdir / "classes.json"
    classes.write_text(json.dumps(VOCAB))
    predictor = predictor_module.GSNetPredictor(
        train_class_json=str(classes),
        test_class_json=str(classes),
        clip_pretrained="ViT-B/16",
        prompt_ensemble_type="single",
        text_guidance_dim=512,
        text_guidance_proj_dim=128,
        appearance_guidance_dim=512,
        appearance_guidance_proj_dim=128,
        prompt_depth=0,
        prompt_length=0,
        decoder_dims=[64, 32],
        decoder_clip_guidance_dims=[256, 128],
        decoder_clip_guidance_proj_dims=[32, 16],
        decoder_dino_guidance_dims=[256, 128],
        decoder_dino_guidance_proj_dims=[32, 16],
        decoder_guidance_dims=[256, 128],
        decoder_guidance_proj_dims=[32, 16],
        use_clip_corr=True,
        use_dino_corr=True,
        fusion_type="query_guided",
        num_heads=4,
        num_layers=2,
        hidden_dims=128,
        pooling_sizes=list(pooling),
        feature_resolution=[24, 24],
        window_sizes=12,
        attention_type="linear",
    )
    head = GSNetHead(num_classes=len(VOCAB), ignore_value=255, feature_resolution=[24, 24], transformer_predictor=predictor)
    return GSNet(
        backbone=None,
        sem_seg_head=head,
        size_divisibility=384,
        pixel_mean=[123.675, 116.280, 103.530],
        pixel_std=[58.395, 57.120, 57.375],
        clip_pixel_mean=[122.7709383, 116.7460125, 104.09373615],
        clip_pixel_std=[68.5005327, 66.6321579, 70.3231630],
        train_class_json=str(classes),
        test_class_json=str(classes),
        sliding_window=True,
        clip_finetune="attention",
        backbone_multiplier=0.0,
        clip_pretrained="ViT-B/16",
        dino=vit_base(patch_size=8, num_classes=0),
        use_clip=True,
        clip_decod_guid_dim=[256, 128],
        dino_decod_guid_dim=[256, 128],
    )


def tokens_to_maps(tokens: torch.Tensor, side: int, lnd: bool) -> torch.Tensor:
    """Drop the CLS token and fold ``[L, B, C]`` (``lnd``) or ``[B, L, C]`` into ``[B, C, side, side]``."""
    if lnd:
        tokens = tokens.permute(1, 0, 2)
    return tokens[:, 1:].transpose(1, 2).reshape(tokens.shape[0], -1, side, side)


def reuse_backbones(model: nn.Module, rec: dict[str, torch.Tensor]) -> None:
    """Make ``model``'s CLIP and DINO return another run's outputs (the backbones do not depend on pooling).

    Only the two backbone calls of ``GSNet.forward`` are replaced on this instance; the official head,
    sliding-window merge and post-processing run unchanged. Halves the cost of the pooling-2 run.
    """
    model.dino_model.get_intermediate_layers = lambda x, n=1: rec["dino"]

    def encode_image(image: torch.Tensor, masks: object = None, pool_mask: object = None, dense: bool = False) -> torch.Tensor:
        model.layers.extend([rec["clip_block3"], rec["clip_block7"]])  # what the block hooks append
        return rec["clip_dense"]

    model.sem_seg_head.predictor.clip_model.encode_image = encode_image


@torch.no_grad()
def run_official(model: nn.Module, image: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]:
    """One sliding-window inference: every recorded stage as float32 numpy, and the raw records."""
    rec: dict[str, torch.Tensor] = {}
    clip_model = model.sem_seg_head.predictor.clip_model
    transformer = model.sem_seg_head.predictor.transformer
    handles = [
        clip_model.visual.transformer.resblocks[3].register_forward_hook(lambda m, i, o: rec.__setitem__("clip_block3", o)),
        clip_model.visual.transformer.resblocks[7].register_forward_hook(lambda m, i, o: rec.__setitem__("clip_block7", o)),
        clip_model.visual.register_forward_hook(lambda m, i, o: rec.__setitem__("clip_dense", o)),
        clip_model.visual.register_forward_pre_hook(lambda m, i: rec.__setitem__("views_normalized", i[0])),
        transformer.layers[0].register_forward_pre_hook(lambda m, i: rec.__setitem__("qgff", i[0])),
        transformer.layers[0].register_forward_hook(lambda m, i, o: rec.__setitem__("agg_layer0", o)),
        transformer.layers[1].register_forward_hook(lambda m, i, o: rec.__setitem__("agg_layer1", o)),
        transformer.register_forward_hook(lambda m, i, o: rec.__setitem__("logits", o)),
    ]
    dino = model.dino_model
    original = dino.get_intermediate_layers

    def recording(x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        out = original(x, n)
        rec["dino"] = out
        return out

    dino.get_intermediate_layers = recording
    resized = resize_shortest_edge(image)
    batched = [{"image": torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1))), "height": HEIGHT, "width": WIDTH}]
    probs = model(batched)[0]["sem_seg"]
    dino.get_intermediate_layers = original
    for h in handles:
        h.remove()
    predictor = model.sem_seg_head.predictor
    out = {
        "tokens": predictor.tokens.numpy().astype(np.int64),
        "text_embeds": predictor.cache[:, 0].numpy(),
        "qgff": rec["qgff"].permute(0, 2, 1, 3, 4).numpy(),  # [B, C, T, H, W] -> [B, N, C, H, W]
        "agg_layer0": rec["agg_layer0"].permute(0, 2, 1, 3, 4).numpy(),
        "agg_layer1": rec["agg_layer1"].permute(0, 2, 1, 3, 4).numpy(),
        "logits": rec["logits"].numpy(),
        "probs": probs.numpy(),
    }
    if "views_normalized" in rec:  # not recorded when the backbones are reused
        out.update(
            views=rec["views_normalized"].numpy(),  # the 5 views after CLIP normalization, as CLIP and DINO see them
            clip_block3=tokens_to_maps(rec["clip_block3"], 24, lnd=True).numpy(),
            clip_block7=tokens_to_maps(rec["clip_block7"], 24, lnd=True).numpy(),
            clip_dense=tokens_to_maps(rec["clip_dense"], 24, lnd=False).numpy(),
            dino_block3=tokens_to_maps(rec["dino"][3], 48, lnd=False).numpy(),
            dino_block7=tokens_to_maps(rec["dino"][7], 48, lnd=False).numpy(),
            dino_block11=tokens_to_maps(rec["dino"][11], 48, lnd=False).numpy(),
        )
    return {k: np.ascontiguousarray(v) for k, v in out.items()}, rec


def sliced(full: dict[str, np.ndarray], suffix: str) -> dict[str, np.ndarray]:
    """The stored slices of one run (see the module docstring)."""
    v = VIEWS
    out = {
        f"logits{suffix}": full["logits"][v],
        f"probs{suffix}": full["probs"][:, ::2, ::2],
        f"agg_layer0{suffix}": full["agg_layer0"][v][:, :, CH128],
        f"agg_layer1{suffix}": full["agg_layer1"][v][:, :, CH128],
    }
    if suffix == "_pool1":  # stages before the class transformer do not depend on pooling
        out.update(
            tokens=full["tokens"],
            text_embeds=full["text_embeds"],
            views=full["views"][:, :, ::8, ::8],
            clip_block3=full["clip_block3"][v][:, CH768],
            clip_block7=full["clip_block7"][v][:, CH768],
            clip_dense=full["clip_dense"][v][:, CH512],
            dino_block3=full["dino_block3"][v][:, CH768],
            dino_block7=full["dino_block7"][v][:, CH768],
            dino_block11=full["dino_block11"][v][:, CH768],
            qgff=full["qgff"][v][:, :, CH128],
        )
    return out


def main() -> int:
    """Build, run and write the fixture."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", type=Path, required=True, help="work tree of github.com/yecy749/GSNet")
    parser.add_argument("--site", type=Path, help="folder with einops installed (pip install --target)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.site:
        sys.path.insert(0, str(args.site))
    torch.Tensor.cuda = lambda self, *a, **k: self  # the official text path calls .cuda(); stay on CPU
    workdir = Path(tempfile.mkdtemp(prefix="gsnet-golden-"))
    install_stubs(workdir / "stubs")
    bare_packages(args.official.resolve())
    state = official_state_dict()
    image = synthetic_image()
    arrays: dict[str, np.ndarray] = {"image": image, "vocab": np.array(VOCAB)}
    backbones: dict[str, torch.Tensor] = {}
    for pooling in ((1, 1), (2, 2)):
        model = build_official(workdir, pooling).eval()
        computed = model.sem_seg_head.predictor.transformer.layers[0].swin_block.block_2.attn_mask.clone()
        model.load_state_dict(state, strict=True)
        if pooling == (1, 1):
            loaded = state["sem_seg_head.predictor.transformer.layers.0.swin_block.block_2.attn_mask"]
            if not torch.equal(computed, loaded):
                raise SystemExit("official_weights.swin_shift_mask differs from the official module's own mask")
            arrays["swin_attn_mask"] = computed.numpy().astype(np.int8)
        if backbones:
            reuse_backbones(model, backbones)
        full, rec = run_official(model, image)
        backbones = backbones or {k: rec[k] for k in ("dino", "clip_block3", "clip_block7", "clip_dense")}
        arrays.update(sliced(full, f"_pool{pooling[0]}"))
        del model
    arrays.update(slice_views=VIEWS, slice_ch768=CH768, slice_ch512=CH512, slice_ch128=CH128)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in arrays.items())
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): {shapes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
