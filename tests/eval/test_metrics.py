"""Confusion matrix and IoU arithmetic against hand-worked examples and a plain per-pixel reference."""

from __future__ import annotations

import numpy as np
import pytest

from gsnet_deploy.eval.metrics import ConfusionMatrix, compute_metrics

NAN = float("nan")

# Hand example, K=3, ignore 255. Valid (pred, gt) pixels: (0,0) (0,0) (1,0) (1,1) (2,1) (2,2);
# the two ignored pixels are predicted 0 and 1.
HAND_GT = np.array([[0, 0, 0, 1], [1, 2, 255, 255]])
HAND_PRED = np.array([[0, 0, 1, 1], [2, 2, 0, 1]])
# [pred, gt] with the ignore column last, counted on paper.
HAND_MATRIX = np.array(
    [
        [2, 0, 0, 1],
        [1, 1, 0, 1],
        [0, 1, 1, 0],
        [0, 0, 0, 0],
    ]
)
# tp = [2, 1, 1], pos_gt = [3, 2, 1], pos_pred = [2, 2, 2], union = [3, 3, 2]
HAND_IOU = [100 * 2 / 3, 100 * 1 / 3, 100 * 1 / 2]
HAND_ACC = [100 * 2 / 3, 100 * 1 / 2, 100.0]
HAND_MIOU = 50.0  # (2/3 + 1/3 + 1/2) / 3
HAND_MACC = 100 * (2 / 3 + 1 / 2 + 1) / 3
HAND_PACC = 100 * 4 / 6
HAND_FWIOU = 100 * 19 / 36  # 2/3*3/6 + 1/3*2/6 + 1/2*1/6


def test_confusion_matrix_hand_example() -> None:
    cm = ConfusionMatrix(num_classes=3, ignore_label=255)
    cm.update(HAND_PRED, HAND_GT)
    assert cm.matrix.dtype == np.int64
    assert cm.matrix.shape == (4, 4)
    np.testing.assert_array_equal(cm.matrix, HAND_MATRIX)


def test_confusion_matrix_accumulates_over_images() -> None:
    cm = ConfusionMatrix(num_classes=3, ignore_label=255)
    cm.update(HAND_PRED[:1], HAND_GT[:1])
    cm.update(HAND_PRED[1:], HAND_GT[1:])
    np.testing.assert_array_equal(cm.matrix, HAND_MATRIX)


def test_compute_metrics_hand_example() -> None:
    m = compute_metrics(HAND_MATRIX)
    np.testing.assert_allclose(m.iou, HAND_IOU, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(m.acc, HAND_ACC, rtol=1e-12, atol=1e-12)
    assert m.miou == pytest.approx(HAND_MIOU, abs=1e-12)
    assert m.macc == pytest.approx(HAND_MACC, abs=1e-12)
    assert m.pacc == pytest.approx(HAND_PACC, abs=1e-12)
    assert m.fwiou == pytest.approx(HAND_FWIOU, abs=1e-12)


def test_compute_metrics_class_without_ground_truth_is_nan_and_left_out() -> None:
    # K=4: gt has classes 0 and 1 only; class 3 is predicted once (a false positive), class 2 never.
    cm = ConfusionMatrix(num_classes=4, ignore_label=255)
    cm.update(np.array([[0, 3, 1, 1]]), np.array([[0, 0, 1, 1]]))
    m = compute_metrics(cm.matrix)
    # IoU0 = 1 / (2 + 1 - 1), IoU1 = 2 / 2, classes 2 and 3 have no ground truth.
    np.testing.assert_allclose(m.iou[:2], [50.0, 100.0], atol=1e-12)
    assert np.isnan(m.iou[2]) and np.isnan(m.iou[3])
    assert m.miou == pytest.approx(75.0, abs=1e-12)
    assert m.pacc == pytest.approx(75.0, abs=1e-12)


def test_compute_metrics_ignore_label_inside_class_range() -> None:
    # FloodNet-like: ignore label 0 is also class 0 ('Background'); predicting 0 on a labelled
    # pixel is a miss of its class, and class 0 has no ground truth so it leaves the mean.
    cm = ConfusionMatrix(num_classes=3, ignore_label=0)
    cm.update(np.array([[1, 1, 0, 2]]), np.array([[0, 1, 2, 2]]))
    m = compute_metrics(cm.matrix)
    # valid pixels: (pred1, gt1), (pred0, gt2), (pred2, gt2); IoU1 = 1/1, IoU2 = 1/(2+1-1)
    assert np.isnan(m.iou[0])
    np.testing.assert_allclose(m.iou[1:], [100.0, 50.0], atol=1e-12)
    assert m.miou == pytest.approx(75.0, abs=1e-12)
    assert m.pacc == pytest.approx(100 * 2 / 3, abs=1e-12)


def test_compute_metrics_exclude_drops_class_from_means_only() -> None:
    m = compute_metrics(HAND_MATRIX, exclude=(1,))
    np.testing.assert_allclose(m.iou, HAND_IOU, atol=1e-12)  # still reported
    assert m.miou == pytest.approx(100 * (2 / 3 + 1 / 2) / 2, abs=1e-12)
    assert m.macc == pytest.approx(100 * (2 / 3 + 1) / 2, abs=1e-12)
    assert m.pacc == pytest.approx(HAND_PACC, abs=1e-12)  # pixels of excluded classes still count


@pytest.mark.parametrize("num_classes", [1, 4, 13])
def test_compute_metrics_perfect_prediction_is_100(num_classes: int) -> None:
    rng = np.random.default_rng(num_classes)
    gt = rng.integers(0, num_classes, size=(17, 23))
    gt[0, :5] = 255
    pred = np.where(gt == 255, 0, gt)
    cm = ConfusionMatrix(num_classes, 255)
    cm.update(pred, gt)
    m = compute_metrics(cm.matrix)
    present = np.unique(gt[gt != 255])
    np.testing.assert_allclose(m.iou[present], 100.0, atol=1e-12)
    assert m.miou == pytest.approx(100.0) and m.pacc == pytest.approx(100.0)


def _reference_iou(preds: list[np.ndarray], gts: list[np.ndarray], k: int, ignore: int) -> np.ndarray:
    """Per-class IoU from set counts, pixel by pixel, float64 (NaN without ground truth)."""
    inter = np.zeros(k)
    union = np.zeros(k)
    has_gt = np.zeros(k, dtype=bool)
    for pred, gt in zip(preds, gts):
        for p, g in zip(pred.ravel().tolist(), gt.ravel().tolist()):
            if g == ignore:
                continue
            has_gt[g] = True
            if p == g:
                inter[g] += 1
                union[g] += 1
            else:
                union[g] += 1
                union[p] += 1
    return np.where(has_gt, 100 * inter / np.maximum(union, 1), np.nan)


@pytest.mark.parametrize("k,ignore", [(5, 255), (6, 5), (10, 0)])
def test_compute_metrics_matches_plain_reference(k: int, ignore: int) -> None:
    rng = np.random.default_rng(k)
    labels = [c for c in range(k) if c != ignore] + [ignore]
    gts = [rng.choice(labels, size=(9, 11)) for _ in range(3)]
    preds = [rng.integers(0, k, size=(9, 11)) for _ in range(3)]
    cm = ConfusionMatrix(k, ignore)
    for p, g in zip(preds, gts):
        cm.update(p, g)
    m = compute_metrics(cm.matrix)
    ref = _reference_iou(preds, gts, k, ignore)
    assert np.array_equal(np.isnan(m.iou), np.isnan(ref))
    np.testing.assert_allclose(m.iou[~np.isnan(ref)], ref[~np.isnan(ref)], rtol=1e-12, atol=1e-12)
    assert m.miou == pytest.approx(float(np.nanmean(ref)), abs=1e-10)
    assert np.isfinite(m.miou)
