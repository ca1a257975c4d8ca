"""Memory the host can give a job, and a one-line refusal before work starts when it is clearly too little.

Available memory is the smaller of ``MemAvailable`` (``/proc/meminfo``) and the cgroup's room
(cgroup v2 ``memory.max - memory.current``, or v1 ``limit_in_bytes - usage_in_bytes``), so a
container limit counts as well as the host's free memory.

Estimates (``calibration_bytes``, ``autocast_bytes``) are lower bounds, about 85% of the peaks measured
on the paper-size model (``benchmarks/results/calib_memory_2026-11-29.md``): a host below them would
be stopped by the out-of-memory killer anyway, minutes later; above them the job may still be tight.
"""

from __future__ import annotations

import os
from pathlib import Path

from gsnet_deploy.errors import GSNetError

GIB = 1 << 30
_CGROUP = Path("/sys/fs/cgroup")
SKIP_ENV = "GSNET_SKIP_MEMORY_CHECK"  # set to 1 to run anyway (the estimate may be wrong for odd graphs)


class InsufficientMemoryError(GSNetError):
    """The host (or its cgroup) clearly has too little memory for the job about to start."""


def _meminfo_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (no limit) -> None


def _cgroup_room(root: Path = _CGROUP) -> int | None:
    """Bytes left under this process's cgroup memory limit, or None without a limit."""
    limit, usage = _read_int(root / "memory.max"), _read_int(root / "memory.current")  # v2
    if limit is None:
        limit, usage = _read_int(root / "memory" / "memory.limit_in_bytes"), _read_int(root / "memory" / "memory.usage_in_bytes")
        if limit is not None and limit >= 1 << 60:  # v1 writes a huge number for "no limit"
            limit = None
    if limit is None:
        return None
    return max(0, limit - (usage or 0))


def available_bytes(meminfo: Path = Path("/proc/meminfo"), cgroup: Path = _CGROUP) -> int | None:
    """Memory this process can still take: min(MemAvailable, cgroup room); None where neither is known."""
    known = [v for v in (_meminfo_available(meminfo), _cgroup_room(cgroup)) if v is not None]
    return min(known) if known else None


def model_bytes(model_path: Path) -> int:
    """Size of an ONNX model with its external data files (what loading it costs, roughly)."""
    model_path = Path(model_path)
    total = model_path.stat().st_size
    for extra in model_path.parent.glob(model_path.name + ".data"):
        total += extra.stat().st_size
    return total


def calibration_bytes(model_path: Path, num_classes: int) -> int:
    """Lower bound of peak memory of ``quantize_image_graph`` on this image graph, views streamed one at a time.

    Measured on the paper-size graph (W = 0.72 GB of weights, N = 40 classes, 2026-11-29,
    ``benchmarks/results/calib_memory_2026-11-29.md``): 6.15 GiB (9.1 W), the same at 8, 32 and 64
    views; about 2 W for the model (the session's copy and the writer's) and the rest one view's
    activations, which grow with the classes. The estimate, ``2 W + N * W / 7``, is 85% of that figure
    at N = 40: a host below it would be stopped by the out-of-memory killer anyway. The view count does
    not enter: views are streamed.
    """
    weights = model_bytes(model_path)
    return 2 * weights + num_classes * (weights // 7)


def autocast_bytes(model_path: Path, num_classes: int = 0) -> int:
    """Lower bound of peak memory of FP16 AutoCast with the streamed reference run (``export.fp16``).

    Measured on the paper-size image graph (W = 0.72 GB, N = 40, one view per batch, 2026-11-29):
    6.37 GiB after the first reference batch, 6.53 GiB for the whole conversion with two (9.7 W):
    AutoCast's copies of the model (sanitized, typed, serialized for the session, the session's own)
    and one view's inference. The estimate, ``3 W + N * W / 8``, is 83% of that figure at N = 40.
    """
    weights = model_bytes(model_path)
    return 3 * weights + num_classes * (weights // 8)


def require_memory(needed: int, what: str, *, hint: str = "") -> None:
    """Raise ``InsufficientMemoryError`` (one line) when clearly less than ``needed`` bytes are available.

    Skipped where available memory is unknown or ``GSNET_SKIP_MEMORY_CHECK=1``.
    """
    if os.environ.get(SKIP_ENV) == "1":
        return
    available = available_bytes()
    if available is None or available >= needed:
        return
    advice = hint or "close other programs or use a machine with more memory"
    raise InsufficientMemoryError(
        f"{what} needs at least {needed / GIB:.1f} GiB of memory but only {available / GIB:.1f} GiB is available "
        f"(MemAvailable / cgroup limit); {advice}, or set {SKIP_ENV}=1 to try anyway."
    )
