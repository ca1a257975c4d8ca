"""``gsnet export check``: how far each engine or FP16 / Q/DQ model drifts from the FP32 ONNX.

Each candidate image graph (the TensorRT engine where TensorRT is present, otherwise every FP16 /
Q/DQ ONNX model of the build folder on ONNX Runtime's CPU provider) runs on the same calibration
views and text embeddings as the FP32 ``image_graph.onnx``; the report gives the maximum absolute and
relative-L2 logit error, the fraction of pixels whose argmax class agrees, and the per-class IoU of
the argmax masks against FP32's. A table for the terminal and a JSON file (written atomically).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gsnet_deploy import io_names
from gsnet_deploy.errors import ExportError
from gsnet_deploy.export.manifest import Graph, write_json_atomic

CHECK_FILE = "check.json"
CANDIDATE_FILES = ("image_graph.fp16.onnx", "image_graph.int8.onnx", "image_graph.int8.fp16.onnx")


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

    """

    candidate: str
    max_abs_error: float
    rel_l2_error: float
    argmax_agreement: float
    per_class_iou: tuple[float, ...]

    @property
    def mean_iou(self) -> float:
        """Mean of the per-class IoUs that are defined."""
        values = [v for v in self.per_class_iou if not np.isnan(v)]
        return float(np.mean(values)) if values else float("nan")


def compare_logits(reference: np.ndarray, candidate: np.ndarray, name: str = "candidate") -> LogitComparison:
    """Compare two logit arrays ``[B, N, H, W]`` (see ``LogitComparison``).

    Raises:
        ExportError: shapes differ.

    """
    if reference.shape != candidate.shape or reference.ndim != 4:
        raise ExportError(f"Cannot compare logits of shapes {reference.shape} and {candidate.shape}; both must be [B, N, H, W].")
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
    return LogitComparison(
        candidate=name,
        max_abs_error=float(np.abs(diff).max()),
        rel_l2_error=float(np.linalg.norm(diff) / ref_norm) if ref_norm > 0 else float(np.linalg.norm(diff)),
        argmax_agreement=float((ref_label == cand_label).mean()),
        per_class_iou=tuple(ious),
    )


def run_onnx_cpu(path: Path, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run an ONNX model once on ONNX Runtime's CPU provider (a minimal runner for checks and tests)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
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

    Returns:
        One ``LogitComparison`` per candidate.

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
    if use_engines:
        from gsnet_deploy.runtime.tensorrt_backend import TensorRTBackend

        with TensorRTBackend(out_dir) as backend:
            logits = _run_image(backend.image.run, views, text_embeds, batch)
        results.append(
            compare_logits(
                reference,
                logits,
                f"image_graph.engine ({backend.manifests[Graph.IMAGE].precision.value}, TensorRT)",
            )
        )
    else:
        for name in CANDIDATE_FILES:
            path = out_dir / name
            if path.is_file():
                logits = _run_image(lambda f, p=path: run_onnx_cpu(p, f), views, text_embeds, batch)
                results.append(compare_logits(reference, logits, f"{name} (onnxruntime CPU)"))
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
            "results": [asdict(r) | {"mean_iou": r.mean_iou} for r in results],
        },
    )
    return results


def format_table(results: Sequence[LogitComparison]) -> str:
    """A plain-text table of the comparisons for the terminal."""
    header = f"{'candidate':<46} {'max abs':>9} {'rel L2':>8} {'argmax agree':>13} {'mean IoU':>9}"
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r.candidate:<46} {r.max_abs_error:>9.4f} {r.rel_l2_error:>8.4f} {r.argmax_agreement:>13.4f} {r.mean_iou:>9.4f}"
        )
    return "\n".join(lines)
