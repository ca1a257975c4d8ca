"""Semantic-segmentation metrics from a confusion matrix, as detectron2's ``SemSegEvaluator``.

Re-implements the arithmetic of ``detectron2/evaluation/sem_seg_evaluation.py``
(github.com/facebookresearch/detectron2, Apache-2.0), which produced the GSNet paper's numbers:

* The matrix has ``K + 1`` rows and columns for ``K`` classes, indexed ``[prediction, ground
  truth]``. Ground-truth pixels with the ignore label are moved to the extra column ``K`` and
  therefore leave every metric; predictions on them are not counted anywhere.
* Per class: ``tp`` = diagonal, ``pos_gt`` = column sum, ``pos_pred`` = row sum (both over the
  first ``K`` rows/columns), ``IoU = tp / (pos_gt + pos_pred - tp)``, ``ACC = tp / pos_gt``.
* A class without ground-truth pixels gets NaN IoU and accuracy and is left out of the means.
* ``pACC = sum(tp) / sum(pos_gt)``; ``fwIoU`` weights IoU by the ground-truth share.

Added here: ``exclude`` drops chosen classes from the means explicitly (see
``gsnet_deploy.eval.datasets``); detectron2 itself has no such option. All values are percent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


class ConfusionMatrix:
    """Accumulates a ``[K+1, K+1]`` int64 confusion matrix over images.

    Args:
        num_classes: Number of classes ``K`` (the evaluator's class axis).
        ignore_label: Ground-truth value left out of the metrics.
    """

    def __init__(self, num_classes: int, ignore_label: int) -> None:
        self.num_classes = num_classes
        self.ignore_label = ignore_label
        self.matrix = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)  # [pred, gt]

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Add one image.

        Args:
            pred: Integer ``[H, W]`` predicted class indices in ``0 .. K-1``.
            gt: Integer ``[H, W]`` labels in ``0 .. K-1`` or the ignore label.
        """
        assert pred.shape == gt.shape, f"{pred.shape} != {gt.shape}"
        k = self.num_classes
        gt = np.where(gt == self.ignore_label, k, gt).astype(np.int64)
        pred = pred.astype(np.int64)
        if pred.size:
            assert 0 <= pred.min() and pred.max() < k, "prediction outside 0..K-1"
            assert 0 <= gt.min() and gt.max() <= k, "label outside 0..K-1 and not ignored"
        flat = (k + 1) * pred.reshape(-1) + gt.reshape(-1)  # [H*W]
        self.matrix += np.bincount(flat, minlength=(k + 1) ** 2).reshape(k + 1, k + 1)


@dataclass(frozen=True)
class SegMetrics:
    """Metrics of one confusion matrix, in percent.

    Attributes:
        iou: float64 ``[K]`` per-class IoU; NaN for a class without ground-truth pixels.
        acc: float64 ``[K]`` per-class accuracy (recall); NaN likewise.
        miou: Mean of the valid, non-excluded IoUs (NaN if none).
        macc: Mean of the valid, non-excluded accuracies (NaN if none).
        fwiou: IoU weighted by each valid, non-excluded class's ground-truth share.
        pacc: Correct pixels over all non-ignored ground-truth pixels (NaN if none).
    """

    iou: np.ndarray
    acc: np.ndarray
    miou: float
    macc: float
    fwiou: float
    pacc: float


def compute_metrics(matrix: np.ndarray, exclude: Sequence[int] = ()) -> SegMetrics:
    """Compute IoU, mIoU, accuracies and fwIoU from a ``[K+1, K+1]`` confusion matrix.

    Args:
        matrix: int64 ``[K+1, K+1]`` indexed ``[prediction, ground truth]``; the last row and
            column hold the ignore label.
        exclude: Class indices left out of ``miou``, ``macc`` and ``fwiou`` (their per-class
            values are still reported); ``pacc`` counts every non-ignored pixel.

    Returns:
        The metrics, in percent.
    """
    m = np.asarray(matrix, dtype=np.float64)[:-1, :-1]  # [K, K], ignore row/column dropped
    k = m.shape[0]
    tp = np.diagonal(m).copy()
    pos_gt = m.sum(axis=0)
    pos_pred = m.sum(axis=1)
    union = pos_gt + pos_pred - tp

    has_gt = pos_gt > 0
    iou = np.full(k, np.nan)
    acc = np.full(k, np.nan)
    acc[has_gt] = tp[has_gt] / pos_gt[has_gt]
    iou[has_gt] = tp[has_gt] / union[has_gt]  # union >= pos_gt > 0

    in_mean = has_gt.copy()
    in_mean[list(exclude)] = False
    total_gt = pos_gt.sum()
    miou = float(iou[in_mean].mean()) if in_mean.any() else float("nan")
    macc = float(acc[in_mean].mean()) if in_mean.any() else float("nan")
    fwiou = float((iou[in_mean] * pos_gt[in_mean] / total_gt).sum()) if total_gt > 0 else float("nan")
    pacc = float(tp.sum() / total_gt) if total_gt > 0 else float("nan")
    return SegMetrics(iou=100 * iou, acc=100 * acc, miou=100 * miou, macc=100 * macc, fwiou=100 * fwiou, pacc=100 * pacc)
