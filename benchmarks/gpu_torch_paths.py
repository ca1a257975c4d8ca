"""One GPU session: the torch paths of GSNet side by side, with correctness checks (issues 4, 6, 7).

Runs, for the paper protocol (one image = 5 views of 384 px) and N classes:
- official-style eager fp32: the reference modules (passed with --reference DIR, not part of this
  project) on the same weights, when available; else our model in eager fp32 with the padding
  materialized as the reference computes it;
- ours eager fp32;
- ours fp16 with the fused cost-volume kernel and SDPA, without and with CUDA graphs;
- ours fp16 without the kernel (reference QGFF front), with CUDA graphs;
and reports medians of CUDA-event timings (warm-up excluded), the fp16 logits' relative L2 error
against fp32, views/s at B=8 (tiled mode's batch), the card's measured fp16 matmul rate and each
result as a fraction of the FLOP floor. Demo weights: timings are real, accuracies only relative.

Usage: python benchmarks/gpu_torch_paths.py --out DIR [--classes 6 40] [--iters 20] [--reference DIR]
       python benchmarks/gpu_torch_paths.py --dry-run   (CPU, tiny model, no timing claims)
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

from gsnet_deploy.bench.timers import measure_matmul_tflops, time_cuda, time_host, timing_stats


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def _reference_model(ref_dir: Path, ours, pooling: int):
    """The reference modules on our weights (official key layout), as one callable on 5 views."""
    sys.path.insert(0, str(ref_dir))
    import torch.nn as nn
    from einops import rearrange
    from offpkg import model_vpt
    from offpkg.RIPD import RIPD
    from offpkg.vision_transformer import vit_base

    from gsnet_deploy.model.checkpoint import to_official_state_dict

    dino = vit_base(patch_size=8, num_classes=0)
    clip = model_vpt.CLIP(512, 224, 12, 768, 16, 77, 49408, 512, 8, 12, prompt_depth=0, prompt_length=0)
    ripd = RIPD(text_guidance_dim=512, text_guidance_proj_dim=128, appearance_guidance_dim=512, appearance_guidance_proj_dim=128,
                decoder_dims=[64, 32], decoder_guidance_dims=[256, 128], decoder_guidance_proj_dims=[32, 16],
                decoder_clip_guidance_dims=[256, 128], decoder_clip_guidance_proj_dims=[32, 16],
                decoder_dino_guidance_dims=[256, 128], decoder_dino_guidance_proj_dims=[32, 16],
                use_clip_corr=True, use_dino_corr=True, fusion_type="query_guided", num_layers=2, nheads=4, hidden_dim=128,
                pooling_size=[pooling, pooling], feature_resolution=[24, 24], window_size=12, attention_type="linear",
                prompt_channel=1)  # fmt: skip
    tops = nn.ModuleDict(dict(upsample1=nn.ConvTranspose2d(768, 256, 2, 2), upsample2=nn.ConvTranspose2d(768, 128, 4, 4),
                              dino_decod_proj1=nn.Conv2d(768, 256, 1), dino_decod_proj2=nn.ConvTranspose2d(768, 128, 2, 2),
                              dino_down_sample=nn.Conv2d(768, 512, 2, 2)))  # fmt: skip
    state = to_official_state_dict(ours)
    for prefix, mod in (
        ("dino_model.", dino),
        ("sem_seg_head.predictor.clip_model.", clip),
        ("sem_seg_head.predictor.transformer.", ripd),
    ):
        mod.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    tops.load_state_dict({k: v for k, v in state.items() if k.split(".")[0] in tops}, strict=True)
    device = next(ours.parameters()).device
    mods = [m.to(device).eval() for m in (dino, clip, ripd, tops)]
    mean = torch.tensor([122.7709383, 116.7460125, 104.09373615], device=device).view(1, 3, 1, 1)
    std = torch.tensor([68.5005327, 66.6321579, 70.3231630], device=device).view(1, 3, 1, 1)
    layers: list[torch.Tensor] = []
    for idx in (3, 7):
        clip.visual.transformer.resblocks[idx].register_forward_hook(lambda m, _, o: layers.append(o))

    @torch.no_grad()
    def forward(images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        layers.clear()
        x = (images - mean) / std
        x = torch.nn.functional.interpolate(x, size=(384, 384), mode="bilinear", align_corners=False)  # as the reference does
        feats = dino.get_intermediate_layers(x, n=12)
        grid = lambda t: rearrange(t[:, 1:, :], "B (H W) C -> B C H W", H=48)  # noqa: E731
        dfd = tops["dino_down_sample"](grid(feats[-1]))
        dg = [tops["dino_decod_proj1"](grid(feats[3])), tops["dino_decod_proj2"](grid(feats[7]))]
        cf = clip.encode_image(x, dense=True)
        res3 = rearrange(cf[:, 1:, :], "B (H W) C -> B C H W", H=24)
        res4 = tops["upsample1"](rearrange(layers[0][1:], "(H W) B C -> B C H W", H=24))
        res5 = tops["upsample2"](rearrange(layers[1][1:], "(H W) B C -> B C H W", H=24))
        tf = text[None, :, None, :].repeat(images.shape[0], 1, 1, 1)
        return ripd(res3, dfd, tf, [res3, res4, res5], dg)

    del mods
    return forward


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path)
    parser.add_argument("--classes", type=int, nargs="+", default=[6, 40])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--reference", type=Path, help="folder holding the reference modules package 'offpkg'")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--floor", action="store_true", help="also count FLOPs (fvcore) for the floor")
    args = parser.parse_args()

    from gsnet_deploy.model import build_gsnet, paper_cfg, tiny_cfg
    from gsnet_deploy.model.torch_backend import TorchBackend, TorchPrecision

    dry = args.dry_run or not torch.cuda.is_available()
    dev = "cpu" if dry else "cuda"
    cfg = tiny_cfg() if dry else paper_cfg()
    timer = (lambda fn, n: time_host(fn, n, 1)) if dry else (lambda fn, n: time_cuda(fn, n, 3))
    iters = 2 if dry else args.iters
    results: dict = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(sys.argv),
        "device": "cpu (dry run)" if dry else torch.cuda.get_device_name(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "protocol": "paper: 5 views of 384 px per image, demo weights",
        "runs": {},
    }
    if not dry:
        import triton

        results["versions"]["triton"] = triton.__version__
        results["versions"]["cuda"] = torch.version.cuda
        results["matmul_fp16_tflops"] = measure_matmul_tflops()
        print(f"measured fp16 matmul: {results['matmul_fp16_tflops']:.0f} TFLOP/s", flush=True)

    torch.manual_seed(0)
    for n in args.classes:
        images = torch.rand(5, 3, 384, 384, device=dev) * 255
        text = torch.nn.functional.normalize(torch.randn(n, 512, device=dev), dim=-1)
        runs: dict = {}
        fp32_model = build_gsnet(cfg)
        with TorchBackend(fp32_model, device=dev, cuda_graphs=False) as be:
            ref_logits = be.image.forward(images, text).float()
            runs["ours eager fp32"] = timing_stats(timer(lambda: be.image.forward(images, text), iters))
            if args.reference is not None and not dry:
                try:
                    reference = _reference_model(args.reference, fp32_model, 1)
                    off = reference(images, text)
                    runs["reference eager fp32"] = timing_stats(timer(lambda: reference(images, text), iters))
                    runs["reference eager fp32"]["max_abs_vs_ours_fp32"] = float((off - ref_logits).abs().max())
                    del reference
                except Exception as exc:
                    runs["reference eager fp32"] = {"error": repr(exc)[:300]}
        del fp32_model
        if not dry:
            torch.cuda.empty_cache()
            variants = [
                ("ours fp16 kernel eager", dict(cuda_graphs=False), True),
                ("ours fp16 kernel + CUDA graphs", dict(cuda_graphs=True), True),
                ("ours fp16 no kernel + CUDA graphs", dict(cuda_graphs=True), False),
            ]
            import gsnet_deploy.kernels.cost_volume as cv

            for name, kw, use_kernel in variants:
                try:
                    original = cv._kernel_applies
                    if not use_kernel:
                        cv._kernel_applies = lambda tensors: False
                    with TorchBackend(build_gsnet(cfg), device=dev, precision=TorchPrecision.FP16, **kw) as be:
                        out = be.image.forward(images, text).float()
                        entry = timing_stats(timer(lambda: be.image.forward(images, text), iters))
                        entry["rel_l2_vs_fp32"] = _rel_l2(out, ref_logits)
                        if n == args.classes[-1] and kw["cuda_graphs"] and use_kernel:
                            big = torch.rand(8, 3, 384, 384, device=dev) * 255
                            ms8 = statistics.median(timer(lambda: be.image.forward(big, text[:6]), iters))
                            results["tiled_views_per_s_B8_N6"] = 8 / (ms8 * 1e-3)
                    runs[name] = entry
                except Exception as exc:
                    runs[name] = {"error": repr(exc)[:300]}
                finally:
                    cv._kernel_applies = original
                torch.cuda.empty_cache()
        results["runs"][f"N={n}"] = runs
        for name, entry in runs.items():
            print(f"N={n:<4} {name:<36} {json.dumps(entry)}", flush=True)

    if args.floor and not dry and "matmul_fp16_tflops" in results:
        from gsnet_deploy.bench.table5 import count_flops
        from gsnet_deploy.model.gsnet import GSNet

        model = GSNet(cfg).eval()
        for n in args.classes:
            gflop = 5 * count_flops(model, n, views=1, architecture=False)["total"]
            floor_ms = gflop * 2e9 / (results["matmul_fp16_tflops"] * 1e12) * 1e3  # 1 MAC = 2 FLOP at the measured rate
            results["runs"][f"N={n}"]["floor"] = {"executed_gmacs": gflop, "floor_ms": floor_ms}
            for entry in results["runs"][f"N={n}"].values():
                if "median_ms" in entry:
                    entry["fraction_of_floor"] = floor_ms / entry["median_ms"]
    text_out = json.dumps(results, indent=2)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_torch_paths.json").write_text(text_out)
    print(text_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
