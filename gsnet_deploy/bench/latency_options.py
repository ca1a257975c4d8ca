"""What ``gsnet bench latency`` measures: its options, the variants, and what the host offers (data only)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gsnet_deploy.backends import BackendKind
from gsnet_deploy.contracts.model_size import ModelSize

PAPER_VIEWS = 5  # views per image under the paper protocol
TILED_BATCH = 8  # views per batch in tiled mode's benchmark
TILED_CLASSES = 6
IMAGE_HW = (512, 768)  # a typical aerial photo; ResizeShortestEdge makes it 640x960, as in design.md
CLASS_NAMES = ("building", "road", "tree", "water", "low vegetation", "car", "bare soil", "ship", "airport", "bridge")


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
        folder: images (768x512) of a folder segmented through ``segment_files`` per N, with the
            numpy protocol and the device protocol side by side (0: skip; ``bench.folder``).
        backends: only these backends' variants (empty: every backend the host can run).
        batch_images: with ``folder``, the device protocol's folder run once per K here (``--batch-images``:
            up to K same-size images per device call); K > 1 only on backends with a batched call (torch).
        variants: only variants whose name contains one of these strings (empty: all).
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
    folder: int = 0
    backends: tuple[BackendKind, ...] = ()
    batch_images: tuple[int, ...] = (1,)
    variants: tuple[str, ...] = ()


@dataclass(frozen=True)
class VariantSpec:
    """One backend + precision + options combination to measure."""

    name: str
    engine: BackendKind
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
