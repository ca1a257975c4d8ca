"""Accuracy comparison of candidate models against FP32 logits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from gsnet_deploy import io_names
from gsnet_deploy.calib.quantize import quantize_image_graph
from gsnet_deploy.errors import ExportError
from gsnet_deploy.export.check import check_build, compare_logits, format_table, run_onnx_cpu
from gsnet_deploy.export.fp16 import make_fp16_onnx


def test_compare_logits_hand_worked() -> None:
    # 1 view, 2 classes, 1x2 pixels: pixel 0 -> class 0 in both; pixel 1 -> class 1 (ref) vs 0 (candidate)
    ref = np.array([[[[2.0, 0.0]], [[1.0, 3.0]]]], dtype=np.float32)  # [1, 2, 1, 2]
    cand = np.array([[[[2.0, 4.0]], [[1.0, 3.0]]]], dtype=np.float32)
    result = compare_logits(ref, cand)
    assert result.max_abs_error == pytest.approx(4.0)
    assert result.rel_l2_error == pytest.approx(4.0 / math.sqrt(4 + 0 + 1 + 9))
    assert result.argmax_agreement == pytest.approx(0.5)
    # class 0: ref {p0}, cand {p0, p1} -> 1/2; class 1: ref {p1}, cand {} -> 0/1
    assert result.per_class_iou == pytest.approx((0.5, 0.0))
    assert result.mean_iou == pytest.approx(0.25)


def test_compare_logits_identical_and_absent_class() -> None:
    ref = np.zeros((2, 3, 4, 4), np.float32)
    ref[:, 1] = 1.0  # class 1 wins everywhere; classes 0 and 2 appear nowhere
    result = compare_logits(ref, ref.copy())
    assert (result.max_abs_error, result.rel_l2_error, result.argmax_agreement) == (0.0, 0.0, 1.0)
    assert math.isnan(result.per_class_iou[0]) and result.per_class_iou[1] == 1.0
    with pytest.raises(ExportError, match="Cannot compare"):
        compare_logits(ref, ref[:1])


def test_check_build_on_standin(standin_graphs, tmp_path: Path) -> None:
    standin = standin_graphs
    onnx_dir = standin.write_standin_onnx_dir(tmp_path / "onnx")
    out = tmp_path / "engines"
    embeds = run_onnx_cpu(onnx_dir / io_names.TEXT_GRAPH_FILE, {io_names.TEXT_TOKENS: standin.standin_tokens(4)})[
        io_names.TEXT_EMBEDS
    ]
    views = np.random.default_rng(0).uniform(0, 255, size=(10, 3, 384, 384)).astype(np.float32)
    make_fp16_onnx(
        onnx_dir / io_names.IMAGE_GRAPH_FILE,
        out / "image_graph.fp16.onnx",
        reference_feeds={io_names.IMAGES: views[:5], io_names.TEXT_EMBEDS: embeds},
    )
    quantize_image_graph(onnx_dir, out, views, text_embeds=embeds)
    results = check_build(out, views[:5], embeds, onnx_dir=onnx_dir, use_engines=False)
    assert [r.candidate.split()[0] for r in results] == ["image_graph.fp16.onnx", "image_graph.int8.onnx"]
    for r in results:
        assert r.rel_l2_error <= 0.05 and 0.0 <= r.argmax_agreement <= 1.0 and len(r.per_class_iou) == 4
    payload = json.loads((out / "check.json").read_text())
    assert payload["num_views"] == 5 and len(payload["results"]) == 2
    assert "rel L2" in format_table(results)


def test_check_build_nothing_to_check(standin_graphs, tmp_path: Path) -> None:
    onnx_dir = standin_graphs.write_standin_onnx_dir(tmp_path / "onnx")
    with pytest.raises(ExportError, match="Nothing to check"):
        check_build(
            tmp_path / "empty",
            np.zeros((1, 3, 384, 384), np.float32),
            np.ones((2, 512), np.float32),
            onnx_dir=onnx_dir,
            use_engines=False,
        )
