"""Measuring one latency variant: the paper protocol per class count, tiled throughput, memory peaks."""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import numpy as np

from gsnet_deploy.backends import BackendKind, BackendOptions, open_backend
from gsnet_deploy.bench.host import PeakRss, import_torch
from gsnet_deploy.bench.latency_options import (
    CLASS_NAMES,
    IMAGE_HW,
    PAPER_VIEWS,
    TILED_BATCH,
    TILED_CLASSES,
    LatencyOptions,
    VariantSpec,
)
from gsnet_deploy.bench.timers import time_cuda, time_host, timing_stats
from gsnet_deploy.contracts.io_names import IMAGES, LOGITS, TEXT_EMBEDS, TEXT_TOKENS
from gsnet_deploy.contracts.model_size import ModelSize
from gsnet_deploy.runtime.backend import Backend

# Executed GMACs (fvcore: 1 multiply-add = 1 flop) of ONE 384-px view of the paper model, pooling [1,1],
# text embeddings cached: count_flops(GSNet(paper_cfg()), N, views=1, architecture=False)["total"], computed
# on 2026-11-27 with fvcore 0.1.5 on the CPU host (about 20 s each). Other sizes and N are counted at run time.
PAPER_EXECUTED_GMACS_PER_VIEW: dict[int, float] = {5: 365.821144576, 6: 368.28490496, 40: 452.052758016}


@contextlib.contextmanager
def _qgff_front(kernel: bool) -> Iterator[None]:
    """Within the block, QGFF's front runs the Triton kernel (``kernel``) or the plain torch reference.

    NOTE: QGFF runs the reference unless its cfg sets ``fused_kernel``; for the kernel variant the
    name QGFF's default path calls is swapped for the duration of the variant and restored on exit
    (this process runs the variants one after another).
    """
    from gsnet_deploy.kernels import cost_volume
    from gsnet_deploy.model import qgff

    original = qgff.cost_volume_reference
    if kernel:
        qgff.cost_volume_reference = cost_volume.fused_cost_volume
    try:
        yield
    finally:
        qgff.cost_volume_reference = original


def _open_variant(spec: VariantSpec, options: LatencyOptions) -> Backend:
    """The (not yet entered) backend of one variant, through the one backend factory."""
    torch = spec.engine is BackendKind.TORCH
    return open_backend(
        BackendOptions(
            kind=spec.engine,
            checkpoint=options.checkpoint if torch else None,
            onnx_dir=spec.path if spec.engine is BackendKind.ONNXRUNTIME else None,
            engine_dir=spec.path if spec.engine is BackendKind.TENSORRT else None,
            device=spec.device if torch else None,
            size=options.size,
            fp16=spec.precision == "fp16",
            cuda_graphs=spec.cuda_graphs if torch else None,
            providers=spec.providers or None,
        ),
        warn=False,
    )


def _tokens(num_classes: int) -> np.ndarray:
    """Tokens ``[N, 77]`` of N prompts made from remote-sensing class names."""
    from gsnet_deploy.runtime.tokenizer import BpeTokenizer
    from gsnet_deploy.runtime.vocab import DEFAULT_TEMPLATE

    k = len(CLASS_NAMES)
    names = [CLASS_NAMES[i] if i < k else f"{CLASS_NAMES[i % k]} {i // k}" for i in range(num_classes)]
    return BpeTokenizer()([DEFAULT_TEMPLATE.format(name) for name in names])


def _test_image() -> np.ndarray:
    """A seeded RGB uint8 image ``[512, 768, 3]`` (content does not change the timings)."""
    return np.random.default_rng(0).integers(0, 256, size=(*IMAGE_HW, 3), dtype=np.uint8)


def measure_variant(spec: VariantSpec, options: LatencyOptions, log: Callable[[str], None]) -> dict[str, Any]:
    """Every measurement of one variant (paper protocol per N, tiled views/s, memory, stages)."""
    torch = import_torch()
    from gsnet_deploy.runtime.protocol import merge_paper_logits, paper_views

    on_cuda = spec.device == "cuda"
    warmup = options.warmup if options.warmup is not None else (3 if on_cuda else 1)
    iters = options.iters
    result: dict[str, Any] = {"engine": spec.engine.value, "device": spec.device, "precision": spec.precision,
                              "kernel": spec.kernel, "cuda_graphs": spec.cuda_graphs, "warmup": warmup, "iters": iters,
                              "paper": {}}  # fmt: skip
    gc.collect()  # NOTE: free the previous variant's model before its memory peaks are reset
    torch_cuda = torch is not None and torch.cuda.is_available()
    if torch_cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    rss = PeakRss()
    rgb = _test_image()
    with _qgff_front(spec.kernel), _open_variant(spec, options) as backend:
        if spec.engine is BackendKind.ONNXRUNTIME:
            result["providers"] = list(backend.providers)
        for n in options.classes:
            start = time.perf_counter()
            text = backend.text.run({TEXT_TOKENS: _tokens(n)})[TEXT_EMBEDS]  # [N, 512]
            text_ms = 1e3 * (time.perf_counter() - start)
            stages: dict[str, list[float]] = {"preprocess": [], "image_graph": [], "merge": []}

            def one_image(record: bool, text: np.ndarray = text, stages: dict[str, list[float]] = stages) -> None:
                t0 = time.perf_counter()
                views = paper_views(rgb)
                t1 = time.perf_counter()
                logits = backend.image.run({IMAGES: views.views, TEXT_EMBEDS: text})[LOGITS]  # [5, N, 96, 96]
                t2 = time.perf_counter()
                merge_paper_logits(logits, views.height, views.width)
                t3 = time.perf_counter()
                if record:
                    for key, seconds in zip(stages, (t1 - t0, t2 - t1, t3 - t2)):
                        stages[key].append(1e3 * seconds)

            for _ in range(warmup):
                one_image(False)
            image_times = time_host(lambda: one_image(True), iters, warmup=0)
            entry: dict[str, Any] = {"image": timing_stats(image_times), "text_encoder_once_ms": text_ms,
                                     "stages_median_ms": {k: statistics.median(v) for k, v in stages.items()}}  # fmt: skip
            if spec.engine is BackendKind.TORCH and on_cuda:
                views_dev = torch.from_numpy(paper_views(rgb).views).to("cuda")  # [5, 3, 384, 384]
                text_dev = torch.from_numpy(text).to("cuda")  # [N, 512]
                graph = time_cuda(partial(backend.image.forward, views_dev, text_dev), iters, warmup)
                entry["graph"] = {**timing_stats(graph), "timer": "CUDA events, device tensors"}
            else:
                entry["graph"] = {**timing_stats(stages["image_graph"]), "timer": "host wall clock, host arrays"}
            if options.folder:
                entry["folder"] = _measure_folder(backend, n, options.folder, log, options.batch_images)
            result["paper"][f"N={n}"] = entry
            log(f"  {spec.name}, N={n}: {entry['image']['median_ms']:.1f} ms per image "
                f"(graph {entry['graph']['median_ms']:.1f} ms)")  # fmt: skip
        if options.tiled:
            result["tiled"] = _measure_tiled(spec, backend, iters, warmup)
            log(f"  {spec.name}, tiled: {result['tiled']['views_per_s']:.2f} views/s")
    result["host_memory"] = rss.peak()
    if spec.engine is BackendKind.TORCH and on_cuda:
        result["device_memory_peak_mib"] = torch.cuda.max_memory_allocated() / (1 << 20)
    return result


def _measure_folder(
    backend: Any, num_classes: int, count: int, log: Callable[[str], None], batch_images: Sequence[int] = (1,)
) -> dict[str, Any]:
    """A folder of ``count`` 768x512 images through ``segment_files``: numpy vs device protocol (``bench.folder``).

    With K > 1 in ``batch_images`` and a backend with a batched call (``segment_paper_batch``: torch),
    the device protocol also runs with ``--batch-images K`` (under ``"batched"``, keyed by K). Each
    device run is preceded by an untimed run of one group (and of the last, smaller group), so
    CUDA graph captures and first-call set-up are not timed.
    """
    import tempfile
    from pathlib import Path

    from gsnet_deploy.bench.folder import make_folder, measure_folder
    from gsnet_deploy.runtime.vocab import parse_classes

    vocab = parse_classes(",".join(f"{CLASS_NAMES[i % len(CLASS_NAMES)]} {i}" for i in range(num_classes)))
    with tempfile.TemporaryDirectory(prefix="gsnet-bench-images-") as tmp:
        images = make_folder(Path(tmp), count, *IMAGE_HW)
        out: dict[str, Any] = {"numpy": measure_folder(backend, vocab, images, device_protocol=False)}
        runs = {k: None for k in (1, *batch_images)}  # K=1 first, each K once
        can_batch = callable(getattr(backend, "segment_paper_batch", None))
        for k in runs:
            if k > 1 and not can_batch:
                continue
            for warm in {min(k, count), count % k} - {0}:
                measure_folder(backend, vocab, images[:warm], device_protocol=True, batch_images=k)
            result = measure_folder(backend, vocab, images, device_protocol=True, batch_images=k)
            if k == 1:
                out["device"] = result
            else:
                out.setdefault("batched", {})[str(k)] = result
    for r in (out["numpy"], out["device"], *out.get("batched", {}).values()):
        log(f"    folder of {count}, N={num_classes}, {r['protocol']} protocol, batch {r['batch_images']}: "
            f"{r['per_image_ms']:.1f} ms per image (graphs {r['graph_ms']:.1f} ms, "
            f"outside {100 * r['outside_share']:.0f}%)")  # fmt: skip
    return out


def _measure_tiled(spec: VariantSpec, backend: Any, iters: int, warmup: int) -> dict[str, Any]:
    """Views per second of one 8-view batch at N=6 (tiled mode's batch)."""
    rng = np.random.default_rng(1)
    views = (rng.random((TILED_BATCH, 3, 384, 384), dtype=np.float32) * 255).astype(np.float32)  # [8, 3, 384, 384]
    text = backend.text.run({TEXT_TOKENS: _tokens(TILED_CLASSES)})[TEXT_EMBEDS]  # [6, 512]
    if spec.engine is BackendKind.TORCH and spec.device == "cuda":
        import torch

        views_dev, text_dev = torch.from_numpy(views).to("cuda"), torch.from_numpy(text).to("cuda")
        times = time_cuda(lambda: backend.image.forward(views_dev, text_dev), iters, warmup)
        timer = "CUDA events, device tensors"
    else:
        times = time_host(lambda: backend.image.run({IMAGES: views, TEXT_EMBEDS: text}), iters, warmup)
        timer = "host wall clock, host arrays"
    stats = timing_stats(times)
    return {**stats, "views": TILED_BATCH, "classes": TILED_CLASSES, "views_per_s": TILED_BATCH / (stats["median_ms"] * 1e-3),
            "timer": timer}  # fmt: skip


def executed_gmacs_per_image(size: ModelSize, classes: Sequence[int], count: bool = True) -> dict[int, float]:
    """Executed GMACs of one image (5 views) per N: the cached table for the paper model, else counted once per N.

    Args:
        size: model architecture.
        classes: class counts N.
        count: count with fvcore what the table lacks (False: leave such N out).
    """
    out: dict[int, float] = {}
    model = None
    for n in classes:
        if size is ModelSize.PAPER and n in PAPER_EXECUTED_GMACS_PER_VIEW:
            out[n] = PAPER_VIEWS * PAPER_EXECUTED_GMACS_PER_VIEW[n]
            continue
        if not count:
            continue
        if model is None:
            from gsnet_deploy.model.gsnet import GSNet, cfg_for

            model = GSNet(cfg_for(size)).eval()
        from gsnet_deploy.bench.table5 import count_flops

        out[n] = PAPER_VIEWS * count_flops(model, n, views=1, architecture=False)["total"]
    return out
