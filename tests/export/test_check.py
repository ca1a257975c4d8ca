"""Accuracy comparison of candidate models against FP32 logits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from gsnet_deploy.calib.quantize import quantize_image_graph
from gsnet_deploy.contracts import io_names
from gsnet_deploy.contracts.precision import Precision
from gsnet_deploy.errors import ExportError
from gsnet_deploy.export.check import GATES, check_build, compare_logits, format_table, label_miou, labels_at, run_onnx_cpu
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


def test_label_miou_and_sampling_hand_worked() -> None:
    # catches: IoU over the wrong axis of the confusion matrix, labels sampled off the logits' grid
    pred = np.array([[0, 0], [1, 1]])
    gt = np.array([[0, 1], [1, 1]])
    # class 0: tp 1, union 2 -> 0.5; class 1: tp 2, union 3 -> 2/3
    assert label_miou(pred, gt, 2) == pytest.approx(100 * (0.5 + 2 / 3) / 2)
    labels = np.arange(16, dtype=np.uint8).reshape(1, 4, 4)
    assert labels_at(labels, 2).tolist() == [[[5, 7], [13, 15]]]  # the centre pixel of each 2x2 cell
    with pytest.raises(ExportError, match="Cannot sample"):
        labels_at(np.zeros((1, 5, 5)), 2)


def _confident_logits(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits [2, 4, 8, 8] with a clear winner per pixel, and the labels they predict."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, size=(2, 8, 8))
    logits = rng.normal(0, 0.1, size=(2, 4, 8, 8)).astype(np.float32)
    np.put_along_axis(logits, labels[:, None], 3.0, axis=1)
    return logits, labels


def test_gates_fail_a_class_swap_that_relative_l2_misses() -> None:
    # catches: gates judged on relative L2 (a swap of two near-tied classes stays close) or not at all
    ref, labels = _confident_logits()
    ref[:, 1] = ref[:, 0] + 0.01  # classes 0 and 1 nearly tied everywhere (as on untrained weights)
    swapped = ref[:, [1, 0, 2, 3]]
    result = compare_logits(ref, swapped, labels=labels * 0, gate=GATES[Precision.INT8])
    assert result.rel_l2_error < 0.05
    assert not result.passed and any("argmax agreement" in f for f in result.failures)
    good = compare_logits(ref, ref + 1e-4, labels=labels, gate=GATES[Precision.FP16])
    assert good.passed and good.failures == () and good.miou_delta == pytest.approx(0.0)


def test_gates_thresholds_and_miou_drop() -> None:
    # catches: thresholds off by a factor (fractions vs percent), the mIoU drop's sign inverted
    ref, labels = _confident_logits(1)
    cand = ref.copy()
    flat = cand.reshape(2, 4, -1)
    # move 2 of 128 pixels (1.6%) to another class: agreement 98.4%, passes INT8's 97% but not FP16's 99.5%
    for b, p in ((0, 0), (1, 5)):
        flat[b, :, p] = np.roll(flat[b, :, p], 1)
    int8 = compare_logits(ref, cand, labels=labels, gate=GATES[Precision.INT8])
    fp16 = compare_logits(ref, cand, labels=labels, gate=GATES[Precision.FP16])
    assert int8.argmax_agreement == pytest.approx(126 / 128)
    assert int8.reference_miou == pytest.approx(100.0) and int8.miou_delta is not None and int8.miou_delta < 0
    assert fp16.failures and not any("mIoU" in f for f in fp16.failures)  # FP16 gates agreement only
    # INT8: 2 wrong pixels cost more than 2 mIoU points on 4 classes of ~32 pixels each
    assert int8.miou_delta < -2.0 and [f for f in int8.failures if "mIoU" in f]
    better = compare_logits(ref, ref, labels=(labels + 1) % 4, gate=GATES[Precision.INT8])
    assert better.passed and better.miou_delta == pytest.approx(0.0)
    unjudged = compare_logits(ref, cand)
    assert unjudged.passed and unjudged.gate is None and unjudged.miou_delta is None
