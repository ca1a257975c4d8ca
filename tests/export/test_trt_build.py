"""Version paths, DLA decisions, optimization profiles and the no-TensorRT fallback of ``export.build``."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from gsnet_deploy.contracts import io_names
from gsnet_deploy.contracts.derived import OnnxVariant
from gsnet_deploy.contracts.engine_manifest import Graph, ShapeRange, parse_version
from gsnet_deploy.contracts.precision import Precision
from gsnet_deploy.errors import EngineBuildError
from gsnet_deploy.export.build import build_engines
from gsnet_deploy.export.dla import resolve_dla
from gsnet_deploy.export.profiles import DimRange, dim_ranges, onnx_input_shapes, profile_for
from gsnet_deploy.export.trt import (
    BuildConfig,
    BuildFlags,
    NetworkFromOnnx,
    installed_tensorrt_version,
    parse_layer_information,
    summarize_layer_precisions,
)
from gsnet_deploy.export.version_policy import select_build_path, variants_for_any_target

no_tensorrt = pytest.mark.skipif(installed_tensorrt_version() is not None, reason="real TensorRT installed")

# (version, precision) -> ((text variant, strongly typed, fp16, int8), (image ...)), written by hand
PATHS = {
    ((10, 3, 0), Precision.FP16): (("", False, True, False), ("", False, True, False)),
    ((10, 3, 0), Precision.INT8): (("", False, False, False), ("int8", False, False, True)),
    ((10, 3, 0), Precision.BEST): (("", False, True, False), ("int8", False, True, True)),
    ((10, 11, 0), Precision.FP16): (("", False, True, False), ("", False, True, False)),
    ((10, 12, 0), Precision.FP16): (("fp16", True, False, False), ("fp16", True, False, False)),
    ((10, 12, 0), Precision.INT8): (("", True, False, False), ("int8", True, False, False)),
    ((11, 1, 0), Precision.BEST): (("fp16", True, False, False), ("int8.fp16", True, False, False)),
    ((11, 0, 0), Precision.INT8): (("", True, False, False), ("int8", True, False, False)),
}


@pytest.mark.parametrize(("key", "expected"), list(PATHS.items()))
def test_select_build_path(key: tuple[tuple[int, ...], Precision], expected: tuple[tuple[str, bool, bool, bool], ...]) -> None:
    path = select_build_path(*key)
    for plan, (variant, strong, fp16, int8) in zip((path.text, path.image), expected):
        assert plan.variant.value == variant
        assert (plan.flags.strongly_typed, plan.flags.fp16, plan.flags.int8) == (strong, fp16, int8)
        assert ("strongly typed" if strong else "weakly typed") in plan.how


def test_select_build_path_refuses_tensorrt_9() -> None:
    with pytest.raises(EngineBuildError, match=r"TensorRT 9\.0 is older than 10\.0"):
        select_build_path((9, 0), Precision.FP16)


def test_strong_typing_refuses_precision_flags() -> None:
    with pytest.raises(EngineBuildError, match="strongly typed"):
        BuildFlags(strongly_typed=True, fp16=True)


def test_variants_for_any_target() -> None:
    assert variants_for_any_target(Precision.FP16) == {
        Graph.TEXT: (OnnxVariant.FP32, OnnxVariant.FP16),
        Graph.IMAGE: (OnnxVariant.FP32, OnnxVariant.FP16),
    }
    assert variants_for_any_target(Precision.BEST)[Graph.IMAGE] == (OnnxVariant.INT8, OnnxVariant.INT8_FP16)
    assert OnnxVariant.INT8_FP16.file_name(Graph.IMAGE) == "image_graph.int8.fp16.onnx"


@pytest.mark.parametrize(
    ("version", "cores", "core", "has_dla", "outcome"),
    [
        ((10, 3, 0), 2, None, True, None),
        ((10, 3, 0), 2, 1, True, 1),
        ((10, 3, 0), 2, 2, True, "does not exist; this device has 2"),
        ((10, 13, 0), 0, 0, True, "no DLA cores"),
        ((11, 0, 0), 0, 0, False, "TensorRT 11.0.0 has no DLA"),
        ((11, 0, 0), 2, 0, True, 0),
        ((10, 3, 0), 2, -1, True, "0 or more"),
    ],
)
def test_resolve_dla(version: tuple[int, ...], cores: int, core: int | None, has_dla: bool, outcome: int | str | None) -> None:
    if isinstance(outcome, str):
        with pytest.raises(EngineBuildError, match=outcome):
            resolve_dla(version, cores, core, has_dla_device_type=has_dla)
    else:
        assert resolve_dla(version, cores, core, has_dla_device_type=has_dla) == outcome


def test_profiles_from_standin_graphs(standin_graphs, tmp_path: Path) -> None:
    onnx_dir = standin_graphs.write_standin_onnx_dir(tmp_path / "onnx")
    image = profile_for(onnx_input_shapes(onnx_dir / io_names.IMAGE_GRAPH_FILE), dim_ranges(32))
    assert image.to_json() == {
        io_names.IMAGES: {"min": [1, 3, 384, 384], "opt": [5, 3, 384, 384], "max": [8, 3, 384, 384]},
        io_names.TEXT_EMBEDS: {"min": [1, 512], "opt": [32, 512], "max": [256, 512]},
    }
    text = profile_for(onnx_input_shapes(onnx_dir / io_names.TEXT_GRAPH_FILE), dim_ranges())
    assert text.to_json() == {io_names.TEXT_TOKENS: {"min": [1, 77], "opt": [40, 77], "max": [256, 77]}}
    fixed = profile_for(onnx_input_shapes(onnx_dir / io_names.IMAGE_GRAPH_FILE), dim_ranges(12, fixed=True))
    assert fixed.shapes[io_names.IMAGES].is_static and fixed.shapes[io_names.IMAGES].max == (5, 3, 384, 384)
    assert fixed.shapes[io_names.TEXT_EMBEDS].max == (12, 512)


@pytest.mark.parametrize("classes_opt", [0, 257])
def test_classes_opt_out_of_range(classes_opt: int) -> None:
    with pytest.raises(EngineBuildError, match="--classes-opt must be between 1 and 256"):
        dim_ranges(classes_opt)


def test_profile_for_unknown_dynamic_dim() -> None:
    with pytest.raises(EngineBuildError, match="dynamic dimension 'batch'"):
        profile_for({"x": ("batch", 3)}, dim_ranges())


@no_tensorrt
def test_loaders_without_tensorrt_say_so(tmp_path: Path) -> None:
    with pytest.raises(EngineBuildError, match="TensorRT is not installed"):
        NetworkFromOnnx(tmp_path / "x.onnx", strongly_typed=True)()


@no_tensorrt
def test_build_without_tensorrt_writes_fp16_onnx_then_one_line_error(standin_graphs, tmp_path: Path) -> None:
    onnx_dir = standin_graphs.write_standin_onnx_dir(tmp_path / "onnx")
    out = tmp_path / "engines"
    with pytest.raises(EngineBuildError, match="TensorRT is not installed") as info:
        build_engines(onnx_dir, out, Precision.FP16, classes_opt=8)
    assert "\n" not in str(info.value) and "same `gsnet export build` command" in str(info.value)
    for name in ("text_encoder.fp16.onnx", "image_graph.fp16.onnx"):
        model = onnx.load(str(out / name))
        assert any(n.op_type == "Cast" for n in model.graph.node)
        assert json.loads((out / f"{name}.json").read_text())["model_digest"] == "standin-0"
    assert json.loads((out / "build.json").read_text())["onnx_dir"] == str(onnx_dir.resolve())
    assert not list(out.glob("*.engine"))


@no_tensorrt
def test_build_int8_without_qdq_or_images_is_refused(standin_graphs, tmp_path: Path) -> None:
    onnx_dir = standin_graphs.write_standin_onnx_dir(tmp_path / "onnx")
    with pytest.raises(EngineBuildError, match="INT8 needs a Q/DQ model"):
        build_engines(onnx_dir, tmp_path / "engines", Precision.INT8)


# ---- the real tiny GSNet graphs (tiny_onnx_dir: demo weights, exported once per session) ----


@pytest.fixture(scope="module")
def tiny_fp16_build(tiny_onnx_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, EngineBuildError]:
    """``build_engines`` FP16 on the tiny graphs without TensorRT: the output folder and the error."""
    from gsnet_deploy.calib.views import calibration_tokens

    out = tmp_path_factory.mktemp("tiny_build") / "engines"
    with pytest.raises(EngineBuildError) as info:
        build_engines(tiny_onnx_dir, out, Precision.FP16, classes_opt=8, text_tokens=calibration_tokens(6))
    return out, info.value


@no_tensorrt
def test_build_tiny_without_tensorrt_writes_fp16_onnx_then_one_line_error(
    tiny_onnx_dir: Path, tiny_fp16_build: tuple[Path, EngineBuildError]
) -> None:
    out, error = tiny_fp16_build
    message = str(error)
    assert "\n" not in message
    assert message.startswith("TensorRT is not installed") and "same `gsnet export build` command" in message
    digest = json.loads((tiny_onnx_dir / io_names.MANIFEST_FILE).read_text())["model_digest"]
    for name in ("text_encoder.fp16.onnx", "image_graph.fp16.onnx", "paper_encoder.fp16.onnx", "paper_head.fp16.onnx"):
        model = onnx.load(str(out / name))
        assert any(n.op_type == "Cast" for n in model.graph.node)
        assert json.loads((out / f"{name}.json").read_text())["model_digest"] == digest
    assert not list(out.glob("*.engine"))


@no_tensorrt
def test_cli_build_without_tensorrt_one_line_no_traceback(
    tiny_onnx_dir: Path, tiny_fp16_build: tuple[Path, EngineBuildError], capsys: pytest.CaptureFixture[str]
) -> None:
    from gsnet_deploy.cli import main

    out, _ = tiny_fp16_build  # the FP16 models are there and fresh: the CLI reuses them
    code = main(["export", "build", "--onnx", str(tiny_onnx_dir), "--precision", "fp16", "--out", str(out)])
    err = capsys.readouterr().err
    assert code != 0
    assert "Traceback" not in err
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "TensorRT is not installed" in error_lines[0]
    assert "run the same `gsnet export build` command there" in error_lines[0]


# ---- TensorRT calls whose answers must be checked, on a stand-in tensorrt module ----


def _fake_tensorrt(timing_cache_ok: bool) -> tuple[object, object]:
    from types import SimpleNamespace

    class FakeConfig:
        def __init__(self) -> None:
            self.profiling_verbosity = None

        def set_flag(self, flag: object) -> None:
            pass

        def add_optimization_profile(self, profile: object) -> int:
            return 0

        def create_timing_cache(self, data: bytes) -> bytes:
            return data

        def set_timing_cache(self, cache: bytes, ignore_mismatch: bool) -> bool:
            assert ignore_mismatch is False
            return timing_cache_ok

    profile = SimpleNamespace(set_shape=lambda *args: None)
    builder = SimpleNamespace(create_builder_config=FakeConfig, create_optimization_profile=lambda: profile)
    trt = SimpleNamespace(
        BuilderFlag=SimpleNamespace(FP16=1, INT8=2),
        Dims=tuple,
        ProfilingVerbosity=SimpleNamespace(DETAILED="detailed"),
    )
    return trt, SimpleNamespace(builder=builder)


@pytest.mark.parametrize("accepted", [True, False])
def test_rejected_timing_cache_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, accepted: bool) -> None:
    # catches: set_timing_cache's False ignored, so a cache from another GPU / TensorRT is silently dropped
    import sys

    from gsnet_deploy.export import trt as trt_loaders

    trt, parsed = _fake_tensorrt(accepted)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(trt_loaders, "import_tensorrt", lambda: trt)
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"from another GPU")
    profile = profile_for({"x": ("B", 3)}, {"B": DimRange(1, 2, 4)})
    config = BuildConfig(BuildFlags(strongly_typed=True), profiles=[profile], timing_cache=cache)
    if accepted:
        assert config(parsed).profiling_verbosity == "detailed"  # the inspector needs DETAILED for precisions
    else:
        with pytest.raises(EngineBuildError, match="rejected the timing cache"):
            config(parsed)


INSPECTOR_JSON = json.dumps(
    {
        "Layers": [
            {
                "Name": "/conv1/Conv + /relu",
                "LayerType": "CaskConvolution",
                "Inputs": [{"Name": "x", "Format/Datatype": "Channel major INT8 format where channel % 32 == 0"}],
                "Outputs": [{"Name": "y", "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}],
            },
            {
                "Name": "/head/MatMul",
                "LayerType": "CaskGemmMatrixMultiply",
                "Inputs": [{"Name": "y", "Format/Datatype": "Row major linear FP16 format"}],
                "Outputs": [{"Name": "z", "Format/Datatype": "Row major linear FP32"}],
            },
            {"Name": "reformat", "LayerType": "Reformat", "Inputs": [], "Outputs": []},
        ]
    }
)


def test_layer_precisions_from_engine_inspector() -> None:
    # catches: a report that misreads the inspector's Format/Datatype strings or misses non-INT8 convs in `best`
    layers = parse_layer_information(INSPECTOR_JSON)
    assert [(layer.name, layer.precisions) for layer in layers] == [
        ("/conv1/Conv + /relu", ("INT8", "FP16")),
        ("/head/MatMul", ("FP16", "FP32")),
        ("reformat", ()),
    ]
    summary = summarize_layer_precisions(layers)
    assert summary["by_precision"] == {"FP16": 2, "FP32": 1, "INT8": 1}
    assert summary["conv_or_matmul_layers"] == 2 and summary["conv_or_matmul_without_int8"] == ["/head/MatMul"]
    names_only = parse_layer_information(json.dumps({"Layers": ["a", "b"]}))  # not built with DETAILED
    assert [layer.precisions for layer in names_only] == [(), ()]


# ---- engine manifests: platform and plugin recorded, engines that cannot load refused ----


def _engine_manifest(host, *, hardware_compatible: bool = False, plugin_used: bool = False):
    from gsnet_deploy.contracts.engine_manifest import EngineManifest, Profile, ShapeRange

    return EngineManifest(
        graph=Graph.IMAGE, engine_file="image_graph.engine", onnx_file="image_graph.onnx", precision=Precision.FP16,
        precision_path="test", strongly_typed=True, host=host,
        profiles=(Profile(shapes={io_names.IMAGES: ShapeRange((1, 3, 384, 384), (5, 3, 384, 384), (8, 3, 384, 384))}),),
        model_digest="d" * 16, plugin_used=plugin_used, hardware_compatible=hardware_compatible,
    )  # fmt: skip


X86_H100 = ("10.13.0", "NVIDIA H100 80GB HBM3", (9, 0), "Linux", "x86_64")
X86_A100 = ("10.13.0", "NVIDIA A100-SXM4-80GB", (8, 0), "Linux", "x86_64")
ARM_GH200 = ("10.13.0", "NVIDIA GH200 480GB", (9, 0), "Linux", "aarch64")


def _host(spec: tuple, known_platform: bool = True):
    from gsnet_deploy.contracts.engine_manifest import HostInfo

    version, name, cc, system, machine = spec
    return HostInfo(version, name, cc, system if known_platform else "", machine if known_platform else "")


def test_manifest_records_platform_and_plugin() -> None:
    # catches: a manifest that loses the build host's OS/machine or the plugin flag on its way to disk
    from gsnet_deploy.contracts.engine_manifest import EngineManifest

    manifest = _engine_manifest(_host(ARM_GH200), hardware_compatible=True, plugin_used=True)
    payload = manifest.to_json()
    assert (payload["system"], payload["machine"], payload["plugin_used"]) == ("Linux", "aarch64", True)
    assert EngineManifest.from_json(json.loads(json.dumps(payload))) == manifest
    del payload["system"], payload["machine"]  # a manifest written before the platform was recorded
    assert EngineManifest.from_json(payload).host.machine == ""


@pytest.mark.parametrize(
    ("built", "plugin", "runs_on", "refused"),
    [
        (X86_H100, False, X86_A100, None),  # hardware-compatible: another Ampere+ GPU, same platform
        (X86_H100, False, ARM_GH200, "aarch64"),  # same capability, other platform
        (X86_H100, True, X86_A100, "plugin"),  # the plugin's PTX is for sm_90 only
        (X86_H100, True, X86_H100, None),
    ],
)
def test_hardware_compatible_engines_refused_where_they_cannot_load(built, plugin: bool, runs_on, refused) -> None:
    # catches: a hardware-compatible engine accepted on any Ampere+ GPU whatever its platform or plugin
    from gsnet_deploy.contracts.engine_manifest import check_engine_compatible

    manifest = _engine_manifest(_host(built), hardware_compatible=True, plugin_used=plugin)
    if refused is None:
        check_engine_compatible(manifest, _host(runs_on))
    else:
        with pytest.raises(EngineBuildError, match=refused):
            check_engine_compatible(manifest, _host(runs_on))


def test_platform_unknown_in_old_manifests_is_not_refused() -> None:
    from gsnet_deploy.contracts.engine_manifest import check_engine_compatible

    check_engine_compatible(_engine_manifest(_host(X86_H100, known_platform=False), hardware_compatible=True), _host(X86_A100))


def test_build_refuses_plugin_with_hardware_compatible(standin_graphs, tmp_path: Path) -> None:
    # catches: --hardware-compatible --plugin accepted (the AOT PTX runs only on the build GPU)
    onnx_dir = standin_graphs.write_standin_onnx_dir(tmp_path / "onnx")
    with pytest.raises(EngineBuildError, match="--hardware-compatible") as info:
        build_engines(onnx_dir, tmp_path / "engines", Precision.FP16, plugin=True, hardware_compatible=True)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "engines").exists()  # refused before anything is written


# ---- the paper protocol engines: profiles with a shape-tensor value range, built beside the others ----


def _recording_tensorrt() -> tuple[object, object, list[tuple[str, tuple]], list[tuple[object, bool]]]:
    """A stand-in tensorrt whose optimization profile records set_shape / set_shape_input calls."""
    from types import SimpleNamespace

    calls: list[tuple[str, tuple]] = []
    preview: list[tuple[object, bool]] = []
    trt, parsed = _fake_tensorrt(True)
    profile = SimpleNamespace(
        set_shape=lambda name, *r: calls.append(("shape", (name, *map(tuple, r)))),
        set_shape_input=lambda name, *r: calls.append(("values", (name, *map(tuple, r)))),
    )
    parsed.builder.create_optimization_profile = lambda: profile
    config_type = parsed.builder.create_builder_config
    config_type.set_preview_feature = lambda self, feature, on: preview.append((feature, on))
    trt.PreviewFeature = SimpleNamespace(RUNTIME_ACTIVATION_RESIZE_10_10="resize")
    return trt, parsed, calls, preview


def test_paper_head_profile_sets_out_size_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_onnx_dir: Path) -> None:
    # catches: out_size given a *shape* range only (TensorRT then has no value range for the shape tensor and
    # refuses the network), set_shape called on a shape tensor, and the head built without runtime activation resize
    import sys

    from gsnet_deploy.export import trt as trt_loaders
    from gsnet_deploy.export.profiles import OUT_SIDE_MAX, paper_dim_ranges

    trt, parsed, calls, preview = _recording_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(trt_loaders, "import_tensorrt", lambda: trt)
    head = profile_for(onnx_input_shapes(tiny_onnx_dir / io_names.PAPER_HEAD_FILE), paper_dim_ranges(12))
    BuildConfig(BuildFlags(strongly_typed=True), profiles=[head], activation_resize=True)(parsed)
    assert ("values", (io_names.OUT_SIZE, (1, 1), (640, 960), (OUT_SIDE_MAX, OUT_SIDE_MAX))) in calls
    assert not [c for c in calls if c[0] == "shape" and c[1][0] == io_names.OUT_SIZE]
    assert ("shape", (io_names.TEXT_EMBEDS, (1, 512), (12, 512), (256, 512))) in calls
    assert preview == [("resize", True)]
    encoder = profile_for(onnx_input_shapes(tiny_onnx_dir / io_names.PAPER_ENCODER_FILE), paper_dim_ranges(12))
    assert encoder.shapes[io_names.PAPER_IMAGE] == ShapeRange((1, 3, 1, 1), (1, 3, 640, 960), (1, 3, 2560, 2560))
    assert OUT_SIDE_MAX**2 * 256 < 2**31  # every [N, H, W] tensor at the profile maximum stays int32-indexable


def _fake_build_pipeline(monkeypatch: pytest.MonkeyPatch, version: str) -> list[tuple[Path, object]]:
    """Stand-ins for TensorRT's parser and builder: every engine is b"plan:<onnx name>"; returns the (onnx, config) built."""
    from types import SimpleNamespace

    from gsnet_deploy.contracts.engine_manifest import HostInfo
    from gsnet_deploy.export import build as build_module
    from gsnet_deploy.export import trt as trt_loaders

    built: list[tuple[Path, object]] = []

    def engine_from_network(network, config):
        return lambda: (built.append((network(), config)), f"plan:{network().name}".encode())[1]

    monkeypatch.setattr(trt_loaders, "installed_tensorrt_version", lambda: parse_version(version))
    monkeypatch.setattr(trt_loaders, "import_tensorrt", lambda: SimpleNamespace(__version__=version))
    monkeypatch.setattr(trt_loaders, "NetworkFromOnnx", lambda path, **kw: lambda: Path(path))
    monkeypatch.setattr(trt_loaders, "EngineFromNetwork", engine_from_network)
    monkeypatch.setattr(build_module, "_current_host", lambda v: HostInfo(v, "Orin", (8, 7), "Linux", "aarch64"))
    return built


@pytest.fixture
def tiny_onnx_with_pooling(tiny_onnx_dir: Path, tmp_path: Path) -> Path:
    """A copy of the tiny export whose manifest records pooling 2."""
    import shutil

    folder = tmp_path / "onnx"
    shutil.copytree(tiny_onnx_dir, folder)
    manifest = json.loads((folder / io_names.MANIFEST_FILE).read_text())
    (folder / io_names.MANIFEST_FILE).write_text(json.dumps({**manifest, "pooling": 2}))
    return folder


def test_build_makes_paper_engines_with_their_profiles(tiny_onnx_with_pooling: Path, tmp_path: Path, monkeypatch) -> None:
    # catches: paper graphs in the ONNX folder ignored by the build, their engines built with the image graph's
    # profile, encoder feature shapes or pooling missing from the manifests (the runtime then refuses them)
    from gsnet_deploy.contracts.engine_manifest import read_manifest
    from gsnet_deploy.export.profiles import static_output_shapes

    built = _fake_build_pipeline(monkeypatch, "10.3.0")
    out = tmp_path / "engines"
    result = build_engines(tiny_onnx_with_pooling, out, Precision.FP16, classes_opt=12)
    assert set(result.engines) == set(Graph)
    assert [p.name for p, _ in built] == [f"{g.value}.onnx" for g in Graph]  # weak typing: the FP32 graphs
    encoder, head = read_manifest(out / "paper_encoder.engine"), read_manifest(out / "paper_head.engine")
    assert {m.pooling for m in result.manifests.values()} == {2}
    features = static_output_shapes(tiny_onnx_with_pooling / io_names.PAPER_ENCODER_FILE, io_names.PAPER_FEATURES)
    assert dict(encoder.output_shapes) == features and len(features) == len(io_names.PAPER_FEATURES)
    for name, shape in features.items():
        assert head.profiles[0].shapes[name] == ShapeRange(shape, shape, shape)  # the head takes them as they are
    assert head.profiles[0].values[io_names.OUT_SIZE].max == (2880, 2880)
    assert encoder.profiles[0].shapes[io_names.PAPER_IMAGE].opt == (1, 3, 640, 960)
    configs = {p.name: c for p, c in built}
    assert configs["paper_head.onnx"].activation_resize and not configs["paper_encoder.onnx"].activation_resize
    assert {name for name, c in configs.items() if c.size_math_fp32} == {"paper_encoder.onnx", "paper_head.onnx"}
    assert (out / "paper_head.engine").read_bytes() == b"plan:paper_head.onnx"


def test_build_makes_fp32_tile_engines_with_shape_tensor_ranges(
    tiny_onnx_with_pooling: Path, tmp_path: Path, monkeypatch
) -> None:
    # catches: tiled mode's blending graphs built with the image graph's FP16 flag (sums of weighted
    # probabilities in FP16), without value ranges for place / count (TensorRT refuses the network), with a
    # strip wider than 2**31 elements at the profile maximum, or holding activation memory for that maximum
    from gsnet_deploy.contracts.engine_manifest import TILE_GRAPHS, read_manifest
    from gsnet_deploy.export.profiles import TILE_WIDTH_MAX
    from gsnet_deploy.runtime.tiling import EMIT_ROWS, WINDOW

    built = _fake_build_pipeline(monkeypatch, "10.3.0")
    out = tmp_path / "engines"
    result = build_engines(tiny_onnx_with_pooling, out, Precision.FP16, classes_opt=12)
    configs = {p.name: c for p, c in built}
    assert configs[io_names.IMAGE_GRAPH_FILE].flags.fp16  # the image engine is FP16 ...
    for graph in TILE_GRAPHS:
        config = configs[graph.onnx_file]  # ... the tile engines are built from the FP32 graphs without precision flags
        assert not config.flags.fp16 and not config.flags.int8 and config.activation_resize
        manifest = read_manifest(out / graph.engine_file)
        assert manifest == result.manifests[graph] and "FP32" in manifest.precision_path
        acc = manifest.profiles[0].shapes[io_names.TILE_ACC]
        assert acc.max == (257, WINDOW, TILE_WIDTH_MAX) and acc.opt[0] == 13
        assert acc.max[0] * acc.max[1] * acc.max[2] < 2**31
    blend, emit = (read_manifest(out / g.engine_file).profiles[0] for g in TILE_GRAPHS)
    assert blend.values[io_names.TILE_PLACE].min == (0, 0, 0, 1, 1)
    assert blend.values[io_names.TILE_PLACE].max == (7, WINDOW - 1, TILE_WIDTH_MAX - 1, WINDOW, WINDOW)
    assert emit.values[io_names.TILE_COUNT].max == (EMIT_ROWS,) and emit.values[io_names.TILE_COUNT].min == (1,)


@pytest.mark.parametrize("paper_qdq", [False, True])
def test_int8_build_uses_paper_qdq_or_falls_back_to_fp16(
    tiny_onnx_with_pooling: Path, tmp_path: Path, monkeypatch, paper_qdq: bool
) -> None:
    # catches: an INT8 build that fails (or builds the paper graphs from a Q/DQ model of another graph) when no
    # INT8 paper graphs exist, that hides the FP16 fallback from the manifest, or that ignores Q/DQ paper graphs
    import shutil

    from gsnet_deploy.contracts.derived import INT8_FILE, write_sidecar
    from gsnet_deploy.export.build import PAPER_FP16_NOTE

    built = _fake_build_pipeline(monkeypatch, "10.3.0")
    out = tmp_path / "engines"
    out.mkdir()
    digest = json.loads((tiny_onnx_with_pooling / io_names.MANIFEST_FILE).read_text())["model_digest"]
    stand_ins = {io_names.IMAGE_GRAPH_FILE: INT8_FILE}  # copies stand in for `gsnet calib`'s Q/DQ models
    if paper_qdq:
        stand_ins.update({g.onnx_file: OnnxVariant.INT8.file_name(g) for g in (Graph.PAPER_ENCODER, Graph.PAPER_HEAD)})
    for src, dst in stand_ins.items():
        shutil.copy(tiny_onnx_with_pooling / src, out / dst)
        write_sidecar(out / dst, {"model_digest": digest})
    result = build_engines(tiny_onnx_with_pooling, out, Precision.INT8, classes_opt=12)
    assert result.manifests[Graph.IMAGE].precision is Precision.INT8
    flags = {p.name: c.flags for p, c in built}
    for graph in (Graph.PAPER_ENCODER, Graph.PAPER_HEAD):
        manifest = result.manifests[graph]
        if paper_qdq:
            assert manifest.precision is Precision.INT8 and PAPER_FP16_NOTE not in manifest.notes
            assert manifest.onnx_file == OnnxVariant.INT8.file_name(graph) and flags[manifest.onnx_file].int8
        else:
            assert manifest.precision is Precision.FP16 and PAPER_FP16_NOTE in manifest.notes
            assert manifest.onnx_file == graph.onnx_file and "BuilderFlag.FP16" in manifest.precision_path
            assert flags[graph.onnx_file].fp16 and not flags[graph.onnx_file].int8
    assert (PAPER_FP16_NOTE in result.notes) is not paper_qdq
    assert flags[INT8_FILE].int8


def test_paper_manifest_round_trip_and_older_manifests() -> None:
    # catches: shape-tensor value ranges, the pooling or the encoder's feature shapes lost on their way to disk
    # (the runtime then cannot check out_size or the head), and manifests written before them no longer read
    from dataclasses import replace

    from gsnet_deploy.contracts.engine_manifest import EngineManifest, Profile

    head = Profile(
        shapes={
            io_names.TEXT_EMBEDS: ShapeRange((1, 512), (40, 512), (256, 512)),
            io_names.OUT_SIZE: ShapeRange((2,), (2,), (2,)),
        },
        values={io_names.OUT_SIZE: ShapeRange((1, 1), (640, 960), (2880, 2880))},
    )
    manifest = replace(
        _engine_manifest(_host(X86_H100)),
        graph=Graph.PAPER_ENCODER, profiles=(head,), pooling=2, output_shapes={"clip_features": (5, 512, 24, 24)},
    )  # fmt: skip
    payload = json.loads(json.dumps(manifest.to_json()))
    assert payload["profiles"][0][io_names.OUT_SIZE]["values"]["max"] == [2880, 2880]
    assert EngineManifest.from_json(payload) == manifest
    for key in ("pooling", "output_shapes"):
        del payload[key]
    del payload["profiles"][0][io_names.OUT_SIZE]["values"]
    older = EngineManifest.from_json(payload)
    assert older.pooling is None and dict(older.output_shapes) == {} and dict(older.profiles[0].values) == {}
    with pytest.raises(EngineBuildError, match="static 1-D shape of 2 values"):
        Profile(shapes={"x": ShapeRange((1,), (2,), (3,))}, values={"x": ShapeRange((1, 1), (2, 2), (3, 3))})


# ---- weakly typed FP16: the paper graphs' size arithmetic (resize coordinates) pinned to FP32 ----
#
# The reference is independent of the layer analysis: ONNX Runtime runs the graph three times, twice with
# other data at the same sizes and once at other sizes. A float tensor that stays the same when the data
# changes but not when the sizes change is resize arithmetic and must be pinned; one that changes with the
# data is the model's work and must stay free (FP16 there is the point of the build).


def _onnx_as_network(model: onnx.ModelProto, dtypes: dict[str, str]):
    """A stand-in INetworkDefinition of ``model``: one layer per node, a constant layer per initializer."""
    from types import SimpleNamespace

    class Layer:
        def __init__(self, name: str, kind: str, inputs: list, outputs: list) -> None:
            self.name, self.type, self._in, self._out = name, kind, inputs, outputs
            self.num_inputs, self.num_outputs = len(inputs), len(outputs)
            self.precision: str | None = None
            self.output_types: dict[int, str] = {}

        def get_input(self, i: int):
            return self._in[i]

        def get_output(self, i: int):
            return self._out[i]

        def set_output_type(self, i: int, dtype: str) -> None:
            self.output_types[i] = dtype

    tensors: dict[str, object] = {}

    def tensor(name: str):
        if name not in tensors:
            tensors[name] = SimpleNamespace(name=name, dtype=dtypes.get(name, "INT64"), is_execution_tensor=True)
        return tensors[name]

    layers = [Layer(f"const {w.name}", "CONSTANT", [], [tensor(w.name)]) for w in model.graph.initializer]
    for node in model.graph.node:
        kind = {"Shape": "SHAPE", "Constant": "CONSTANT"}.get(node.op_type, node.op_type)
        inputs = [tensor(n) if n else None for n in node.input]
        layers.append(Layer(node.name, kind, inputs, [tensor(n) for n in node.output]))
    return SimpleNamespace(num_layers=len(layers), get_layer=layers.__getitem__), layers


def _run_every_tensor(model: onnx.ModelProto, feeds: dict) -> dict:
    import onnxruntime as ort

    every = onnx.ModelProto()
    every.CopyFrom(model)
    known = {o.name for o in every.graph.output}
    for node in every.graph.node:
        for name in node.output:
            if name and name not in known:
                every.graph.output.append(onnx.ValueInfoProto(name=name))
                known.add(name)
    session = ort.InferenceSession(every.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


@pytest.mark.parametrize("graph", [Graph.PAPER_HEAD, Graph.PAPER_ENCODER])
def test_fp16_build_pins_exactly_the_resize_arithmetic(tiny_onnx_dir: Path, monkeypatch, graph: Graph) -> None:
    # catches: resize coordinates (up to 2880, spacing 2 in FP16) left to FP16 in a weakly typed build (the
    # output lands on wrong pixels, weights round to 0 or 1), e.g. the Range / Fill of the output indices or
    # the coordinates of the encoder's image size missed; and model layers pinned to FP32 by mistake
    import sys
    from types import SimpleNamespace

    import numpy as np

    from gsnet_deploy.export.trt import pin_size_math_fp32, size_math_layers

    model = onnx.load(str(tiny_onnx_dir / graph.onnx_file))
    inputs = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}

    def feeds(seed: int, size: tuple[int, int]) -> dict:
        rng = np.random.default_rng(seed)
        if graph is Graph.PAPER_ENCODER:
            return {io_names.PAPER_IMAGE: rng.integers(0, 256, size=(1, 3, *size), dtype=np.uint8)}
        out = {name: rng.normal(size=dims).astype(np.float32) for name, dims in inputs.items() if all(dims)}
        return {**out, io_names.TEXT_EMBEDS: rng.normal(size=(3, inputs[io_names.TEXT_EMBEDS][1])).astype(np.float32),
                io_names.OUT_SIZE: np.array(size, dtype=np.int64)}  # fmt: skip

    runs = ((1, (37, 53)), (2, (37, 53)), (1, (41, 29)))  # (data seed, sizes): base, other data, other sizes
    base, other_data, other_size = (_run_every_tensor(model, feeds(seed, hw)) for seed, hw in runs)

    def same(a: np.ndarray, b: np.ndarray) -> bool:
        return a.shape == b.shape and np.array_equal(a, b)

    floats = {name for name, value in base.items() if value.dtype == np.float32}
    must = {n for n in floats if same(base[n], other_data[n]) and not same(base[n], other_size[n])}
    must_not = {n for n in floats if not same(base[n], other_data[n])}
    assert len(must) >= 20 and must_not  # the graph has both kinds (a vacuous test otherwise)

    float32 = onnx.TensorProto.FLOAT
    dtypes = {name: "FLOAT" for name in floats} | {
        i.name: "FLOAT" for i in model.graph.input if i.type.tensor_type.elem_type == float32
    }
    dtypes |= {w.name: "FLOAT" for w in model.graph.initializer if w.data_type == float32}
    network, layers = _onnx_as_network(model, dtypes)
    trt = SimpleNamespace(DataType=SimpleNamespace(FLOAT="FLOAT"), LayerType=SimpleNamespace(SHAPE="SHAPE", CONSTANT="CONSTANT"))
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    shape_inputs = {io_names.OUT_SIZE} if graph is Graph.PAPER_HEAD else set()
    count = pin_size_math_fp32(size_math_layers(network, shape_inputs))
    pinned_outputs = {layer.get_output(i).name for layer in layers for i in layer.output_types}
    assert must <= pinned_outputs, sorted(must - pinned_outputs)
    assert not must_not & {layer.get_output(i).name for layer in layers if layer.precision for i in range(layer.num_outputs)}
    assert not must_not & pinned_outputs
    assert {t for layer in layers for t in (layer.precision, *layer.output_types.values()) if t} == {"FLOAT"}
    assert count == sum(1 for layer in layers if layer.precision or layer.output_types)


@pytest.mark.parametrize(
    ("flags", "asked", "flag"),
    [
        (BuildFlags(False, fp16=True), True, "OBEY"),
        (BuildFlags(False, fp16=True, int8=True), True, "PREFER"),  # the parser's Q/DQ constraints stay hints
        (BuildFlags(False, fp16=True), False, None),  # text and image graphs: untouched
        (BuildFlags(False, int8=True), True, None),  # no FP16 flag: nothing runs in FP16 unasked
        (BuildFlags(True), True, None),  # strongly typed: the ONNX types decide (AutoCast kept them FP32)
    ],
)
def test_size_math_constraints_bind_only_in_weak_fp16_builds(monkeypatch, flags: BuildFlags, asked: bool, flag) -> None:
    # catches: precision constraints set without OBEY/PREFER (TensorRT then treats them as hints and may still
    # pick FP16), OBEY on a Q/DQ build, and setPrecision on strongly typed networks (which reject it)
    import sys
    from types import SimpleNamespace

    import numpy as np

    from gsnet_deploy.export import trt as trt_loaders

    trt, parsed = _fake_tensorrt(True)
    set_flags: list[object] = []
    parsed.builder.create_builder_config.set_flag = lambda self, f: set_flags.append(f)
    trt.BuilderFlag = SimpleNamespace(
        FP16="FP16", INT8="INT8", OBEY_PRECISION_CONSTRAINTS="OBEY", PREFER_PRECISION_CONSTRAINTS="PREFER"
    )
    trt.DataType = SimpleNamespace(FLOAT="FLOAT")
    trt.LayerType = SimpleNamespace(SHAPE="SHAPE", CONSTANT="CONSTANT")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(trt_loaders, "import_tensorrt", lambda: trt)
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("Shape", ["x"], ["hw"], name="shape"),
            onnx.helper.make_node("Cast", ["hw"], ["hw_f"], name="cast", to=1),
            onnx.helper.make_node("Mul", ["hw_f", "half"], ["coord"], name="coord"),
            onnx.helper.make_node("Mul", ["x", "half"], ["y"], name="data"),
        ],
        "g",
        [],
        [],
        [onnx.numpy_helper.from_array(np.float32([0.5]), "half")],
    )
    network, layers = _onnx_as_network(onnx.helper.make_model(graph), {n: "FLOAT" for n in ("x", "hw_f", "coord", "y", "half")})
    parsed.network = network
    config = BuildConfig(flags, profiles=[profile_for({"x": ("B", 3)}, {"B": DimRange(1, 2, 4)})], size_math_fp32=asked)
    config(parsed)
    by_name = {layer.name: layer for layer in layers}
    assert ("OBEY" in set_flags, "PREFER" in set_flags) == (flag == "OBEY", flag == "PREFER")
    if flag is None:
        assert config.pinned_layers in (None, 0) and not any(layer.precision or layer.output_types for layer in layers)
    else:
        assert (
            config.pinned_layers == 2 and by_name["coord"].precision == "FLOAT" and by_name["cast"].output_types == {0: "FLOAT"}
        )
        assert by_name["data"].precision is None and by_name["cast"].precision is None  # an int -> float cast: output only
