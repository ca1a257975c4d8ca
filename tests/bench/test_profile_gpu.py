"""Tests of benchmarks/profile_gpu.py (stage attribution, the ranges' cleanup, a CPU smoke run) and device_check.sh."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from collections import namedtuple
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.autograd import DeviceType

from gsnet_deploy.model import build_gsnet, tiny_cfg

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "profile_gpu.py"
_spec = importlib.util.spec_from_file_location("profile_gpu", _PATH)
assert _spec is not None and _spec.loader is not None
profile_gpu = importlib.util.module_from_spec(_spec)
sys.modules["profile_gpu"] = profile_gpu
_spec.loader.exec_module(profile_gpu)

Kernel = namedtuple("Kernel", ["name", "device", "duration"])


@dataclass
class FakeEvent:
    """The fields of ``torch.autograd.profiler_util.FunctionEvent`` that the attribution reads."""

    name: str
    cpu_parent: FakeEvent | None = None
    kernels: list[Any] = field(default_factory=list)
    self_cpu_time_total: float = 0.0
    device_type: DeviceType = DeviceType.CPU
    time_range: Any = None


def _events() -> list[FakeEvent]:
    qgff = FakeEvent("qgff", kernels=[Kernel("qgff", 0, 100.0)], self_cpu_time_total=1.0)  # range + its GPU span
    conv = FakeEvent("aten::conv2d", qgff, self_cpu_time_total=2.0)
    inner = FakeEvent("aten::cudnn_convolution", conv, [Kernel("sm90_conv", 0, 10.0)], self_cpu_time_total=4.0)
    triton = FakeEvent("cuLaunchKernel", qgff, [Kernel("cost_volume_kernel", 0, 5.0)], self_cpu_time_total=8.0)
    ripd = FakeEvent("ripd", self_cpu_time_total=16.0)
    up = FakeEvent("aten::upsample", ripd, [Kernel("upsample_kernel", 0, 7.0)], self_cpu_time_total=32.0)
    outside = FakeEvent("aten::sub", None, [Kernel("elementwise", 0, 3.0)], self_cpu_time_total=64.0)
    device_copy = FakeEvent("sm90_conv", None, [Kernel("sm90_conv", 0, 10.0)], device_type=DeviceType.CUDA)
    return [qgff, conv, inner, triton, ripd, up, outside, device_copy]


def test_attribute_device_counts_each_kernel_once_in_its_innermost_stage() -> None:
    """Bugs: kernels of nested ops lost or given to ``other``; a range's GPU span or a device event counted again."""
    out = profile_gpu.attribute(_events(), ["clip", "qgff", "ripd"], device=True)
    assert out["qgff"].time_us == 15.0  # 10 (nested conv) + 5 (Triton launch directly under the range)
    assert dict(out["qgff"].kernels) == {"sm90_conv": 10.0, "cost_volume_kernel": 5.0}
    assert out["ripd"].time_us == 7.0
    assert out["other"].time_us == 3.0
    assert out["clip"].time_us == 0.0
    assert sum(s.time_us for s in out.values()) == 25.0  # every launched kernel once, nothing else


def test_attribute_cpu_sums_self_time_of_ops_not_ranges() -> None:
    """Bug: the ranges' own self time counted as an op (it is the hooks' overhead, not the model's)."""
    out = profile_gpu.attribute(_events(), ["qgff", "ripd"], device=False)
    assert out["qgff"].time_us == 2.0 + 4.0 + 8.0
    assert out["ripd"].time_us == 32.0
    assert out["other"].time_us == 64.0


def test_kernel_totals_skip_ranges_and_device_copies() -> None:
    """Bug: the top-kernel table led by a stage's whole span, or each kernel listed twice."""
    totals = profile_gpu.kernel_totals(_events(), exclude=["qgff", "ripd"])
    assert totals == {"sm90_conv": 10.0, "cost_volume_kernel": 5.0, "upsample_kernel": 7.0, "elementwise": 3.0}


def test_kernel_totals_device_side_reads_device_events_only() -> None:
    """Bug: a CUDA-graph replay (kernels linked to no host op) listed as empty, or host ops summed as kernels."""
    span = namedtuple("span", ["elapsed_us"])
    events = [
        FakeEvent("cudaGraphLaunch", kernels=[Kernel("ignored", 0, 99.0)]),
        FakeEvent("sm90_gemm", device_type=DeviceType.CUDA, time_range=span(lambda: 4.0)),
        FakeEvent("sm90_gemm", device_type=DeviceType.CUDA, time_range=span(lambda: 6.0)),
        FakeEvent("graph_replay", device_type=DeviceType.CUDA, time_range=span(lambda: 50.0)),
    ]
    assert profile_gpu.kernel_totals(events, exclude=["graph_replay"], device_side=True) == {"sm90_gemm": 10.0}


def test_stage_ranges_leave_the_model_as_it_was() -> None:
    """Bug: hooks or method wrappers left behind (they would run inside a later CUDA-graph capture)."""
    model = build_gsnet(tiny_cfg())
    hooks = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())  # noqa: E731
    before = hooks()
    with profile_gpu.stage_ranges(model):
        assert hooks() == before + 2 * sum(isinstance(t, torch.nn.Module) for _, t in profile_gpu.stage_targets(model))
        assert "decode" in vars(model.decoder) and "forward_intermediates" in vars(model.dino)
    assert hooks() == before
    assert "decode" not in vars(model.decoder) and "forward_intermediates" not in vars(model.dino)


@pytest.mark.timeout(600)
def test_cpu_smoke_mode_writes_a_report_with_every_stage(tmp_path: Path) -> None:
    """Bugs: a stage whose range never opens (e.g. a method GSNet calls directly, like DINO's), a broken report."""
    rc = profile_gpu.main(["--device", "cpu", "--size", "tiny", "--classes", "2", "--iters", "1", "--out", str(tmp_path)])
    assert rc == 0
    report = json.loads((tmp_path / "profile_gpu.json").read_text())
    assert report["card"]["torch"] == torch.__version__ and report["size"] == "tiny"
    assert "--size tiny" in report["command"] and report["date"]
    (run,) = report["runs"]
    assert run["classes"] == 2 and run["precision"] == "fp32"
    stages = run["stages"]
    expected = ["clip", "dino", "projections", "qgff", "agg0.spatial", "agg0.class", "agg1.spatial", "agg1.class", "ripd"]
    expected.append("other")
    assert list(stages) == expected
    for name in expected[:-1]:
        assert stages[name]["us"] > 0, name
        assert stages[name]["top"], name
    assert sum(s["share"] for s in stages.values()) == pytest.approx(1.0)
    # the stages hold nearly all the op time: the hooks cover the model, not just a corner of it
    assert stages["other"]["share"] < 0.2
    markdown = (tmp_path / "profile_gpu.md").read_text()
    assert "| agg1.class |" in markdown and "## N=2" in markdown


# --- benchmarks/device_check.sh: its control flow, without a GPU

_SCRIPT = _PATH.parent / "device_check.sh"
_STEPS = [
    "card", "setup", "tests", "profile", "torch_paths", "protocol", "batch_images",
    "trt_protocol", "kernel_bench", "tiled_blend", "requery", "targets",
]  # fmt: skip


def _run_check(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], str]:
    out = tmp_path / "out"
    full = {**os.environ, "OUT": str(out), "DEVICE_CHECK_WORK": str(tmp_path / "work"), **env}
    proc = subprocess.run(["bash", str(_SCRIPT)], cwd=_PATH.parents[1], env=full, capture_output=True, text=True, timeout=120)
    summary = (out / "summary.txt").read_text() if (out / "summary.txt").exists() else ""
    return proc, summary


def _status(summary: str) -> dict[str, str]:
    return {line.split()[0]: line.split()[1] for line in summary.splitlines() if line.split() and line.split()[0] in _STEPS}


def test_device_check_parses_and_dry_run_lists_every_step(tmp_path: Path) -> None:
    """Bugs: a syntax error found only on the lent machine; a dry run that runs or writes something."""
    assert subprocess.run(["bash", "-n", str(_SCRIPT)]).returncode == 0
    proc, _ = _run_check(tmp_path, DRY_RUN="1", PYTHON="/bin/false")
    assert proc.returncode == 0, proc.stderr
    assert re.findall(r"^step (\w+)", proc.stdout, re.M) == _STEPS
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


def test_device_check_continues_past_failing_steps(tmp_path: Path) -> None:
    """Bug: the first failing step ends the check (set -e style), or a failure is reported as a pass."""
    proc, summary = _run_check(tmp_path, PYTHON="/bin/false")
    assert proc.returncode == 1
    status = _status(summary)
    assert set(status) == set(_STEPS)
    assert all(status[s] == "FAIL" for s in _STEPS if s != "trt_protocol") and status["trt_protocol"] == "SKIP"
    assert (tmp_path / "out" / "device_check.log").exists() and (tmp_path / "out" / "all.tar.gz").exists()


def test_device_check_times_out_a_step_and_skips_past_the_budget(tmp_path: Path) -> None:
    """Bugs: a hung step eats the whole lease; steps started with no budget left (the device call is killed)."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nsleep 60\n")
    fake.chmod(0o755)
    proc, summary = _run_check(tmp_path, PYTHON=str(fake), ONLY="setup tests", DEVICE_CHECK_BUDGET="8",
                               DEVICE_CHECK_MIN_STEP="2")  # fmt: skip
    assert proc.returncode == 1
    assert _status(summary) == {"setup": "TIMEOUT", "tests": "SKIP"}, summary


def test_device_check_targets_read_the_reports(tmp_path: Path) -> None:
    """Bugs: a target compared the wrong way round or read from the wrong key, so a miss reads as MET."""
    work = tmp_path / "work"
    (work / "profile").mkdir(parents=True)
    (work / "torch_paths").mkdir()
    runs = [{"classes": 6, "graph": {"median_ms": 9.5}}, {"classes": 40, "graph": {"median_ms": 12.0}}]
    (work / "profile" / "profile_gpu.json").write_text(json.dumps({"runs": runs}))
    paths = {"N=40": {"ours fp16 kernel + CUDA graphs": {"median_ms": 13.5, "rel_l2_vs_fp32": 2e-2}}}
    (work / "torch_paths" / "gpu_torch_paths.json").write_text(json.dumps({"runs": paths}))
    proc, summary = _run_check(tmp_path, PYTHON=sys.executable, ONLY="targets")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = {re.sub(r"\s+", " ", line.strip()) for line in summary.splitlines()}
    assert "profile N=6 graph 9.50 ms target <= 9.0 ms NOT MET" in lines
    assert "profile N=40 graph 12.00 ms target <= 13.0 ms MET" in lines
    assert "torch_paths N=40 graph 13.50 ms target <= 13.0 ms NOT MET" in lines
    assert "torch_paths N=40 fp16 rel. L2 vs fp32 2.0e-02 target <= 1e-2 NOT MET" in lines
