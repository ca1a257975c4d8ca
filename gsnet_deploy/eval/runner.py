"""Backend-agnostic evaluation loop: one predictor (normal eval) or two (``--compare A B``).

A predictor is any callable that maps an RGB uint8 image ``[H, W, 3]`` to a class-index map
``[H, W]`` (index into ``DatasetSpec.vocabulary``); the CLI wraps the torch, ONNX Runtime and
TensorRT backends that way, so this module imports none of them. Metrics follow detectron2's
``SemSegEvaluator`` (see ``gsnet_deploy.eval.metrics``); the paper's Table 2 number of the dataset
is printed beside ours (GSNet paper, AAAI 2025, github.com/yecy749/GSNet).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gsnet_deploy.contracts.atomic import write_text_atomic
from gsnet_deploy.errors import BackendError, DatasetError, ImageError
from gsnet_deploy.eval.datasets import DatasetSpec, SamplePair, check_mask_size, read_image, read_mask
from gsnet_deploy.eval.metrics import ConfusionMatrix, compute_metrics

Predictor = Callable[[np.ndarray], np.ndarray]


@dataclass
class SkippedFile:
    """A sample left out of the run because its image or mask file could not be read.

    Attributes:
        path: The sample's image file.
        reason: The read error, which names the unreadable file.
    """

    path: str
    reason: str


@dataclass
class PredictorResult:
    """Metrics of one predictor over the evaluated images (percent; NaN where undefined).

    Attributes:
        name: Predictor name (the key it was passed under).
        miou: Mean IoU over classes with ground truth, excluded classes left out.
        macc: Mean class accuracy, same classes.
        fwiou: Frequency-weighted IoU.
        pacc: Pixel accuracy over non-ignored pixels.
        iou: Per-class IoU, ``len(class_names)`` entries.
        acc: Per-class accuracy.
        confusion_matrix: ``[K+1, K+1]`` counts indexed ``[prediction, ground truth]``.
        predict_seconds: Time spent inside the predictor.
        images_per_second: Evaluated images over ``predict_seconds``.
    """

    name: str
    miou: float
    macc: float
    fwiou: float
    pacc: float
    iou: list[float]
    acc: list[float]
    confusion_matrix: list[list[int]]
    predict_seconds: float
    images_per_second: float


@dataclass
class Comparison:
    """Predictor ``b`` against predictor ``a`` on the same images (deltas are ``b - a``).

    Attributes:
        a: Name of the reference predictor.
        b: Name of the compared predictor.
        miou_delta: ``miou(b) - miou(a)`` in points.
        iou_delta: Per-class ``iou(b) - iou(a)`` (NaN where either is NaN).
        pixel_agreement: Percent of all pixels where both predict the same class.
        valid_pixel_agreement: The same over pixels whose label is not the ignore label.
    """

    a: str
    b: str
    miou_delta: float
    iou_delta: list[float]
    pixel_agreement: float
    valid_pixel_agreement: float


@dataclass
class EvalReport:
    """Everything one ``gsnet eval`` run measured.

    Attributes:
        dataset: Dataset name (``DatasetName`` value).
        class_names: The evaluator's classes (``stuff_classes``), in label order.
        ignore_label: Label left out of the confusion matrix.
        excluded_classes: Class indices left out of the means.
        paper_miou: GSNet's mIoU in the paper's Table 2 for this dataset.
        num_listed: Samples given to the run after ``limit``.
        num_evaluated: Samples evaluated (listed minus skipped).
        skipped: Samples skipped because a file could not be read.
        results: One entry per predictor, in the order given.
        comparison: Present when two predictors were given.
        wall_seconds: Wall time of the whole loop (reading included).
        images_per_second: ``num_evaluated / wall_seconds``.
    """

    dataset: str
    class_names: list[str]
    ignore_label: int
    excluded_classes: list[int]
    paper_miou: float
    num_listed: int
    num_evaluated: int
    skipped: list[SkippedFile] = field(default_factory=list)
    results: list[PredictorResult] = field(default_factory=list)
    comparison: Comparison | None = None
    wall_seconds: float = 0.0
    images_per_second: float = 0.0

    def to_json(self) -> str:
        """Serialize as JSON; NaN (undefined metrics) becomes ``null``."""
        return json.dumps(_nan_to_none(asdict(self)), indent=2, allow_nan=False)

    def format_table(self) -> str:
        """Per-class IoU and mIoU of each predictor, beside the paper's Table 2 mIoU."""
        names = [r.name for r in self.results]
        cols = names + (["delta"] if self.comparison else []) + ["paper"]
        width = max([len(c) for c in self.class_names] + [len("pixel accuracy")]) + len(" (excluded)")
        colw = max([8] + [len(c) + 1 for c in cols])
        header = (
            f"{self.dataset}: {self.num_evaluated} images evaluated, {len(self.skipped)} skipped "
            f"(ignore label {self.ignore_label}; IoU in %)"
        )
        lines = [header]
        lines.append("class".ljust(width) + "".join(c.rjust(colw) for c in cols))
        lines.append("-" * (width + colw * len(cols)))
        for i, cname in enumerate(self.class_names):
            label = cname + (" (excluded)" if i in self.excluded_classes else "")
            cells = [r.iou[i] for r in self.results]
            if self.comparison:
                cells.append(self.comparison.iou_delta[i])
            row = "".join(_fmt(v, signed=(j == len(names))).rjust(colw) for j, v in enumerate(cells))
            lines.append(label.ljust(width) + row + "".rjust(colw))
        lines.append("-" * (width + colw * len(cols)))
        for label, attr in (("mIoU", "miou"), ("pixel accuracy", "pacc")):
            cells = [getattr(r, attr) for r in self.results]
            if self.comparison:
                cells.append(cells[1] - cells[0])
            row = "".join(_fmt(v, signed=(j == len(names))).rjust(colw) for j, v in enumerate(cells))
            paper = _fmt(self.paper_miou) if attr == "miou" else ""
            lines.append(label.ljust(width) + row + paper.rjust(colw))
        lines.append(
            "paper: GSNet's Table 2 mIoU with the official checkpoint (not measured here); "
            "'-': class without labelled pixels, left out of the mean."
        )
        if self.comparison:
            c = self.comparison
            lines.append(
                f"pixel agreement {c.a} vs {c.b}: {_fmt(c.pixel_agreement)} % of all pixels, "
                f"{_fmt(c.valid_pixel_agreement)} % of labelled pixels; delta = {c.b} - {c.a}."
            )
        speed = ", ".join(f"{r.name} {r.images_per_second:.2f} img/s" for r in self.results)
        lines.append(f"speed: {speed} (predictor only); {self.images_per_second:.2f} img/s overall.")
        for s in self.skipped:
            lines.append(f"skipped {s.path}: {s.reason}")
        return "\n".join(lines)


def _fmt(value: float, signed: bool = False) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return obj


def write_report(report: EvalReport, path: Path) -> None:
    """Write ``report.to_json()`` to ``path`` atomically (``contracts.atomic``).

    Args:
        report: The report.
        path: Target JSON file; its folder is created if missing.
    """
    write_text_atomic(path, report.to_json() + "\n")


def _check_prediction(pred: Any, name: str, shape: tuple[int, int], num_classes: int, image: Path) -> np.ndarray:
    if not isinstance(pred, np.ndarray) or pred.shape != shape:
        got = getattr(pred, "shape", type(pred).__name__)
        raise BackendError(
            f"Predictor {name!r} returned {got} for {str(image)!r}, expected a class map "
            f"of shape {shape}; it must return an integer [H, W] array."
        )
    if not np.issubdtype(pred.dtype, np.integer):
        raise BackendError(
            f"Predictor {name!r} returned dtype {pred.dtype} for {str(image)!r}; it must "
            f"return integer class indices (argmax of the logits)."
        )
    lo, hi = (int(pred.min()), int(pred.max())) if pred.size else (0, 0)
    if lo < 0 or hi >= num_classes:
        raise BackendError(
            f"Predictor {name!r} returned class indices {lo}..{hi} for {str(image)!r}, "
            f"outside 0..{num_classes - 1}; pass the dataset's vocabulary as classes."
        )
    return pred


def evaluate(
    spec: DatasetSpec,
    pairs: Sequence[SamplePair],
    predictors: Mapping[str, Predictor],
    limit: int | None = None,
    progress: bool = True,
) -> EvalReport:
    """Run predictors over a benchmark and compute detectron2-style metrics.

    Args:
        spec: The benchmark (class list, ignore label, excluded classes, paper number).
        pairs: Samples, e.g. from ``list_pairs``; evaluated in the given order.
        predictors: One entry for a normal evaluation, two for a comparison (the first is the
            reference ``A``, the second ``B``). Each maps uint8 ``[H, W, 3]`` RGB to integer
            ``[H, W]`` class indices.
        limit: Evaluate only the first ``limit`` samples.
        progress: Show a tqdm progress bar (images per second) and skip notes on stderr.

    Returns:
        The report. Samples whose image or mask is unreadable, corrupt, of the wrong size or
        holds labels outside the class list are skipped and listed in ``skipped``.

    Raises:
        BackendError: If not one or two predictors are given, or a predictor returns a map of the
            wrong shape, dtype or class range.
        DatasetError: If ``limit`` is below 1 or no sample could be read.
    """
    if len(predictors) not in (1, 2):
        raise BackendError(
            f"evaluate takes one predictor or two to compare, got {len(predictors)} "
            f"({', '.join(predictors)}); pass one backend or --compare A B."
        )
    if limit is not None and limit < 1:
        raise DatasetError(f"--limit is {limit}; pass a positive number of images.")
    selected = list(pairs)[:limit] if limit is not None else list(pairs)
    names = list(predictors)
    k = spec.num_classes
    matrices = {n: ConfusionMatrix(k, spec.ignore_label) for n in names}
    seconds = dict.fromkeys(names, 0.0)
    agree = agree_valid = total = total_valid = 0
    skipped: list[SkippedFile] = []

    from tqdm import tqdm

    bar = tqdm(selected, desc=f"eval {spec.name.value}", unit="img", disable=not progress, file=sys.stderr)
    start = time.perf_counter()
    for sample in bar:
        try:
            image = read_image(sample.image)
            gt = read_mask(sample.mask, spec)
            check_mask_size(image, gt, sample.mask)
        except (ImageError, DatasetError) as exc:
            # NOTE: one rule for every defective file (unreadable, corrupt, wrong size, bad labels): the
            # sample is skipped and listed, the run goes on, and `gsnet eval` exits 1 when any was skipped.
            skipped.append(SkippedFile(path=str(sample.image), reason=str(exc)))
            if progress:
                tqdm.write(f"skipped: {exc}", file=sys.stderr)
                bar.set_postfix(skipped=len(skipped))
            continue
        preds: list[np.ndarray] = []
        for n in names:
            t0 = time.perf_counter()
            raw = predictors[n](image)
            seconds[n] += time.perf_counter() - t0
            pred = _check_prediction(raw, n, gt.shape, k, sample.image)
            matrices[n].update(pred, gt)
            preds.append(pred)
        if len(preds) == 2:
            same = preds[0] == preds[1]  # [H, W]
            valid = gt != spec.ignore_label
            agree += int(same.sum())
            total += same.size
            agree_valid += int((same & valid).sum())
            total_valid += int(valid.sum())
    wall = time.perf_counter() - start
    bar.close()

    evaluated = len(selected) - len(skipped)
    if evaluated == 0:
        raise DatasetError(
            f"No sample of {spec.name.value} could be read ({len(skipped)} skipped, first: "
            f"{skipped[0].path if skipped else 'none listed'}); check the dataset files."
        )

    results = []
    for n in names:
        m = compute_metrics(matrices[n].matrix, exclude=spec.excluded_classes)
        results.append(
            PredictorResult(
                name=n,
                miou=m.miou,
                macc=m.macc,
                fwiou=m.fwiou,
                pacc=m.pacc,
                iou=[float(v) for v in m.iou],
                acc=[float(v) for v in m.acc],
                confusion_matrix=matrices[n].matrix.tolist(),
                predict_seconds=seconds[n],
                images_per_second=evaluated / seconds[n] if seconds[n] > 0 else float("nan"),
            )
        )

    comparison = None
    if len(results) == 2:
        ra, rb = results
        comparison = Comparison(
            a=ra.name,
            b=rb.name,
            miou_delta=rb.miou - ra.miou,
            iou_delta=[b - a for a, b in zip(ra.iou, rb.iou)],  # NaN propagates
            pixel_agreement=100.0 * agree / total if total else float("nan"),
            valid_pixel_agreement=100.0 * agree_valid / total_valid if total_valid else float("nan"),
        )

    return EvalReport(
        dataset=spec.name.value,
        class_names=list(spec.stuff_classes),
        ignore_label=spec.ignore_label,
        excluded_classes=list(spec.excluded_classes),
        paper_miou=spec.paper_miou,
        num_listed=len(selected),
        num_evaluated=evaluated,
        skipped=skipped,
        results=results,
        comparison=comparison,
        wall_seconds=wall,
        images_per_second=evaluated / wall if wall > 0 else float("nan"),
    )
