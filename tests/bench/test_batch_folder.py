"""``gsnet bench latency --folder K --batch-images 1 4``: the batched folder rows, their warm-up, the variant filter."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from gsnet_deploy.bench.latency import discover_variants
from gsnet_deploy.bench.latency_options import HostCaps, LatencyOptions
from gsnet_deploy.bench.latency_report import LatencyReport, format_markdown
from gsnet_deploy.contracts.io_names import CLASS_MAP, TEXT_EMBEDS, TEXT_TOKENS
from gsnet_deploy.runtime.vocab import parse_classes

DEVICE_S = 0.04  # seconds per device call of the stand-in, whatever its batch


class _Text:
    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {TEXT_EMBEDS: np.eye(feeds[TEXT_TOKENS].shape[0], 512, dtype=np.float32)}


class _Unused:
    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        raise AssertionError("the combined calls must be used")


class StandIn:
    """A backend whose combined calls sleep ``DEVICE_S`` per call (one image or a batch) and record their batch."""

    name, model_digest, preferred_views, max_views = "standin", "standin", 5, None

    def __init__(self, batched: bool) -> None:
        self.text, self.image, self.encoder, self.head = _Text(), _Unused(), _Unused(), _Unused()
        self.batches: list[int] = []
        if batched:
            self.segment_paper_batch = self._batch

    def segment_paper(self, image: np.ndarray, text: np.ndarray, out_size: tuple[int, int], with_probs: bool = False) -> dict:
        self.batches.append(1)
        time.sleep(DEVICE_S)
        return {CLASS_MAP: np.zeros(out_size, np.uint8)}

    def _batch(self, images: np.ndarray, text: np.ndarray, out_size: tuple[int, int], with_probs: bool = False) -> list:
        self.batches.append(images.shape[0])
        time.sleep(DEVICE_S)
        return [{CLASS_MAP: np.zeros(out_size, np.uint8)} for _ in images]


def _images(folder: Path, count: int) -> list[Path]:
    paths = []
    for index in range(count):
        path = folder / f"{index}.png"
        Image.fromarray(np.full((30, 40, 3), index, np.uint8)).save(path)
        paths.append(path)
    return paths


def test_measure_folder_times_the_batched_call(tmp_path: Path) -> None:
    """Catches: the timed wrapper hiding ``segment_paper_batch`` (the batched row would silently run one image
    per call), the device time of batched calls not counted, and ``batched`` claimed for a backend without it."""
    from gsnet_deploy.bench.folder import measure_folder

    images = _images(tmp_path, 6)
    vocab = parse_classes("a,b")
    backend = StandIn(batched=True)
    r = measure_folder(backend, vocab, images, device_protocol=True, batch_images=3)  # type: ignore[arg-type]
    assert backend.batches == [3, 3] and r["batched"] is True and r["batch_images"] == 3
    assert 2 * DEVICE_S / 6 * 1e3 <= r["graph_ms"] < r["per_image_ms"]
    backend = StandIn(batched=True)
    r = measure_folder(backend, vocab, images, device_protocol=True)  # type: ignore[arg-type]
    assert backend.batches == [1] * 6 and r["batched"] is False and 1e3 * DEVICE_S <= r["graph_ms"]
    backend = StandIn(batched=False)
    r = measure_folder(backend, vocab, images, device_protocol=True, batch_images=3)  # type: ignore[arg-type]
    assert backend.batches == [1] * 6 and r["batched"] is False


def test_measure_folder_rows_warm_up_and_batch_only_where_offered(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches: CUDA graph captures timed (no untimed run of a whole group and of the last, smaller group),
    a batched row for a backend that cannot batch, and the K = 1 device row lost when K > 1 is asked."""
    from gsnet_deploy.bench import folder, measure

    calls: list[tuple[int, bool, int]] = []

    def fake(backend: Any, vocab: Any, images: Sequence[Path], *, device_protocol: bool, batch_images: int = 1) -> dict:
        calls.append((len(images), device_protocol, batch_images))
        return {"protocol": "device" if device_protocol else "numpy", "images": len(images), "per_image_ms": 10.0 / batch_images,
                "graph_ms": 1.0, "outside_share": 0.9, "batch_images": batch_images, "batched": batch_images > 1}  # fmt: skip

    monkeypatch.setattr(folder, "measure_folder", fake)
    monkeypatch.setattr(folder, "make_folder", lambda directory, count, *hw: [directory / f"{i}.png" for i in range(count)])
    out = measure._measure_folder(StandIn(batched=True), 3, 10, lambda msg: None, (1, 4))
    assert calls[0] == (10, False, 1)
    assert calls[1:3] == [(1, True, 1), (10, True, 1)]
    assert sorted(calls[3:5]) == [(2, True, 4), (4, True, 4)] and calls[5] == (10, True, 4) and len(calls) == 6
    assert set(out) == {"numpy", "device", "batched"} and set(out["batched"]) == {"4"}
    assert out["device"]["batch_images"] == 1 and out["batched"]["4"]["images"] == 10
    calls.clear()
    out = measure._measure_folder(StandIn(batched=False), 3, 10, lambda msg: None, (1, 4))
    assert "batched" not in out and [c[2] for c in calls] == [1, 1, 1]


def test_markdown_shows_batched_rows_against_k1() -> None:
    """Catches: the speed-up printed upside down, K = 1 missing from the batched table, rows in the wrong order."""

    def run(k: int, ms: float) -> dict:
        return {"protocol": "device", "images": 24, "per_image_ms": ms, "graph_ms": ms / 2, "outside_share": 0.5,
                "batch_images": k, "batched": k > 1}  # fmt: skip

    numpy_row = {**run(1, 900.0), "protocol": "numpy"}
    entry = {"image": {"median_ms": 1.0, "p90_ms": 1.0}, "graph": {"median_ms": 1.0, "p90_ms": 1.0},
             "text_encoder_once_ms": 1.0, "stages_median_ms": {"preprocess": 1.0, "image_graph": 1.0, "merge": 1.0},
             "folder": {"numpy": numpy_row, "device": run(1, 40.0),
                        "batched": {"8": run(8, 20.0), "4": run(4, 25.0)}}}  # fmt: skip
    report = LatencyReport(
        date="2026-11-29", command="gsnet bench latency", model="paper", weights="demo weights",
        host={"cpu": "Test CPU", "cores": 2, "torch_threads": 2, "versions": {}}, classes=[40], protocol="paper",
        variants={"torch fp16": {"paper": {"N=40": entry}, "host_memory": {"peak_mib": 1.0, "delta_mib": 1.0}}},
    )  # fmt: skip
    text = format_markdown(report)
    rows = [line for line in text.splitlines() if line.startswith("| torch fp16 | 40 | 24 |") and line.endswith("x |")]
    assert rows == [
        "| torch fp16 | 40 | 24 | 1 | 40.0 | 20.0 | 25.00 | 1.00x |",
        "| torch fp16 | 40 | 24 | 4 | 25.0 | 12.5 | 40.00 | 1.60x |",
        "| torch fp16 | 40 | 24 | 8 | 20.0 | 10.0 | 50.00 | 2.00x |",
    ]


def test_variant_filter_keeps_only_the_named_variants() -> None:
    """Catches: --variant ignored (every torch variant timed on the lent GPU) or the others not listed as skipped."""
    caps = HostCaps(cuda=True, ort_providers=None, ort_cuda_devices=0, tensorrt="not installed", triton=True)
    runnable, missing = discover_variants(LatencyOptions(variants=("fused kernel, CUDA graphs",)), caps)
    assert [v.name for v in runnable] == ["torch fp16 cuda, fused kernel, CUDA graphs"]
    skipped = {u.name for u in missing if u.reason.startswith("not asked (--variant")}
    assert skipped == {"torch fp32 cuda", "torch fp16 cuda, fused kernel, eager", "torch fp16 cuda, no kernel, CUDA graphs",
                       "torch fp16 cuda, no kernel, eager"}  # fmt: skip


def test_cli_passes_batch_images_and_variants(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches: the CLI options parsed but not handed to the benchmark (the batched rows never run)."""
    from gsnet_deploy import cli
    from gsnet_deploy.bench import latency
    from gsnet_deploy.errors import GSNetError

    with pytest.raises(GSNetError, match="--batch-images"):
        latency.run_latency(LatencyOptions(batch_images=(0,)))
    seen: list[LatencyOptions] = []
    monkeypatch.setattr(latency, "run_latency", lambda options: seen.append(options) or "")
    assert cli.main(["bench", "latency", "--folder", "8", "--batch-images", "1", "4", "--variant", "CUDA graphs"]) == 0
    assert seen[0].batch_images == (1, 4) and seen[0].variants == ("CUDA graphs",) and seen[0].folder == 8


def test_device_check_reports_batched_images_per_second(tmp_path: Path) -> None:
    """Catches: the device check's summary dropping the batched rows, or the speed-up printed upside down."""
    import json
    import os
    import re
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    work = tmp_path / "work"
    (work / "batch_images").mkdir(parents=True)

    def run(ms: float) -> dict:
        return {"per_image_ms": ms}

    folder = {"device": run(40.0), "batched": {"8": run(20.0), "4": run(25.0)}}
    payload = {"variants": {"torch fp16 cuda, fused kernel, CUDA graphs": {"paper": {"N=40": {"folder": folder}}}}}
    (work / "batch_images" / "latency_h200_2026-11-29.json").write_text(json.dumps(payload))
    env = {
        **os.environ,
        "OUT": str(tmp_path / "out"),
        "DEVICE_CHECK_WORK": str(work),
        "PYTHON": sys.executable,
        "ONLY": "targets",
    }
    proc = subprocess.run(["bash", str(repo / "benchmarks" / "device_check.sh")], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [re.sub(r"\s+", " ", line.strip()) for line in (tmp_path / "out" / "summary.txt").read_text().splitlines()]
    assert [line for line in lines if line.startswith("batch_images N=40")] == [
        "batch_images N=40 K=4: 40.0 images/s, K=1 25.0 images/s (1.60x)",
        "batch_images N=40 K=8: 50.0 images/s, K=1 25.0 images/s (2.00x)",
    ]
