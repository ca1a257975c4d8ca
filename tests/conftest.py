"""Shared fixtures: the tiny GSNet (demo weights) and small synthetic images."""

from __future__ import annotations

import os
import shutil

# Triton reads TRITON_INTERPRET when it decorates its own library functions, at its first import, and
# other packages (ModelOpt) import triton early: set it before any test module is collected. A host with
# an NVIDIA driver runs the compiled kernels instead.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json
from pathlib import Path

import numpy as np
import pytest

TRT_OPS_FILE = Path(__file__).resolve().parent / "data" / "trt_onnx_ops.json"


@pytest.fixture(scope="session")
def tiny_gsnet():
    """GSNet with the tiny config and seeded demo weights (eval mode)."""
    from gsnet_deploy.model import build_gsnet, tiny_cfg

    return build_gsnet(tiny_cfg())


@pytest.fixture
def rng() -> np.random.Generator:
    """A fresh random generator per test (seeded from the OS: values differ run to run)."""
    return np.random.default_rng()


def _trt_supported_ops() -> frozenset[str]:
    data = json.loads(TRT_OPS_FILE.read_text())
    return frozenset(name for name, entry in data["operators"].items() if entry["supported"])


@pytest.fixture(scope="session")
def trt_supported_ops() -> frozenset[str]:
    """Ops TensorRT's ONNX parser supports (tests/data/trt_onnx_ops.json, with its source and version)."""
    return _trt_supported_ops()


@pytest.fixture(scope="session")
def tiny_model(tiny_gsnet):
    """The tiny GSNet config with seeded demo weights, eval mode (same object as ``tiny_gsnet``)."""
    return tiny_gsnet


@pytest.fixture(scope="session")
def tiny_onnx_dir(tiny_model, tmp_path_factory) -> Path:
    """``tiny_model`` exported (simplified, checked against TensorRT's op list) to a session temp folder."""
    from gsnet_deploy.export.onnx import export_onnx

    out = tmp_path_factory.mktemp("tiny_onnx") / "onnx"
    export_onnx(tiny_model, out, supported_ops=_trt_supported_ops())
    return out


@pytest.fixture(scope="session")
def standin_graphs():
    """The module ``tests/calib/standin_graphs.py``: small ONNX graphs with the real IO names (tests has no package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("standin_graphs", Path(__file__).parent / "calib" / "standin_graphs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HEAVY_LOCK = Path("/tmp/gsnet-heavy.lock")  # one job over ~3 GB at a time on a shared machine


@pytest.fixture(scope="session")
def paper_onnx_dir(tmp_path_factory) -> Path:
    """The paper-size GSNet (demo weights) exported to ONNX once per session (~2 min, ~8 GB; slow tests only).

    ``GSNET_PAPER_ONNX_DIR`` names an existing export of ``build_gsnet(paper_cfg())`` to reuse instead.
    The export holds ``/tmp/gsnet-heavy.lock`` so that it never runs beside another heavy job.
    """
    reuse = os.environ.get("GSNET_PAPER_ONNX_DIR")
    if reuse:
        path = Path(reuse)
        if not (path / "image_graph.onnx").is_file():
            pytest.fail(f"GSNET_PAPER_ONNX_DIR={reuse} has no image_graph.onnx")
        return path
    import fcntl

    from gsnet_deploy.export.onnx import export_onnx
    from gsnet_deploy.model import build_gsnet, paper_cfg

    out = tmp_path_factory.mktemp("paper_onnx") / "onnx"
    with HEAVY_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            export_onnx(build_gsnet(paper_cfg()).eval(), out)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out
