"""Engine manifests, host checks, and the TensorRT backend's chunking / feed checks (no TensorRT needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gsnet_deploy.contracts import io_names
from gsnet_deploy.contracts.engine_manifest import (
    EngineManifest,
    Graph,
    HostInfo,
    Profile,
    ShapeRange,
    check_engine_compatible,
    check_same_model,
    check_tensorrt_version,
    manifest_path,
    parse_version,
    read_manifest,
    write_manifest,
)
from gsnet_deploy.contracts.precision import Precision
from gsnet_deploy.errors import BackendError, EngineBuildError
from gsnet_deploy.runtime.tensorrt_backend import TensorRTBackend, check_feeds, chunk_slices

H100 = HostInfo("10.13.0.35", "NVIDIA H100 80GB HBM3", (9, 0))
IMAGE_PROFILE = Profile(
    {
        io_names.IMAGES: ShapeRange((1, 3, 384, 384), (5, 3, 384, 384), (8, 3, 384, 384)),
        io_names.TEXT_EMBEDS: ShapeRange((1, 512), (40, 512), (256, 512)),
    }
)
TEXT_PROFILE = Profile({io_names.TEXT_TOKENS: ShapeRange((1, 77), (40, 77), (256, 77))})


def _manifest(graph: Graph = Graph.IMAGE, host: HostInfo = H100, digest: str = "abc", **kw: object) -> EngineManifest:
    profile = IMAGE_PROFILE if graph is Graph.IMAGE else TEXT_PROFILE
    return EngineManifest(
        graph=graph,
        engine_file=graph.engine_file,
        onnx_file=f"{graph.value}.fp16.onnx",
        precision=Precision.FP16,
        precision_path="strongly typed from the AutoCast FP16 ONNX",
        strongly_typed=True,
        host=host,
        profiles=(profile,),
        model_digest=digest,
        **kw,  # type: ignore[arg-type]
    )


def test_manifest_roundtrip_through_json(tmp_path: Path) -> None:
    manifest = _manifest(dla_core=0, plugin_used=True, plugin_note="fused", notes=("a", "b"))
    path = write_manifest(manifest, tmp_path)
    assert path == tmp_path / "image_graph.engine.json"
    assert read_manifest(tmp_path / "image_graph.engine") == manifest
    payload = json.loads(path.read_text())
    assert payload["profiles"][0][io_names.IMAGES] == {
        "min": [1, 3, 384, 384],
        "opt": [5, 3, 384, 384],
        "max": [8, 3, 384, 384],
    }
    assert payload["compute_capability"] == [9, 0] and payload["plugin_used"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image_graph.engine.json"]  # no temp files left


def test_read_manifest_missing_and_malformed(tmp_path: Path) -> None:
    with pytest.raises(EngineBuildError, match=r"manifest .* is missing"):
        read_manifest(tmp_path / "image_graph.engine")
    manifest_path(tmp_path / "image_graph.engine").write_text('{"schema": 1, "graph": "image_graph"}')
    with pytest.raises(EngineBuildError, match="malformed"):
        read_manifest(tmp_path / "image_graph.engine")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("10.3.0", (10, 3, 0)), ("10.13.0.35", (10, 13, 0, 35)), ("11.0.0rc1", (11, 0, 0)), ("9", (9,))],
)
def test_parse_version(text: str, expected: tuple[int, ...]) -> None:
    assert parse_version(text) == expected


@pytest.mark.parametrize(
    ("built", "running", "compatible", "ok"),
    [
        ("10.3.0", "10.3.0", False, True),
        ("10.3.0", "10.3.1", False, False),
        ("10.3.0", "10.13.0", True, True),
        ("10.13.0", "10.3.0", True, False),
        ("10.13.0", "11.1.0", True, True),
        ("10.13.0", "11.1.0", False, False),
        ("11.0.0", "12.0.0", True, False),
    ],
)
def test_check_tensorrt_version(built: str, running: str, compatible: bool, ok: bool) -> None:
    if ok:
        check_tensorrt_version(built, running, version_compatible=compatible)
    else:
        with pytest.raises(EngineBuildError, match="TensorRT"):
            check_tensorrt_version(built, running, version_compatible=compatible)


def test_check_engine_compatible_gpu() -> None:
    check_engine_compatible(_manifest(), H100)
    a100 = HostInfo(H100.tensorrt_version, "NVIDIA A100-SXM4-80GB", (8, 0))
    with pytest.raises(EngineBuildError, match=r"built for NVIDIA H100.*--hardware-compatible"):
        check_engine_compatible(_manifest(), a100)
    check_engine_compatible(_manifest(hardware_compatible=True), a100)
    turing = HostInfo(H100.tensorrt_version, "Tesla T4", (7, 5))
    with pytest.raises(EngineBuildError, match="Ampere or newer"):
        check_engine_compatible(_manifest(hardware_compatible=True), turing)
    with pytest.raises(EngineBuildError, match=r"TensorRT 10\.13\.0\.35 but this host runs TensorRT 10\.3\.0"):
        check_engine_compatible(_manifest(), HostInfo("10.3.0", H100.gpu_name, H100.compute_capability))


def test_check_same_model() -> None:
    check_same_model(_manifest(Graph.TEXT), _manifest(Graph.IMAGE))
    with pytest.raises(EngineBuildError, match="digest 'x' differs"):
        check_same_model(_manifest(Graph.TEXT, digest="x"), _manifest(Graph.IMAGE, digest="y"))


def test_shape_range_rejects_unordered() -> None:
    with pytest.raises(EngineBuildError, match="min <= opt <= max"):
        ShapeRange((5,), (1,), (8,))


@pytest.mark.parametrize(
    ("total", "max_batch", "expected"),
    [
        (5, 8, [(0, 5)]),
        (8, 8, [(0, 8)]),
        (13, 8, [(0, 8), (8, 13)]),
        (20, 5, [(0, 5), (5, 10), (10, 15), (15, 20)]),
    ],
)
def test_chunk_slices(total: int, max_batch: int, expected: list[tuple[int, int]]) -> None:
    assert [(s.start, s.stop) for s in chunk_slices(total, max_batch)] == expected


def test_check_feeds_allows_large_chunk_axis_refuses_other_dims() -> None:
    manifest = _manifest()
    images = np.zeros((13, 3, 384, 384), np.float32)  # more views than the profile max: chunked later
    check_feeds(
        {io_names.IMAGES: images, io_names.TEXT_EMBEDS: np.zeros((40, 512), np.float32)},
        manifest,
        io_names.IMAGES,
    )
    with pytest.raises(BackendError, match=r"dim 0 is 300 .* accepts 1\.\.256"):
        check_feeds(
            {io_names.IMAGES: images, io_names.TEXT_EMBEDS: np.zeros((300, 512), np.float32)},
            manifest,
            io_names.IMAGES,
        )
    with pytest.raises(BackendError, match="missing"):
        check_feeds({io_names.IMAGES: images}, manifest, io_names.IMAGES)
    with pytest.raises(BackendError, match="dim 2 is 512"):
        check_feeds(
            {
                io_names.IMAGES: np.zeros((1, 3, 512, 512), np.float32),
                io_names.TEXT_EMBEDS: np.zeros((4, 512), np.float32),
            },
            manifest,
            io_names.IMAGES,
        )


def test_backend_reads_manifests_and_refuses_mixed_models(tmp_path: Path) -> None:
    write_manifest(_manifest(Graph.TEXT), tmp_path)
    write_manifest(_manifest(Graph.IMAGE), tmp_path)
    backend = TensorRTBackend(tmp_path)
    assert (backend.model_digest, backend.max_views, backend.preferred_views) == ("abc", 8, 5)
    with pytest.raises(BackendError, match="not open"):
        _ = backend.image
    write_manifest(_manifest(Graph.TEXT, digest="other"), tmp_path)
    with pytest.raises(EngineBuildError, match="differs"):
        TensorRTBackend(tmp_path)


def test_backend_enter_without_tensorrt_is_clear(tmp_path: Path) -> None:
    try:
        import tensorrt

        if hasattr(tensorrt, "Runtime"):
            pytest.skip("real TensorRT installed: covered by tests/gpu")
    except ImportError:
        pass
    write_manifest(_manifest(Graph.TEXT), tmp_path)
    write_manifest(_manifest(Graph.IMAGE), tmp_path)
    with pytest.raises(BackendError, match="TensorRT is not installed"):
        with TensorRTBackend(tmp_path):
            pass
