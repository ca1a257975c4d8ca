"""Issue 11, reliability: bad inputs, signals, full disks and permissions on the ``segment`` path.

Each test names the bug it catches. The CLI tests swap the backend for a numpy stand-in (no torch,
no model build), so they check the orchestration, not the network.
"""

from __future__ import annotations

import errno
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
import tracemalloc
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gsnet_deploy import cli
from gsnet_deploy.contracts.io_names import IMAGES, LOGITS, TEXT_EMBEDS, TEXT_TOKENS

REPO = Path(__file__).parents[2]


class _TextRunner:
    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = feeds[TEXT_TOKENS].shape[0]
        emb = np.eye(n, 512, dtype=np.float32)
        return {TEXT_EMBEDS: emb}


class _ImageRunner:
    """Logits favour class ``favour`` everywhere, with a little spatial texture."""

    def __init__(self, favour: int = 0) -> None:
        self.favour = favour
        self.calls = 0

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        views, emb = feeds[IMAGES], feeds[TEXT_EMBEDS]
        b, n = views.shape[0], emb.shape[0]
        pooled = views.reshape(b, 3, 96, 4, 96, 4).mean(axis=(3, 5))[:, :1] / 255.0  # [B, 1, 96, 96]
        logits = np.broadcast_to(pooled, (b, n, 96, 96)).copy() * 0.1
        logits[:, self.favour % n] += 2.0
        return {LOGITS: logits.astype(np.float32)}


class StandInBackend:
    name = "standin"
    model_digest = "standin"
    preferred_views = 4
    max_views = 8

    def __init__(self, favour: int = 0) -> None:
        self.text = _TextRunner()
        self.image = _ImageRunner(favour)

    def __enter__(self) -> StandInBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.fixture
def standin(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Replace the CLI's backend factory by the numpy stand-in; counts how often it was opened."""
    opened = {"count": 0, "favour": 0}

    def fake_open(options: object, warn: bool = True) -> StandInBackend:
        opened["count"] += 1
        return StandInBackend(opened["favour"])

    monkeypatch.setattr(cli, "open_backend", fake_open)
    return opened


def _png(path: Path, h: int = 64, w: int = 80, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _segment(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(["segment", *args, "--no-cache", "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


# --- 1: --max-memory holds on sparse rasters -------------------------------------------------------------


class _SparseSource:
    """A tall source whose middle is all nodata (only the first and last 384 rows are valid)."""

    def __init__(self, height: int, width: int) -> None:
        self.height, self.width = height, width
        self.sample_bytes = 1

    def read(self, row_off: int, row_end: int, col_off: int, col_end: int) -> tuple[np.ndarray, np.ndarray]:
        rows = np.arange(row_off, row_end)
        valid_rows = (rows < 384) | (rows >= self.height - 384)
        valid = np.broadcast_to(valid_rows[:, None], (row_end - row_off, col_end - col_off)).copy()
        return np.zeros((row_end - row_off, col_end - col_off, 3), np.uint8), valid


def test_nodata_gap_does_not_break_the_memory_budget() -> None:
    """Bug: StripAccumulator emitted a whole nodata gap as one list of bands ([N, gap, W] float32 at once)."""
    from gsnet_deploy.runtime.tiled import run_tiled

    n, height, width = 8, 12_000, 400
    budget = 64 << 20  # the stand-in backend's own temporaries count too

    class Sink:
        rows = 0

        def write(self, rows: object) -> None:
            Sink.rows += rows.valid.shape[0]  # type: ignore[attr-defined]

    emb = np.eye(n, 512, dtype=np.float32)
    tracemalloc.start()
    try:
        run_tiled(_SparseSource(height, width), Sink(), StandInBackend(), emb, max_memory=budget, progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert Sink.rows == height
    whole_gap = n * (height - 2 * 384) * width * 4
    assert peak < budget < whole_gap, f"peak {peak / 2**20:.0f} MiB"


# --- 2: NaN in float rasters is nodata ---------------------------------------------------------------------


def test_nan_in_float_raster_is_nodata(tmp_path: Path, fakes) -> None:
    """Bug: a NaN patch made the percentile stretch NaN (whole mask garbage) and was not nodata."""
    rasterio = pytest.importorskip("rasterio")
    from gsnet_deploy.runtime.raster import RasterReader

    rng = np.random.default_rng(0)
    data = rng.uniform(100.0, 4000.0, (3, 300, 420)).astype(np.float32)
    data[:, 50:120, 60:200] = np.nan
    src = fakes.geotiff(tmp_path / "f.tif", 300, 420, dtype="float32", data=data)
    with RasterReader(src) as reader:
        assert reader.stretch is not None and all(np.isfinite(reader.stretch))
        _, valid = reader.read(0, 300, 0, 420)
    assert valid is not None
    np.testing.assert_array_equal(valid, ~np.isnan(data[0]))
    from gsnet_deploy.runtime.segment import Mode, SegmentOptions, segment_one

    opts = SegmentOptions(out_dir=tmp_path / "out", mode=Mode.TILED, progress=False)
    res = segment_one(src, StandInBackend(1), np.eye(3, 512, dtype=np.float32), ["a", "b", "c"], opts)
    with rasterio.open(res.paths[0]) as ds:
        mask = ds.read(1)
        nodata = ds.nodata
    assert nodata is not None
    assert (mask[50:120, 60:200] == nodata).all()
    outside = np.ones(mask.shape, bool)
    outside[50:120, 60:200] = False
    assert (mask[outside] == 1).all()


def test_nan_in_plain_float_image_keeps_finite_stretch() -> None:
    """Bug: stretch_to_uint8 took percentiles over NaN, so every pixel became 0."""
    from gsnet_deploy.runtime.stretch import stretch_to_uint8

    values = np.linspace(0.0, 1000.0, 400, dtype=np.float32).reshape(20, 20)
    values[:5] = np.nan
    out, (lo, hi) = stretch_to_uint8(values)
    assert np.isfinite(lo) and np.isfinite(hi)
    assert out[5:].max() == 255 and out[5:].min() == 0


# --- 3: images over Pillow's decompression-bomb limit ---------------------------------------------------


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width x height`` RGB with almost no pixel data (a bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )
    return path


def test_large_png_goes_tiled_and_bomb_is_one_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], standin: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bug: a PNG over Pillow's limit raised DecompressionBombError out of the batch (traceback, later inputs lost)."""
    pytest.importorskip("rasterio")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # a 300x200 PNG now counts as a 'huge' one
    big = _png(tmp_path / "big.png", 200, 300)
    bomb = _png_header_only(tmp_path / "bomb.png", 60_000, 60_000)
    small = _png(tmp_path / "small.png", 100, 100)
    out = tmp_path / "out"
    code, _, err = _segment(capsys, str(big), str(bomb), str(small), "--classes", "a,b", "--out", str(out))
    assert code == 1, err
    assert "Traceback" not in err and "bomb.png" in err
    monkeypatch.undo()
    mask = np.asarray(Image.open(out / "big_mask.png"))
    assert mask.shape == (200, 300)
    assert "tiled" in err
    assert (out / "small_mask.png").is_file() and (out / "big_overlay.png").is_file()
    assert not (out / "bomb_mask.png").exists()


# --- 4: the embedding cache is best effort -----------------------------------------------------------------


def test_unwritable_cache_warns_once_and_continues(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Bug: a read-only cache folder (container HOME) aborted the run with a traceback."""
    from gsnet_deploy.runtime.vocab import TextEmbeddingCache, parse_classes

    blocker = tmp_path / "file"
    blocker.write_text("x")
    cache = TextEmbeddingCache(blocker / "cache")
    vocab = parse_classes("a,b")
    for _ in range(2):
        emb = cache.get_or_compute(vocab, "{}", "d", lambda prompts: np.ones((len(prompts), 4), np.float32))
        assert emb.shape == (2, 4)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "cache" in err


# --- 5: same-stem inputs -----------------------------------------------------------------------------------


def test_same_stem_inputs_are_refused_up_front(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], standin: dict[str, int]
) -> None:
    """Bug: a/x.png and b/x.png wrote the same outputs; the run reported both segmented."""
    a, b = _png(tmp_path / "a" / "x.png"), _png(tmp_path / "b" / "x.png", seed=1)
    c = _png(tmp_path / "b" / "y.jpg")
    code, _, err = _segment(capsys, str(a), str(b), str(c), "--classes", "a,b", "--out", str(tmp_path / "out"))
    assert code == 2
    assert str(a) in err and str(b) in err and len(err.strip().splitlines()) == 1
    assert standin["count"] == 0 and not (tmp_path / "out" / "x_mask.png").exists()


# --- 6: SIGTERM / SIGINT leave nothing half-written ---------------------------------------------------------

_SIGNAL_SCRIPT = textwrap.dedent(
    """
    import signal, sys, time
    # a child inherits ignored and blocked signals from the pytest process (in the full suite SIGINT arrived
    # ignored); start from what a shell gives a foreground command
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT, signal.SIGTERM])
    sys.path.insert(0, {tests!r})
    from test_reliability import StandInBackend
    from gsnet_deploy import cli
    from gsnet_deploy.runtime import outputs
    cli.open_backend = lambda options, warn=True: StandInBackend()
    real = outputs.render_overlay
    def slow(*a, **k):
        print("READY", flush=True)
        for _ in range(300):  # 30 s in short calls: the interrupt is seen between them whichever thread the kernel
            time.sleep(0.1)   # gave it to (one 30 s sleep() is only cut short when the main thread itself gets it)
        return real(*a, **k)
    outputs.render_overlay = slow
    sys.exit(cli.main(sys.argv[1:]))
    """
)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_between_mask_and_overlay_leaves_no_outputs(tmp_path: Path, sig: int, code: int) -> None:
    """Bug: SIGTERM left .part files; an interrupt between mask and overlay left a mask without overlay."""
    img = _png(tmp_path / "x.png")
    out = tmp_path / "out"
    script = tmp_path / "run.py"
    script.write_text(_SIGNAL_SCRIPT.format(tests=str(Path(__file__).parent)))
    proc = subprocess.Popen(
        [sys.executable, str(script), "segment", str(img), "--classes", "a,b", "--out", str(out), "--save-probs",
         "--no-cache", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "READY", proc.stderr.read() if proc.stderr else ""
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == []


# --- 7: full disk during the overlay ------------------------------------------------------------------------


def test_full_disk_during_overlay_keeps_previous_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], standin: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bug: ENOSPC while writing the overlay left the new mask beside the previous run's overlay."""
    from gsnet_deploy.runtime import outputs

    img = _png(tmp_path / "x.png")
    out = tmp_path / "out"
    code, _, err = _segment(capsys, str(img), "--classes", "a,b", "--out", str(out))
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    class FullDisk:
        def save(self, *a: object, **k: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs, "render_overlay", lambda *a, **k: FullDisk())
    standin["favour"] = 1  # the new mask would differ from the old one
    code, _, err = _segment(capsys, str(img), "--classes", "a,b", "--out", str(out))
    assert code == 1
    assert "No space left" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# --- 8: permissions -----------------------------------------------------------------------------------------


def test_outputs_get_umask_permissions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], standin: dict[str, int], fakes
) -> None:
    """Bug: mkstemp + rename left every output at mode 0600."""
    pytest.importorskip("rasterio")
    img = _png(tmp_path / "x.png")
    geo = fakes.geotiff(tmp_path / "g.tif", 100, 120)
    old = os.umask(0o022)
    try:
        code, _, err = _segment(capsys, str(img), str(geo), "--classes", "a,b", "--out", str(tmp_path / "out"), "--save-probs")
    finally:
        os.umask(old)
    assert code == 0, err
    files = sorted((tmp_path / "out").iterdir())
    assert {p.name for p in files} == {
        "x_mask.png", "x_overlay.png", "x.probs.npy", "g_mask.tif", "g_overlay.png", "g_probs.tif",
    }  # fmt: skip
    for p in files:
        assert p.stat().st_mode & 0o777 == 0o644, p.name


# --- paper mode on a GeoTIFF --------------------------------------------------------------------------------


def test_paper_mode_on_geotiff_keeps_georeferencing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], standin: dict[str, int], fakes
) -> None:
    """Bug: --mode paper on a GeoTIFF wrote a PNG without georeferencing."""
    rasterio = pytest.importorskip("rasterio")
    geo = fakes.geotiff(tmp_path / "g.tif", 100, 120)
    out = tmp_path / "out"
    standin["favour"] = 1
    code, stdout, err = _segment(capsys, str(geo), "--classes", "a,b", "--out", str(out), "--mode", "paper", "--save-probs")
    assert code == 0, err
    assert stdout.strip() == str(out / "g_mask.tif")
    with rasterio.open(geo) as a, rasterio.open(out / "g_mask.tif") as b:
        assert b.crs == a.crs and b.transform == a.transform and b.shape == a.shape
        assert (b.read(1) == 1).all()
    assert (out / "g_probs.tif").is_file() and not (out / "g_mask.png").exists()


# --- 9: no tracebacks without --debug ------------------------------------------------------------------------


def test_bad_device_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Bug: --device banana reached torch.device and printed a RuntimeError traceback."""
    img = _png(tmp_path / "x.png")
    code, _, err = _segment(capsys, str(img), "--classes", "a", "--out", str(tmp_path / "o"), "--device", "banana",
                            "--model-size", "tiny")  # fmt: skip
    assert code == 2 and "--device" in err and "banana" in err and "Traceback" not in err


def test_export_onnx_to_unwritable_folder_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Bug: export onnx --out on a read-only place failed with an OSError traceback after building the model."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = cli.main(["export", "onnx", "--model-size", "tiny", "--out", str(blocker / "onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and str(blocker / "onnx") in err


def test_eval_json_unwritable_is_checked_before_evaluating(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Bug: eval --json to an unwritable path failed after the whole evaluation ran (losing it)."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = cli.main(["eval", "--dataset", "potsdam", "--root", str(tmp_path / "nowhere"), "--json", str(blocker / "r.json")])
    err = capsys.readouterr().err
    assert code == 2 and "r.json" in err and "Traceback" not in err


# --- 10: class counts and long names --------------------------------------------------------------------------


def test_too_many_classes_refused_before_the_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], standin: dict[str, int]
) -> None:
    """Bug: 300 classes were refused only at write time, after the whole inference."""
    img = _png(tmp_path / "x.png")
    names = ",".join(f"class{i}" for i in range(300))
    code, _, err = _segment(capsys, str(img), "--classes", names, "--out", str(tmp_path / "o"))
    assert code == 2 and "300 classes" in err and standin["count"] == 0


def test_class_name_over_77_tokens_is_refused_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], standin: dict[str, int]
) -> None:
    """Bug: names over CLIP's 77 tokens were cut silently (two long names could become the same channel)."""
    img = _png(tmp_path / "x.png")
    long_name = " ".join(["red roofed building"] * 30)
    code, _, err = _segment(capsys, str(img), "--classes", f"road,{long_name}", "--out", str(tmp_path / "o"))
    assert code == 2 and "red roofed building red" in err and "77" in err and standin["count"] == 0


# --- 11: the smaller ones ---------------------------------------------------------------------------------------


def test_exit_codes_failed_inputs_and_internal_crash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], standin: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bug: the exit status counted failed inputs (2 looked like a usage error); a crash printed a traceback."""
    img = _png(tmp_path / "x.png")
    code, _, _ = _segment(capsys, str(img), str(tmp_path / "m1.png"), str(tmp_path / "m2.png"), "--classes", "a",
                          "--out", str(tmp_path / "o"))  # fmt: skip
    assert code == 1
    from gsnet_deploy.runtime import segment

    def crash(*a: object, **k: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(segment, "segment_files", crash)
    code, _, err = _segment(capsys, str(img), "--classes", "a", "--out", str(tmp_path / "o"))
    assert code == 3 and "boom" in err and "--debug" in err and "Traceback" not in err


def test_onnx_demo_export_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_onnx_dir: Path) -> None:
    """Bug: --onnx on a demo-weights export gave no demo warning."""
    img = _png(tmp_path / "x.png")
    code, _, err = _segment(capsys, str(img), "--classes", "a,b", "--out", str(tmp_path / "o"), "--onnx", str(tiny_onnx_dir))
    assert code == 0, err
    assert "demo weights" in err


def test_engine_with_onnx_is_a_conflict(tmp_path: Path, capsys: pytest.CaptureFixture[str], standin: dict[str, int]) -> None:
    """Bug: --engine with --onnx silently used the engine."""
    img = _png(tmp_path / "x.png")
    code, _, err = _segment(capsys, str(img), "--classes", "a", "--onnx", str(tmp_path), "--engine", str(tmp_path))
    assert code == 2 and "--engine" in err and "--onnx" in err and standin["count"] == 0


def test_bands_on_png_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], standin: dict[str, int]) -> None:
    """Bug: --bands on a PNG was silently ignored."""
    img = _png(tmp_path / "x.png")
    code, _, err = _segment(capsys, str(img), "--classes", "a", "--bands", "1,2,3", "--out", str(tmp_path / "o"))
    assert code == 2 and "--bands" in err and "x.png" in err and standin["count"] == 0


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--overlap", "400"), ("--overlap", "-1"), ("--gsd-scale", "0"), ("--gsd-scale", "nan"), ("--max-memory", "0")],
)
def test_out_of_range_options_checked_before_the_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], standin: dict[str, int], flag: str, value: str
) -> None:
    """Bug: bad --overlap/--gsd-scale/--max-memory were reported per image, after the model loaded."""
    imgs = [str(_png(tmp_path / f"x{i}.png", 1100, 1100)) for i in range(2)]
    code, _, err = _segment(capsys, *imgs, "--classes", "a", flag, value, "--out", str(tmp_path / "o"))
    assert code == 2 and flag in err and standin["count"] == 0
    assert len(err.strip().splitlines()) == 1


def test_palette_error_names_the_class(tmp_path: Path) -> None:
    """Bug: a bad color in a line palette was reported by line number only (a comment line shifts it)."""
    from gsnet_deploy.errors import GSNetError
    from gsnet_deploy.runtime.palette import load_palette

    pal = tmp_path / "p.txt"
    pal.write_text("# colors\n#ff0000\nbanana\n#00ff00\n")
    with pytest.raises(GSNetError, match="'tree'"):
        load_palette(pal, ["road", "tree", "water"])


def test_export_onnx_prints_no_dataclass_repr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bug: export onnx printed 'wrote OnnxExport(out_dir=PosixPath(...), ...)'."""
    from gsnet_deploy.contracts.onnx_manifest import OnnxManifest
    from gsnet_deploy.export import onnx as export_module

    def fake_export(model: object, out: Path, **kwargs: object) -> object:
        manifest = OnnxManifest("demo-x", "{}", (0.0,) * 3, (1.0,) * 3, 384, 96, 512, "p", 17)
        paths = [out / n for n in ("text_encoder.onnx", "image_graph.onnx", "manifest.json")]
        return export_module.OnnxExport(out, *paths, manifest, (None, None))  # type: ignore[arg-type]

    monkeypatch.setattr(export_module, "export_onnx", fake_export)
    code = cli.main(["export", "onnx", "--model-size", "tiny", "--out", str(tmp_path / "onnx")])
    err = capsys.readouterr().err
    assert code == 0
    assert "OnnxExport(" not in err and "PosixPath" not in err
    assert "text_encoder.onnx" in err


def test_sigterm_is_handled_like_sigint(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bug: SIGTERM killed the process without running cleanup (no handler installed)."""
    seen: list[int] = []

    def work(args: object) -> int:
        seen.append(signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None))
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        return 0

    parser = cli.build_parser()
    args = parser.parse_args(["bench", "table5"])
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    monkeypatch.setattr(parser, "parse_args", lambda argv=None: args)
    args.func = work
    assert cli.main([]) == 143
    assert seen == [True]
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None)


# --- 11: sparse GeoTIFF blocks ------------------------------------------------------------------------------


def _sparse_geotiff(path: Path, blocks: list[tuple[int, int]]) -> Path:
    """A 1024x1024 RGB GeoTIFF in 256-px blocks, SPARSE_OK, with only ``blocks`` (row, col) written."""
    import rasterio
    from rasterio.transform import from_origin

    transform = from_origin(500000.0, 5400000.0, 0.5, 0.5)
    profile = dict(driver="GTiff", width=1024, height=1024, count=3, dtype="uint8", tiled=True, blockxsize=256,
                   blockysize=256, SPARSE_OK=True, crs="EPSG:32633", transform=transform)  # fmt: skip
    rng = np.random.default_rng(0)
    with rasterio.open(path, "w", **profile) as dst:
        for r, c in blocks:
            data = rng.integers(1, 255, (3, 256, 256), dtype=np.uint8)
            dst.write(data, window=rasterio.windows.Window(c * 256, r * 256, 256, 256))
    return path


def test_sparse_blocks_are_nodata_and_not_run(tmp_path: Path) -> None:
    """Bug: never-written blocks of a sparse GeoTIFF without nodata were read and run as black pixels."""
    rasterio = pytest.importorskip("rasterio")
    from gsnet_deploy.runtime.palette import default_palette
    from gsnet_deploy.runtime.segment import segment_raster

    src = _sparse_geotiff(tmp_path / "s.tif", [(0, 0), (2, 3)])
    backend = StandInBackend(1)
    result = segment_raster(src, backend, np.eye(2, 512, dtype=np.float32), out_dir=tmp_path / "o", class_names=["a", "b"],
                            palette=default_palette(2), progress=False)  # fmt: skip
    assert result.skipped >= 8 and result.windows + result.skipped == 16
    with rasterio.open(result.paths[0]) as ds:
        mask, nodata = ds.read(1), ds.nodata
    assert nodata == 255
    assert (mask[:256, :256] == 1).all() and (mask[512:768, 768:] == 1).all()
    assert (mask[256:512, 256:512] == 255).all() and (mask[768:, :256] == 255).all()


def test_sparse_window_is_not_read(tmp_path: Path) -> None:
    """Bug: a rectangle lying wholly in never-written blocks still went to GDAL for a read."""
    pytest.importorskip("rasterio")
    from gsnet_deploy.runtime.raster import RasterReader

    src = _sparse_geotiff(tmp_path / "s.tif", [(0, 0)])

    class NoRead:
        def __init__(self, ds: object) -> None:
            self._ds = ds

        def __getattr__(self, name: str) -> object:
            if name in ("read", "read_masks"):
                raise AssertionError("read a never-written block")
            return getattr(self._ds, name)

    with RasterReader(src) as reader:
        reader._ds = NoRead(reader._ds)
        rgb, valid = reader.read(300, 700, 300, 1024)
        assert rgb.shape == (400, 724, 3) and valid is not None and not valid.any()
        with pytest.raises(AssertionError, match="never-written"):
            reader.read(0, 300, 0, 300)  # touches the written block: a real read


def test_eval_exits_1_when_a_sample_was_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bug: a corrupt eval mask was skipped with exit 0 (while a wrong-size one aborted the run)."""
    import contextlib

    from gsnet_deploy.eval import predict

    split = tmp_path / "root" / "PotsdamSplit"
    for i in range(2):
        _png(split / "img_dir" / "val" / f"tile_{i}.png", 16, 24, seed=i)
        (split / "ann_dir" / "val").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((16, 24), np.uint8)).save(split / "ann_dir" / "val" / f"tile_{i}.png")
    (split / "ann_dir" / "val" / "tile_1.png").write_bytes(b"\x89PNG\r\n\x1a\n corrupt")

    @contextlib.contextmanager
    def fake_predictors(*a: object, **k: object) -> Iterator[dict[str, object]]:
        yield {"p": lambda im: np.zeros(im.shape[:2], np.int64)}

    monkeypatch.setattr(predict, "backend_predictors", fake_predictors)
    code = cli.main(["eval", "--dataset", "potsdam", "--root", str(tmp_path / "root"), "--json", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert code == 1 and "tile_1.png" in err and "skipped" in err
    assert (tmp_path / "r.json").is_file()


class _MaskRecordingRunner:
    """An image runner (or row source) wrapper noting, per call, whether a worker thread could take SIGINT/SIGTERM."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.open_workers: list[str] = []  # worker threads that ran us without SIGINT and SIGTERM blocked
        self.worker_calls = 0

    def _note(self) -> None:
        import threading

        if threading.current_thread() is threading.main_thread():
            return
        self.worker_calls += 1
        if not {signal.SIGINT, signal.SIGTERM} <= set(signal.pthread_sigmask(signal.SIG_BLOCK, [])):
            self.open_workers.append(threading.current_thread().name)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._note()
        return self.inner.run(feeds)  # type: ignore[attr-defined]

    def read(self, *window: int) -> tuple[np.ndarray, np.ndarray | None]:
        self._note()
        return self.inner.read(*window)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


def test_worker_threads_leave_sigint_and_sigterm_to_the_main_thread(tmp_path: Path, fakes, monkeypatch) -> None:
    # catches: a worker thread of the orchestrator (the folder pipeline's device worker, the tiled window
    # reader) that can take SIGINT or SIGTERM: the kernel may hand the signal to it, and a main thread
    # blocked in a long write would not see the interrupt until that write returned
    from gsnet_deploy.runtime import segment
    from gsnet_deploy.runtime.rows import ArraySink, ArraySource
    from gsnet_deploy.runtime.tiled import run_tiled
    from gsnet_deploy.runtime.vocab import TextEmbeddingCache, parse_classes

    runner = _MaskRecordingRunner(fakes.linear(3))
    images = [_png(tmp_path / f"img{i}.png", seed=i) for i in range(3)]
    monkeypatch.setattr(segment, "encode_vocabulary", lambda *args: np.eye(3, 512, dtype=np.float32))
    options = segment.SegmentOptions(out_dir=tmp_path / "out", mode=segment.Mode.PAPER, progress=False)
    with fakes.backend(runner) as backend:
        report = segment.segment_files(images, backend, parse_classes("a,b,c"), options, TextEmbeddingCache(None), log=print)
    assert len(report.written) == 3 and runner.worker_calls >= 2  # the device work ran in the pipeline's worker
    source = _MaskRecordingRunner(ArraySource(np.zeros((500, 600, 3), np.uint8)))
    run_tiled(source, ArraySink(3, 500, 600), fakes.backend(fakes.linear(3)), np.eye(3, 512, dtype=np.float32), progress=False)
    assert source.worker_calls > 0  # windows were read in the reader thread
    assert runner.open_workers == [] and source.open_workers == []
