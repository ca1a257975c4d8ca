"""Check and time the fused cost-volume kernel of GSNet's QGFF (issue 4).

One script for a GPU machine (torch + triton, no TensorRT needed):

1. checks the Triton kernel against a float64 evaluation of ``cost_volume_reference`` at fp32
   and fp16 (output poisoned with NaN before each call);
2. times fp16, B = 5, H = W = 24, N in {6, 40, 150}: the Triton kernel, the unfused PyTorch ops
   (eager) and ``torch.compile`` of them (``triton.testing.do_bench``, L2 flushed between runs,
   warm-up excluded; median and p90);
3. measures the card's copy and write bandwidth and reports the bytes/flops floor of the op and
   the fraction of it each variant reaches;
4. writes ``kernel_cost_volume.json`` and ``kernel_cost_volume.md`` to ``--out`` and prints a table.

Usage::

    python benchmarks/kernel_cost_volume.py --out benchmarks/results
    python benchmarks/kernel_cost_volume.py --out /tmp/kcv --dry-run   # CPU, Triton interpreter

A failing variant is recorded with its error and the script goes on. ``--dry-run`` runs tiny
shapes on the CPU under ``TRITON_INTERPRET=1`` (timings there mean nothing).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

EMBED_DIM = 512
BATCH = 5
SIZE = 24
CLASS_COUNTS = (6, 40, 150)
WEIGHT_BYTES = 2 * (128 * 49 + 128) * 4  # fp32 conv weights + biases, both streams


@dataclass
class CheckResult:
    """Kernel vs float64 reference for one shape and dtype."""

    dtype: str
    shape: str  # "B,N,H,W"
    rel_err: float | None
    tol: float
    fully_written: bool | None
    passed: bool
    error: str | None = None


@dataclass
class TimingResult:
    """One variant at one class count."""

    variant: str
    n: int
    median_us: float | None  # do_bench: L2 flushed, includes CPU launch cost when that dominates
    p90_us: float | None
    graph_us: float | None  # CUDA-graph replay of 10 back-to-back calls, per call (GPU time only)
    floor_fraction: float | None  # floor time / graph time
    error: str | None = None


@dataclass
class Report:
    """Everything the script measured."""

    date: str
    command: str
    device: str
    versions: dict[str, str]
    dry_run: bool
    copy_bw_gbs: float | None = None
    write_bw_gbs: float | None = None
    floor: list[dict[str, float]] = field(default_factory=list)
    checks: list[CheckResult] = field(default_factory=list)
    timings: list[TimingResult] = field(default_factory=list)


def op_bytes(batch: int, n: int, size: int, elem: int = 2) -> int:
    """Minimum DRAM bytes: read both feature maps, the text and the weights, write the output."""
    hw = size * size
    read = 2 * batch * EMBED_DIM * hw * elem + n * EMBED_DIM * elem + WEIGHT_BYTES
    write = batch * n * 256 * hw * elem
    return read + write


def op_flops(batch: int, n: int, size: int) -> int:
    """Flops (multiply-add = 2): two cost-volume GEMMs plus two 7x7 1->128 convolutions."""
    hw = size * size
    cost = 2 * batch * n * hw * EMBED_DIM * 2
    conv = 2 * batch * n * 128 * hw * 49 * 2
    return cost + conv


def _short_error(exc: BaseException) -> str:
    last = traceback.format_exception_only(type(exc), exc)[-1].strip()
    return last[:500]


def make_inputs(torch: Any, batch: int, n: int, h: int, w: int, dtype: Any, device: str) -> tuple[Any, ...]:
    """Random inputs with realistic scales (features not normalized, small conv weights)."""
    gen = torch.Generator(device="cpu").manual_seed(1000 * batch + 10 * n + h)
    e_clip = torch.randn(batch, EMBED_DIM, h, w, generator=gen) * 2.0
    e_dino = torch.randn(batch, EMBED_DIM, h, w, generator=gen) + 0.5
    text = torch.randn(n, EMBED_DIM, generator=gen)
    w_clip = torch.randn(128, 1, 7, 7, generator=gen) * 0.2
    b_clip = torch.randn(128, generator=gen) * 0.1
    w_dino = torch.randn(128, 1, 7, 7, generator=gen) * 0.2
    b_dino = torch.randn(128, generator=gen) * 0.1
    return tuple(t.to(device=device, dtype=dtype) for t in (e_clip, e_dino, text, w_clip, b_clip, w_dino, b_dino))


def run_checks(torch: Any, device: str, dry_run: bool) -> list[CheckResult]:
    """Kernel vs float64 reference at fp32 and fp16; output poisoned before each call."""
    from gsnet_deploy.kernels.cost_volume import cost_volume_reference
    from gsnet_deploy.kernels.triton_cost_volume import cost_volume_triton

    shapes = [(2, 3, 7, 9), (1, 17, 5, 6)] if dry_run else [(2, 7, 24, 24), (1, 3, 13, 17), (5, 40, 24, 24)]
    results = []
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
        for batch, n, h, w in shapes:
            shape = f"{batch},{n},{h},{w}"
            try:
                inputs = make_inputs(torch, batch, n, h, w, dtype, device)
                out = torch.full((batch * n, 256, h, w), float("nan"), dtype=dtype, device=device)
                cost_volume_triton(*inputs, out=out)
                ref = cost_volume_reference(*(t.double() for t in inputs))
                written = bool(torch.isfinite(out).all().item())
                rel = float(((out.double() - ref).norm() / ref.norm()).item())
                results.append(CheckResult(str(dtype), shape, rel, tol, written, written and rel <= tol))
            except Exception as exc:
                results.append(CheckResult(str(dtype), shape, None, tol, None, False, _short_error(exc)))
    return results


def _bench(torch: Any, fn: Callable[[], Any], device: str, dry_run: bool) -> list[float]:
    """Per-call times in ms (warm-up excluded)."""
    if dry_run or device == "cpu":
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return times
    import triton.testing

    times = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="all")
    return list(times)


GRAPH_CALLS = 10


def _bench_graph(torch: Any, fn: Callable[[], Any]) -> float:
    """GPU time per call in us: CUDA-graph replay of GRAPH_CALLS calls, median of 20 replays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_CALLS):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(20):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / GRAPH_CALLS)
    del graph
    return statistics.median(times)


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


def measure_bandwidth(torch: Any) -> tuple[float, float]:
    """Device copy and write bandwidth in GB/s (1 GiB buffers, median of do_bench)."""
    import triton.testing

    numel = 1 << 28  # 1 GiB of fp32
    bufs = [torch.empty(numel, dtype=torch.float32, device="cuda").uniform_(), torch.empty(numel, device="cuda")]
    copy_ms = triton.testing.do_bench(lambda: bufs[1].copy_(bufs[0]), warmup=10, rep=50, return_mode="median")
    write_ms = triton.testing.do_bench(lambda: bufs[1].fill_(1.0), warmup=10, rep=50, return_mode="median")
    nbytes = numel * 4
    bufs.clear()
    torch.cuda.empty_cache()
    return 2 * nbytes / copy_ms / 1e6, nbytes / write_ms / 1e6


def _time_variant(
    torch: Any, name: str, n: int, fn: Callable[[], Any], device: str, dry_run: bool, floor_us: dict[int, float]
) -> TimingResult:
    """do_bench and CUDA-graph times of one variant; a failure is recorded, not raised."""
    errors = []
    med = p90 = graph_us = None
    with torch.no_grad():
        try:
            times = _bench(torch, fn, device, dry_run)
            med, p90 = statistics.median(times) * 1e3, _p90(times) * 1e3
        except Exception as exc:
            errors.append(f"do_bench: {_short_error(exc)}")
        if device == "cuda":
            try:
                graph_us = _bench_graph(torch, fn)
            except Exception as exc:
                errors.append(f"graph: {_short_error(exc)}")
    frac = floor_us[n] / graph_us if graph_us and n in floor_us else None
    return TimingResult(name, n, med, p90, graph_us, frac, "; ".join(errors) or None)


def run_timings(torch: Any, device: str, dry_run: bool, floor_us: dict[int, float]) -> list[TimingResult]:
    """Triton kernel vs eager unfused ops vs torch.compile of them, fp16."""
    from gsnet_deploy.kernels.cost_volume import cost_volume_reference
    from gsnet_deploy.kernels.triton_cost_volume import cost_volume_triton

    batch, size = (1, 6) if dry_run else (BATCH, SIZE)
    counts = (2, 3) if dry_run else CLASS_COUNTS
    dtype = torch.float32 if device == "cpu" else torch.float16
    compiled: Callable[..., Any] | None = None
    compile_error: str | None = None
    if not dry_run:
        try:
            compiled = torch.compile(cost_volume_reference, dynamic=False)
        except Exception as exc:
            compile_error = _short_error(exc)
    results = []
    for n in counts:
        inputs = make_inputs(torch, batch, n, size, size, dtype, device)
        variants: dict[str, Callable[[], Any] | None] = {
            "triton": lambda inputs=inputs: cost_volume_triton(*inputs),
            "eager": lambda inputs=inputs: cost_volume_reference(*inputs),
        }
        if not dry_run:
            variants["torch.compile"] = None if compiled is None else (lambda inputs=inputs: compiled(*inputs))
        for name, fn in variants.items():
            if fn is None:
                results.append(TimingResult(name, n, None, None, None, None, compile_error))
                continue
            results.append(_time_variant(torch, name, n, fn, device, dry_run, floor_us))
        del inputs
    return results


TUNING_CONFIGS = ((4, 2), (8, 1), (8, 2), (8, 3))  # (num_warps, num_stages)


def run_tuning(torch: Any, floor_us: dict[int, float], n: int = 40) -> list[TimingResult]:
    """Time the kernel's launch configurations at one class count (fp16, B=5, 24x24)."""
    from gsnet_deploy.kernels.triton_cost_volume import cost_volume_triton

    inputs = make_inputs(torch, BATCH, n, SIZE, SIZE, torch.float16, "cuda")
    results = []
    for num_warps, num_stages in TUNING_CONFIGS:
        name = f"triton[w{num_warps},s{num_stages}]"

        def fn(num_warps: int = num_warps, num_stages: int = num_stages) -> Any:
            return cost_volume_triton(*inputs, num_warps=num_warps, num_stages=num_stages)

        results.append(_time_variant(torch, name, n, fn, "cuda", False, floor_us))
    return results


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_markdown(report: Report) -> str:
    """The report as a markdown page."""
    lines = [
        "# Fused cost-volume kernel (QGFF front end)",
        "",
        f"- date: {report.date}",
        f"- device: {report.device}",
        f"- command: `{report.command}`",
        f"- versions: {', '.join(f'{k} {v}' for k, v in report.versions.items())}",
        f"- bandwidth: copy {_fmt(report.copy_bw_gbs, '.0f')} GB/s, write {_fmt(report.write_bw_gbs, '.0f')} GB/s",
        "- timing in us: `graph` = GPU time per call from CUDA-graph replay of 10 back-to-back calls",
        "  (median of 20 replays; the way the torch backend runs); `do_bench` = triton.testing.do_bench",
        "  median/p90 with the L2 flushed before each call (includes Python launch cost where it",
        "  exceeds the GPU time); floor = op bytes / measured copy bandwidth; fraction = floor / graph",
        "",
        "## Correctness (kernel vs float64 reference, output poisoned with NaN)",
        "",
        "| dtype | B,N,H,W | rel. L2 error | tolerance | fully written | pass |",
        "|---|---|---|---|---|---|",
    ]
    for c in report.checks:
        lines.append(
            f"| {c.dtype} | {c.shape} | {_fmt(c.rel_err, '.2e')} | {c.tol:.0e} | {c.fully_written} | "
            f"{'yes' if c.passed else 'NO ' + (c.error or '')} |"
        )
    lines += ["", "## Floor (fp16, B=5, H=W=24)", "", "| N | MB moved | GFLOP | floor us |", "|---|---|---|---|"]
    for f in report.floor:
        lines.append(f"| {int(f['n'])} | {f['bytes'] / 1e6:.2f} | {f['flops'] / 1e9:.2f} | {_fmt(f.get('floor_us'), '.1f')} |")
    lines += [
        "",
        "## Timings (fp16, B=5, H=W=24)",
        "",
        "| variant | N | graph us | do_bench median us | do_bench p90 us | floor fraction | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in report.timings:
        lines.append(
            f"| {t.variant} | {t.n} | {_fmt(t.graph_us, '.1f')} | {_fmt(t.median_us, '.1f')} | "
            f"{_fmt(t.p90_us, '.1f')} | {_fmt(t.floor_fraction, '.2f')} | {t.error or ''} |"
        )
    lines += ["", "## Speed-up of the kernel over the best unfused variant (graph times)", ""]
    for n in sorted({t.n for t in report.timings}):
        row = {t.variant: t.graph_us for t in report.timings if t.n == n}
        others = [v for k, v in row.items() if not k.startswith("triton") and v is not None]
        kern = row.get("triton")
        if kern and others:
            lines.append(f"- N={n}: {min(others) / kern:.2f}x")
    return "\n".join(lines) + "\n"


def print_table(report: Report) -> None:
    """Short summary on stdout."""
    print(f"\ndevice: {report.device}   copy {_fmt(report.copy_bw_gbs, '.0f')} GB/s")
    for c in report.checks:
        status = "ok" if c.passed else f"FAIL {c.error or ''}"
        print(f"check {c.dtype:14s} {c.shape:12s} rel_err {_fmt(c.rel_err, '.2e')} (tol {c.tol:.0e}) {status}")
    print(f"{'variant':14s} {'N':>4s} {'graph us':>9s} {'do_bench us':>11s} {'p90 us':>9s} {'floor frac':>10s}")
    for t in report.timings:
        print(
            f"{t.variant:14s} {t.n:4d} {_fmt(t.graph_us, '9.1f')} {_fmt(t.median_us, '11.1f')} "
            f"{_fmt(t.p90_us, '9.1f')} {_fmt(t.floor_fraction, '10.2f')} {t.error or ''}"
        )


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run checks and timings, write the report; exit 1 when a check fails."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON and markdown reports")
    parser.add_argument(
        "--dry-run",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="tiny shapes on the CPU with TRITON_INTERPRET=1 (checks the script, not the GPU)",
    )
    args = parser.parse_args(argv)
    if args.dry_run:
        # NOTE: must be set before triton is first imported (the kernel module imports it).
        os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch
    import triton

    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    if device == "cpu" and not args.dry_run:
        print("no CUDA device found; run with --dry-run to check the script on the CPU", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    report = Report(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command="python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        device=torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or 'unknown'})",
        versions={"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()},
        dry_run=args.dry_run,
    )
    if device == "cuda":
        try:
            report.copy_bw_gbs, report.write_bw_gbs = measure_bandwidth(torch)
        except Exception as exc:
            print(f"bandwidth measurement failed: {_short_error(exc)}", file=sys.stderr)
    floor_us: dict[int, float] = {}
    for n in CLASS_COUNTS:
        entry: dict[str, float] = {"n": n, "bytes": op_bytes(BATCH, n, SIZE), "flops": op_flops(BATCH, n, SIZE)}
        if report.copy_bw_gbs:
            floor_us[n] = entry["bytes"] / (report.copy_bw_gbs * 1e3)
            entry["floor_us"] = floor_us[n]
        report.floor.append(entry)
    report.checks = run_checks(torch, device, args.dry_run)
    print(f"checks done after {time.perf_counter() - t_start:.1f} s", flush=True)
    report.timings = run_timings(torch, device, args.dry_run, floor_us)
    if device == "cuda":
        report.timings += run_tuning(torch, floor_us)
    print(f"timings done after {time.perf_counter() - t_start:.1f} s", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = "kernel_cost_volume_dryrun" if args.dry_run else "kernel_cost_volume"
    _write_atomic(args.out / f"{stem}.json", json.dumps(asdict(report), indent=2) + "\n")
    _write_atomic(args.out / f"{stem}.md", render_markdown(report))
    print_table(report)
    print(f"wrote {args.out / stem}.json and .md")
    return 0 if all(c.passed for c in report.checks) else 1


if __name__ == "__main__":
    sys.exit(main())
