"""Open the inference backend a command asked for: torch, ONNX Runtime or TensorRT.

The one place that turns backend options into a ``runtime.backend.Backend``. Heavy packages
(torch, onnxruntime, tensorrt) are imported only for the backend chosen, so a Jetson with only
the TensorRT runtime never needs torch.
"""

from __future__ import annotations

import enum
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from gsnet_deploy.contracts.model_size import ModelSize
from gsnet_deploy.errors import BackendError
from gsnet_deploy.runtime.backend import Backend

B = TypeVar("B", bound=Backend)


class BackendKind(enum.Enum):
    """Inference engines."""

    TORCH = "torch"
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"


@dataclass(frozen=True)
class BackendOptions:
    """What selects and configures a backend (parsed once by the CLI)."""

    kind: BackendKind | None = None  # None: tensorrt with --engine, onnxruntime with --onnx, else torch
    checkpoint: Path | None = None
    onnx_dir: Path | None = None
    engine_dir: Path | None = None
    device: str | None = None
    pooling: int | None = None  # None: 1 for torch; an export's own pooling for ONNX Runtime and TensorRT
    size: ModelSize = ModelSize.PAPER
    fp16: bool = False
    cuda_graphs: bool | None = None  # torch: replay the image graph as a CUDA graph (None: the backend decides)
    providers: tuple[str, ...] | None = None  # onnxruntime execution providers, in order (None: its default)

    def resolved_kind(self) -> BackendKind:
        """The backend to use, inferring it from the model source when not given."""
        if self.kind is not None:
            return self.kind
        if self.engine_dir is not None:
            return BackendKind.TENSORRT
        if self.onnx_dir is not None:
            return BackendKind.ONNXRUNTIME
        return BackendKind.TORCH


def open_backend(options: BackendOptions, warn: bool = True) -> Backend:
    """Construct (not yet enter) the backend ``options`` describe.

    Raises:
        BackendError: the options do not fit together (e.g. onnxruntime without --onnx).
    """
    kind = options.resolved_kind()
    if kind is BackendKind.TORCH:
        if options.onnx_dir is not None or options.engine_dir is not None:
            raise BackendError("--backend torch runs the PyTorch model; drop --onnx/--engine or pick their backend")
        from gsnet_deploy.model import DEMO_WARNING, build_gsnet, cfg_for
        from gsnet_deploy.model.torch_backend import TorchBackend, TorchPrecision

        cfg = cfg_for(options.size, 1 if options.pooling is None else options.pooling)
        if options.checkpoint is None and warn:
            print(f"warning: {DEMO_WARNING}", file=sys.stderr)
        if options.checkpoint is not None and options.size is ModelSize.TINY:
            raise BackendError("--model-size tiny is for demo weights only; drop it when passing --checkpoint")
        model = build_gsnet(cfg, checkpoint=options.checkpoint)
        precision = TorchPrecision.FP16 if options.fp16 else TorchPrecision.FP32
        return TorchBackend(model, device=options.device, precision=precision, cuda_graphs=options.cuda_graphs)
    if kind is BackendKind.ONNXRUNTIME:
        if options.onnx_dir is None:
            raise BackendError("--backend onnxruntime needs --onnx DIR (make it with 'gsnet export onnx --out DIR')")
        from gsnet_deploy.runtime.onnxruntime_backend import OnnxRuntimeBackend

        return require_pooling(OnnxRuntimeBackend(options.onnx_dir, providers=options.providers), options.pooling)
    if options.engine_dir is None:
        raise BackendError("--backend tensorrt needs --engine DIR (make it with 'gsnet export build --out DIR')")
    from gsnet_deploy.runtime.tensorrt_backend import TensorRTBackend

    return require_pooling(TensorRTBackend(options.engine_dir), options.pooling)


def backend_pooling(backend: Backend) -> int | None:
    """The pooling a backend says it runs: the torch model's config, or its export's manifest (None: unknown)."""
    model = getattr(backend, "model", None)
    cfg = getattr(model, "cfg", None)
    if cfg is not None:
        return int(cfg.aggregator.pooling[0])
    manifest = getattr(backend, "manifest", None)
    pooling = getattr(manifest, "pooling", None)
    return int(pooling[0] if isinstance(pooling, (tuple, list)) else pooling) if pooling is not None else None


def require_pooling(backend: B, requested: int | None) -> B:
    """``backend``, or a one-line error when it runs another pooling than ``requested`` (None: any).

    An export fixes its pooling; asking for another one would silently run the exported one.

    Raises:
        BackendError: the backend's model or manifest says another pooling.
    """
    known = backend_pooling(backend)
    if requested is not None and known is not None and requested != known:
        raise BackendError(
            f"the {backend.name} backend runs pooling {known} (its model or manifest says so) but pooling {requested} was "
            f"asked; pass pooling {known}, leave it out, or re-export with `gsnet export onnx --pooling {requested}`"
        )
    return backend
