"""INT8 Q/DQ model by ModelOpt ONNX PTQ on the CPU: Q/DQ nodes, runs on ONNX Runtime, close to FP32."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from gsnet_deploy import io_names
from gsnet_deploy.calib.quantize import (
    CalibMethod,
    image_graph_feeds,
    quantize_image_graph,
    reference_text_embeds,
)
from gsnet_deploy.errors import ExportError
from gsnet_deploy.export.check import run_onnx_cpu

sys.path.insert(0, str(Path(__file__).parent))
import standin_graphs


def _rel_l2(reference: np.ndarray, candidate: np.ndarray) -> float:
    ref, cand = reference.astype(np.float64), candidate.astype(np.float64)
    return float(np.sqrt(((cand - ref) ** 2).sum()) / np.sqrt((ref**2).sum()))


@pytest.mark.parametrize(("method", "tolerance"), [(CalibMethod.ENTROPY, 0.05), (CalibMethod.MAX, 0.05)])
def test_quantize_standin_image_graph(tmp_path: Path, method: CalibMethod, tolerance: float) -> None:
    onnx_dir = standin_graphs.write_standin_onnx_dir(tmp_path / "onnx")
    embeds = reference_text_embeds(onnx_dir, standin_graphs.standin_tokens(6))
    rng = np.random.default_rng(1)
    views = rng.uniform(0, 255, size=(10, 3, 384, 384)).astype(np.float32)
    out = quantize_image_graph(onnx_dir, tmp_path / "out", views, text_embeds=embeds, method=method)
    assert out == tmp_path / "out" / "image_graph.int8.onnx"
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    record = json.loads((tmp_path / "out" / "image_graph.int8.onnx.json").read_text())
    assert record["model_digest"] == "standin-0" and record["calibration_method"] == method.value

    test_views = rng.uniform(0, 255, size=(2, 3, 384, 384)).astype(np.float32)
    feeds = {io_names.IMAGES: test_views, io_names.TEXT_EMBEDS: embeds}
    reference = run_onnx_cpu(onnx_dir / io_names.IMAGE_GRAPH_FILE, feeds)[io_names.LOGITS]
    candidate = run_onnx_cpu(out, feeds)[io_names.LOGITS]
    assert candidate.shape == (2, 6, 96, 96) and np.isfinite(candidate).all()
    assert _rel_l2(reference, candidate) <= tolerance


def test_feeds_keep_all_classes_per_batch() -> None:
    views = np.zeros((12, 3, 8, 8), np.float32)
    embeds = np.ones((3, 512), np.float32)
    feeds = image_graph_feeds(views, embeds)
    assert [f[io_names.IMAGES].shape[0] for f in feeds] == [5, 5, 2]
    assert all(f[io_names.TEXT_EMBEDS].shape == (3, 512) for f in feeds)
    with pytest.raises(ExportError, match="non-empty"):
        image_graph_feeds(views[:0], embeds)


def test_quantize_missing_model(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="does not exist"):
        quantize_image_graph(
            tmp_path,
            tmp_path / "out",
            np.zeros((5, 3, 384, 384), np.float32),
            text_embeds=np.ones((2, 512), np.float32),
        )
