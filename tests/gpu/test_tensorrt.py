"""TensorRT engines built from ONNX, compared with ONNX Runtime; only where TensorRT and a CUDA GPU exist."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gsnet_deploy import io_names
from gsnet_deploy.export.precision import Precision


def _skip_reason() -> str | None:
    try:
        import tensorrt
    except ImportError:
        return "TensorRT is not installed"
    if not hasattr(tensorrt, "Builder"):
        return "only tensorrt-stubs is installed (no tensorrt.Builder)"
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        return "cuda-python (cuda.bindings) is not installed"
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or count < 1:
        return f"no CUDA device ({err})"
    return None


_REASON = _skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.trt, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]


@pytest.fixture
def onnx_dir(standin_graphs, request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """The lead's ``tiny_onnx_dir`` fixture where it exists, else the stand-in graphs."""
    try:
        return Path(request.getfixturevalue("tiny_onnx_dir"))
    except pytest.FixtureLookupError:
        return standin_graphs.write_standin_onnx_dir(tmp_path / "onnx")


def _tokens(n: int) -> np.ndarray:
    from gsnet_deploy.calib.views import calibration_tokens

    return calibration_tokens(n, seed=1)


@pytest.mark.parametrize(("precision", "tolerance"), [(Precision.FP16, 0.05), (Precision.INT8, 0.08), (Precision.BEST, 0.1)])
def test_engines_match_onnxruntime(onnx_dir: Path, tmp_path: Path, precision: Precision, tolerance: float) -> None:
    from gsnet_deploy.export.build import build_engines
    from gsnet_deploy.export.check import run_onnx_cpu
    from gsnet_deploy.runtime.tensorrt_backend import TensorRTBackend

    calib = tmp_path / "calib"
    calib.mkdir()
    from PIL import Image

    rng = np.random.default_rng(0)
    for k in range(2):
        Image.fromarray(rng.integers(0, 256, size=(400, 600, 3), dtype=np.uint8)).save(calib / f"{k}.png")
    out = tmp_path / "engines"
    result = build_engines(onnx_dir, out, precision, classes_opt=6, calib_images=[calib], text_tokens=_tokens(6))
    assert (out / "image_graph.engine").is_file() and (out / "text_encoder.engine.json").is_file()
    assert result.manifests[next(iter(result.manifests))].model_digest

    tokens = _tokens(6)
    ref_embeds = run_onnx_cpu(onnx_dir / io_names.TEXT_GRAPH_FILE, {io_names.TEXT_TOKENS: tokens})[io_names.TEXT_EMBEDS]
    views = rng.uniform(0, 255, size=(11, 3, 384, 384)).astype(np.float32)  # 11 > profile max 8: chunked
    ref_logits = run_onnx_cpu(onnx_dir / io_names.IMAGE_GRAPH_FILE, {io_names.IMAGES: views, io_names.TEXT_EMBEDS: ref_embeds})[
        io_names.LOGITS
    ]
    for cuda_graphs in (False, True):
        with TensorRTBackend(out, cuda_graphs=cuda_graphs) as backend:
            embeds = backend.text.run({io_names.TEXT_TOKENS: tokens})[io_names.TEXT_EMBEDS]
            logits = backend.image.run({io_names.IMAGES: views, io_names.TEXT_EMBEDS: ref_embeds})[io_names.LOGITS]
            again = backend.image.run({io_names.IMAGES: views, io_names.TEXT_EMBEDS: ref_embeds})[io_names.LOGITS]
        assert embeds.shape == ref_embeds.shape and logits.shape == ref_logits.shape
        assert np.isfinite(logits).all()
        np.testing.assert_allclose(embeds, ref_embeds, rtol=0, atol=0.02)
        rel = np.linalg.norm((logits - ref_logits).astype(np.float64)) / np.linalg.norm(ref_logits.astype(np.float64))
        assert rel <= tolerance, f"{precision.value}: relative L2 {rel:.4f}"
        np.testing.assert_allclose(again, logits, rtol=0, atol=1e-5)  # graph replay gives the same numbers
