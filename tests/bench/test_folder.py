"""``bench.folder``: per-image time of a folder through ``segment_files``, numpy vs device protocol."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest

from gsnet_deploy.bench.folder import make_folder, measure_folder
from gsnet_deploy.contracts.io_names import CLASS_MAP, IMAGES, LOGITS, PROBS, TEXT_EMBEDS, TEXT_TOKENS
from gsnet_deploy.runtime.vocab import parse_classes

GRAPH_S, TEXT_S = 0.05, 1.0


class Sleeper:
    """A runner that sleeps ``seconds`` and returns fixed outputs."""

    def __init__(self, seconds: float, kind: str) -> None:
        self.seconds, self.kind = seconds, kind

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        time.sleep(self.seconds)
        if self.kind == "text":
            return {TEXT_EMBEDS: np.ones((feeds[TEXT_TOKENS].shape[0], 512), np.float32)}
        if self.kind == "image":
            b, n = feeds[IMAGES].shape[0], feeds[TEXT_EMBEDS].shape[0]
            return {LOGITS: np.zeros((b, n, 96, 96), np.float32)}
        if self.kind == "encoder":
            return {"clip_features": np.zeros((5, 1), np.float32)}
        h, w = (int(v) for v in feeds["out_size"])
        out = {CLASS_MAP: np.zeros((h, w), np.uint8), PROBS: np.zeros((3, h, w), np.float32)}
        return {k: out[k] for k in (outputs or out)}


class Backend:
    name, model_digest, max_views, preferred_views = "sleepy", "sleepy", None, 5

    def __init__(self) -> None:
        self.text, self.image = Sleeper(TEXT_S, "text"), Sleeper(GRAPH_S, "image")
        self.encoder, self.head = Sleeper(GRAPH_S / 2, "encoder"), Sleeper(GRAPH_S / 2, "head")


def test_folder_times_graphs_excludes_text_and_reports_what_ran(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches: the text encoder counted per image, graph time not summed over runners, the wrong protocol label."""
    from gsnet_deploy.bench import folder
    from gsnet_deploy.runtime.paper_path import protocol_runners
    from gsnet_deploy.runtime.segment import SegmentReport

    host_s = 0.02

    def fake_segment_files(paths, backend, vocab, options, cache, log):
        backend.text.run({TEXT_TOKENS: np.zeros((len(vocab), 77), np.int64)})
        for _ in paths:
            runners = protocol_runners(backend)
            if runners is None:
                backend.image.run({IMAGES: np.zeros((5, 3, 384, 384), np.float32), TEXT_EMBEDS: np.ones((3, 512), np.float32)})
            else:
                runners[0].run({})
                runners[1].run({"out_size": np.array([4, 6])}, outputs=(CLASS_MAP,))
            time.sleep(host_s)
        return SegmentReport()

    monkeypatch.setattr(folder, "segment_files", fake_segment_files)
    images = [tmp_path / f"{i}.png" for i in range(3)]
    vocab = parse_classes("a,b,c")
    for device, label in ((False, "numpy"), (True, "device")):
        r = measure_folder(Backend(), vocab, images, device_protocol=device)
        assert r["protocol"] == label and r["images"] == 3
        assert 1e3 * GRAPH_S <= r["graph_ms"] < 1e3 * (GRAPH_S + host_s), r  # encoder + head add up
        assert 1e3 * (GRAPH_S + host_s) <= r["per_image_ms"] < 1e3 * (GRAPH_S + host_s + TEXT_S / 3), r  # text excluded
        assert abs(r["outside_share"] - (1 - r["graph_ms"] / r["per_image_ms"])) < 1e-9


def test_make_folder_makes_distinct_images(tmp_path: Path) -> None:
    """Catches: every benchmark image identical (a cache or a constant image would flatter the timings)."""
    from PIL import Image

    a, b = (np.asarray(Image.open(p)) for p in make_folder(tmp_path, 2, height=32, width=48))
    assert a.shape == (32, 48, 3) and not np.array_equal(a, b)


def test_markdown_folder_rows_side_by_side() -> None:
    """Catches: the two protocols' columns swapped, or a backend without the device protocol shown with numbers."""
    from gsnet_deploy.bench.latency_report import LatencyReport, format_markdown

    def entry(device: str) -> dict:
        numpy = {"protocol": "numpy", "images": 10, "per_image_ms": 2000.0, "graph_ms": 1400.0, "outside_share": 0.3}
        dev = {"protocol": device, "images": 10, "per_image_ms": 1500.0, "graph_ms": 1450.0, "outside_share": 1 / 30}
        return {"image": {"median_ms": 1.0, "p90_ms": 1.0}, "graph": {"median_ms": 1.0, "p90_ms": 1.0},
                "text_encoder_once_ms": 1.0, "stages_median_ms": {"preprocess": 1.0, "image_graph": 1.0, "merge": 1.0},
                "folder": {"numpy": numpy, "device": dev}}  # fmt: skip

    mem = {"peak_mib": 1.0, "delta_mib": 1.0}
    report = LatencyReport(
        date="2026-11-29", command="gsnet bench latency", model="tiny", weights="demo weights",
        host={"cpu": "Test CPU", "cores": 2, "torch_threads": 2, "versions": {}}, classes=[40], protocol="paper",
        variants={"ort": {"paper": {"N=40": entry("device")}, "host_memory": mem},
                  "old": {"paper": {"N=40": entry("numpy")}, "host_memory": mem}},
    )  # fmt: skip
    text = format_markdown(report)
    assert "| ort | 40 | 10 | 2,000.0 | 1,400.0 | 30% | 1,500.0 | 1,450.0 | 3% |" in text
    assert "| old | 40 | 10 | 2,000.0 | 1,400.0 | 30% | not offered by this backend | — | — |" in text
