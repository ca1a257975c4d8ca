"""Latency of every backend and precision on this host, side by side in one process (``gsnet bench latency``).

For each variant that the host can run (torch fp32 on CPU or CUDA; ONNX Runtime on CPU and CUDA with
``--onnx``; torch fp16 on CUDA with and without the fused cost-volume kernel and CUDA graphs;
TensorRT engines with ``--engine``) it measures, after warm-up:

- the paper protocol (one image = 5 views of 384 px) at each class count N: milliseconds per image
  end to end (``paper_views`` + image graph + ``merge_paper_logits``, host wall clock), the image
  graph alone (CUDA events on device tensors for the torch CUDA variants, host wall clock elsewhere),
  and the time per stage (text encoder once per vocabulary, preprocessing, image graph, merge);
- tiled mode's throughput: views per second for a batch of 8 views at N=6;
- peak host memory (``VmHWM`` of ``/proc/self/status`` after resetting it through
  ``/proc/self/clear_refs``; where that is impossible, the growth of ``ru_maxrss``) and peak
  device memory (``torch.cuda.max_memory_allocated``, torch variants only).

On GPUs every result is also put against a floor: executed FLOPs (``count_flops(...,
architecture=False)``, fvcore convention, one multiply-add = one flop, doubled for the rate) over
the card's fp16 matmul rate measured in the same run. Variants the host cannot run are listed with
the reason. Demo weights are used unless a checkpoint is given: timings are real, masks are not.

Writes ``latency_<host>_<date>[_<size>].json`` and ``.md`` (and a ``.png`` chart when matplotlib is
installed) atomically into the output folder.

This module finds the variants and runs them; ``latency_options`` (options and variants),
``host`` (probing), ``timers``, ``measure`` (one variant) and ``latency_report`` do the rest.
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Callable
from pathlib import Path

from gsnet_deploy.backends import BackendKind
from gsnet_deploy.bench.host import host_caps, host_info
from gsnet_deploy.bench.latency_options import (
    IMAGE_HW,
    PAPER_VIEWS,
    HostCaps,
    LatencyOptions,
    Unavailable,
    VariantSpec,
)
from gsnet_deploy.bench.latency_report import LatencyReport, add_efficiency, format_markdown, write_report
from gsnet_deploy.bench.measure import executed_gmacs_per_image, measure_variant
from gsnet_deploy.bench.timers import measure_matmul_tflops
from gsnet_deploy.contracts.model_size import ModelSize
from gsnet_deploy.errors import BackendError, GSNetError


def discover_variants(options: LatencyOptions, caps: HostCaps) -> tuple[list[VariantSpec], list[Unavailable]]:
    """The variants to run on a host with ``caps``, and those listed as unavailable with the reason."""
    runnable: list[VariantSpec] = []
    missing: list[Unavailable] = []
    device = "cuda" if caps.cuda else "cpu"
    if caps.torch:
        runnable.append(VariantSpec(f"torch fp32 {device}", BackendKind.TORCH, device, "fp32"))
    else:
        missing.append(Unavailable("torch", "torch is not installed"))
    cpu_ep, cuda_ep = "CPUExecutionProvider", "CUDAExecutionProvider"
    if options.onnx_dir is None:
        missing.append(Unavailable("onnxruntime", "no --onnx DIR given (make one with 'gsnet export onnx --out DIR')"))
    elif caps.ort_providers is None:
        missing.append(Unavailable("onnxruntime", "onnxruntime is not installed"))
    else:
        runnable.append(VariantSpec("onnxruntime fp32 cpu", BackendKind.ONNXRUNTIME, "cpu", "fp32", providers=(cpu_ep,),
                                    path=options.onnx_dir))  # fmt: skip
        if cuda_ep not in caps.ort_providers:
            missing.append(Unavailable("onnxruntime fp32 cuda", f"this onnxruntime has no {cuda_ep}"))
        elif caps.ort_cuda_devices < 1:
            missing.append(Unavailable("onnxruntime fp32 cuda", "no CUDA device"))
        else:
            runnable.append(VariantSpec("onnxruntime fp32 cuda", BackendKind.ONNXRUNTIME, "cuda", "fp32",
                                        providers=(cuda_ep, cpu_ep), path=options.onnx_dir))  # fmt: skip
    for kernel in (True, False):
        for graphs in (True, False):
            name = f"torch fp16 cuda, {'fused kernel' if kernel else 'no kernel'}, {'CUDA graphs' if graphs else 'eager'}"
            if not caps.torch:
                continue  # listed once above
            if not caps.cuda:
                missing.append(Unavailable(name, "torch sees no CUDA device"))
            elif kernel and not caps.triton:
                missing.append(Unavailable(name, "Triton is not installed"))
            else:
                runnable.append(VariantSpec(name, BackendKind.TORCH, "cuda", "fp16", kernel=kernel, cuda_graphs=graphs))
    if caps.tensorrt is not None:
        missing.append(Unavailable("tensorrt", caps.tensorrt))
    else:
        for path in options.engine_dirs:
            runnable.append(VariantSpec(f"tensorrt {_engine_precision(path)} ({path.name})", BackendKind.TENSORRT, "cuda",
                                        _engine_precision(path), path=path))  # fmt: skip
    if options.backends:
        asked = ", ".join(b.value for b in options.backends)
        missing += [Unavailable(v.name, f"not asked (--backend {asked})") for v in runnable if v.engine not in options.backends]
        runnable = [v for v in runnable if v.engine in options.backends]
    if options.variants:
        asked = " | ".join(options.variants)
        chosen = [v for v in runnable if any(part in v.name for part in options.variants)]
        missing += [Unavailable(v.name, f"not asked (--variant {asked})") for v in runnable if v not in chosen]
        runnable = chosen
    return runnable, missing


def _engine_precision(engine_dir: Path) -> str:
    """The precision recorded in an engine folder's image manifest ("?" when unreadable)."""
    from gsnet_deploy.contracts.engine_manifest import Graph, read_manifest

    try:
        precision = read_manifest(engine_dir / Graph.IMAGE.engine_file).precision
    except (GSNetError, OSError):
        return "?"
    return str(getattr(precision, "value", precision))


def host_was_busy(load_at_start: float | None, load_at_end: float, cores: int) -> bool:
    """Whether other work ran beside the benchmark, judged from the 1-minute load average.

    At the start the benchmark has not run yet, so any load near half the cores is someone else's;
    at the end the benchmark's own threads count (up to one per core), so only more than one
    runnable task above the core count means others were running.
    """
    return (load_at_start or 0.0) > cores / 2 or load_at_end > cores + 1


def run_latency(options: LatencyOptions, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> str:
    """Measure every variant this host can run and write the report; returns the markdown table.

    Raises:
        GSNetError: bad options (no classes, iters < 1, a missing --onnx/--engine folder).
    """
    if options.iters < 1:
        raise GSNetError(f"--iters is {options.iters}; pass 1 or more")
    if not options.batch_images or min(options.batch_images) < 1:
        raise GSNetError(f"--batch-images is {list(options.batch_images)}; pass counts of 1 or more, e.g. --batch-images 1 4")
    if not options.classes or min(options.classes) < 1:
        raise GSNetError(f"--classes is {list(options.classes)}; pass class counts of 1 or more, e.g. --classes 6 40")
    for label, path in [("--onnx", options.onnx_dir), *(("--engine", p) for p in options.engine_dirs)]:
        if path is not None and not Path(path).is_dir():
            raise BackendError(f"{label} {path} is not a folder; pass the folder 'gsnet export' wrote")
    info = host_info()
    caps = host_caps(options.engine_dirs)
    runnable, missing = discover_variants(options, caps)
    report = LatencyReport(
        date=datetime.date.today().isoformat(),
        command="gsnet " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("gsnet") else " ".join(sys.argv),
        model=options.size.value,
        weights=f"checkpoint {options.checkpoint}" if options.checkpoint else "demo weights (timings real, masks meaningless)",
        host=info,
        classes=list(options.classes),
        protocol=f"paper sliding window, {PAPER_VIEWS} views of 384 px per image, image {IMAGE_HW[1]}x{IMAGE_HW[0]}",
        unavailable={u.name: u.reason for u in missing},
    )
    log(f"host: {info.get('gpu', info['cpu'])}; {len(runnable)} variants to run, {len(missing)} unavailable")
    if caps.cuda:
        report.matmul_fp16_tflops = measure_matmul_tflops()
        log(f"measured fp16 matmul: {report.matmul_fp16_tflops:,.0f} TFLOP/s")
    for spec in runnable:
        log(f"{spec.name}: warm-up {options.warmup if options.warmup is not None else 'auto'}, {options.iters} iterations")
        try:
            report.variants[spec.name] = measure_variant(spec, options, log)
        except (GSNetError, RuntimeError, MemoryError) as err:
            # NOTE: one variant failing (out of memory, a provider that does not start) must not lose the others
            error = f"{type(err).__name__}: {err}"[:300]
            report.variants[spec.name] = {"engine": spec.engine.value, "device": spec.device, "error": error}
            log(f"  {spec.name}: failed: {report.variants[spec.name]['error']}")
    # NOTE: counting the paper model takes ~20 s per N on a CPU: there only the cached table is used
    count = caps.torch and (caps.cuda or options.size is ModelSize.TINY)
    gmacs = executed_gmacs_per_image(options.size, options.classes, count=count)
    report.executed_gmacs_per_image = {f"N={n}": g for n, g in gmacs.items()}
    add_efficiency(report)
    if hasattr(os, "getloadavg"):
        report.host["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
        if host_was_busy(report.host.get("load_average_1m_at_start"), report.host["load_average_1m_at_end"], os.cpu_count() or 1):
            report.notes.append("the host was busy (other work ran beside the benchmark): CPU timings are inflated")
    paths = write_report(report, options)
    log("wrote " + ", ".join(str(p) for p in paths.values()))
    return format_markdown(report)
