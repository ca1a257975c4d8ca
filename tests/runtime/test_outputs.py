"""Tests of runtime.outputs and runtime.palette: mask/overlay/probs files and class colors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gsnet_deploy.errors import GSNetError, ImageError
from gsnet_deploy.runtime.outputs import labels_from_probs, render_overlay, write_outputs
from gsnet_deploy.runtime.palette import default_palette, load_palette, parse_color, resolve_palette


def _probs(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, size=(n, h, w)).astype(np.float32)


@pytest.mark.parametrize("save_probs", [False, True])
def test_write_outputs_files(tmp_path: Path, save_probs: bool) -> None:
    rgb = np.random.default_rng(1).integers(0, 256, size=(40, 60, 3), dtype=np.uint8)
    probs = _probs(3, 40, 60)
    names = ["sky", "road", "tree"]
    paths = write_outputs("img", tmp_path / "out", rgb, probs, names, default_palette(3), save_probs)
    expected = ["img_mask.png", "img_overlay.png"] + (["img.probs.npy"] if save_probs else [])
    assert [p.name for p in paths] == expected
    assert sorted(os.listdir(tmp_path / "out")) == sorted(expected)  # no temp files left
    mask = np.asarray(Image.open(paths[0]))
    assert mask.dtype == np.uint8 and mask.shape == (40, 60)
    # reference argmax written plainly
    ref = np.zeros((40, 60), np.uint8)
    for y in range(40):
        for x in range(60):
            ref[y, x] = int(np.argmax(probs[:, y, x]))
    np.testing.assert_array_equal(mask, ref)
    overlay = Image.open(paths[1])
    assert overlay.mode == "RGB" and overlay.height == 40 and overlay.width > 60  # legend at the right
    if save_probs:
        saved = np.load(paths[2])
        assert saved.dtype == np.float32 and saved.shape == (3, 40, 60)
        np.testing.assert_array_equal(saved, probs)


def test_overlay_blends_palette_and_lists_classes() -> None:
    rgb = np.full((50, 50, 3), 100, np.uint8)
    labels = np.zeros((50, 50), np.uint8)
    labels[:, 25:] = 1
    palette = np.array([[255, 0, 0], [0, 0, 255]], np.uint8)
    img = np.asarray(render_overlay(rgb, labels, ["alpha", "beta"], palette))
    # 0.5 * 100 + 0.5 * color
    np.testing.assert_array_equal(img[10, 10], [178, 50, 50])
    np.testing.assert_array_equal(img[10, 40], [50, 50, 178])
    legend = img[:, 50:]
    assert legend.shape[1] > 20
    # both swatch colors appear in the legend panel
    assert (legend == [255, 0, 0]).all(axis=-1).any() and (legend == [0, 0, 255]).all(axis=-1).any()


def test_overlay_downscales_huge_images() -> None:
    rgb = np.zeros((5000, 100, 3), np.uint8)
    img = render_overlay(rgb, np.zeros((5000, 100), np.uint8), ["a"], default_palette(1))
    assert img.height == 4096


def test_too_many_classes_for_png() -> None:
    with pytest.raises(ImageError, match="257 classes"):
        labels_from_probs(np.zeros((257, 2, 2), np.float32))


def test_unwritable_output_folder(tmp_path: Path) -> None:
    blocker = tmp_path / "f"
    blocker.write_text("x")
    with pytest.raises(ImageError, match="cannot write to output folder"):
        write_outputs("a", blocker, np.zeros((4, 4, 3), np.uint8), _probs(1, 4, 4), ["a"], default_palette(1), False)


def test_default_palette_deterministic_and_distinct() -> None:
    p = default_palette(60)
    assert p.shape == (60, 3) and p.dtype == np.uint8
    np.testing.assert_array_equal(p, default_palette(60))
    np.testing.assert_array_equal(default_palette(5), p[:5])
    assert len({tuple(c) for c in p.tolist()}) == 60


def test_load_palette_formats(tmp_path: Path) -> None:
    names = ["road", "tree"]
    js = tmp_path / "p.json"
    js.write_text(json.dumps({"tree": [0, 200, 0], "road": "#808080", "unused": "#000000"}))
    np.testing.assert_array_equal(load_palette(js, names), [[128, 128, 128], [0, 200, 0]])
    lst = tmp_path / "l.json"
    lst.write_text(json.dumps(["#ff0000", [1, 2, 3], "#000000"]))
    np.testing.assert_array_equal(load_palette(lst, names), [[255, 0, 0], [1, 2, 3]])
    txt = tmp_path / "p.txt"
    txt.write_text("# colors\n#0a0b0c\n\n4, 5, 6\n")
    np.testing.assert_array_equal(load_palette(txt, names), [[10, 11, 12], [4, 5, 6]])
    np.testing.assert_array_equal(resolve_palette(names), default_palette(2))


@pytest.mark.parametrize(
    ("content", "suffix", "match"),
    [
        ('{"road": "#808080"}', ".json", "no color for class 'tree'"),
        ("{bad json", ".json", "not valid JSON"),
        ("#ff0000\n", ".txt", "1 colors for 2 classes"),
        ("#gg0000\n#000000\n", ".txt", "'#gg0000'"),
        ('{"road": [1, 2, 300], "tree": "#000000"}', ".json", "0..255"),
        ('"text"', ".json", "JSON str"),
    ],
)
def test_load_palette_errors(tmp_path: Path, content: str, suffix: str, match: str) -> None:
    path = tmp_path / f"pal{suffix}"
    path.write_text(content)
    with pytest.raises(GSNetError, match=match):
        load_palette(path, ["road", "tree"])


def test_load_palette_missing_file(tmp_path: Path) -> None:
    with pytest.raises(GSNetError, match="cannot read palette file"):
        load_palette(tmp_path / "none.json", ["a"])


def test_parse_color_rejects_bool_triplet() -> None:
    with pytest.raises(GSNetError, match="palette"):
        parse_color([True, 0, 0], "x")
