"""FP16 ONNX by ModelOpt AutoCast: Cast nodes present, runs on ONNX Runtime CPU, logits close to FP32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from gsnet_deploy.contracts import io_names
from gsnet_deploy.contracts.tensorrt_import import find_tensorrt
from gsnet_deploy.errors import ExportError
from gsnet_deploy.export.check import run_onnx_cpu
from gsnet_deploy.export.fp16 import casts_after_dequantize, make_fp16_onnx


def _rel_l2(reference: np.ndarray, candidate: np.ndarray) -> float:
    ref, cand = reference.astype(np.float64), candidate.astype(np.float64)
    return float(np.sqrt(((cand - ref) ** 2).sum()) / np.sqrt((ref**2).sum()))


@pytest.mark.parametrize("num_views", [1, 3])
def test_fp16_image_graph_casts_runs_and_stays_close(standin_graphs, tmp_path: Path, num_views: int) -> None:
    standin = standin_graphs
    onnx_dir = standin.write_standin_onnx_dir(tmp_path / "onnx")
    rng = np.random.default_rng(3)
    embeds = run_onnx_cpu(onnx_dir / io_names.TEXT_GRAPH_FILE, {io_names.TEXT_TOKENS: standin.standin_tokens(6)})[
        io_names.TEXT_EMBEDS
    ]
    images = rng.uniform(0, 255, size=(num_views, 3, 384, 384)).astype(np.float32)
    feeds = {io_names.IMAGES: images, io_names.TEXT_EMBEDS: embeds}
    dst = make_fp16_onnx(
        onnx_dir / io_names.IMAGE_GRAPH_FILE,
        tmp_path / "out" / "image_graph.fp16.onnx",
        reference_feeds=feeds,
    )

    model = onnx.load(str(dst))
    assert any(n.op_type == "Cast" for n in model.graph.node)
    fp16_inits = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert fp16_inits, "AutoCast left every weight in FP32"
    # graph I/O keep FP32 so every engine takes the same dtypes
    assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for v in list(model.graph.input) + list(model.graph.output))

    reference = run_onnx_cpu(onnx_dir / io_names.IMAGE_GRAPH_FILE, feeds)[io_names.LOGITS]
    candidate = run_onnx_cpu(dst, feeds)[io_names.LOGITS]
    assert candidate.shape == (num_views, 6, 96, 96) and candidate.dtype == np.float32
    assert np.isfinite(candidate).all()
    assert _rel_l2(reference, candidate) <= 0.05


def test_fp16_text_graph(standin_graphs, tmp_path: Path) -> None:
    standin = standin_graphs
    onnx_dir = standin.write_standin_onnx_dir(tmp_path / "onnx")
    tokens = standin.standin_tokens(5)
    dst = make_fp16_onnx(
        onnx_dir / io_names.TEXT_GRAPH_FILE,
        tmp_path / "text.fp16.onnx",
        reference_feeds={io_names.TEXT_TOKENS: tokens},
    )
    reference = run_onnx_cpu(onnx_dir / io_names.TEXT_GRAPH_FILE, {io_names.TEXT_TOKENS: tokens})[io_names.TEXT_EMBEDS]
    candidate = run_onnx_cpu(dst, {io_names.TEXT_TOKENS: tokens})[io_names.TEXT_EMBEDS]
    np.testing.assert_allclose(np.linalg.norm(candidate.astype(np.float64), axis=1), 1.0, rtol=0, atol=5e-3)
    assert _rel_l2(reference, candidate) <= 0.05


def test_fp16_missing_source(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="does not exist"):
        make_fp16_onnx(tmp_path / "nope.onnx", tmp_path / "x.onnx")


# ---- the real tiny GSNet graphs (tiny_onnx_dir: demo weights, exported once per session) ----


def test_fp16_tiny_image_graph_casts_runs_and_stays_close(tiny_onnx_dir: Path, tmp_path: Path) -> None:
    from gsnet_deploy.calib.quantize import reference_text_embeds
    from gsnet_deploy.calib.views import calibration_tokens
    from gsnet_deploy.runtime.examples import example_image
    from gsnet_deploy.runtime.protocol import paper_views

    embeds = reference_text_embeds(tiny_onnx_dir, calibration_tokens(6))
    views = paper_views(example_image(0)).views.astype(np.float32)  # [5, 3, 384, 384]
    dst = make_fp16_onnx(
        tiny_onnx_dir / io_names.IMAGE_GRAPH_FILE,
        tmp_path / "image_graph.fp16.onnx",
        reference_feeds={io_names.IMAGES: views[:2], io_names.TEXT_EMBEDS: embeds},
    )
    model = onnx.load(str(dst))
    assert any(n.op_type == "Cast" for n in model.graph.node)
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    # other B and N than the reference run: the dynamic axes survive AutoCast
    feeds = {io_names.IMAGES: views[2:5], io_names.TEXT_EMBEDS: embeds[:4]}
    reference = run_onnx_cpu(tiny_onnx_dir / io_names.IMAGE_GRAPH_FILE, feeds)[io_names.LOGITS]
    candidate = run_onnx_cpu(dst, feeds)[io_names.LOGITS]
    assert candidate.shape == (3, 4, 96, 96) and candidate.dtype == np.float32
    assert np.isfinite(candidate).all()
    assert _rel_l2(reference, candidate) <= 0.05


def test_fp16_tiny_text_graph_keeps_dynamic_classes(tiny_onnx_dir: Path, tmp_path: Path) -> None:
    from gsnet_deploy.calib.views import calibration_tokens

    dst = make_fp16_onnx(
        tiny_onnx_dir / io_names.TEXT_GRAPH_FILE,
        tmp_path / "text_encoder.fp16.onnx",
        reference_feeds={io_names.TEXT_TOKENS: calibration_tokens(5)},
    )
    assert any(n.op_type == "Cast" for n in onnx.load(str(dst)).graph.node)
    tokens = calibration_tokens(3, seed=7)
    reference = run_onnx_cpu(tiny_onnx_dir / io_names.TEXT_GRAPH_FILE, {io_names.TEXT_TOKENS: tokens})[io_names.TEXT_EMBEDS]
    candidate = run_onnx_cpu(dst, {io_names.TEXT_TOKENS: tokens})[io_names.TEXT_EMBEDS]
    assert candidate.shape == (3, 512) and np.isfinite(candidate).all()
    # L2-normalized rows, checked directly in float64
    np.testing.assert_allclose(np.linalg.norm(candidate.astype(np.float64), axis=1), 1.0, rtol=0, atol=5e-3)
    assert _rel_l2(reference, candidate) <= 0.05


@pytest.mark.skipif(find_tensorrt() is not None, reason="real TensorRT installed: the build would go on")
def test_best_onnx_has_no_cast_between_dequantize_and_its_consumer(tiny_onnx_dir: Path, tmp_path: Path) -> None:
    # catches: the `best` model keeping Q/DQ in FP32 while its convs go FP16, so a Cast sits between each
    # DequantizeLinear and its Conv/MatMul (ModelOpt's INT8+FP16 path makes the DQ scales FP16 instead)
    from PIL import Image

    from gsnet_deploy.calib.views import calibration_tokens
    from gsnet_deploy.contracts.precision import Precision
    from gsnet_deploy.errors import EngineBuildError
    from gsnet_deploy.export.build import build_engines

    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, size=(400, 600, 3), dtype=np.uint8)).save(calib / "0.png")
    out = tmp_path / "engines"
    with pytest.raises(EngineBuildError, match="TensorRT is not installed"):
        build_engines(tiny_onnx_dir, out, Precision.BEST, classes_opt=6, calib_images=[calib], text_tokens=calibration_tokens(6))
    model = onnx.load(str(out / "image_graph.int8.fp16.onnx"))
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    dequantize = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert dequantize, "the best model has no Q/DQ nodes"
    read_by = [c.op_type for dq in dequantize for c in consumers.get(dq.output[0], [])]
    assert "Cast" not in read_by
    assert {"Conv", "MatMul"} & set(read_by)
    assert casts_after_dequantize(model) == []
    scales = {t.name: t.data_type for t in model.graph.initializer}
    assert all(scales.get(dq.input[1]) == onnx.TensorProto.FLOAT16 for dq in dequantize if dq.input[1] in scales)
