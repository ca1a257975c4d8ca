"""Where the image graph's time goes: a per-stage profile of the torch path (issue 17, item 1).

Runs the torch image graph (paper protocol: 5 views of 384 px, N classes, demo weights) under
``torch.profiler`` with one ``record_function`` range per stage, entered and left by forward hooks
(or instance-level method wrappers) that this script installs and removes; the model code carries
no ranges. Stages: CLIP, DINO, projections (guidance, appearance, text, E_S), QGFF, each aggregator
layer's spatial (Swin pair) and class attention, RIPD; time outside them is ``other``.

On CUDA (fp16): the per-stage GPU kernel time and the top kernels of each stage come from the eager
fp16 run (ranges need eager launches); the CUDA-graph replay is then timed with CUDA events and
profiled for its kernel list alone (a replay has no host ops to attribute kernels to). On the CPU
(``--device cpu``, fp32, no graphs) the same report holds self CPU time of the ops: a smoke mode
that keeps the script working without a GPU, not a measurement.

Usage: python benchmarks/profile_gpu.py --out DIR [--classes 6 40] [--iters 20]
       python benchmarks/profile_gpu.py --device cpu --size tiny --classes 6 --iters 1 --out DIR
Writes ``DIR/profile_gpu.json`` and ``DIR/profile_gpu.md`` (card, versions, date and command included).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from gsnet_deploy.bench.timers import time_cuda, time_host, timing_stats
from gsnet_deploy.contracts.atomic import AtomicFiles
from gsnet_deploy.contracts.model_size import ModelSize
from gsnet_deploy.errors import GSNetError
from gsnet_deploy.model import GSNet, build_gsnet, cfg_for
from gsnet_deploy.model.aggregator import AggregatorLayer
from gsnet_deploy.model.torch_backend import TorchBackend, TorchPrecision, pick_device

OTHER = "other"
TOP_KERNELS = 8  # kernels listed per stage


@dataclass
class StageProfile:
    """Time attributed to one stage (microseconds) and its kernels (or ops, on the CPU)."""

    time_us: float = 0.0
    kernels: dict[str, float] = field(default_factory=lambda: defaultdict(float))


def stage_targets(model: GSNet) -> list[tuple[str, torch.nn.Module | tuple[object, str]]]:
    """Stages in execution order: a module (hooked) or an (object, method name) pair (wrapped)."""
    targets: list[tuple[str, torch.nn.Module | tuple[object, str]]] = [
        ("clip", model.clip_visual),
        ("dino", (model.dino, "forward_intermediates")),  # GSNet calls this method, not forward
    ]
    for name in ("dino_down", "clip_up1", "clip_up2", "dino_proj1", "dino_proj2", "appearance_proj", "text_proj"):
        targets.append(("projections", getattr(model, name)))
    targets.append(("projections", (model.decoder, "project_guidance")))
    targets.append(("qgff", model.qgff))
    for i, layer in enumerate(model.aggregator.layers):
        assert isinstance(layer, AggregatorLayer)
        targets.append((f"agg{i}.spatial", layer.swin))
        targets.append((f"agg{i}.class", layer.class_attn))
    targets.append(("ripd", (model.decoder, "decode")))
    return targets


def stage_names(model: GSNet) -> list[str]:
    """Unique stage names in execution order, then ``other``."""
    names = list(dict.fromkeys(name for name, _ in stage_targets(model)))
    return [*names, OTHER]


@contextmanager
def stage_ranges(model: GSNet) -> Iterator[None]:
    """Open a ``record_function`` range around every stage while inside; leaves the model as it was."""
    handles: list[Any] = []
    wrapped: list[tuple[object, str]] = []
    for name, target in stage_targets(model):
        if isinstance(target, torch.nn.Module):
            stack: list[record_function] = []

            def pre(_m: object, _a: object, name: str = name, stack: list[record_function] = stack) -> None:
                rf = record_function(name)
                rf.__enter__()
                stack.append(rf)

            def post(_m: object, _a: object, _o: object, stack: list[record_function] = stack) -> None:
                stack.pop().__exit__(None, None, None)

            handles += [target.register_forward_pre_hook(pre), target.register_forward_hook(post)]
        else:
            obj, method = target
            original = getattr(obj, method)

            def wrapper(*a: Any, name: str = name, fn: Callable[..., Any] = original, **kw: Any) -> Any:
                with record_function(name):
                    return fn(*a, **kw)

            setattr(obj, method, wrapper)  # instance attribute shadows the class method
            wrapped.append((obj, method))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for obj, method in wrapped:
            delattr(obj, method)


def _stage_of(event: Any, stages: set[str]) -> str:
    """Innermost stage range enclosing a host event (walking ``cpu_parent``), else ``other``."""
    node = event
    while node is not None:
        if node.name in stages:
            return node.name
        node = node.cpu_parent
    return OTHER


def attribute(events: Iterable[Any], stages: Iterable[str], device: bool) -> dict[str, StageProfile]:
    """Split profiled time by stage.

    Args:
        events: ``FunctionEvent``-like objects (``name``, ``cpu_parent``, ``kernels``, ``self_cpu_time_total``,
            ``device_type``); each kernel is counted once, on the host op that launched it.
        stages: stage range names.
        device: True: sum the device kernels each host op launched; False: sum the self CPU time of
            the ops (range events themselves excluded).

    Returns:
        Stage name (and ``other``) -> its time and per-kernel (per-op) time, in microseconds.
    """
    names = set(stages)
    out = {name: StageProfile() for name in [*names, OTHER]}
    for ev in events:
        if ev.device_type != DeviceType.CPU:
            continue  # device-side copies of kernels: counted through their launching host op
        stage = _stage_of(ev, names)
        if device:
            for k in ev.kernels:
                if k.name in names:
                    continue  # the GPU-side span of a range itself (gpu_user_annotation), not a kernel
                out[stage].time_us += k.duration
                out[stage].kernels[k.name] += k.duration
        elif ev.name not in names:
            out[stage].time_us += ev.self_cpu_time_total
            out[stage].kernels[ev.name] += ev.self_cpu_time_total
    return out


def kernel_totals(events: Iterable[Any], exclude: Iterable[str] = (), device_side: bool = False) -> dict[str, float]:
    """Device time per kernel name (microseconds).

    Args:
        events: ``FunctionEvent``-like objects.
        exclude: range names (their GPU-side spans are not kernels).
        device_side: sum the device events themselves (``time_range``) instead of the kernels linked to
            host ops; for a CUDA-graph replay, whose kernels need not link to any host op.
    """
    skip = set(exclude)
    totals: dict[str, float] = defaultdict(float)
    for ev in events:
        if device_side:
            if ev.device_type != DeviceType.CPU and ev.name not in skip:
                totals[ev.name] += ev.time_range.elapsed_us()
        elif ev.device_type == DeviceType.CPU:
            for k in ev.kernels:
                if k.name not in skip:
                    totals[k.name] += k.duration
    return dict(totals)


def card(device: torch.device) -> dict[str, Any]:
    """GPU name, driver and versions (or the CPU's), for the report's header."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.machine(),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        try:
            smi = ["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"]
            info["driver_clock_power"] = subprocess.run(smi, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            info["driver_clock_power"] = f"nvidia-smi failed: {exc}"
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
    else:
        info["gpu"] = None
        info["cpu"] = platform.processor() or platform.machine()
    return info


def _top(kernels: dict[str, float], total: float, n: int) -> list[dict[str, Any]]:
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1])[:n]
    return [{"name": k, "us": v, "share": v / total if total else 0.0} for k, v in ranked]


def profile_classes(model: GSNet, device: torch.device, n: int, iters: int, graphs: bool) -> dict[str, Any]:
    """Profile the image graph at ``n`` classes; returns the JSON entry of one N."""
    cuda = device.type == "cuda"
    gen = torch.Generator().manual_seed(n)
    images = (torch.rand(5, 3, 384, 384, generator=gen) * 255).to(device)  # [5, 3, 384, 384], never zeros
    text = torch.nn.functional.normalize(torch.randn(n, 512, generator=gen), dim=-1).to(device)  # [N, 512]
    precision = TorchPrecision.FP16 if cuda else TorchPrecision.FP32
    timer = (lambda fn: time_cuda(fn, iters, 3)) if cuda else (lambda fn: time_host(fn, iters, 0))
    names = stage_names(model)
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    entry: dict[str, Any] = {"classes": n, "precision": precision.value}
    with TorchBackend(model, device=str(device), precision=precision, cuda_graphs=False) as be:
        run = lambda: be.image.forward(images, text)  # noqa: E731
        entry["eager"] = timing_stats(timer(run))
        with stage_ranges(model):
            if cuda:
                run()  # warm (Triton compiles, cuBLAS heuristics, the hooks' first call) outside the profile
                torch.cuda.synchronize()
            with profile(activities=activities) as prof:
                run()
                if cuda:
                    torch.cuda.synchronize()
        events = prof.events()
        per_stage = attribute(events, names[:-1], device=cuda)
        total = sum(s.time_us for s in per_stage.values())
        entry["attributed_us"] = total
        entry["stages"] = {
            name: {"us": per_stage[name].time_us, "share": per_stage[name].time_us / total if total else 0.0,
                   "top": _top(per_stage[name].kernels, per_stage[name].time_us, TOP_KERNELS)}
            for name in names
        }  # fmt: skip
        if cuda:
            entry["eager_kernels_top"] = _top(kernel_totals(events, names), total, 20)
    if cuda and graphs:
        with TorchBackend(model, device=str(device), precision=precision, cuda_graphs=True) as be:
            run = lambda: be.image.forward(images, text)  # noqa: E731
            entry["graph"] = timing_stats(timer(run))
            with profile(activities=activities) as prof:
                with record_function("graph_replay"):
                    run()
                torch.cuda.synchronize()
            totals = kernel_totals(prof.events(), exclude=["graph_replay"], device_side=True)
            gsum = sum(totals.values())
            entry["graph_kernel_sum_us"] = gsum
            entry["graph_kernels_top"] = _top(totals, gsum, 20)
        torch.cuda.empty_cache()
    return entry


def format_markdown(report: dict[str, Any]) -> str:
    """The report as a short markdown page."""
    c = report["card"]
    lines = [
        "# Image graph profile (torch path, paper protocol: 5 views of 384 px)",
        "",
        f"- Device: {c.get('gpu') or 'CPU ' + str(c.get('cpu'))}; driver/clock/power: {c.get('driver_clock_power', '-')}; "
        f"torch {c['torch']}, CUDA {c.get('cuda', '-')}, Triton {c.get('triton', '-')}, Python {c['python']}.",
        f"- Date: {report['date']}. Model: {report['size']} config, demo weights. Command: `{report['command']}`",
        "- Stage times: device kernel time launched inside each stage's range (eager run; CPU: self op time).",
        "",
    ]
    for entry in report["runs"]:
        n = entry["classes"]
        eager = entry["eager"]["median_ms"]
        graph = entry.get("graph", {}).get("median_ms")
        lines.append(f"## N={n} ({entry['precision']})")
        lines.append("")
        lines.append(f"Eager median {eager:.2f} ms" + (f"; CUDA graph median {graph:.2f} ms" if graph else "")
                     + f"; attributed {entry['attributed_us'] / 1e3:.2f} ms.")  # fmt: skip
        lines += ["", "| stage | ms | share | top kernels (share of stage) |", "|---|---|---|---|"]
        for name, s in entry["stages"].items():
            tops = "; ".join(f"{k['name'][:60]} {k['share']:.0%}" for k in s["top"][:3])
            lines.append(f"| {name} | {s['us'] / 1e3:.3f} | {s['share']:.1%} | {tops} |")
        if "graph_kernels_top" in entry:
            lines += ["", "CUDA-graph replay, top kernels:", "", "| kernel | us | share |", "|---|---|---|"]
            lines += [f"| {k['name'][:90]} | {k['us']:.1f} | {k['share']:.1%} |" for k in entry["graph_kernels_top"][:12]]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Profile and write ``profile_gpu.json`` and ``profile_gpu.md`` under ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda", help="cuda (fp16 + CUDA graphs) or cpu (fp32 smoke mode)")
    parser.add_argument("--size", type=ModelSize, choices=list(ModelSize), default=ModelSize.PAPER)
    parser.add_argument("--classes", type=int, nargs="+", default=[6, 40])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph replay")
    args = parser.parse_args(argv)
    try:
        device = pick_device(args.device)
        if args.iters < 1:
            raise GSNetError("--iters must be 1 or more")
        model = build_gsnet(cfg_for(args.size))
        report: dict[str, Any] = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python", "benchmarks/profile_gpu.py", *(argv if argv is not None else sys.argv[1:])]),
            "card": card(device),
            "size": args.size.value,
            "weights": model.digest,
            "runs": [],
        }
        for n in args.classes:
            entry = profile_classes(model, device, n, args.iters, graphs=not args.no_graphs)
            report["runs"].append(entry)
            print(f"N={n}: eager {entry['eager']['median_ms']:.2f} ms"
                  + (f", graph {entry['graph']['median_ms']:.2f} ms" if "graph" in entry else ""), flush=True)  # fmt: skip
    except GSNetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    markdown = format_markdown(report)
    with AtomicFiles() as files:  # both files appear together or not at all
        files.part(args.out / "profile_gpu.json").write_text(json.dumps(report, indent=2))
        files.part(args.out / "profile_gpu.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
