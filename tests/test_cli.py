"""``gsnet segment`` end to end on the tiny model: outputs, image conversions, failures, exit status."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gsnet_deploy.cli import main

EXAMPLE = Path(__file__).parents[1] / "examples" / "aerial.png"


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_segment_writes_mask_overlay_and_probs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code, stdout, stderr = _run(
        ["segment", str(EXAMPLE), "--classes", "building,road,tree", "--out", str(out), "--save-probs",
         "--model-size", "tiny", "--no-cache", "--no-progress"],
        capsys,
    )  # fmt: skip
    assert code == 0, stderr
    assert "demo weights" in stderr and "paper mode" in stderr
    assert stdout.strip() == str(out / "aerial_mask.png")
    rgb = np.asarray(Image.open(EXAMPLE))
    mask = np.asarray(Image.open(out / "aerial_mask.png"))
    probs = np.load(out / "aerial.probs.npy")
    assert mask.shape == rgb.shape[:2] and mask.max() < 3
    assert probs.shape == (3, *rgb.shape[:2]) and probs.dtype == np.float32
    np.testing.assert_array_equal(mask, probs.argmax(0))
    assert (out / "aerial_overlay.png").is_file()
    assert not list(out.glob(".*"))  # no temp files left


def test_segment_converts_and_survives_bad_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    gray = tmp_path / "gray.png"
    Image.fromarray(rng.integers(0, 255, (200, 300), dtype=np.uint8)).save(gray)
    rgba = tmp_path / "rgba.png"
    Image.fromarray(rng.integers(0, 255, (150, 150, 4), dtype=np.uint8)).save(rgba)
    deep = tmp_path / "deep.png"
    Image.fromarray(rng.integers(0, 65535, (120, 160), dtype=np.uint16)).save(deep)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = tmp_path / "out"
    code, _, stderr = _run(
        ["segment", str(gray), str(broken), str(rgba), str(deep), str(tmp_path / "missing.jpg"),
         "--classes", "water,field", "--out", str(out), "--model-size", "tiny", "--no-cache", "--no-progress"],
        capsys,
    )  # fmt: skip
    assert code == 1  # two inputs failed (exit 1: some inputs failed), the three others were processed
    assert "grayscale image converted to RGB" in stderr
    assert "RGBA image converted to RGB" in stderr
    assert "stretched to 8 bits" in stderr
    assert "cannot read image" in stderr and "does not exist" in stderr
    for stem in ("gray", "rgba", "deep"):
        assert (out / f"{stem}_mask.png").is_file()
    assert not (out / "broken_mask.png").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--classes", ""], "empty"),
        (["--classes", "road,,tree"], "blank"),
        (["--classes", "road,Road"], "same prompt"),
        ([], "no classes given"),
        (["--classes", "a", "--checkpoint", "nope.pth"], "does not exist"),
    ],
)
def test_segment_user_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    code, _, stderr = _run(["segment", str(EXAMPLE), "--out", str(tmp_path), "--no-cache", *extra], capsys)
    assert code == 2
    assert message in stderr
    assert "Traceback" not in stderr


def test_save_probs_torch_and_onnxruntime_agree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """End to end through the CLI: export the tiny model, segment with both backends, compare probabilities."""
    onnx_dir = tmp_path / "onnx"
    code, _, stderr = _run(["export", "onnx", "--model-size", "tiny", "--out", str(onnx_dir)], capsys)
    assert code == 0, stderr
    common = [str(EXAMPLE), "--classes", "building,road,tree,water", "--save-probs", "--no-cache", "--no-progress"]
    code, _, stderr = _run(["segment", *common, "--model-size", "tiny", "--out", str(tmp_path / "t")], capsys)
    assert code == 0, stderr
    code, _, stderr = _run(["segment", *common, "--onnx", str(onnx_dir), "--out", str(tmp_path / "o")], capsys)
    assert code == 0, stderr
    assert "onnxruntime" in stderr
    torch_probs = np.load(tmp_path / "t" / "aerial.probs.npy")
    ort_probs = np.load(tmp_path / "o" / "aerial.probs.npy")
    assert torch_probs.shape == ort_probs.shape == (4, 512, 640)
    np.testing.assert_allclose(ort_probs, torch_probs, rtol=0, atol=1e-5)


def test_segment_geotiff_keeps_georeferencing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rasterio = pytest.importorskip("rasterio")
    from rasterio.transform import from_origin

    rng = np.random.default_rng(1)
    src = tmp_path / "scene.tif"
    data = rng.integers(0, 255, size=(3, 420, 530), dtype=np.uint8)
    profile = dict(driver="GTiff", width=530, height=420, count=3, dtype="uint8", crs="EPSG:32633",
                   transform=from_origin(500000.0, 4200000.0, 0.3, 0.3))  # fmt: skip
    with rasterio.open(src, "w", **profile) as dst:
        dst.write(data)
    out = tmp_path / "out"
    code, stdout, stderr = _run(
        ["segment", str(src), "--classes", "building,road", "--out", str(out), "--model-size", "tiny",
         "--no-cache", "--no-progress"],
        capsys,
    )  # fmt: skip
    assert code == 0, stderr
    assert "tiled mode" in stderr
    mask_path = out / "scene_mask.tif"
    assert stdout.strip() == str(mask_path)
    with rasterio.open(src) as a, rasterio.open(mask_path) as b:
        assert b.crs == a.crs and b.transform == a.transform and (b.width, b.height) == (a.width, a.height)
        assert b.count == 1 and b.dtypes[0] == "uint8"
        assert int(b.read(1).max()) < 2


def test_eval_and_compare_run_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_onnx_dir: Path) -> None:
    """``gsnet eval`` on a small Potsdam-layout dataset, one backend and two compared (tiny model)."""
    root = tmp_path / "data"
    img_dir, ann_dir = root / "PotsdamSplit" / "img_dir" / "val", root / "PotsdamSplit" / "ann_dir" / "val"
    img_dir.mkdir(parents=True)
    ann_dir.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(img_dir / f"t{i}.png")
        Image.fromarray(rng.integers(0, 6, (64, 96), dtype=np.uint8)).save(ann_dir / f"t{i}.png")
    report = tmp_path / "eval.json"
    base = ["eval", "--dataset", "potsdam", "--root", str(root), "--model-size", "tiny"]
    code, stdout, stderr = _run([*base, "--json", str(report)], capsys)
    assert code == 0, stderr
    assert "45.75" in stdout  # the paper's Table 2 number is shown beside ours
    assert report.is_file()
    code, stdout, stderr = _run([*base, "--compare", "torch", f"onnxruntime:{tiny_onnx_dir}"], capsys)
    assert code == 0, stderr
    assert "agree" in stdout.lower()


def test_segment_refuses_a_pooling_the_export_does_not_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_onnx_dir: Path
) -> None:
    """Catches: ``--pooling 2`` silently ignored with ``--onnx`` (the export fixes its pooling, here 1)."""
    image = tmp_path / "scene.png"
    Image.fromarray(np.zeros((40, 60, 3), dtype=np.uint8)).save(image)
    base = ["segment", str(image), "--onnx", str(tiny_onnx_dir), "--classes", "building,road", "--out", str(tmp_path / "out")]
    code, _, stderr = _run([*base, "--pooling", "2"], capsys)
    assert code != 0
    assert "pooling 1" in stderr and "pooling 2" in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "scene_mask.png").exists()
