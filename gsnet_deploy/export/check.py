"""``gsnet export check``: how far each engine or FP16 / Q/DQ model drifts from the FP32 ONNX.

Each candidate image graph (the TensorRT engine where TensorRT is present, otherwise every FP16 /
Q/DQ ONNX model of the build folder on ONNX Runtime's CPU provider) runs on the same calibration
views and text embeddings as the FP32 ``image_graph.onnx``; the report gives the maximum absolute and
relative-L2 logit error, the fraction of pixels whose argmax class agrees, and the per-class IoU of
the argmax masks against FP32's. A table for the terminal and a JSON file (written atomically).

With ground-truth labels of the views (the held-out synthetic scenes of ``eval.synthetic`` and the
trained ``tests/data/synthetic_tiny.pth``), each candidate's mIoU and FP32's are measured against
the labels too. Every candidate is judged by the gate of its precision (``GATES``): FP16 keeps the
FP32 argmax on at least 99.5% of pixels; INT8 and best on at least 97% and lose at most 2 mIoU
points. Relative L2 alone cannot tell a good model from a broken one: on weights where every class
scores alike, a class-swapped model stays within 0.05 of FP32.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from gsnet_deploy.contracts import io_names
from gsnet_deploy.contracts.atomic import write_json_atomic
from gsnet_deploy.contracts.engine_manifest import Graph
from gsnet_deploy.contracts.precision import Precision
from gsnet_deploy.errors import ExportError

CHECK_FILE = "check.json"
# derived ONNX models of a build folder and the precision whose gate judges each
CANDIDATES = {
    "image_graph.fp16.onnx": Precision.FP16,
    "image_graph.int8.onnx": Precision.INT8,
    "image_graph.int8.fp16.onnx": Precision.BEST,
}
CANDIDATE_FILES = tuple(CANDIDATES)


@dataclass(frozen=True)
class AccuracyGate:
    """Pass / fail thresholds of one precision against FP32.

    Attributes:
        min_agreement: least fraction of pixels whose argmax class equals FP32's.
        max_miou_drop: most mIoU points (against ground truth) the candidate may lose to FP32;
            None: not judged. Only applied where labels are given.

    """

    min_agreement: float
    max_miou_drop: float | None = None


GATES: dict[Precision, AccuracyGate] = {
    Precision.FP16: AccuracyGate(min_agreement=0.995),
    Precision.INT8: AccuracyGate(min_agreement=0.97, max_miou_drop=2.0),
    Precision.BEST: AccuracyGate(min_agreement=0.97, max_miou_drop=2.0),
}


@dataclass(frozen=True)
class LogitComparison:
    """Candidate logits against reference logits ``[B, N, H, W]``.

    Attributes:
        candidate: what was compared (file name and runtime).
        max_abs_error: max |candidate - reference|.
        rel_l2_error: ||candidate - reference|| / ||reference|| over all elements.
        argmax_agreement: fraction of pixels whose argmax class (over N) is the same.
        per_class_iou: IoU of each class's argmax mask against the reference's; NaN where the class
            is in neither mask.
        reference_miou: mIoU (percent) of the reference's argmax against ground-truth labels; None
            without labels.
        candidate_miou: the same for the candidate.
        failures: why the candidate fails its gate (one line each); empty when it passes or was not
            judged.
        gate: the gate it was judged by; None when not judged.

    """

    candidate: str
    max_abs_error: float
    rel_l2_error: float
    argmax_agreement: float
    per_class_iou: tuple[float, ...]
    reference_miou: float | None = None
    candidate_miou: float | None = None
    failures: tuple[str, ...] = ()
    gate: AccuracyGate | None = None

    @property
    def mean_iou(self) -> float:
        """Mean of the per-class IoUs that are defined."""
        values = [v for v in self.per_class_iou if not np.isnan(v)]
        return float(np.mean(values)) if values else float("nan")

    @property
    def miou_delta(self) -> float | None:
        """Candidate mIoU minus FP32 mIoU in points (against ground truth); None without labels."""
        if self.reference_miou is None or self.candidate_miou is None:
            return None
        return self.candidate_miou - self.reference_miou

    @property
    def passed(self) -> bool:
        """Whether the candidate meets its gate (True when it was not judged)."""
        return not self.failures


def labels_at(labels: np.ndarray, side: int) -> np.ndarray:
    """Labels ``[S, H, W]`` sampled at the centres of a ``side x side`` grid (the logits' grid)."""
    if labels.shape[-1] == side and labels.shape[-2] == side:
        return labels
    step_y, step_x = labels.shape[-2] // side, labels.shape[-1] // side
    if step_y < 1 or step_x < 1 or labels.shape[-2] % side or labels.shape[-1] % side:
        raise ExportError(f"Cannot sample labels of shape {labels.shape} at a {side}x{side} grid; give a multiple of {side}.")
    return labels[..., step_y // 2 :: step_y, step_x // 2 :: step_x]


def label_miou(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """mIoU (percent) of integer predictions against labels of the same shape, over the classes in either."""
    flat = num_classes * pred.astype(np.int64).reshape(-1) + labels.astype(np.int64).reshape(-1)
    matrix = np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)  # [pred, gt]
    tp = np.diagonal(matrix).astype(np.float64)
    union = matrix.sum(axis=0) + matrix.sum(axis=1) - tp
    present = union > 0
    return float(100 * (tp[present] / union[present]).mean()) if present.any() else float("nan")


def judge(comparison: LogitComparison, gate: AccuracyGate) -> tuple[str, ...]:
    """The ways ``comparison`` misses ``gate`` (empty: it passes)."""
    failures = []
    if not comparison.argmax_agreement >= gate.min_agreement:
        failures.append(f"argmax agreement {comparison.argmax_agreement:.2%} < {gate.min_agreement:.1%}")
    delta = comparison.miou_delta
    if gate.max_miou_drop is not None and delta is not None and not delta >= -gate.max_miou_drop:
        failures.append(f"mIoU {delta:+.2f} points vs FP32 (allowed -{gate.max_miou_drop:g})")
    return tuple(failures)


def compare_logits(
    reference: np.ndarray,
    candidate: np.ndarray,
    name: str = "candidate",
    *,
    labels: np.ndarray | None = None,
    gate: AccuracyGate | None = None,
) -> LogitComparison:
    """Compare two logit arrays ``[B, N, H, W]`` (see ``LogitComparison``).

    Args:
        reference: FP32 logits.
        candidate: the logits under test.
        name: what the candidate is.
        labels: ground truth ``[B, h, w]`` (class indices into N; ``h``, ``w`` multiples of H, W),
            for the mIoU of both against the labels.
        gate: thresholds to judge the candidate by; None: not judged.

    Raises:
        ExportError: shapes differ.

    """
    if reference.shape != candidate.shape or reference.ndim != 4:
        raise ExportError(f"Cannot compare logits of shapes {reference.shape} and {candidate.shape}; both must be [B, N, H, W].")
    if labels is not None and (labels.ndim != 3 or labels.shape[0] != reference.shape[0]):
        raise ExportError(f"Labels of shape {labels.shape} do not match logits {reference.shape}; give [B, H, W].")
    ref = reference.astype(np.float64)
    cand = candidate.astype(np.float64)
    diff = cand - ref
    ref_norm = float(np.linalg.norm(ref))
    ref_label = ref.argmax(axis=1)  # [B, H, W]
    cand_label = cand.argmax(axis=1)  # [B, H, W]
    ious = []
    for cls in range(ref.shape[1]):
        a, b = ref_label == cls, cand_label == cls
        union = int(np.logical_or(a, b).sum())
        ious.append(float(np.logical_and(a, b).sum() / union) if union else float("nan"))
    miou: tuple[float | None, float | None] = (None, None)
    if labels is not None:
        truth = labels_at(labels, ref.shape[-1])  # [B, H, W]
        miou = (label_miou(ref_label, truth, ref.shape[1]), label_miou(cand_label, truth, ref.shape[1]))
    result = LogitComparison(
        candidate=name,
        max_abs_error=float(np.abs(diff).max()),
        rel_l2_error=float(np.linalg.norm(diff) / ref_norm) if ref_norm > 0 else float(np.linalg.norm(diff)),
        argmax_agreement=float((ref_label == cand_label).mean()),
        per_class_iou=tuple(ious),
        reference_miou=miou[0],
        candidate_miou=miou[1],
    )
    return result if gate is None else replace(result, failures=judge(result, gate), gate=gate)


def run_onnx_cpu(path: Path, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run an ONNX model once on ONNX Runtime's CPU provider (a minimal runner for checks and tests)."""
    from gsnet_deploy.runtime.ort_session import open_session

    session = open_session(path)
    names = [out.name for out in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds))))


def _run_image(runner: Any, views: np.ndarray, embeds: np.ndarray, batch: int) -> np.ndarray:
    outs = [
        runner({io_names.IMAGES: views[i : i + batch], io_names.TEXT_EMBEDS: embeds})[io_names.LOGITS]
        for i in range(0, len(views), batch)
    ]
    return np.concatenate(outs, axis=0)  # [V, N, 96, 96]


def check_build(
    out_dir: Path,
    views: np.ndarray,
    text_embeds: np.ndarray,
    *,
    onnx_dir: Path | None = None,
    use_engines: bool | None = None,
    batch: int = 5,
    labels: np.ndarray | None = None,
    gates: Mapping[Precision, AccuracyGate] | None = GATES,
) -> list[LogitComparison]:
    """Compare every candidate of a build folder with the FP32 image graph and write ``check.json``.

    Args:
        out_dir: the folder of ``gsnet export build`` (engines and / or derived ONNX models).
        views: float32 ``[V, 3, 384, 384]`` (``calib.views.calibration_views``).
        text_embeds: float32 ``[N, 512]`` from the FP32 text graph.
        onnx_dir: folder with the FP32 ``image_graph.onnx`` (None: read from ``out_dir/build.json``).
        use_engines: compare the TensorRT engine (True), the ONNX models on ONNX Runtime CPU (False),
            or the engine where TensorRT is present and the engine exists (None).
        batch: views per run.
        labels: ground truth ``[V, H, W]`` of the views (indices into the N classes), to measure
            mIoU against; None: agreement only.
        gates: thresholds per precision (None: report only, judge nothing).

    Returns:
        One ``LogitComparison`` per candidate, judged by its precision's gate.

    Raises:
        ExportError: no FP32 model or no candidate was found.

    """
    out_dir = Path(out_dir)
    if onnx_dir is None:
        record = out_dir / "build.json"
        try:
            onnx_dir = Path(json.loads(record.read_text())["onnx_dir"])
        except (OSError, ValueError, KeyError) as err:
            raise ExportError(
                f"Cannot find the FP32 ONNX folder: {record} is missing or malformed ({err}); pass --onnx DIR."
            ) from err
    reference_path = Path(onnx_dir) / io_names.IMAGE_GRAPH_FILE
    if not reference_path.is_file():
        raise ExportError(f"FP32 image graph {reference_path} does not exist; run `gsnet export onnx` first.")
    reference = _run_image(lambda f: run_onnx_cpu(reference_path, f), views, text_embeds, batch)
    results: list[LogitComparison] = []
    if use_engines is None:
        from gsnet_deploy.export.trt import installed_tensorrt_version

        use_engines = installed_tensorrt_version() is not None and (out_dir / "image_graph.engine").is_file()
    engine_layers: dict[str, object] | None = None
    if use_engines:
        from gsnet_deploy.export.trt import engine_layer_precisions, summarize_layer_precisions
        from gsnet_deploy.runtime.tensorrt_backend import TensorRTBackend

        with TensorRTBackend(out_dir) as backend:
            logits = _run_image(backend.image.run, views, text_embeds, batch)
        precision = backend.manifests[Graph.IMAGE].precision
        # which precision each layer really runs in, from TensorRT's engine inspector
        engine_layers = summarize_layer_precisions(
            engine_layer_precisions((out_dir / "image_graph.engine").read_bytes(), backend.manifests[Graph.IMAGE].dla_core)
        )
        results.append(
            compare_logits(
                reference,
                logits,
                f"image_graph.engine ({precision.value}, TensorRT)",
                labels=labels,
                gate=None if gates is None else gates.get(precision),
            )
        )
    else:
        for name, precision in CANDIDATES.items():
            path = out_dir / name
            if path.is_file():
                logits = _run_image(lambda f, p=path: run_onnx_cpu(p, f), views, text_embeds, batch)
                gate = None if gates is None else gates.get(precision)
                results.append(compare_logits(reference, logits, f"{name} (onnxruntime CPU)", labels=labels, gate=gate))
    if not results:
        raise ExportError(
            f"Nothing to check in {out_dir}: no engine and none of {', '.join(CANDIDATE_FILES)}; run `gsnet export build` first."
        )
    write_json_atomic(
        out_dir / CHECK_FILE,
        {
            "reference": str(reference_path),
            "num_views": int(views.shape[0]),
            "num_classes": int(text_embeds.shape[0]),
            "labelled": labels is not None,
            "engine_layers": engine_layers,
            "results": [asdict(r) | {"mean_iou": r.mean_iou, "miou_delta": r.miou_delta, "passed": r.passed} for r in results],
        },
    )
    return results


def format_table(results: Sequence[LogitComparison]) -> str:
    """A plain-text table of the comparisons for the terminal."""
    header = (
        f"{'candidate':<46} {'max abs':>9} {'rel L2':>8} {'argmax agree':>13} {'IoU vs FP32':>12}"
        f" {'mIoU':>7} {'vs FP32':>8}  verdict"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        miou = "-" if r.candidate_miou is None else f"{r.candidate_miou:.2f}"
        delta = "-" if r.miou_delta is None else f"{r.miou_delta:+.2f}"
        verdict = "-" if r.gate is None else ("PASS" if r.passed else "FAIL: " + "; ".join(r.failures))
        lines.append(
            f"{r.candidate:<46} {r.max_abs_error:>9.4f} {r.rel_l2_error:>8.4f} {r.argmax_agreement:>13.4f}"
            f" {r.mean_iou:>12.4f} {miou:>7} {delta:>8}  {verdict}"
        )
    return "\n".join(lines)
