"""Evaluation loop: perfect predictor, hand-worked compare mode, skipped files, errors, report IO."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gsnet_deploy.errors import BackendError, DatasetError
from gsnet_deploy.eval.datasets import FAST, FLAIR, FLOODNET, POTSDAM, DatasetSpec, SamplePair, list_pairs
from gsnet_deploy.eval.runner import evaluate, write_report

ALL_SPECS = [POTSDAM, FLOODNET, FLAIR, FAST]


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.name.value)
def test_evaluate_perfect_predictor_scores_100(spec: DatasetSpec, make_dataset, synth, tmp_path: Path) -> None:
    written = make_dataset(spec, n=3)
    pairs = list_pairs(spec, tmp_path / "root")

    def perfect(image: np.ndarray) -> np.ndarray:
        return synth.decode_label(image, len(spec.vocabulary))

    report = evaluate(spec, pairs, {"perfect": perfect}, progress=False)
    assert report.num_evaluated == 3 and report.skipped == []
    (res,) = report.results
    assert res.miou == pytest.approx(100.0, abs=1e-9)
    assert res.pacc == pytest.approx(100.0, abs=1e-9)
    # Every class present in the ground truth (not ignored) scores 100; absent classes are NaN.
    present = set()
    for _, mask in written:
        labels = np.asarray(Image.open(mask)).astype(int)
        present |= set(np.unique(labels[labels != spec.ignore_label]).tolist())
    for c, iou in enumerate(res.iou):
        if c in present:
            assert iou == pytest.approx(100.0)
        else:
            assert math.isnan(iou)
    assert spec.ignore_label not in present


def _one_sample(tmp_path: Path, spec: DatasetSpec, gt: np.ndarray) -> list[SamplePair]:
    img = tmp_path / f"a{spec.image_ext}"
    mask = tmp_path / f"a{spec.mask_ext}"
    Image.fromarray(np.zeros((*gt.shape, 3), np.uint8)).save(img)  # predictors below ignore it
    Image.fromarray(gt.astype(np.uint8)).save(mask)
    return [SamplePair(img, mask)]


# Potsdam (K=6, ignore 5 'clutter'), one 2x4 image, worked on paper.
GT = np.array([[0, 0, 1, 1], [2, 5, 4, 4]])
PRED_A = np.array([[0, 0, 1, 1], [2, 0, 4, 4]])  # right on every labelled pixel
PRED_B = np.array([[0, 1, 1, 1], [2, 3, 4, 0]])
# B on the 7 labelled pixels: tp = [1, 2, 1, -, 1], pos_gt = [2, 2, 1, 0, 2],
# pos_pred = [2, 3, 1, 0, 1] (its 3 sits on the ignored pixel and is not counted).
B_IOU = [100 / 3, 200 / 3, 100.0, None, 50.0, None]  # 1/(2+2-1), 2/(2+3-2), 1/1, -, 1/(2+1-1), -
B_MIOU = 62.5  # (1/3 + 2/3 + 1 + 1/2) / 4
B_PACC = 100 * 5 / 7


def test_evaluate_compare_hand_example(tmp_path: Path) -> None:
    pairs = _one_sample(tmp_path, POTSDAM, GT)
    preds = {"fp32": lambda im: PRED_A.copy(), "int8": lambda im: PRED_B.copy()}
    report = evaluate(POTSDAM, pairs, preds, progress=False)
    a, b = report.results
    assert (a.name, b.name) == ("fp32", "int8")
    assert a.miou == pytest.approx(100.0) and a.pacc == pytest.approx(100.0)
    assert b.miou == pytest.approx(B_MIOU, abs=1e-9)
    assert b.pacc == pytest.approx(B_PACC, abs=1e-9)
    for got, want in zip(b.iou, B_IOU):
        assert math.isnan(got) if want is None else got == pytest.approx(want, abs=1e-9)
    c = report.comparison
    assert c is not None and (c.a, c.b) == ("fp32", "int8")
    assert c.miou_delta == pytest.approx(B_MIOU - 100.0, abs=1e-9)
    want_delta = [100 / 3 - 100, 200 / 3 - 100, 0.0, None, -50.0, None]
    for got, want in zip(c.iou_delta, want_delta):
        assert math.isnan(got) if want is None else got == pytest.approx(want, abs=1e-9)
    # Same class at (0,0) (0,2) (0,3) (1,0) (1,2): 5 of 8 pixels, 5 of the 7 labelled ones.
    assert c.pixel_agreement == pytest.approx(100 * 5 / 8, abs=1e-9)
    assert c.valid_pixel_agreement == pytest.approx(100 * 5 / 7, abs=1e-9)
    # B's confusion matrix: [pred, gt], last column = ignored pixels.
    m = np.array(b.confusion_matrix)
    assert m.shape == (7, 7) and m[3, 6] == 1 and m[0, 4] == 1 and m[1, 0] == 1


def test_evaluate_floodnet_background_prediction_is_a_miss(tmp_path: Path) -> None:
    gt = np.array([[0, 1], [2, 2]])  # label 0 = 'Background' = ignore label
    pairs = _one_sample(tmp_path, FLOODNET, gt)
    report = evaluate(FLOODNET, pairs, {"m": lambda im: np.array([[0, 0], [2, 2]])}, progress=False)
    (res,) = report.results
    assert math.isnan(res.iou[0])  # Background: no ground truth left, out of the mean
    assert res.iou[1] == pytest.approx(0.0) and res.iou[2] == pytest.approx(100.0)
    assert res.miou == pytest.approx(50.0)
    assert report.excluded_classes == [0]


def test_evaluate_unreadable_image_is_skipped_and_counted(make_dataset, synth, tmp_path: Path) -> None:
    written = make_dataset(FLAIR, n=4)
    written[2][0].write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    pairs = list_pairs(FLAIR, tmp_path / "root")
    report = evaluate(FLAIR, pairs, {"p": lambda im: synth.decode_label(im, 12)}, progress=True)
    assert report.num_listed == 4 and report.num_evaluated == 3
    assert len(report.skipped) == 1
    assert report.skipped[0].path == str(written[2][0])
    assert "tile_002.png" in report.skipped[0].reason
    assert report.results[0].miou == pytest.approx(100.0)
    assert "skipped" in report.format_table()


def test_evaluate_mask_size_mismatch_is_skipped_like_a_corrupt_one(make_dataset, tmp_path: Path) -> None:
    """One rule (issue 11): a wrong-size mask and a corrupt mask are both skipped, listed and counted."""
    written = make_dataset(POTSDAM, n=3)
    Image.fromarray(np.zeros((16, 23), dtype=np.uint8)).save(written[1][1])
    written[2][1].write_bytes(b"\x89PNG\r\n\x1a\n corrupt")
    pairs = list_pairs(POTSDAM, tmp_path / "root")
    report = evaluate(POTSDAM, pairs, {"p": lambda im: np.zeros(im.shape[:2], np.int64)}, progress=False)
    assert report.num_evaluated == 1 and len(report.skipped) == 2
    assert re.search(r"ann_dir/val/tile_001\.png' is 23x16 but its image is 24x16", report.skipped[0].reason)
    assert "tile_002.png" in report.skipped[1].reason


def test_evaluate_out_of_range_label_names_mask(make_dataset, tmp_path: Path) -> None:
    written = make_dataset(FAST, n=2)
    labels = np.asarray(Image.open(written[0][1])).copy()
    labels[0, 0] = 40
    Image.fromarray(labels).save(written[0][1])
    pairs = list_pairs(FAST, tmp_path / "root")
    report = evaluate(FAST, pairs, {"p": lambda im: np.zeros(im.shape[:2], np.int64)}, progress=False)
    assert len(report.skipped) == 1
    assert re.search(r"semlabels/gray/tile_000\.png' holds label values 40", report.skipped[0].reason)


def test_evaluate_limit(make_dataset, synth, tmp_path: Path) -> None:
    make_dataset(POTSDAM, n=3)
    pairs = list_pairs(POTSDAM, tmp_path / "root")
    seen = []

    def pred(im: np.ndarray) -> np.ndarray:
        seen.append(im.shape)
        return synth.decode_label(im, 5)

    report = evaluate(POTSDAM, pairs, {"p": pred}, limit=2, progress=False)
    assert report.num_listed == 2 and report.num_evaluated == 2 and len(seen) == 2
    with pytest.raises(DatasetError, match="--limit is 0"):
        evaluate(POTSDAM, pairs, {"p": pred}, limit=0, progress=False)


@pytest.mark.parametrize(
    "bad,match",
    [
        (lambda im: np.zeros((3, 3), np.int64), r"shape"),
        (lambda im: np.zeros(im.shape[:2], np.float32), r"dtype float32"),
        (lambda im: np.full(im.shape[:2], 6, np.int64), r"class indices 6\.\.6"),
    ],
)
def test_evaluate_bad_prediction_is_backend_error(bad, match: str, tmp_path: Path) -> None:
    pairs = _one_sample(tmp_path, POTSDAM, GT)
    with pytest.raises(BackendError, match=match):
        evaluate(POTSDAM, pairs, {"bad": bad}, progress=False)


@pytest.mark.parametrize("n", [0, 3])
def test_evaluate_needs_one_or_two_predictors(n: int, tmp_path: Path) -> None:
    pairs = _one_sample(tmp_path, POTSDAM, GT)
    preds = {f"p{i}": (lambda im: PRED_A.copy()) for i in range(n)}
    with pytest.raises(BackendError, match=f"got {n}"):
        evaluate(POTSDAM, pairs, preds, progress=False)


def test_evaluate_all_unreadable_raises(tmp_path: Path) -> None:
    pairs = _one_sample(tmp_path, POTSDAM, GT)
    pairs[0].image.write_bytes(b"junk")
    with pytest.raises(DatasetError, match="No sample of potsdam could be read"):
        evaluate(POTSDAM, pairs, {"p": lambda im: PRED_A.copy()}, progress=False)


def test_write_report_json_and_table(tmp_path: Path) -> None:
    pairs = _one_sample(tmp_path, POTSDAM, GT)
    report = evaluate(POTSDAM, pairs, {"fp32": lambda im: PRED_A.copy(), "int8": lambda im: PRED_B.copy()}, progress=False)
    out = tmp_path / "out" / "eval.json"
    write_report(report, out)
    assert [p.name for p in out.parent.iterdir()] == ["eval.json"]  # no temp file left
    data = json.loads(out.read_text())
    assert data["dataset"] == "potsdam" and data["paper_miou"] == 45.75
    assert data["results"][1]["miou"] == pytest.approx(B_MIOU)
    assert data["results"][1]["iou"][3] is None and data["results"][1]["iou"][5] is None  # NaN -> null
    assert data["comparison"]["pixel_agreement"] == pytest.approx(62.5)
    table = report.format_table()
    assert "clutter (excluded)" in table and "45.75" in table and "delta" in table
    assert "62.50" in table and "-37.50" in table


def test_eval_package_imports_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import gsnet_deploy.eval.runner, gsnet_deploy.eval.datasets, gsnet_deploy.eval.metrics\n"
        "assert 'torch' not in {k for k, v in sys.modules.items() if v is not None}\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
