"""``gsnet segment`` with several vocabularies: each image encoded once, outputs per vocabulary."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gsnet_deploy.cli import main


@pytest.fixture
def scene(tmp_path: Path) -> Path:
    rng = np.random.default_rng(5)
    path = tmp_path / "in" / "scene.png"
    path.parent.mkdir()
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(path)
    return path


def test_segment_several_vocabularies_equal_one_at_a_time(scene, tmp_path, tiny_onnx_dir, capsys):
    out = tmp_path / "many"
    code = main(["segment", str(scene), "--onnx", str(tiny_onnx_dir), "--classes", "road,tree",
                 "--classes", "water,building,car", "--out", str(out), "--no-progress"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    for k, classes in ((1, "road,tree"), (2, "water,building,car")):
        single = tmp_path / f"single{k}"
        assert main(["segment", str(scene), "--onnx", str(tiny_onnx_dir), "--classes", classes,
                     "--out", str(single), "--mode", "paper", "--no-progress"]) == 0  # fmt: skip
        many = np.asarray(Image.open(out / f"vocab{k}" / "scene_mask.png"))
        one = np.asarray(Image.open(single / "scene_mask.png"))
        assert np.array_equal(many, one), f"vocabulary {k} differs from its own run"
        assert (out / f"vocab{k}" / "scene_overlay.png").is_file()
    # the two vocabularies really are different outputs (a mix-up would not be caught otherwise)
    assert np.asarray(Image.open(out / "vocab2" / "scene_mask.png")).max() == 2


def test_segment_vocabularies_file_and_conflicts(scene, tmp_path, capsys):
    file = tmp_path / "vocabs.txt"
    file.write_text("# two questions\nroad,tree\n\n")
    assert main(["segment", str(scene), "--vocabularies", str(file), "--classes", "a", "--out", str(tmp_path / "o")]) == 2
    assert "one of --classes" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("# nothing\n")
    assert main(["segment", str(scene), "--vocabularies", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "holds no vocabulary" in capsys.readouterr().err
    code = main(["segment", str(scene), "--classes", "a,b", "--classes", "c", "--mode", "tiled", "--out", str(tmp_path / "o")])
    assert code == 2 and "paper protocol only" in capsys.readouterr().err
