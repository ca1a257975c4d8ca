"""Dataset specs (facts of the official code), layout listing, and mask/image reading errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gsnet_deploy.errors import DatasetError, GSNetError, ImageError
from gsnet_deploy.eval.datasets import (
    FAST,
    FLAIR,
    FLOODNET,
    POTSDAM,
    DatasetName,
    DatasetSpec,
    SamplePair,
    check_mask_size,
    dataset_spec,
    list_pairs,
    read_image,
    read_mask,
)

ALL_SPECS = [POTSDAM, FLOODNET, FLAIR, FAST]


def test_dataset_spec_facts_of_official_code() -> None:
    # Written from the official register_*.py / datasets/*.json / README (github.com/yecy749/GSNet).
    assert POTSDAM.stuff_classes == ("impervious surface", "building", "low vegetation", "tree", "car", "clutter")
    assert POTSDAM.ignore_label == 5 and len(POTSDAM.vocabulary) == 5
    assert (POTSDAM.image_dir, POTSDAM.mask_dirs[0], POTSDAM.image_ext) == ("img_dir/val", "ann_dir/val", ".png")
    assert FLOODNET.stuff_classes[0] == "Background" and FLOODNET.ignore_label == 0
    assert len(FLOODNET.stuff_classes) == 10 and FLOODNET.vocabulary == FLOODNET.stuff_classes
    assert (FLOODNET.image_ext, FLOODNET.mask_ext) == (".jpg", ".png")
    assert FLAIR.stuff_classes[12] == "other" and FLAIR.ignore_label == 12 and len(FLAIR.vocabulary) == 12
    assert FLAIR.vocabulary[1] == "pervious-surface"
    assert len(FAST.stuff_classes) == 37 and FAST.ignore_label == 255 and FAST.excluded_classes == ()
    assert FAST.stuff_classes[0] == "A220" and FAST.stuff_classes[-1] == "Warship"
    assert {s.name: s.paper_miou for s in ALL_SPECS} == {
        DatasetName.FLAIR: 20.00,
        DatasetName.FAST: 16.61,
        DatasetName.POTSDAM: 45.75,
        DatasetName.FLOODNET: 42.63,
    }


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.name.value)
def test_dataset_spec_vocabulary_is_prefix_and_lookup(spec: DatasetSpec) -> None:
    assert dataset_spec(DatasetName(spec.name.value)) is spec
    n = len(spec.vocabulary)
    # Same classes in the same order (FLAIR's JSON spells two names with hyphens).
    assert [v.replace("-", " ") for v in spec.vocabulary] == [c.replace("-", " ") for c in spec.stuff_classes[:n]]


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.name.value)
def test_list_pairs_official_layouts(spec: DatasetSpec, make_dataset, tmp_path: Path) -> None:
    written = make_dataset(spec, n=3)
    pairs = list_pairs(spec, tmp_path / "root")
    assert pairs == [SamplePair(img, mask) for img, mask in written]
    assert all(isinstance(p, tuple) and len(p) == 2 for p in pairs)


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.name.value)
def test_list_pairs_root_is_dataset_folder(spec: DatasetSpec, make_dataset, tmp_path: Path) -> None:
    written = make_dataset(spec, n=2)
    pairs = list_pairs(spec, tmp_path / "root" / spec.dataset_dirs[0])
    assert [p.image for p in pairs] == [w[0] for w in written]


def test_list_pairs_floodnet_lab_suffix(make_dataset, tmp_path: Path) -> None:
    written = make_dataset(FLOODNET, n=2, mask_suffix="_lab")
    pairs = list_pairs(FLOODNET, tmp_path / "root")
    assert [p.mask.name for p in pairs] == ["tile_000_lab.png", "tile_001_lab.png"]
    assert [p.mask for p in pairs] == [w[1] for w in written]


def test_list_pairs_fast_registered_layout(make_dataset, tmp_path: Path) -> None:
    # register_FAST_val.py: SAMRS/FAST/val/images + val/semlabels/gray
    make_dataset(FAST, n=2, dataset_dir="SAMRS/FAST", mask_dir="val/semlabels/gray")
    pairs = list_pairs(FAST, tmp_path / "root")
    assert len(pairs) == 2 and pairs[0].mask.parent.name == "gray"


def test_list_pairs_fast_readme_layout_without_gray(make_dataset, tmp_path: Path) -> None:
    make_dataset(FAST, n=2, mask_dir="val/semlabels")
    pairs = list_pairs(FAST, tmp_path / "root")
    assert len(pairs) == 2 and pairs[0].mask.parent.name == "semlabels"


def test_list_pairs_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not a folder"):
        list_pairs(POTSDAM, tmp_path / "nowhere")


def test_list_pairs_missing_split_folder(tmp_path: Path) -> None:
    (tmp_path / "root" / "PotsdamSplit" / "img_dir" / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"img_dir/val"):
        list_pairs(POTSDAM, tmp_path / "root")


def test_list_pairs_missing_mask_folder(make_dataset, tmp_path: Path) -> None:
    written = make_dataset(FLAIR, n=1)
    for _, mask in written:
        mask.unlink()
    written[0][1].parent.rmdir()
    with pytest.raises(DatasetError, match=r"test/mask"):
        list_pairs(FLAIR, tmp_path / "root")


def test_list_pairs_image_without_mask_names_image(make_dataset, tmp_path: Path) -> None:
    written = make_dataset(POTSDAM, n=3)
    written[1][1].unlink()
    with pytest.raises(GSNetError, match=r"tile_001\.png' has no mask"):
        list_pairs(POTSDAM, tmp_path / "root")


def test_list_pairs_empty_image_folder(tmp_path: Path) -> None:
    (tmp_path / "root" / "FloodNet" / "val+test" / "img").mkdir(parents=True)
    (tmp_path / "root" / "FloodNet" / "val+test" / "lbl").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"No \.jpg image"):
        list_pairs(FLOODNET, tmp_path / "root")


def test_read_mask_values_and_ignore(tmp_path: Path) -> None:
    labels = np.array([[0, 36, 255], [12, 5, 255]], dtype=np.uint8)
    path = tmp_path / "m.png"
    Image.fromarray(labels).save(path)
    mask = read_mask(path, FAST)
    assert mask.dtype == np.int64 and mask.shape == (2, 3)
    np.testing.assert_array_equal(mask, labels.astype(np.int64))


def test_read_mask_palette_png_gives_indices(tmp_path: Path) -> None:
    labels = np.array([[0, 1], [4, 5]], dtype=np.uint8)
    img = Image.fromarray(labels, mode="L").convert("P")
    img.putpalette([v for i in range(256) for v in (i, 255 - i, 7)])
    path = tmp_path / "p.png"
    img.save(path)
    np.testing.assert_array_equal(read_mask(path, POTSDAM), labels)


def test_read_mask_tif(tmp_path: Path) -> None:
    labels = np.array([[0, 3, 12], [11, 12, 1]], dtype=np.uint8)
    path = tmp_path / "m.tif"
    Image.fromarray(labels).save(path)
    np.testing.assert_array_equal(read_mask(path, FLAIR), labels)


@pytest.mark.parametrize(
    "spec,bad",
    [(POTSDAM, 6), (FLOODNET, 10), (FLAIR, 13), (FAST, 37), (FAST, 254)],
    ids=lambda v: getattr(getattr(v, "name", None), "value", str(v)),
)
def test_read_mask_out_of_range_names_file(spec: DatasetSpec, bad: int, tmp_path: Path) -> None:
    labels = np.zeros((3, 4), dtype=np.uint8)
    labels[1, 2] = bad
    path = tmp_path / f"bad_{spec.name.value}.png"
    Image.fromarray(labels).save(path)
    with pytest.raises(DatasetError, match=rf"bad_{spec.name.value}\.png' holds label values {bad}\b"):
        read_mask(path, spec)


def test_read_mask_rgb_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((2, 2, 3), dtype=np.uint8)).save(path)
    with pytest.raises(DatasetError, match=r"rgb\.png.*single-channel"):
        read_mask(path, POTSDAM)


def test_read_mask_unreadable_is_image_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(b"not a png")
    with pytest.raises(ImageError, match=r"broken\.png"):
        read_mask(path, POTSDAM)


def test_read_image_rgb_and_unreadable(tmp_path: Path) -> None:
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    Image.fromarray(rgb).save(tmp_path / "ok.png")
    out = read_image(tmp_path / "ok.png")
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
    np.testing.assert_array_equal(out, rgb)
    Image.fromarray(rgb[:, :, 0]).save(tmp_path / "gray.png")
    assert read_image(tmp_path / "gray.png").shape == (2, 3, 3)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.raises(ImageError, match=r"bad\.jpg"):
        read_image(tmp_path / "bad.jpg")


def test_check_mask_size_names_file() -> None:
    with pytest.raises(DatasetError, match=r"m\.png' is 4x3 but its image is 5x3"):
        check_mask_size(np.zeros((3, 5, 3), np.uint8), np.zeros((3, 4), np.int64), Path("/x/m.png"))
    check_mask_size(np.zeros((3, 5, 3), np.uint8), np.zeros((3, 5), np.int64), Path("/x/m.png"))
