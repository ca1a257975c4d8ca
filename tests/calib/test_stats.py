"""Streaming activation statistics: histograms folded view by view, entropy thresholds, memory checks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from gsnet_deploy.calib import memory
from gsnet_deploy.calib.stats import AbsHistogram, entropy_amax, scale_of


def test_streamed_histogram_equals_one_histogram_of_all_values() -> None:
    rng = np.random.default_rng(3)
    # magnitudes grow chunk by chunk (x1, x3, x40, x1000): the histogram widens three times
    chunks = [rng.standard_normal(50_000).astype(np.float32) * s for s in (1.0, 3.0, 0.5, 40.0, 1000.0, 2.0)]
    hist = AbsHistogram(bins=256)
    for chunk in chunks:
        hist.update(chunk.reshape(10, -1))
    values = np.abs(np.concatenate(chunks)).astype(np.float64)
    assert hist.amax == pytest.approx(values.max())
    assert hist.top >= values.max()
    reference, _ = np.histogram(values, bins=256, range=(0.0, hist.top))  # float64, all values at once
    assert hist.counts.sum() == values.size
    # bin edges coincide exactly (power-of-two widening); allow a handful of float32 edge ties
    assert np.abs(hist.counts - reference).sum() <= 4


def test_histogram_rejects_non_finite_values() -> None:
    from gsnet_deploy.errors import ExportError

    with pytest.raises(ExportError, match="inf or NaN"):
        AbsHistogram().update(np.array([1.0, np.inf], np.float32))


def _entropy_reference(counts: np.ndarray, top: float, levels: int, start: int, stride: int) -> float:
    """KL threshold search written plainly with Python loops, float64."""
    bins = len(counts)
    best, best_kl = bins, math.inf
    for i in range(start, bins + 1, stride):
        p = [float(c) for c in counts[:i]]
        p[-1] += float(sum(counts[i:]))
        q = [0.0] * i
        for j in range(levels):
            lo, hi = (j * i) // levels, ((j + 1) * i) // levels
            group = counts[lo:hi]
            nonzero = [k for k in range(lo, hi) if counts[k] > 0]
            if nonzero:
                share = float(sum(group)) / len(nonzero)
                for k in nonzero:
                    q[k] = share
        ps, qs = sum(p), sum(q)
        kl, finite = 0.0, True
        for pk, qk in zip(p, q):
            if pk > 0:
                if qk == 0:
                    finite = False
                    break
                kl += pk / ps * math.log((pk / ps) / (qk / qs))
        if finite and kl < best_kl:
            best, best_kl = i, kl
    return best * top / bins


@pytest.mark.parametrize("stride", [1, 8])
def test_entropy_threshold_matches_plain_reference(stride: int) -> None:
    rng = np.random.default_rng(0)
    values = np.abs(np.concatenate([rng.standard_normal(200_000), rng.uniform(-60, 60, 300)]))  # Gaussian + outliers
    counts, _ = np.histogram(values, bins=512, range=(0.0, values.max()))
    got = entropy_amax(counts, float(values.max()), levels=64, start=64, stride=stride)
    assert got == pytest.approx(_entropy_reference(counts, float(values.max()), 64, 64, stride), rel=1e-12)
    assert got < 0.5 * values.max()  # the outliers are clipped


def test_entropy_keeps_the_range_of_a_uniform_distribution() -> None:
    values = np.abs(np.random.default_rng(1).uniform(-1, 1, 400_000))
    hist = AbsHistogram()
    hist.update(values)
    assert scale_of(hist, "entropy") == pytest.approx(scale_of(hist, "max"), rel=0.02)
    assert scale_of(hist, "max") == pytest.approx(values.max() / 127.0)


def test_available_memory_takes_the_smaller_of_host_and_cgroup(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       25000000 kB\nMemAvailable:   20000000 kB\n")
    cgroup = tmp_path / "cg"
    cgroup.mkdir()
    assert memory.available_bytes(meminfo, cgroup) == 20000000 * 1024  # no cgroup files: host only
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text("1000\n")
    assert memory.available_bytes(meminfo, cgroup) == 20000000 * 1024  # "max": no limit
    (cgroup / "memory.max").write_text(str(8 << 30))
    (cgroup / "memory.current").write_text(str(3 << 30))
    assert memory.available_bytes(meminfo, cgroup) == 5 << 30


def test_require_memory_is_one_line_and_can_be_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "available_bytes", lambda: 2 << 30)
    memory.require_memory(1 << 30, "a job")  # enough: no error
    with pytest.raises(memory.InsufficientMemoryError, match=r"needs at least 4\.0 GiB .* only 2\.0 GiB") as info:
        memory.require_memory(4 << 30, "a job")
    assert "\n" not in str(info.value)
    monkeypatch.setenv(memory.SKIP_ENV, "1")
    memory.require_memory(4 << 30, "a job")


def _all_outputs_run(model_path: Path, feeds: list[dict[str, np.ndarray]]) -> dict[str, list[np.ndarray]]:
    """Every float tensor of the model for each feed, by a plain ONNX Runtime run that returns them all."""
    import onnx
    import onnxruntime as ort

    model = onnx.shape_inference.infer_shapes(onnx.load(str(model_path)))
    floats = {vi.name for vi in (*model.graph.value_info, *model.graph.output) if vi.type.tensor_type.elem_type == 1}
    names = [out for node in model.graph.node for out in node.output if out in floats]
    del model.graph.output[:]
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    results: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed in feeds:
        for name, value in zip(names, session.run(names, feed)):
            results[name].append(value)
    return results


def test_tensor_ranges_equal_a_run_returning_every_tensor(tmp_path: Path, standin_graphs) -> None:
    import onnx

    from gsnet_deploy.calib.stats import tensor_ranges
    from gsnet_deploy.contracts import io_names

    onnx_dir = standin_graphs.write_standin_onnx_dir(tmp_path)
    path = onnx_dir / io_names.IMAGE_GRAPH_FILE
    rng = np.random.default_rng(2)
    embeds = rng.standard_normal((3, 512)).astype(np.float32)
    feeds = [
        {io_names.IMAGES: rng.uniform(0, 255 * s, (1, 3, 384, 384)).astype(np.float32), io_names.TEXT_EMBEDS: embeds}
        for s in (1, 4, 2)
    ]
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    before = model.SerializeToString()
    ranges = tensor_ranges(model, feeds)
    assert model.SerializeToString() == before  # the caller's model is restored
    reference = _all_outputs_run(path, feeds)
    assert set(reference) <= set(ranges) and io_names.IMAGES in ranges
    for name, values in reference.items():
        got = ranges[name]
        assert got.absmax == pytest.approx(max(float(np.abs(v).max()) for v in values), rel=1e-6), name
        assert got.min == pytest.approx(min(float(v.min()) for v in values), rel=1e-6, abs=1e-6), name
        assert got.max == pytest.approx(max(float(v.max()) for v in values), rel=1e-6, abs=1e-6), name
        assert got.shape == values[0].shape, name


def test_autocast_reference_sees_every_class_in_every_batch(
    tmp_path: Path, standin_graphs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ModelOpt split an NPZ's text_embeds by class (axis 0) into as many batches as views: with N < B one was empty."""
    from modelopt.onnx.autocast import nodeclassifier

    from gsnet_deploy.contracts import io_names
    from gsnet_deploy.export.fp16 import make_fp16_onnx

    onnx_dir = standin_graphs.write_standin_onnx_dir(tmp_path / "onnx")
    rng = np.random.default_rng(4)
    embeds = rng.standard_normal((2, 512)).astype(np.float32)  # 2 classes, 3 views: fewer classes than views
    views = rng.uniform(0, 255, (3, 1, 3, 384, 384)).astype(np.float32)
    seen: dict = {}
    original = nodeclassifier.NodeClassifier.run

    def spy(self, ref_outputs_dict=None):
        seen.update(ref_outputs_dict or {})
        return original(self, ref_outputs_dict)

    monkeypatch.setattr(nodeclassifier.NodeClassifier, "run", spy)
    feeds = [{io_names.IMAGES: v, io_names.TEXT_EMBEDS: embeds} for v in views]
    make_fp16_onnx(onnx_dir / io_names.IMAGE_GRAPH_FILE, tmp_path / "fp16.onnx", reference_feeds=feeds)
    assert seen[io_names.TEXT_EMBEDS].shape == (2, 512)
    assert seen["cost"].shape == (1, 2, 576)
    reference = _all_outputs_run(onnx_dir / io_names.IMAGE_GRAPH_FILE, [dict(f) for f in feeds])
    assert seen["cost"].absmax == pytest.approx(max(float(np.abs(c).max()) for c in reference["cost"]), rel=1e-6)


def test_calibration_and_autocast_refuse_before_any_work_on_too_little_memory(
    tmp_path: Path, standin_graphs, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gsnet_deploy.calib.quantize import quantize_image_graph
    from gsnet_deploy.contracts import io_names
    from gsnet_deploy.export import fp16

    onnx_dir = standin_graphs.write_standin_onnx_dir(tmp_path / "onnx")
    monkeypatch.setattr(memory, "available_bytes", lambda: 1024)  # 1 KiB left: less than any model needs
    monkeypatch.delenv(memory.SKIP_ENV, raising=False)

    def no_modelopt(*args, **kwargs):
        raise AssertionError("work started before the memory check")

    monkeypatch.setattr("modelopt.onnx.quantization.quantize", no_modelopt)
    monkeypatch.setattr("modelopt.onnx.autocast.convert_to_mixed_precision", no_modelopt)
    views = np.zeros((3, 3, 384, 384), np.float32)
    embeds = np.ones((2, 512), np.float32)
    with pytest.raises(memory.InsufficientMemoryError, match="INT8 calibration"):
        quantize_image_graph(onnx_dir, tmp_path / "out", views, text_embeds=embeds)
    assert not (tmp_path / "out").exists()
    with pytest.raises(memory.InsufficientMemoryError, match="FP16 AutoCast"):
        fp16.make_fp16_onnx(
            onnx_dir / io_names.IMAGE_GRAPH_FILE, tmp_path / "fp16.onnx", reference_feeds={"images": views, "text_embeds": embeds}
        )


_PEAK_SCRIPT = """
import resource, sys
import numpy as np, onnx
from onnx import shape_inference
from gsnet_deploy.calib import stats
from gsnet_deploy.runtime.ort_session import open_session
path, mode = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(0)
embeds = rng.normal(size=(40, 512)).astype(np.float32)
feed = {"images": rng.uniform(0, 255, size=(1, 3, 384, 384)).astype(np.float32), "text_embeds": embeds}
if mode == "plain":
    open_session(path, memory_arena=False, quiet=True).run(None, feed)
else:
    stats.tensor_ranges(shape_inference.infer_shapes(onnx.load(path)), [feed])
# VmHWM, not ru_maxrss: ru_maxrss survives exec and would report the (larger) pytest parent's RSS for both modes
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")]
print(int(hwm[0].split()[1]) * 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def test_tensor_ranges_peak_memory_is_one_plain_inference(tiny_onnx_dir: Path) -> None:
    """Bug caught: reductions that ONNX Runtime runs after the whole graph, keeping every tensor alive to the end.

    Measured 2026-11-29, tiny graph, one view, N=40: 0.48 GiB plain; 2.1 GiB with the reductions appended
    (the paper-size AutoCast was OOM-killed above 15 GiB); 0.47 GiB with each right after its producer.
    """
    import subprocess
    import sys

    from gsnet_deploy.contracts import io_names

    path = str(tiny_onnx_dir / io_names.IMAGE_GRAPH_FILE)
    peaks = {}
    for mode in ("plain", "ranges"):
        done = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, path, mode], capture_output=True, text=True, check=True)
        peaks[mode] = int(done.stdout.strip().splitlines()[-1])
    assert peaks["ranges"] <= 1.3 * peaks["plain"], peaks
