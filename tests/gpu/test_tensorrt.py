"""TensorRT engines built from ONNX, compared with ONNX Runtime; only where TensorRT and a CUDA GPU exist."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gsnet_deploy.contracts import io_names
from gsnet_deploy.contracts.precision import Precision


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


def test_dla_shaped_fixed_profile_pads_and_slices(onnx_dir: Path, tmp_path: Path) -> None:
    """The image engine rebuilt with the fixed profile a DLA build uses (5 views, N fixed), run on the GPU:
    11 views go as 5, 5 and 1 padded to 5, and the outputs match ONNX Runtime."""
    import dataclasses

    from gsnet_deploy.contracts.engine_manifest import Graph, read_manifest, write_manifest
    from gsnet_deploy.export.build import build_engines
    from gsnet_deploy.export.check import run_onnx_cpu
    from gsnet_deploy.export.profiles import dim_ranges, onnx_input_shapes, profile_for
    from gsnet_deploy.export.trt import BuildConfig, BuildFlags, EngineFromNetwork, NetworkFromOnnx, SaveEngine
    from gsnet_deploy.runtime.tensorrt_backend import TensorRTBackend

    out = tmp_path / "engines"
    tokens = _tokens(6)
    build_engines(onnx_dir, out, Precision.FP16, classes_opt=6, text_tokens=tokens)
    manifest = read_manifest(out / Graph.IMAGE.engine_file)
    src = onnx_dir / io_names.IMAGE_GRAPH_FILE
    fixed = profile_for(onnx_input_shapes(src), dim_ranges(6, fixed=True))
    flags = BuildFlags(strongly_typed=False, fp16=False)
    SaveEngine(
        EngineFromNetwork(NetworkFromOnnx(src, strongly_typed=False), BuildConfig(flags, profiles=[fixed])),
        out / Graph.IMAGE.engine_file,
    )()
    write_manifest(dataclasses.replace(manifest, profiles=(fixed,), onnx_file=src.name), out)

    rng = np.random.default_rng(0)
    embeds = run_onnx_cpu(onnx_dir / io_names.TEXT_GRAPH_FILE, {io_names.TEXT_TOKENS: tokens})[io_names.TEXT_EMBEDS]
    views = rng.uniform(0, 255, size=(11, 3, 384, 384)).astype(np.float32)
    ref = run_onnx_cpu(src, {io_names.IMAGES: views, io_names.TEXT_EMBEDS: embeds})[io_names.LOGITS]
    for cuda_graphs in (False, True):
        with TensorRTBackend(out, cuda_graphs=cuda_graphs) as backend:
            logits = backend.image.run({io_names.IMAGES: views, io_names.TEXT_EMBEDS: embeds})[io_names.LOGITS]
        assert logits.shape == ref.shape
        rel = np.linalg.norm((logits - ref).astype(np.float64)) / np.linalg.norm(ref.astype(np.float64))
        assert rel <= 1e-3, f"fixed profile, cuda_graphs={cuda_graphs}: relative L2 {rel:.2e}"


def _cost_volume_onnx(path: Path) -> Path:
    """The QGFF front at the plugin's sizes (512-d features, 128-channel 7x7 convs) inside a small graph."""
    import warnings

    import torch

    from gsnet_deploy.kernels import cost_volume_reference

    class Front(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.clip = torch.nn.Conv2d(1, 128, 7, padding=3)
            self.dino = torch.nn.Conv2d(1, 128, 7, padding=3)

        def forward(self, e_clip: torch.Tensor, e_dino: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
            z = cost_volume_reference(e_clip, e_dino, text, self.clip.weight, self.clip.bias, self.dino.weight, self.dino.bias)
            return z * 2.0

    args = (torch.randn(2, 512, 24, 24), torch.randn(2, 512, 24, 24), torch.randn(5, 512))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Front().eval(), args, str(path), opset_version=17, dynamo=False,
            input_names=["e_clip", "e_dino", "text_embeds"], output_names=["out"],
            dynamic_axes={"e_clip": {0: "B"}, "e_dino": {0: "B"}, "text_embeds": {0: "N"}, "out": {0: "BN"}},
        )  # fmt: skip
    return path


def test_plugin_engine_matches_onnxruntime(tmp_path: Path) -> None:
    """The cost volume rewritten to gsnet::fused_cost_volume, built with the AOT plugin for this GPU, vs ONNX Runtime."""
    import onnx

    from gsnet_deploy.contracts.engine_manifest import Profile, ShapeRange
    from gsnet_deploy.export.check import run_onnx_cpu
    from gsnet_deploy.export.plugin_rewrite import require_cost_volume_plugin
    from gsnet_deploy.export.trt import BuildConfig, BuildFlags, EngineFromNetwork, NetworkFromOnnx, installed_tensorrt_version
    from gsnet_deploy.kernels.trt_plugin import plugin_supported, ptx_arch, register_plugin
    from gsnet_deploy.runtime.tensorrt_backend import current_gpu

    version = installed_tensorrt_version()
    if version is None or not plugin_supported(version):
        pytest.skip(f"TensorRT {version} has no AOT plugins (10.9+)")
    src = _cost_volume_onnx(tmp_path / "front.onnx")
    rewritten = tmp_path / "front.plugin.onnx"
    onnx.save(require_cost_volume_plugin(onnx.load(str(src))), str(rewritten))
    arch = ptx_arch(current_gpu()[1])
    profile = Profile(
        shapes={
            "e_clip": ShapeRange((1, 512, 24, 24), (2, 512, 24, 24), (4, 512, 24, 24)),
            "e_dino": ShapeRange((1, 512, 24, 24), (2, 512, 24, 24), (4, 512, 24, 24)),
            "text_embeds": ShapeRange((1, 512), (5, 512), (40, 512)),
        }
    )
    plan = EngineFromNetwork(
        NetworkFromOnnx(rewritten, strongly_typed=False, plugin_hook=lambda: register_plugin(arch)),
        BuildConfig(BuildFlags(strongly_typed=False), profiles=[profile]),
    )()
    register_plugin(arch)  # a second build hook in the same process must not raise

    import tensorrt as trt
    from cuda.bindings import runtime as cudart

    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan)
    assert engine is not None
    rng = np.random.default_rng(0)
    feeds = {
        "e_clip": rng.normal(size=(3, 512, 24, 24)).astype(np.float32),
        "e_dino": rng.normal(size=(3, 512, 24, 24)).astype(np.float32),
        "text_embeds": rng.normal(size=(7, 512)).astype(np.float32),
    }
    ref = run_onnx_cpu(src, feeds)["out"]
    context = engine.create_execution_context()
    pointers = []
    for name, value in feeds.items():
        assert context.set_input_shape(name, value.shape)
        err, ptr = cudart.cudaMalloc(value.nbytes)
        assert err == cudart.cudaError_t.cudaSuccess
        cudart.cudaMemcpy(ptr, value.ctypes.data, value.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice)
        context.set_tensor_address(name, ptr)
        pointers.append(ptr)
    outputs = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
            shape = tuple(context.get_tensor_shape(name))
            host = np.empty(shape, dtype=np.float32)
            err, ptr = cudart.cudaMalloc(max(host.nbytes, 1))
            assert err == cudart.cudaError_t.cudaSuccess
            context.set_tensor_address(name, ptr)
            outputs[name] = (host, ptr)
            pointers.append(ptr)
    assert context.execute_async_v3(0)
    cudart.cudaDeviceSynchronize()
    host, ptr = outputs["out"]
    cudart.cudaMemcpy(host.ctypes.data, ptr, host.nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost)
    for ptr in pointers:
        cudart.cudaFree(ptr)
    np.testing.assert_allclose(host, ref, rtol=0, atol=2e-3)


@pytest.mark.slow
def test_paper_size_plugin_build_runs(paper_onnx_dir: Path, tmp_path: Path) -> None:
    """`export build --plugin` on the paper-size graphs: the rewrite fires, the manifest says so, and the
    engine's logits match ONNX Runtime on one view."""
    from gsnet_deploy.export.build import build_engines
    from gsnet_deploy.export.check import run_onnx_cpu
    from gsnet_deploy.export.trt import installed_tensorrt_version
    from gsnet_deploy.kernels.trt_plugin import plugin_supported
    from gsnet_deploy.runtime.tensorrt_backend import TensorRTBackend

    version = installed_tensorrt_version()
    if version is None or not plugin_supported(version):
        pytest.skip(f"TensorRT {version} has no AOT plugins (10.9+)")
    out = tmp_path / "engines"
    tokens = _tokens(6)
    result = build_engines(paper_onnx_dir, out, Precision.FP16, classes_opt=6, plugin=True, text_tokens=tokens)
    manifest = next(m for m in result.manifests.values() if m.graph.value == "image_graph")
    assert manifest.plugin_used
    embeds = run_onnx_cpu(paper_onnx_dir / io_names.TEXT_GRAPH_FILE, {io_names.TEXT_TOKENS: tokens})[io_names.TEXT_EMBEDS]
    views = np.random.default_rng(0).uniform(0, 255, size=(1, 3, 384, 384)).astype(np.float32)
    ref = run_onnx_cpu(paper_onnx_dir / io_names.IMAGE_GRAPH_FILE, {io_names.IMAGES: views, io_names.TEXT_EMBEDS: embeds})
    with TensorRTBackend(out) as backend:
        logits = backend.image.run({io_names.IMAGES: views, io_names.TEXT_EMBEDS: embeds})[io_names.LOGITS]
    ref_logits = ref[io_names.LOGITS].astype(np.float64)
    rel = np.linalg.norm(logits - ref_logits) / np.linalg.norm(ref_logits)
    assert rel <= 0.05, f"paper-size FP16 + plugin: relative L2 {rel:.4f}"


def test_paper_engines_match_onnxruntime(onnx_dir: Path, tmp_path: Path) -> None:
    """paper_encoder.engine + paper_head.engine (FP16) against ONNX Runtime's paper graphs on the CPU: class maps
    identical wherever FP16 rounding cannot flip the argmax, probabilities within FP16 tolerance; the combined
    call (features kept on the GPU) equals the two runners; an output beyond the profile fails with one line."""
    from gsnet_deploy.errors import BackendError
    from gsnet_deploy.export.build import build_engines
    from gsnet_deploy.export.check import run_onnx_cpu
    from gsnet_deploy.runtime.tensorrt_backend import TensorRTBackend

    if not (onnx_dir / io_names.PAPER_HEAD_FILE).is_file():
        pytest.skip("this ONNX folder has no paper graphs")
    out = tmp_path / "engines"
    tokens = _tokens(40)
    result = build_engines(onnx_dir, out, Precision.FP16, classes_opt=40, text_tokens=tokens)
    assert (out / "paper_head.engine").is_file() and result.manifests
    import tensorrt as trt

    from gsnet_deploy.export.build import SIZE_MATH_NOTE
    from gsnet_deploy.export.version_policy import STRONG_TYPING_MIN

    weak = tuple(int(p) for p in trt.__version__.split(".")[:2]) < STRONG_TYPING_MIN
    for graph in (g for g in result.manifests if g.value.startswith("paper_")):  # FP16 resize coordinates pinned
        pinned = [n for n in result.manifests[graph].notes if n.endswith(SIZE_MATH_NOTE.split("}", 1)[1])]
        assert bool(pinned) is weak, (graph, result.manifests[graph].notes)
    head_engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine((out / "paper_head.engine").read_bytes())
    # out_size: a host shape tensor that is also computed with (cast to float for the resize scale)
    assert head_engine.get_tensor_location(io_names.OUT_SIZE) == trt.TensorLocation.HOST
    assert head_engine.is_shape_inference_io(io_names.OUT_SIZE)
    assert head_engine.get_tensor_dtype(io_names.OUT_SIZE) == trt.DataType.INT64
    embeds_all = run_onnx_cpu(onnx_dir / io_names.TEXT_GRAPH_FILE, {io_names.TEXT_TOKENS: tokens})[io_names.TEXT_EMBEDS]
    rng = np.random.default_rng(0)
    cases = [((640, 960), 5, (512, 768)), ((640, 853), 40, (517, 689)), ((1707, 640), 1, (2000, 750)), ((40, 2560), 3, (5, 333))]
    with TensorRTBackend(out) as backend:
        for (h, w), classes, size in cases:
            image = rng.integers(0, 256, size=(1, 3, h, w), dtype=np.uint8)
            embeds = embeds_all[:classes]
            features = run_onnx_cpu(onnx_dir / io_names.PAPER_ENCODER_FILE, {io_names.PAPER_IMAGE: image})
            head_feeds = {**features, io_names.TEXT_EMBEDS: embeds, io_names.OUT_SIZE: np.array(size, dtype=np.int64)}
            ref = run_onnx_cpu(onnx_dir / io_names.PAPER_HEAD_FILE, head_feeds)
            ref_probs = ref[io_names.PROBS].astype(np.float64)  # [N, H, W]
            got = backend.segment_paper(image, embeds, size, with_probs=True)
            assert got[io_names.CLASS_MAP].shape == size and got[io_names.PROBS].shape == ref_probs.shape
            np.testing.assert_allclose(got[io_names.PROBS], ref_probs, rtol=0, atol=2e-2)
            top2 = np.sort(ref_probs, axis=0)[-2:] if classes > 1 else np.stack([np.zeros(size), ref_probs[0]])
            safe = (top2[1] - top2[0]) > 4e-2  # FP16 cannot flip these pixels
            np.testing.assert_array_equal(got[io_names.CLASS_MAP][safe], ref[io_names.CLASS_MAP][safe])
            assert safe.mean() > 0.5, f"too few decided pixels to compare ({safe.mean():.2f})"
            # the two host-array runners agree with the combined call
            enc = backend.encoder.run({io_names.PAPER_IMAGE: image})
            split = backend.head.run(
                {**enc, io_names.TEXT_EMBEDS: embeds, io_names.OUT_SIZE: np.array(size)}, [io_names.CLASS_MAP]
            )
            np.testing.assert_array_equal(split[io_names.CLASS_MAP], got[io_names.CLASS_MAP])
        with pytest.raises(BackendError, match=r"outside what paper_head\.engine takes") as info:
            backend.segment_paper(image, embeds, (4000, 3000))
        assert "\n" not in str(info.value)
