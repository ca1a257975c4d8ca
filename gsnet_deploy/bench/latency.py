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
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import gc
import importlib.util
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from gsnet_deploy.backends import ModelSize
from gsnet_deploy.errors import BackendError, GSNetError
from gsnet_deploy.io_names import IMAGES, LOGITS, TEXT_EMBEDS, TEXT_TOKENS
from gsnet_deploy.tensorrt_import import find_tensorrt

PAPER_VIEWS = 5  # views per image under the paper protocol
TILED_BATCH = 8  # views per batch in tiled mode's benchmark
TILED_CLASSES = 6
IMAGE_HW = (512, 768)  # a typical aerial photo; ResizeShortestEdge makes it 640x960, as in design.md
CLASS_NAMES = ("building", "road", "tree", "water", "low vegetation", "car", "bare soil", "ship", "airport", "bridge")

# Executed GMACs (fvcore: 1 multiply-add = 1 flop) of ONE 384-px view of the paper model, pooling [1,1],
# text embeddings cached: count_flops(GSNet(paper_cfg()), N, views=1, architecture=False)["total"], computed
# on 2026-11-27 with fvcore 0.1.5 on the CPU host (about 20 s each). Other sizes and N are counted at run time.
PAPER_EXECUTED_GMACS_PER_VIEW: dict[int, float] = {5: 365.821144576, 6: 368.28490496, 40: 452.052758016}


class Engine(enum.Enum):
    """The inference engine of a variant."""

    TORCH = "torch"
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"


@dataclass(frozen=True)
class LatencyOptions:
    """What ``gsnet bench latency`` measures (parsed once by the CLI).

    Attributes:
        onnx_dir: folder from ``gsnet export onnx`` (adds the ONNX Runtime variants).
        engine_dirs: folders from ``gsnet export build`` (one TensorRT variant each).
        classes: class counts N of the paper protocol.
        iters: timed iterations per measurement (warm-up excluded).
        out_dir: where the JSON, markdown and chart go.
        size: model architecture for the torch variants (``TINY`` for quick runs).
        checkpoint: official checkpoint for the torch variants (default: demo weights).
        warmup: warm-up iterations (None: 1 on CPU, 3 on CUDA).
        tiled: also measure tiled mode's views per second (8 views, N=6).
        label: host part of the output file names (None: the GPU's name or ``cpu-<cores>core``).
        chart: draw the PNG chart when matplotlib is installed.
    """

    onnx_dir: Path | None = None
    engine_dirs: tuple[Path, ...] = ()
    classes: tuple[int, ...] = (6, 40)
    iters: int = 3
    out_dir: Path = Path("benchmarks/results")
    size: ModelSize = ModelSize.PAPER
    checkpoint: Path | None = None
    warmup: int | None = None
    tiled: bool = True
    label: str | None = None
    chart: bool = True


@dataclass(frozen=True)
class VariantSpec:
    """One backend + precision + options combination to measure."""

    name: str
    engine: Engine
    device: str  # "cpu" or "cuda"
    precision: str  # "fp32", "fp16", or the engine manifest's precision
    kernel: bool = False  # torch fp16: the fused cost-volume Triton kernel for the QGFF front
    cuda_graphs: bool = False
    providers: tuple[str, ...] = ()  # onnxruntime execution providers
    path: Path | None = None  # ONNX or engine folder


@dataclass(frozen=True)
class Unavailable:
    """A variant this host cannot run, and why."""

    name: str
    reason: str


@dataclass(frozen=True)
class HostCaps:
    """What the host offers, found once (pure data so that discovery can be tested)."""

    cuda: bool
    ort_providers: tuple[str, ...] | None  # None: onnxruntime not importable
    ort_cuda_devices: int
    tensorrt: str | None  # None: usable; otherwise why not
    triton: bool
    torch: bool = True  # False on a torch-free install (a Jetson with the TensorRT runtime only)


def timing_stats(times_ms: Sequence[float]) -> dict[str, float]:
    """Median, p90 (nearest rank), min and count of a list of milliseconds.

    Raises:
        GSNetError: no times.
    """
    if not times_ms:
        raise GSNetError("no timings to summarize; pass --iters 1 or more")
    ordered = sorted(float(t) for t in times_ms)
    rank = max(1, int(np.ceil(0.9 * len(ordered))))  # nearest-rank p90
    return {"median_ms": statistics.median(ordered), "p90_ms": ordered[rank - 1], "min_ms": ordered[0], "n": len(ordered)}


def floor_ms(gmacs: float, tflops: float) -> float:
    """Time at the matmul rate: ``gmacs`` multiply-adds (2 flops each) at ``tflops`` TFLOP/s, in ms."""
    return 2.0 * gmacs * 1e9 / (tflops * 1e12) * 1e3


def host_caps(engine_dirs: Sequence[Path] = ()) -> HostCaps:
    """Probe torch CUDA, ONNX Runtime providers, TensorRT and Triton without loading any model."""
    torch = _import_torch()
    try:
        import onnxruntime

        providers: tuple[str, ...] | None = tuple(onnxruntime.get_available_providers())
    except ImportError:
        providers = None
    from gsnet_deploy.runtime.onnxruntime_backend import cuda_device_count

    return HostCaps(
        cuda=torch is not None and torch.cuda.is_available(),
        ort_providers=providers,
        ort_cuda_devices=cuda_device_count(),
        tensorrt=tensorrt_problem() if engine_dirs else "no --engine DIR given",
        triton=importlib.util.find_spec("triton") is not None,
        torch=torch is not None,
    )


def _import_torch() -> Any:
    """``torch``, or None where it is not installed (the runtime works without it)."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def tensorrt_problem() -> str | None:
    """Why TensorRT cannot run here, or None when a real TensorRT (with ``Builder``) and cuda-python import."""
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed"
    if find_tensorrt() is None:
        return "only TensorRT type stubs are installed (no libraries)"
    if importlib.util.find_spec("cuda") is None:
        return "cuda-python is not installed (pip install cuda-python)"
    return None


def discover_variants(options: LatencyOptions, caps: HostCaps) -> tuple[list[VariantSpec], list[Unavailable]]:
    """The variants to run on a host with ``caps``, and those listed as unavailable with the reason."""
    runnable: list[VariantSpec] = []
    missing: list[Unavailable] = []
    device = "cuda" if caps.cuda else "cpu"
    if caps.torch:
        runnable.append(VariantSpec(f"torch fp32 {device}", Engine.TORCH, device, "fp32"))
    else:
        missing.append(Unavailable("torch", "torch is not installed"))
    cpu_ep, cuda_ep = "CPUExecutionProvider", "CUDAExecutionProvider"
    if options.onnx_dir is None:
        missing.append(Unavailable("onnxruntime", "no --onnx DIR given (make one with 'gsnet export onnx --out DIR')"))
    elif caps.ort_providers is None:
        missing.append(Unavailable("onnxruntime", "onnxruntime is not installed"))
    else:
        runnable.append(VariantSpec("onnxruntime fp32 cpu", Engine.ONNXRUNTIME, "cpu", "fp32", providers=(cpu_ep,),
                                    path=options.onnx_dir))  # fmt: skip
        if cuda_ep not in caps.ort_providers:
            missing.append(Unavailable("onnxruntime fp32 cuda", f"this onnxruntime has no {cuda_ep}"))
        elif caps.ort_cuda_devices < 1:
            missing.append(Unavailable("onnxruntime fp32 cuda", "no CUDA device"))
        else:
            runnable.append(VariantSpec("onnxruntime fp32 cuda", Engine.ONNXRUNTIME, "cuda", "fp32",
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
                runnable.append(VariantSpec(name, Engine.TORCH, "cuda", "fp16", kernel=kernel, cuda_graphs=graphs))
    if caps.tensorrt is not None:
        missing.append(Unavailable("tensorrt", caps.tensorrt))
    else:
        for path in options.engine_dirs:
            runnable.append(VariantSpec(f"tensorrt {_engine_precision(path)} ({path.name})", Engine.TENSORRT, "cuda",
                                        _engine_precision(path), path=path))  # fmt: skip
    return runnable, missing


def _engine_precision(engine_dir: Path) -> str:
    """The precision recorded in an engine folder's image manifest ("?" when unreadable)."""
    from gsnet_deploy.export.manifest import Graph, read_manifest

    try:
        precision = read_manifest(engine_dir / Graph.IMAGE.engine_file).precision
    except (GSNetError, OSError):
        return "?"
    return str(getattr(precision, "value", precision))


class PeakRss:
    """Peak resident memory of this process over a region, in MiB.

    Linux: resets the high-water mark by writing 5 to ``/proc/self/clear_refs`` and reads ``VmHWM``.
    Elsewhere (or when the reset is refused): the growth of ``ru_maxrss``, which only sees new peaks.
    """

    def __init__(self) -> None:
        self.method = "VmHWM"
        self.start_rss = _status_mib("VmRSS")
        self.start_maxrss = _maxrss_mib()
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.method = "ru_maxrss growth"

    def peak(self) -> dict[str, Any]:
        """``peak_mib`` (absolute, None when unknown), ``delta_mib`` over the RSS at the start, and the method."""
        if self.method == "VmHWM" and self.start_rss is not None:
            hwm = _status_mib("VmHWM")
            if hwm is not None:
                return {"peak_mib": hwm, "delta_mib": hwm - self.start_rss, "method": self.method}
        return {"peak_mib": None, "delta_mib": _maxrss_mib() - self.start_maxrss, "method": "ru_maxrss growth"}


def _status_mib(key: str) -> float | None:
    """A ``kB`` field of ``/proc/self/status`` in MiB, or None."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else None


def _maxrss_mib() -> float:
    """``ru_maxrss`` of this process in MiB (kB on Linux, bytes on macOS)."""
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value / (1 << 20) if sys.platform == "darwin" else value / 1024


def host_info() -> dict[str, Any]:
    """CPU, GPU, driver and library versions of this host."""
    torch = _import_torch()
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        if match:
            cpu = match.group(1).strip()
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "os": platform.platform(),
        "load_average_1m_at_start": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "versions": {"python": platform.python_version(), "numpy": np.__version__},
    }
    for package in ("torch", "onnxruntime", "triton", "fvcore"):
        with contextlib.suppress(ImportError, AttributeError):
            info["versions"][package] = __import__(package).__version__
    if tensorrt_problem() is None:
        info["versions"]["tensorrt"] = __import__("tensorrt").__version__
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        info["versions"]["gsnet-deploy"] = version("gsnet-deploy")
    if torch is not None and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / (1 << 30), 1)
        info["versions"]["cuda"] = torch.version.cuda
        info["driver"] = _nvidia_driver()
    return info


def _nvidia_driver() -> str:
    """The NVIDIA driver version from nvidia-smi, or why it is unknown."""
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"unknown ({type(err).__name__})"
    if result.returncode != 0:
        return f"unknown (nvidia-smi exit {result.returncode})"
    return result.stdout.strip().splitlines()[0] if result.stdout.strip() else "unknown"


def host_label(info: dict[str, Any]) -> str:
    """File-name label of the host: the GPU's name, else ``cpu-<cores>core``."""
    if "gpu" in info:
        return re.sub(r"[^a-z0-9]+", "-", str(info["gpu"]).lower()).strip("-")
    return f"cpu-{info['cores']}core"


def measure_matmul_tflops(iters: int = 20, n: int = 8192) -> float:
    """The card's dense fp16 matmul rate in TFLOP/s (``n``^3 GEMM, CUDA events, median)."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.float16)
    b = torch.randn(n, n, device="cuda", dtype=torch.float16)
    ms = statistics.median(time_cuda(lambda: a @ b, iters, warmup=3))
    return 2 * n**3 / (ms * 1e-3) / 1e12


def time_cuda(fn: Callable[[], object], iters: int, warmup: int) -> list[float]:
    """CUDA-event milliseconds of ``fn`` per call, after ``warmup`` untimed calls."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def time_host(fn: Callable[[], object], iters: int, warmup: int) -> list[float]:
    """Wall-clock milliseconds of ``fn`` per call (``fn`` returns host arrays, so it has synchronized)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return times


@contextlib.contextmanager
def _qgff_front(kernel: bool) -> Iterator[None]:
    """Within the block, QGFF's front runs the Triton kernel (``kernel``) or the plain torch reference.

    NOTE: the model has no switch for this, so the name QGFF calls is swapped for the duration of one
    variant and restored on exit (this process runs the variants one after another).
    """
    from gsnet_deploy.kernels import cost_volume
    from gsnet_deploy.model import qgff

    original = qgff.fused_cost_volume
    if not kernel:
        qgff.fused_cost_volume = cost_volume.cost_volume_reference
    try:
        yield
    finally:
        qgff.fused_cost_volume = original


def _open_variant(spec: VariantSpec, options: LatencyOptions) -> Any:
    """The (not yet entered) backend of one variant."""
    if spec.engine is Engine.TORCH:
        from gsnet_deploy.model import build_gsnet, paper_cfg, tiny_cfg
        from gsnet_deploy.model.torch_backend import TorchBackend, TorchPrecision

        cfg = tiny_cfg() if options.size is ModelSize.TINY else paper_cfg()
        model = build_gsnet(cfg, checkpoint=options.checkpoint)
        precision = TorchPrecision.FP16 if spec.precision == "fp16" else TorchPrecision.FP32
        return TorchBackend(model, device=spec.device, precision=precision, cuda_graphs=spec.cuda_graphs)
    if spec.engine is Engine.ONNXRUNTIME:
        from gsnet_deploy.runtime.onnxruntime_backend import OnnxRuntimeBackend

        assert spec.path is not None
        return OnnxRuntimeBackend(spec.path, providers=list(spec.providers))
    from gsnet_deploy.runtime.tensorrt_backend import TensorRTBackend

    assert spec.path is not None
    return TensorRTBackend(spec.path)


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
    torch = _import_torch()
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
        if spec.engine is Engine.ONNXRUNTIME:
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
            if spec.engine is Engine.TORCH and on_cuda:
                views_dev = torch.from_numpy(paper_views(rgb).views).to("cuda")  # [5, 3, 384, 384]
                text_dev = torch.from_numpy(text).to("cuda")  # [N, 512]
                graph = time_cuda(partial(backend.image.forward, views_dev, text_dev), iters, warmup)
                entry["graph"] = {**timing_stats(graph), "timer": "CUDA events, device tensors"}
            else:
                entry["graph"] = {**timing_stats(stages["image_graph"]), "timer": "host wall clock, host arrays"}
            result["paper"][f"N={n}"] = entry
            log(f"  {spec.name}, N={n}: {entry['image']['median_ms']:.1f} ms per image "
                f"(graph {entry['graph']['median_ms']:.1f} ms)")  # fmt: skip
        if options.tiled:
            result["tiled"] = _measure_tiled(spec, backend, iters, warmup)
            log(f"  {spec.name}, tiled: {result['tiled']['views_per_s']:.2f} views/s")
    result["host_memory"] = rss.peak()
    if spec.engine is Engine.TORCH and on_cuda:
        result["device_memory_peak_mib"] = torch.cuda.max_memory_allocated() / (1 << 20)
    return result


def _measure_tiled(spec: VariantSpec, backend: Any, iters: int, warmup: int) -> dict[str, Any]:
    """Views per second of one 8-view batch at N=6 (tiled mode's batch)."""
    rng = np.random.default_rng(1)
    views = (rng.random((TILED_BATCH, 3, 384, 384), dtype=np.float32) * 255).astype(np.float32)  # [8, 3, 384, 384]
    text = backend.text.run({TEXT_TOKENS: _tokens(TILED_CLASSES)})[TEXT_EMBEDS]  # [6, 512]
    if spec.engine is Engine.TORCH and spec.device == "cuda":
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
            from gsnet_deploy.model.gsnet import GSNet, paper_cfg, tiny_cfg

            model = GSNet(tiny_cfg() if size is ModelSize.TINY else paper_cfg()).eval()
        from gsnet_deploy.bench.table5 import count_flops

        out[n] = PAPER_VIEWS * count_flops(model, n, views=1, architecture=False)["total"]
    return out


@dataclass
class LatencyReport:
    """Everything one run measured (serialized as the JSON file)."""

    date: str
    command: str
    model: str
    weights: str
    host: dict[str, Any]
    classes: list[int]
    protocol: str
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    executed_gmacs_per_image: dict[str, float] = field(default_factory=dict)
    matmul_fp16_tflops: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        """The report as indented JSON."""
        return json.dumps(asdict(self), indent=2, default=str)


def add_efficiency(report: LatencyReport) -> None:
    """Floor (executed FLOPs at the measured fp16 matmul rate) and fraction of it, for every CUDA variant."""
    if report.matmul_fp16_tflops is None:
        return
    for variant in report.variants.values():
        if variant.get("device") != "cuda" or "paper" not in variant:
            continue
        for key, entry in variant["paper"].items():
            gmacs = report.executed_gmacs_per_image.get(key)
            if gmacs is None:
                continue
            floor = floor_ms(gmacs, report.matmul_fp16_tflops)
            entry["floor_ms"] = floor
            entry["fraction_of_floor"] = floor / entry["graph"]["median_ms"]


def _fmt(value: float | None, digits: int = 1) -> str:
    """A number with thousands separators, or an em dash."""
    return "—" if value is None else f"{value:,.{digits}f}"


def format_markdown(report: LatencyReport) -> str:
    """The report as markdown: host, per-variant latency table, stages, tiled throughput, unavailable variants."""
    host = report.host
    device = host.get("gpu", f"{host['cpu']} ({host['cores']} cores, {host['torch_threads']} torch threads)")
    versions = ", ".join(f"{k} {v}" for k, v in host["versions"].items())
    lines = [
        f"# Latency per backend and precision: {device}",
        "",
        f"- Date: {report.date}. Command: `{report.command}`.",
        f"- Model: {report.model}, {report.weights}. Protocol: {report.protocol}.",
        f"- Host: {device}" + (f", driver {host['driver']}" if "driver" in host else "") + f"; {versions}.",
        f"- 1-minute load average at start / end: {host.get('load_average_1m_at_start')} / {host.get('load_average_1m_at_end')}.",
    ]
    if report.matmul_fp16_tflops is not None:
        lines.append(f"- Measured fp16 dense matmul rate in this run: {report.matmul_fp16_tflops:,.0f} TFLOP/s (8192^3).")
    if report.executed_gmacs_per_image:
        gm = ", ".join(f"{k}: {v:,.1f}" for k, v in report.executed_gmacs_per_image.items())
        lines.append(f"- Executed GMACs per image (5 views, fvcore, text cached): {gm}.")
    lines += [
        "",
        "Per image = `paper_views` + image graph (5 views) + `merge_paper_logits`, host wall clock. "
        "Graph = the image graph alone (CUDA events on device tensors for torch on CUDA, else host wall clock). "
        "Median and p90 over the timed iterations, warm-up excluded.",
        "",
        "| variant | N | per image median ms | p90 ms | graph median ms | graph p90 ms | floor ms | of floor | "
        "peak host MiB (+delta) | peak device MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in report.variants.items():
        if "error" in v:
            lines.append(f"| {name} | | error: {v['error']} | | | | | | | |")
            continue
        mem = v["host_memory"]
        host_mem = f"{_fmt(mem['peak_mib'], 0)} (+{_fmt(mem['delta_mib'], 0)})"
        dev_mem = _fmt(v.get("device_memory_peak_mib"), 0)
        for key, e in v["paper"].items():
            frac = e.get("fraction_of_floor")
            lines.append(
                f"| {name} | {key[2:]} | {_fmt(e['image']['median_ms'])} | {_fmt(e['image']['p90_ms'])} | "
                f"{_fmt(e['graph']['median_ms'])} | {_fmt(e['graph']['p90_ms'])} | {_fmt(e.get('floor_ms'), 2)} | "
                f"{'—' if frac is None else f'{100 * frac:.0f}%'} | {host_mem} | {dev_mem} |"
            )
    lines += [
        "",
        "Time per stage (medians, ms): text encoder once per vocabulary; per image preprocessing, image graph, merge.",
        "",
        "| variant | N | text encoder (once) | preprocess | image graph | merge |",
        "|---|---|---|---|---|---|",
    ]
    for name, v in report.variants.items():
        for key, e in v.get("paper", {}).items():
            s = e["stages_median_ms"]
            lines.append(f"| {name} | {key[2:]} | {_fmt(e['text_encoder_once_ms'])} | {_fmt(s['preprocess'])} | "
                         f"{_fmt(s['image_graph'])} | {_fmt(s['merge'])} |")  # fmt: skip
    tiled = [(name, v["tiled"]) for name, v in report.variants.items() if "tiled" in v]
    if tiled:
        lines += ["", f"Tiled mode: one batch of {TILED_BATCH} views, N={TILED_CLASSES}.", "",
                  "| variant | median ms per batch | p90 ms | views/s |", "|---|---|---|---|"]  # fmt: skip
        lines += [f"| {n} | {_fmt(t['median_ms'])} | {_fmt(t['p90_ms'])} | {_fmt(t['views_per_s'], 2)} |" for n, t in tiled]
    if report.unavailable:
        lines += ["", "Not run on this host:", ""]
        lines += [f"- {name}: {reason}." for name, reason in report.unavailable.items()]
    if report.notes:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in report.notes]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o644)  # NOTE: mkstemp creates 0600; results are meant to be shared and committed
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def output_stem(report: LatencyReport, options: LatencyOptions) -> str:
    """``latency_<host>_<date>`` plus ``_<size>`` for a non-paper model."""
    label = options.label or host_label(report.host)
    stem = f"latency_{label}_{report.date}"
    return stem if options.size is ModelSize.PAPER else f"{stem}_{options.size.value}"


def write_report(report: LatencyReport, options: LatencyOptions) -> dict[str, Path]:
    """Write the JSON, the markdown and (with matplotlib) the PNG chart; return their paths."""
    stem = output_stem(report, options)
    paths = {"json": options.out_dir / f"{stem}.json", "md": options.out_dir / f"{stem}.md"}
    if options.chart:
        from gsnet_deploy.bench.chart import chart_png

        png = chart_png(report)
        if png is None:
            report.notes.append("chart skipped: matplotlib is not installed (pip install -e '.[dev]')")
        else:
            paths["png"] = options.out_dir / f"{stem}.png"
            write_atomic(paths["png"], png)
    write_atomic(paths["json"], report.to_json())
    write_atomic(paths["md"], format_markdown(report))
    return paths


def run_latency(options: LatencyOptions, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> str:
    """Measure every variant this host can run and write the report; returns the markdown table.

    Raises:
        GSNetError: bad options (no classes, iters < 1, a missing --onnx/--engine folder).
    """
    if options.iters < 1:
        raise GSNetError(f"--iters is {options.iters}; pass 1 or more")
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
        if max(report.host.get("load_average_1m_at_start") or 0.0, report.host["load_average_1m_at_end"]) > (os.cpu_count() or 1):
            report.notes.append("the host was busy (1-minute load above its core count): CPU timings are inflated")
    paths = write_report(report, options)
    log("wrote " + ", ".join(str(p) for p in paths.values()))
    return format_markdown(report)
