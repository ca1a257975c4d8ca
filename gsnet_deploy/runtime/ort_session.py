"""The one place that opens ONNX Runtime inference sessions (backend, calibration, export checks).

Torch-free; ``onnxruntime`` is imported when a session is opened, so hosts with only TensorRT
never need it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gsnet_deploy.errors import BackendError

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"


def import_onnxruntime() -> Any:
    """``onnxruntime``, or a BackendError saying how to install it."""
    try:
        import onnxruntime
    except ImportError as err:
        raise BackendError(
            f"ONNX Runtime is not installed ({err}); pip install onnxruntime (CPU) or onnxruntime-gpu (CUDA)."
        ) from err
    return onnxruntime


def open_session(
    model: str | Path | bytes,
    providers: Sequence[str] = (CPU_PROVIDER,),
    threads: int | None = None,
    *,
    memory_arena: bool = True,
    quiet: bool = False,
    priority_order: bool = False,
    fuse_quantized: bool = True,
) -> Any:
    """An ``onnxruntime.InferenceSession`` with all graph optimizations (unless ``fuse_quantized`` is False).

    Args:
        model: an ``.onnx`` file, or a serialized model.
        providers: execution providers, in order of preference.
        threads: intra-op threads (None or 0: ONNX Runtime's default, one per core).
        memory_arena: keep the CPU memory arena (off for one-shot sessions whose peak should be returned).
        quiet: log errors only (ONNX Runtime warns about every unused initializer of rewritten graphs).
        priority_order: run nodes in the model's node order where it is a valid one (``PRIORITY_BASED``),
            e.g. a reduction placed right after the tensor it reads, so that the tensor is freed early.
        fuse_quantized: all graph optimizations (Q/DQ pairs fused into integer kernels); False: basic
            ones only, Q/DQ computed as written (what TensorRT's explicit quantization means). ONNX Runtime
            1.24 fails to initialize range-reduction graphs of Q/DQ models with the fusions and the exact
            x64 mode below both on ("Attempt to replace the existing tensor").

    Raises:
        BackendError: onnxruntime is missing or cannot load the model.
    """
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if fuse_quantized else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    )
    # NOTE: ORT fuses Q/DQ pairs into integer kernels; on x86 CPUs with AVX2 but no VNNI their u8s8 path
    # saturates 16-bit sums, and the tiny Q/DQ graph drifted 0.29 rel. L2 from FP32 instead of the 0.04 the
    # Q/DQ model itself computes (and TensorRT runs). This keeps ORT's quantized ops exact on those CPUs.
    options.add_session_config_entry("session.x64quantprecision", "1")
    if threads:
        options.intra_op_num_threads = threads
    if not memory_arena:
        options.enable_cpu_mem_arena = False
    if quiet:
        options.log_severity_level = 3
    if priority_order:
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    source = model if isinstance(model, bytes) else str(model)
    name = "the serialized model" if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, sess_options=options, providers=list(providers))
    except Exception as err:
        raise BackendError(f"ONNX Runtime cannot load {name} ({type(err).__name__}: {err}); re-export it.") from err
