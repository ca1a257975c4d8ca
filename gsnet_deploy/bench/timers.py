"""Timers and timing statistics of the benchmarks: host wall clock, CUDA events, the fp16 matmul rate."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np

from gsnet_deploy.errors import GSNetError


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
