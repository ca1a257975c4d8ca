"""Tests of runtime.tiling: window grid coverage and overlap, blending weights, streaming accumulator."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from gsnet_deploy.runtime.tiling import (
    StripAccumulator,
    WindowGrid,
    axis_starts,
    blend_weights,
    pad_to_window,
    ramp_profile,
)

S = 384


@pytest.mark.parametrize("length", [1, 100, 383, 384, 385, 640, 700, 1000, 2049])
@pytest.mark.parametrize("overlap", [0, 64, 128, 200])
def test_axis_starts_cover_every_pixel_with_overlap(length: int, overlap: int) -> None:
    starts = axis_starts(length, S, overlap)
    cover = np.zeros(length, dtype=np.int64)
    for s in starts:
        cover[s : s + S] += 1
    assert (cover >= 1).all()
    assert starts[0] == 0
    assert starts == sorted(set(starts))
    if length >= S:
        assert starts[-1] == length - S  # last window aligned to the edge
        assert all(s + S <= length for s in starts)
        for a, b in itertools.pairwise(starts):
            assert a + S - b >= overlap  # neighbours share at least `overlap` pixels
            assert b - a <= S - overlap  # and no more windows than needed before the edge one
    else:
        assert starts == [0]


def test_axis_starts_hand_example() -> None:
    # 1000 px, stride 256: 0, 256, 512 (512+384 = 896 < 1000), then the edge window at 616
    assert axis_starts(1000, 384, 128) == [0, 256, 512, 616]
    assert axis_starts(640, 384, 128) == [0, 256]


def test_grid_windows_cover_image_and_stay_inside() -> None:
    grid = WindowGrid(700, 1000, S, 128)
    cover = np.zeros((700, 1000), dtype=np.int64)
    windows = list(grid)
    assert len(windows) == len(grid) == 3 * 4
    for w in windows:
        assert 0 <= w.row_off and w.row_off + w.height <= 700
        assert 0 <= w.col_off and w.col_off + w.width <= 1000
        assert (w.height, w.width) == (S, S)
        cover[w.row_off : w.row_off + w.height, w.col_off : w.col_off + w.width] += 1
    assert cover.min() >= 1
    # hand-worked starts: rows 0, 256, 316 (edge-aligned); columns 0, 256, 512, 616
    rows = np.zeros(700, np.int64)
    for s in (0, 256, 316):
        rows[s : s + S] += 1
    cols = np.zeros(1000, np.int64)
    for s in (0, 256, 512, 616):
        cols[s : s + S] += 1
    np.testing.assert_array_equal(cover, rows[:, None] * cols[None, :])
    assert [w.index for w in windows] == list(range(12))
    assert [w.row for w in windows] == sorted(w.row for w in windows)  # row-major


def test_grid_small_image_has_one_clipped_window() -> None:
    (w,) = list(WindowGrid(100, 50, S, 128))
    assert (w.row_off, w.col_off, w.height, w.width) == (0, 0, 100, 50)


def test_grid_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="positive"):
        WindowGrid(0, 10)
    with pytest.raises(ValueError, match="overlap"):
        WindowGrid(10, 10, 384, 384)


def test_ramp_profile_hand_values() -> None:
    # size 8, overlap 4: distance to the nearer end + 0.5, divided by 4, capped at 1
    expected = np.array([0.5, 1.5, 2.5, 3.5, 3.5, 2.5, 1.5, 0.5]) / 4.0
    np.testing.assert_allclose(ramp_profile(8, 4), expected, rtol=0, atol=1e-7)
    np.testing.assert_allclose(ramp_profile(8, 2), [0.25, 0.75, 1, 1, 1, 1, 0.75, 0.25], rtol=0, atol=1e-7)
    np.testing.assert_array_equal(ramp_profile(8, 0), np.ones(8))


def test_blend_weights_positive_and_ramps_sum_to_one_at_exact_overlap() -> None:
    w = blend_weights(S, 128)
    assert w.shape == (S, S) and w.dtype == np.float32
    assert w.min() > 0 and np.isclose(w.min(), (0.5 / 128) ** 2)
    assert w.max() == 1.0
    # two windows overlapping by exactly 128: the two ramps add up to 1 over the shared pixels
    p = ramp_profile(S, 128).astype(np.float64)
    shared = p[256:] + p[:128]
    np.testing.assert_allclose(shared, np.ones(128), rtol=0, atol=1e-6)


def test_pad_to_window_reflects() -> None:
    patch = np.arange(6, dtype=np.uint8).reshape(3, 2, 1)  # rows [0 1] [2 3] [4 5]
    out = pad_to_window(patch, 5)
    # rows reflect 0,1,2,1,0 ; columns reflect 0,1,0,1,0
    rows = [0, 1, 2, 1, 0]
    cols = [0, 1, 0, 1, 0]
    expected = np.array([[patch[r, c, 0] for c in cols] for r in rows], dtype=np.uint8)
    np.testing.assert_array_equal(out[:, :, 0], expected)
    one = pad_to_window(np.full((1, 3, 2), 7, dtype=np.uint8), 4)  # 1-pixel side: repeated
    assert one.shape == (4, 4, 2) and (one == 7).all()


def _reference_merge(grid: WindowGrid, probs: dict[int, np.ndarray], overlap: int) -> np.ndarray:
    """Dense float64 weighted average written plainly (weights from the ramp formula)."""
    i = np.arange(S, dtype=np.float64)
    prof = np.minimum(1.0, (np.minimum(i, S - 1 - i) + 0.5) / overlap) if overlap else np.ones(S)
    wgt = prof[:, None] * prof[None, :]
    n = next(iter(probs.values())).shape[0]
    acc = np.zeros((n, grid.height, grid.width))
    tot = np.zeros((grid.height, grid.width))
    for w in grid:
        if w.index not in probs:
            continue
        h, wd = w.height, w.width
        acc[:, w.row_off : w.row_off + h, w.col_off : w.col_off + wd] += probs[w.index][:, :h, :wd] * wgt[:h, :wd]
        tot[w.row_off : w.row_off + h, w.col_off : w.col_off + wd] += wgt[:h, :wd]
    return np.divide(acc, tot, out=np.zeros_like(acc), where=tot > 0)


def _stream(grid: WindowGrid, probs: dict[int, np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
    acc = StripAccumulator(grid, n)
    out = np.full((n, grid.height, grid.width), np.nan)
    valid = np.zeros((grid.height, grid.width), dtype=bool)
    next_row = 0
    bands = []
    for w in grid:
        if w.index in probs:
            bands += acc.add(w, probs[w.index].astype(np.float32))
    bands += acc.finish()
    for band in bands:
        h = band.valid.shape[0]
        assert band.row_off == next_row  # rows come out in order, each once
        assert band.probs.shape == (n, h, grid.width) and band.probs.dtype == np.float32
        out[:, band.row_off : band.row_off + h] = band.probs
        valid[band.row_off : band.row_off + h] = band.valid
        next_row += h
    assert next_row == grid.height
    return out, valid


@pytest.mark.parametrize(("height", "width", "overlap"), [(700, 1000, 128), (1100, 500, 64), (200, 900, 128), (384, 384, 0)])
def test_accumulator_matches_dense_reference(height: int, width: int, overlap: int) -> None:
    grid = WindowGrid(height, width, S, overlap)
    rng = np.random.default_rng(1)
    probs = {w.index: rng.uniform(0, 1, size=(2, S, S)) for w in grid}
    out, valid = _stream(grid, probs, 2)
    assert valid.all()
    np.testing.assert_allclose(out, _reference_merge(grid, probs, overlap), rtol=0, atol=1e-5)


def test_accumulator_partition_of_unity() -> None:
    # probabilities of 1 everywhere must merge to exactly 1: the normalized weights sum to 1
    grid = WindowGrid(1000, 700, S, 128)
    out, valid = _stream(grid, {w.index: np.ones((1, S, S)) for w in grid}, 1)
    assert valid.all()
    np.testing.assert_allclose(out, 1.0, rtol=0, atol=1e-6)


def test_accumulator_skipped_windows_leave_rows_invalid() -> None:
    grid = WindowGrid(1300, 500, S, 128)  # window rows start at 0, 256, 512, 768, 916
    kept = {w.index: np.full((1, S, S), 0.25) for w in grid if w.row in (0, 4)}
    out, valid = _stream(grid, kept, 1)
    assert valid[:384].all() and valid[916:].all()
    assert not valid[384:916].any()
    np.testing.assert_allclose(out[0][valid], 0.25, rtol=0, atol=1e-6)
    assert (out[0][~valid] == 0).all()


def test_accumulator_rejects_rows_out_of_order() -> None:
    grid = WindowGrid(800, 400, S, 128)
    windows = list(grid)
    acc = StripAccumulator(grid, 1)
    acc.add(windows[-1], np.zeros((1, S, S), np.float32))
    with pytest.raises(ValueError, match="row order"):
        acc.add(windows[0], np.zeros((1, S, S), np.float32))
