"""Probing the host: torch / ONNX Runtime / TensorRT / Triton, versions, GPU and driver, peak memory.

Peak host memory reads ``VmHWM`` of ``/proc/self/status`` after resetting it through
``/proc/self/clear_refs``; where that is impossible, the growth of ``ru_maxrss``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import platform
import re
import resource
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gsnet_deploy.bench.latency_options import HostCaps
from gsnet_deploy.contracts.tensorrt_import import find_tensorrt


def host_caps(engine_dirs: Sequence[Path] = ()) -> HostCaps:
    """Probe torch CUDA, ONNX Runtime providers, TensorRT and Triton without loading any model."""
    torch = import_torch()
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


def import_torch() -> Any:
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
    torch = import_torch()
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
