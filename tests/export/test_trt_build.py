"""Version paths, DLA decisions, optimization profiles and the no-TensorRT fallback of ``export.build``."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from gsnet_deploy import io_names
from gsnet_deploy.errors import EngineBuildError
from gsnet_deploy.export.build import (
    OnnxVariant,
    build_engines,
    dim_ranges,
    onnx_input_shapes,
    profile_for,
    resolve_dla,
    select_build_path,
    variants_for_any_target,
)
from gsnet_deploy.export.manifest import Graph
from gsnet_deploy.export.precision import Precision
from gsnet_deploy.export.trt import BuildFlags, NetworkFromOnnx, installed_tensorrt_version

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
    for name in ("text_encoder.fp16.onnx", "image_graph.fp16.onnx"):
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
