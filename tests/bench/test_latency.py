"""Tests of ``gsnet bench latency``: statistics, floors, variant discovery, report writing, a tiny CPU run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from gsnet_deploy.bench.host import PeakRss, tensorrt_problem
from gsnet_deploy.bench.latency import discover_variants, run_latency
from gsnet_deploy.bench.latency_options import HostCaps, LatencyOptions
from gsnet_deploy.bench.latency_report import LatencyReport, add_efficiency, format_markdown, output_stem, write_report
from gsnet_deploy.bench.timers import floor_ms, timing_stats
from gsnet_deploy.contracts.model_size import ModelSize
from gsnet_deploy.errors import BackendError, GSNetError

# onnxruntime-gpu on a host without a GPU: the CUDA provider is built in, no device to run it
CPU_CAPS = HostCaps(cuda=False, ort_providers=("CUDAExecutionProvider", "CPUExecutionProvider"), ort_cuda_devices=0,
                    tensorrt="no --engine DIR given", triton=True)  # fmt: skip
GPU_CAPS = HostCaps(cuda=True, ort_providers=("CUDAExecutionProvider", "CPUExecutionProvider"), ort_cuda_devices=1,
                    tensorrt=None, triton=True)  # fmt: skip


@pytest.mark.parametrize(
    ("times", "median", "p90"),
    [
        ([5.0, 1.0, 3.0, 2.0, 4.0], 3.0, 5.0),  # nearest rank: ceil(0.9 * 5) = 5th smallest
        ([10.0], 10.0, 10.0),
        ([4.0, 1.0, 2.0, 3.0], 2.5, 4.0),  # ceil(3.6) = 4th
        (list(range(1, 21)), 10.5, 18.0),  # ceil(18.0) = 18th
    ],
)
def test_timing_stats_median_and_p90(times: list[float], median: float, p90: float) -> None:
    stats = timing_stats(times)
    assert stats["median_ms"] == pytest.approx(median, rel=0, abs=1e-12)
    assert stats["p90_ms"] == pytest.approx(p90, rel=0, abs=1e-12)
    assert stats["min_ms"] == min(times)
    assert stats["n"] == len(times)


def test_timing_stats_empty_raises() -> None:
    with pytest.raises(GSNetError, match="no timings"):
        timing_stats([])


def test_floor_ms_hand_worked() -> None:
    # 1,000 GMAC = 2e12 FLOP at 1,000 TFLOP/s = 1e15 FLOP/s -> 2e-3 s
    assert floor_ms(1000.0, 1000.0) == pytest.approx(2.0, rel=1e-12)
    # the H100 numbers of design.md: 2,260.26 GMAC (N=40) at 693 TFLOP/s
    assert floor_ms(2260.26, 693.0) == pytest.approx(2 * 2260.26e9 / 693e12 * 1e3, rel=1e-12)


def test_discover_variants_cpu_host(tmp_path: Path) -> None:
    runnable, missing = discover_variants(LatencyOptions(onnx_dir=tmp_path), CPU_CAPS)
    assert [v.name for v in runnable] == ["torch fp32 cpu", "onnxruntime fp32 cpu"]
    assert all(v.device == "cpu" for v in runnable)
    reasons = {u.name: u.reason for u in missing}
    assert reasons["onnxruntime fp32 cuda"] == "no CUDA device"
    assert sum("torch fp16 cuda" in name for name in reasons) == 4
    assert reasons["tensorrt"] == "no --engine DIR given"


def test_discover_variants_cpu_only_onnxruntime(tmp_path: Path) -> None:
    caps = HostCaps(cuda=False, ort_providers=("CPUExecutionProvider",), ort_cuda_devices=0, tensorrt="x", triton=False)
    _, missing = discover_variants(LatencyOptions(onnx_dir=tmp_path), caps)
    assert {u.name: u.reason for u in missing}["onnxruntime fp32 cuda"] == "this onnxruntime has no CUDAExecutionProvider"


def test_discover_variants_torch_free_host(tmp_path: Path) -> None:
    caps = HostCaps(cuda=False, ort_providers=("CPUExecutionProvider",), ort_cuda_devices=1, tensorrt=None, triton=False,
                    torch=False)  # fmt: skip
    runnable, missing = discover_variants(LatencyOptions(onnx_dir=tmp_path, engine_dirs=(tmp_path,)), caps)
    assert [v.engine.value for v in runnable] == ["onnxruntime", "tensorrt"]
    assert [u.name for u in missing if "torch" in u.name] == ["torch"]


def test_discover_variants_without_onnx_dir() -> None:
    runnable, missing = discover_variants(LatencyOptions(), CPU_CAPS)
    assert [v.name for v in runnable] == ["torch fp32 cpu"]
    assert any(u.name == "onnxruntime" and "--onnx" in u.reason for u in missing)


def test_discover_variants_gpu_host(tmp_path: Path) -> None:
    runnable, missing = discover_variants(LatencyOptions(onnx_dir=tmp_path, engine_dirs=(tmp_path,)), GPU_CAPS)
    names = [v.name for v in runnable]
    assert names[0] == "torch fp32 cuda"
    assert "onnxruntime fp32 cuda" in names
    fp16 = [v for v in runnable if v.precision == "fp16"]
    assert {(v.kernel, v.cuda_graphs) for v in fp16} == {(True, True), (True, False), (False, True), (False, False)}
    assert sum(v.engine.value == "tensorrt" for v in runnable) == 1
    assert missing == []


def test_discover_variants_no_triton_drops_kernel_variants() -> None:
    caps = HostCaps(cuda=True, ort_providers=None, ort_cuda_devices=1, tensorrt="TensorRT is not installed", triton=False)
    runnable, missing = discover_variants(LatencyOptions(), caps)
    assert all(not v.kernel for v in runnable)
    assert sum(u.reason == "Triton is not installed" for u in missing) == 2


def test_tensorrt_problem_on_this_host() -> None:
    try:
        import tensorrt

        real = hasattr(tensorrt, "Builder")
    except ImportError:
        real = False
    assert (tensorrt_problem() is None) == (real and _has_module("cuda"))


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_peak_rss_sees_a_large_allocation() -> None:
    rss = PeakRss()
    block = np.ones(64 << 20, dtype=np.uint8)  # 64 MiB, touched
    assert int(block[::4096].sum()) == (64 << 20) // 4096
    peak = rss.peak()
    del block
    assert peak["delta_mib"] >= 48.0, peak
    if peak["method"] == "VmHWM":
        assert peak["peak_mib"] >= peak["delta_mib"]


def _synthetic_report() -> LatencyReport:
    entry = {
        "image": {"median_ms": 30.0, "p90_ms": 33.0, "min_ms": 29.0, "n": 3},
        "graph": {"median_ms": 20.0, "p90_ms": 22.0, "min_ms": 19.0, "n": 3, "timer": "CUDA events"},
        "text_encoder_once_ms": 5.0,
        "stages_median_ms": {"preprocess": 2.0, "image_graph": 21.0, "merge": 7.0},
    }
    variant = {"engine": "torch", "device": "cuda", "precision": "fp16", "paper": {"N=6": entry},
               "tiled": {"median_ms": 40.0, "p90_ms": 41.0, "min_ms": 39.0, "n": 3, "views_per_s": 200.0},
               "host_memory": {"peak_mib": 1000.0, "delta_mib": 500.0, "method": "VmHWM"},
               "device_memory_peak_mib": 2048.0}  # fmt: skip
    return LatencyReport(
        date="2026-11-27", command="gsnet bench latency", model="paper", weights="demo weights",
        host={"cpu": "Test CPU", "cores": 2, "torch_threads": 2, "versions": {"torch": "x"}, "gpu": "NVIDIA Test GPU 80GB"},
        classes=[6], protocol="paper", variants={"torch fp16 cuda": variant}, unavailable={"tensorrt": "not here"},
        executed_gmacs_per_image={"N=6": 1000.0}, matmul_fp16_tflops=500.0,
    )  # fmt: skip


def test_add_efficiency_hand_worked() -> None:
    report = _synthetic_report()
    add_efficiency(report)
    entry = report.variants["torch fp16 cuda"]["paper"]["N=6"]
    # 1,000 GMAC = 2e12 FLOP at 5e14 FLOP/s = 4 ms; graph median 20 ms -> 20 %
    assert entry["floor_ms"] == pytest.approx(4.0, rel=1e-12)
    assert entry["fraction_of_floor"] == pytest.approx(0.2, rel=1e-12)


def test_markdown_rows_and_files_written_atomically(tmp_path: Path) -> None:
    report = _synthetic_report()
    add_efficiency(report)
    text = format_markdown(report)
    assert "| torch fp16 cuda | 6 | 30.0 | 33.0 | 20.0 | 22.0 | 4.00 | 20% | 1,000 (+500) | 2,048 |" in text
    assert "| torch fp16 cuda | 200.00 |" not in text  # tiled rows have median/p90 first
    assert "| torch fp16 cuda | 40.0 | 41.0 | 200.00 |" in text
    assert "- tensorrt: not here." in text
    options = LatencyOptions(out_dir=tmp_path / "out", chart=False)
    paths = write_report(report, options)
    assert paths["json"].name == "latency_nvidia-test-gpu-80gb_2026-11-27.json"
    loaded = json.loads(paths["json"].read_text())
    assert loaded["variants"]["torch fp16 cuda"]["paper"]["N=6"]["fraction_of_floor"] == pytest.approx(0.2)
    assert paths["md"].read_text() == format_markdown(report)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths.values())  # no temp files


def test_output_stem_cpu_tiny() -> None:
    report = _synthetic_report()
    del report.host["gpu"]
    assert output_stem(report, LatencyOptions(size=ModelSize.TINY)) == "latency_cpu-2core_2026-11-27_tiny"
    assert output_stem(report, LatencyOptions(label="orin")) == "latency_orin_2026-11-27"


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (LatencyOptions(iters=0), "--iters"),
        (LatencyOptions(classes=()), "--classes"),
        (LatencyOptions(classes=(0,)), "--classes"),
    ],
)
def test_run_latency_rejects_bad_options(options: LatencyOptions, match: str) -> None:
    with pytest.raises(GSNetError, match=match):
        run_latency(options)


def test_run_latency_missing_onnx_dir(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="is not a folder"):
        run_latency(LatencyOptions(onnx_dir=tmp_path / "nope"))


def test_run_latency_tiny_cpu(tmp_path: Path) -> None:
    options = LatencyOptions(classes=(2,), iters=1, warmup=0, out_dir=tmp_path, size=ModelSize.TINY, label="test")
    messages: list[str] = []
    text = run_latency(options, log=messages.append)
    json_path = _only_json(tmp_path)
    data = json.loads(json_path.read_text())
    assert json_path.name == f"latency_test_{data['date']}_tiny.json"
    assert text == json_path.with_suffix(".md").read_text()
    variant = data["variants"]["torch fp32 cpu"]
    assert set(variant["paper"]) == {"N=2"}
    entry = variant["paper"]["N=2"]
    for key in ("image", "graph"):
        assert entry[key]["n"] == 1 and math.isfinite(entry[key]["median_ms"]) and entry[key]["median_ms"] > 0
    stages = entry["stages_median_ms"]
    assert set(stages) == {"preprocess", "image_graph", "merge"}
    assert sum(stages.values()) <= entry["image"]["median_ms"] * (1 + 1e-9)  # stages are parts of the image time
    assert variant["tiled"]["views"] == 8 and variant["tiled"]["views_per_s"] > 0
    assert variant["host_memory"]["delta_mib"] >= 0
    assert "torch fp16 cuda, fused kernel, CUDA graphs" in data["unavailable"]
    assert data["executed_gmacs_per_image"]["N=2"] > 0
    assert data["host"]["cores"] >= 1 and "torch" in data["host"]["versions"]
    assert "| torch fp32 cpu | 2 |" in text


def _only_json(folder: Path) -> Path:
    (found,) = folder.glob("*.json")
    return found


def test_cli_parses_latency_options() -> None:
    from gsnet_deploy.cli import build_parser

    args = build_parser().parse_args(["bench", "latency", "--engine", "a", "b", "--no-tiled", "--model-size", "tiny"])
    assert args.engine == [Path("a"), Path("b")]
    assert args.tiled is False and args.chart is True
    assert args.iters == 3 and args.classes == [6, 40]


def test_qgff_front_switch_restores_on_error() -> None:
    from gsnet_deploy.bench.measure import _qgff_front
    from gsnet_deploy.kernels import cost_volume
    from gsnet_deploy.model import qgff

    original = qgff.cost_volume_reference
    with _qgff_front(False):
        assert qgff.cost_volume_reference is original
    with pytest.raises(RuntimeError, match="boom"), _qgff_front(True):
        assert qgff.cost_volume_reference is cost_volume.fused_cost_volume
        raise RuntimeError("boom")
    assert qgff.cost_volume_reference is original


@pytest.mark.parametrize(
    ("start", "end", "busy"),
    [(0.8, 2.2, False), (1.5, 2.2, True), (0.2, 3.4, True), (None, 2.9, False)],
)
def test_host_was_busy_ignores_the_benchmarks_own_threads(start: float | None, end: float, busy: bool) -> None:
    """Catches: the benchmark's own 2 threads on 2 cores (end load ~2.2) reported as a busy host."""
    from gsnet_deploy.bench.latency import host_was_busy

    assert host_was_busy(start, end, cores=2) is busy


def test_discover_variants_keeps_only_the_asked_backends(tmp_path: Path) -> None:
    """Catches: ``--backend onnxruntime`` still timing torch (a paper-size CPU run then takes twice as long)."""
    from gsnet_deploy.backends import BackendKind

    options = LatencyOptions(onnx_dir=tmp_path, backends=(BackendKind.ONNXRUNTIME,))
    runnable, missing = discover_variants(options, CPU_CAPS)
    assert [v.engine for v in runnable] == [BackendKind.ONNXRUNTIME]
    assert any(m.name.startswith("torch fp32") and "not asked" in m.reason for m in missing)
