"""The Python API: ``Segmenter`` against the one-piece reference, encoded-image reuse, bad encodings, outputs, no torch."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gsnet_deploy.encoded_cache import EncodedCache, content_key
from gsnet_deploy.errors import GSNetError
from gsnet_deploy.runtime.images import load_image

REPO = Path(__file__).resolve().parents[1]
CLASSES = "building,road,tree"
OTHER = ["solar panel", "swimming pool", "low vegetation, grass", "car", "water"]


def _image(height: int = 96, width: int = 128, seed: int = 0) -> np.ndarray:
    """A smooth random RGB uint8 image (structure at several scales, so masks vary in space)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    bands = [
        127 + 120 * np.sin(rng.uniform(0.02, 0.2) * xx + rng.uniform(0, 6)) * np.cos(rng.uniform(0.02, 0.2) * yy)
        for _ in range(3)
    ]
    return np.clip(np.stack(bands, axis=-1), 0, 255).astype(np.uint8)


class _CountingPath:
    """Wraps a Segmenter's paper path and counts encoder and head runs."""

    def __init__(self, inner: object) -> None:
        self.inner, self.encodes, self.decodes = inner, 0, 0
        self.feature_names = inner.feature_names  # type: ignore[attr-defined]

    def encode(self, resized: np.ndarray) -> dict[str, np.ndarray]:
        self.encodes += 1
        return self.inner.encode(resized)  # type: ignore[attr-defined]

    def decode(self, *args: object, **kwargs: object) -> tuple[np.ndarray, np.ndarray | None]:
        self.decodes += 1
        return self.inner.decode(*args, **kwargs)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def seg(tiny_onnx_dir: Path):
    """A Segmenter on the tiny ONNX export (ONNX Runtime, CPU)."""
    from gsnet_deploy import Segmenter

    with Segmenter.from_onnx(tiny_onnx_dir) as s:
        yield s


@pytest.fixture(scope="module")
def encoded(seg):
    """An encoded 96x128 image (shared by the bad-input tests: they fail before any graph runs)."""
    return seg.encode(_image())


def _one_piece_probs(backend: object, rgb: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
    """The reference: the one-piece image graph on the numpy protocol's 5 views, merged by the numpy protocol."""
    from gsnet_deploy.contracts.io_names import IMAGES, LOGITS, TEXT_EMBEDS
    from gsnet_deploy.runtime.protocol import merge_paper_logits, paper_views

    views = paper_views(rgb)
    logits = backend.image.run({IMAGES: views.views, TEXT_EMBEDS: text_embeds})[LOGITS]  # type: ignore[attr-defined]
    return merge_paper_logits(logits, views.height, views.width)  # [N, H, W]


def _reference_probs(onnx_dir: Path, rgb: np.ndarray, classes: str) -> np.ndarray:
    """``_one_piece_probs`` on image_graph.onnx, in a backend of its own."""
    from gsnet_deploy.runtime.onnxruntime_backend import OnnxRuntimeBackend
    from gsnet_deploy.runtime.segment import encode_vocabulary
    from gsnet_deploy.runtime.vocab import DEFAULT_TEMPLATE, TextEmbeddingCache, parse_classes

    with OnnxRuntimeBackend(onnx_dir) as backend:
        embeds = encode_vocabulary(backend, parse_classes(classes), DEFAULT_TEMPLATE, TextEmbeddingCache(None))
        return _one_piece_probs(backend, rgb, embeds)


def test_segmenter_encoded_path_matches_one_piece_reference(seg, tiny_onnx_dir: Path) -> None:
    # catches: wrong feature plumbing between encoder and head, wrong out size, wrong merge, wrong class order
    rgb = _image(90, 140, seed=3)
    got = seg.segment(rgb, CLASSES, probs=True)
    want = _reference_probs(tiny_onnx_dir, rgb, CLASSES)
    assert got.probs is not None and got.probs.shape == want.shape == (3, 90, 140)
    np.testing.assert_allclose(got.probs, want, rtol=0, atol=1e-5)
    top2 = np.sort(want, axis=0)[-2:]
    decided = (top2[1] - top2[0]) > 2e-5  # pixels whose argmax cannot flip within the tolerance
    print(f"decided {decided.mean():.3f}")
    assert decided.mean() > 0.2
    assert np.array_equal(got.class_map[decided], np.argmax(want, axis=0)[decided])
    assert got.class_map.dtype == np.uint8 and got.class_names == ("building", "road", "tree")


class _TorchSplitRunners:
    """Encoder and head runners from ``model.protocol`` (PaperEncoder / PaperHead), as the runner protocol specifies."""

    def __init__(self, model: object) -> None:
        from gsnet_deploy.model.protocol import PaperEncoder, PaperHead

        self.encoder, self.head = self._Runner(PaperEncoder(model), True), self._Runner(PaperHead(model), False)

    class _Runner:
        def __init__(self, module: object, encoder: bool) -> None:
            self.module, self.is_encoder, self.calls = module, encoder, 0

        def run(self, feeds: dict[str, np.ndarray], outputs: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
            import torch

            from gsnet_deploy.contracts import io_names as io

            self.calls += 1
            with torch.no_grad():
                if self.is_encoder:
                    out = self.module(torch.from_numpy(feeds[io.PAPER_IMAGE]))  # type: ignore[operator]
                    return {k: v.numpy() for k, v in out.items()}
                features = {k: torch.from_numpy(np.array(feeds[k])) for k in io.PAPER_FEATURES}
                text = torch.from_numpy(np.array(feeds[io.TEXT_EMBEDS]))
                class_map, probs = self.module(features, text, torch.from_numpy(feeds[io.OUT_SIZE]))  # type: ignore[operator]
            both = {io.CLASS_MAP: class_map.numpy(), io.PROBS: probs.numpy()}
            return {k: both[k] for k in (outputs or both)}


def test_segmenter_split_path_matches_one_piece_reference(tiny_gsnet) -> None:
    # catches: the encoder/head seam (image layout [1, 3, h, w], feature names, out_size order (H, W), outputs
    # requested) disagreeing with the one-piece image graph + numpy merge, beyond 1e-5
    from gsnet_deploy.model.torch_backend import TorchBackend
    from gsnet_deploy.segmenter import Segmenter

    class SplitBackend(TorchBackend):
        runners = _TorchSplitRunners(tiny_gsnet)
        encoder = property(lambda self: self.runners.encoder)
        head = property(lambda self: self.runners.head)

    rgb = _image(70, 150, seed=13)
    with Segmenter(SplitBackend(tiny_gsnet, device="cpu")) as s:
        assert s.encoder_split
        got = s.segment(rgb, OTHER, probs=True)
        only_map = s.segment(rgb, OTHER)
        want = _one_piece_probs(s.backend, rgb, s.encode_classes(OTHER))  # [N, H, W]
        assert (SplitBackend.runners.encoder.calls, SplitBackend.runners.head.calls) == (1, 2)
    assert got.probs is not None and got.probs.shape == want.shape == (5, 70, 150) and only_map.probs is None
    np.testing.assert_allclose(got.probs, want, rtol=0, atol=1e-5)
    top2 = np.sort(want, axis=0)[-2:]
    decided = (top2[1] - top2[0]) > 2e-5
    assert decided.mean() > 0.2
    assert np.array_equal(got.class_map[decided], np.argmax(want, axis=0)[decided])
    assert np.array_equal(got.class_map, only_map.class_map) and got.class_map.dtype == np.uint8


def test_segmenter_reuses_encoding_for_new_vocabulary(seg) -> None:
    # catches: a cache keyed by object identity (a copy of the array re-encodes), or no cache at all;
    # and an encoded path whose result differs from a fresh full run
    counting = _CountingPath(seg._path)
    seg._path = counting
    try:
        rgb = _image(80, 100, seed=5)
        first = seg.segment(rgb, CLASSES)
        again = seg.segment(rgb.copy(), OTHER, probs=True)
        assert (counting.encodes, counting.decodes) == (1, 2)
        enc = seg.encode(rgb)
        assert counting.encodes == 1
        from_encoded = seg.segment(enc, OTHER, probs=True)
        np.testing.assert_array_equal(from_encoded.probs, again.probs)
        assert first.class_names == ("building", "road", "tree")
        assert again.class_names == ("solar panel", "swimming pool", "low vegetation", "car", "water")
        many = seg.segment_many(_image(80, 100, seed=6), [CLASSES, OTHER])
        assert counting.encodes == 2 and [len(r.class_names) for r in many] == [3, 5]
    finally:
        seg._path = counting.inner


def test_segmenter_segment_many_encodes_once_even_without_cache(tiny_onnx_dir: Path) -> None:
    # catches: segment_many relying on the cache (with the cache disabled it would encode once per vocabulary)
    from gsnet_deploy import Segmenter

    with Segmenter.from_onnx(tiny_onnx_dir, encoded_cache_bytes=0) as s:
        counting = _CountingPath(s._path)
        s._path = counting
        rgb = _image(64, 64, seed=7)
        results = s.segment_many(rgb, ["road,tree", "water"])
        assert counting.encodes == 1 and counting.decodes == 2
        assert len(s.encoded_cache) == 0
        assert results[1].class_map.max() == 0  # one class: every pixel is class 0
        s._path = counting.inner


def test_encoded_cache_evicts_least_recently_used_by_bytes() -> None:
    # catches: eviction of the newest item, counting entries instead of bytes, a get that does not refresh recency
    @dataclasses.dataclass
    class Item:
        nbytes: int

    cache: EncodedCache[Item] = EncodedCache(max_bytes=100)
    cache.put("a", Item(40))
    cache.put("b", Item(40))
    assert cache.get("a") is not None  # a is now the most recently used
    cache.put("c", Item(40))  # 120 > 100: evict the least recently used, b
    assert "a" in cache and "c" in cache and "b" not in cache and cache.nbytes == 80
    cache.put("huge", Item(101))  # larger than the budget: not stored, nothing evicted
    assert "huge" not in cache and len(cache) == 2
    cache.put("a", Item(10))  # replacing an item recounts its bytes
    assert cache.nbytes == 50


def test_content_key_depends_on_pixels_and_shape() -> None:
    # catches: a key from id() or from a prefix of the data, and one that ignores the shape
    rgb = _image(32, 48)
    assert content_key(rgb) == content_key(rgb.copy())
    changed = rgb.copy()
    changed[-1, -1, -1] ^= 1
    assert content_key(changed) != content_key(rgb)
    assert content_key(rgb.reshape(48, 32, 3)) != content_key(rgb)


def test_encoded_from_another_model_is_refused(encoded, tiny_onnx_dir: Path) -> None:
    # catches: a head run on features of other weights (no digest check): a wrong mask, silently
    from gsnet_deploy import Segmenter

    with Segmenter.from_onnx(tiny_onnx_dir) as other:
        other.model_digest = "another-model"
        with pytest.raises(GSNetError, match=r"comes from model .* but this Segmenter runs another-model") as info:
            other.segment(encoded, CLASSES)
    assert "\n" not in str(info.value)


def test_encoded_with_another_pooling_is_refused(tiny_gsnet) -> None:
    # catches: features of a pooling-1 Segmenter decoded by a pooling-2 one of the same checkpoint (same digest)
    from gsnet_deploy import Segmenter
    from gsnet_deploy.model import build_gsnet, tiny_cfg
    from gsnet_deploy.model.torch_backend import TorchBackend

    pooled = build_gsnet(tiny_cfg((2, 2)))
    pooled.digest = tiny_gsnet.digest  # one checkpoint file serves both poolings: same digest
    with Segmenter(TorchBackend(tiny_gsnet, device="cpu")) as one, Segmenter(TorchBackend(pooled, device="cpu")) as two:
        assert (one.pooling, two.pooling) == (1, 2)
        encoded = one.encode(_image(48, 64))
        with pytest.raises(GSNetError, match="made with pooling 1 but this Segmenter uses pooling 2"):
            two.segment(encoded, CLASSES)


def test_encoded_from_another_image_size_is_refused(seg, encoded) -> None:
    # catches: features of one image decoded at another image's size (a stretched, wrong mask)
    wide = seg.encode(_image(60, 200, seed=9))
    swapped = dataclasses.replace(encoded, features=wide.features)
    with pytest.raises(GSNetError, match="features of another image or image size"):
        seg.segment(swapped, CLASSES)
    resized = dataclasses.replace(encoded, image_size=(60, 200), resized_size=wide.resized_size)
    with pytest.raises(GSNetError, match="says 200x60 but holds a 128x96 image"):
        seg.segment(resized, CLASSES)
    bad_shape = dict(encoded.features)
    name = sorted(bad_shape)[0]
    bad_shape[name] = bad_shape[name][:4]
    with pytest.raises(GSNetError, match="encoder makes"):
        seg.segment(dataclasses.replace(encoded, features=bad_shape), CLASSES)
    seg.segment(encoded, "road")  # the untouched encoding still works


def test_encoded_by_another_path_is_refused(tiny_gsnet) -> None:
    # catches: views of a one-piece backend fed to an encoder/head backend of the same model (a KeyError traceback)
    from gsnet_deploy.model.torch_backend import TorchBackend
    from gsnet_deploy.segmenter import Segmenter

    class OnePiece(TorchBackend):
        encoder = None
        head = None

    class Split(TorchBackend):
        runners = _TorchSplitRunners(tiny_gsnet)
        encoder = property(lambda self: self.runners.encoder)
        head = property(lambda self: self.runners.head)

    with pytest.warns(RuntimeWarning, match="has no paper encoder/head"):
        one = Segmenter(OnePiece(tiny_gsnet, device="cpu"))
    with one, Segmenter(Split(tiny_gsnet, device="cpu")) as two:
        assert not one.encoder_split and two.encoder_split
        views = one.encode(_image(40, 40))
        with pytest.raises(GSNetError, match=r"holds features \['views'\] but this Segmenter's encoder makes"):
            two.segment(views, CLASSES)
        assert Split.runners.head.calls == 0


def test_encoded_image_reports_its_size(encoded) -> None:
    # catches: nbytes counting only one array (the cache budget would be overrun)
    assert encoded.nbytes == sum(a.nbytes for a in encoded.features.values()) + encoded.image.nbytes
    assert encoded.image_size == (96, 128) and encoded.resized_size == (640, 853)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda rgb: rgb[:, :, 0], id="gray-array"),
        pytest.param(lambda rgb: np.dstack([rgb, np.full(rgb.shape[:2], 200, np.uint8)]), id="rgba-array"),
        pytest.param(lambda rgb: Image.fromarray(rgb).convert("L"), id="gray-pil"),
        pytest.param(lambda rgb: Image.fromarray(rgb).convert("P"), id="palette-pil"),
    ],
)
def test_load_rgb_converts_like_the_cli(make, tmp_path: Path) -> None:
    # catches: arrays and PIL images converted differently from files (the CLI path, runtime.images.load_image)
    from gsnet_deploy.segmenter import load_rgb

    source = make(_image(20, 30))
    rgb, notes = load_rgb(source)
    pil = source if isinstance(source, Image.Image) else Image.fromarray(source)
    pil.save(tmp_path / "x.png")
    want = load_image(tmp_path / "x.png")
    np.testing.assert_array_equal(rgb, want.rgb)
    assert list(notes) == want.notes and notes


@pytest.mark.parametrize(
    "bad", [np.zeros((4, 4, 3), np.float32), np.zeros((4, 4, 2), np.uint8), np.zeros((0, 4, 3), np.uint8), 3]
)
def test_load_rgb_refuses_unusable_input(bad: object) -> None:
    # catches: float or two-channel arrays accepted and cast silently, a traceback instead of one line
    from gsnet_deploy.segmenter import load_rgb

    with pytest.raises(GSNetError) as info:
        load_rgb(bad)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_segmentation_save_writes_what_the_cli_writes(seg, tiny_onnx_dir: Path, tmp_path: Path) -> None:
    # catches: a second writer that drifts from `gsnet segment` (names, mask encoding, overlay, probabilities)
    from gsnet_deploy.cli import main

    rgb = _image(72, 100, seed=11)
    Image.fromarray(rgb).save(tmp_path / "scene.png")
    code = main(
        ["segment", str(tmp_path / "scene.png"), "--onnx", str(tiny_onnx_dir), "--classes", CLASSES,
         "--out", str(tmp_path / "cli"), "--save-probs", "--mode", "paper", "--no-cache", "--no-progress"]
    )  # fmt: skip
    assert code == 0
    result = seg.segment(tmp_path / "scene.png", CLASSES, probs=True)
    written = result.save(tmp_path / "api", "scene")
    assert [p.name for p in written] == ["scene_mask.png", "scene_overlay.png", "scene.probs.npy"]
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == sorted(p.name for p in written)
    np.testing.assert_allclose(np.load(written[2]), np.load(tmp_path / "cli" / "scene.probs.npy"), rtol=0, atol=1e-5)
    api_mask = np.asarray(Image.open(written[0]))
    cli_mask = np.asarray(Image.open(tmp_path / "cli" / "scene_mask.png"))
    assert api_mask.dtype == cli_mask.dtype == np.uint8 and (api_mask == cli_mask).mean() > 0.999
    api_overlay = np.asarray(Image.open(written[1]), dtype=np.int16)
    cli_overlay = np.asarray(Image.open(tmp_path / "cli" / "scene_overlay.png"), dtype=np.int16)
    assert api_overlay.shape == cli_overlay.shape and (np.abs(api_overlay - cli_overlay).max(axis=-1) == 0).mean() > 0.999
    np.testing.assert_array_equal(np.asarray(result.to_image()), np.asarray(Image.open(written[1])))
    without = seg.segment(tmp_path / "scene.png", CLASSES).save(tmp_path / "api2", "scene")
    assert [p.name for p in without] == ["scene_mask.png", "scene_overlay.png"]


def test_segmenter_refuses_use_after_close(tiny_onnx_dir: Path) -> None:
    # catches: a closed Segmenter that still runs (or crashes with an AttributeError traceback)
    from gsnet_deploy import Segmenter

    s = Segmenter.from_onnx(tiny_onnx_dir)
    s.close()
    s.close()
    with pytest.raises(GSNetError, match="closed"):
        s.segment(_image(8, 8), CLASSES)


def test_segmenter_imports_and_runs_without_torch(tiny_onnx_dir: Path) -> None:
    # catches: a torch import anywhere on the ONNX path of the public API
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys

        class BlockTorch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
                return None

        sys.meta_path.insert(0, BlockTorch())
        import numpy as np
        from gsnet_deploy import Segmenter

        with Segmenter.from_onnx({str(tiny_onnx_dir)!r}) as seg:
            result = seg.segment(np.full((40, 50, 3), 90, np.uint8), "road,tree")
            again = seg.segment(seg.encode(np.full((40, 50, 3), 90, np.uint8)), "water")
        assert result.class_map.shape == (40, 50) and again.class_names == ("water",)
        assert "torch" not in sys.modules
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ok"


def _readme_python_example() -> str:
    """The code block of the README's 'Python API' section."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Python API", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert match is not None, "README's Python API section has no ```python block"
    return match.group(1)


def test_readme_python_example_runs(tiny_onnx_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # catches: a README example that no longer runs against the API (renamed method, changed arguments)
    code = _readme_python_example()
    assert len(code.strip().splitlines()) <= 8
    (tmp_path / "gsnet_onnx").symlink_to(tiny_onnx_dir, target_is_directory=True)
    Image.fromarray(_image(64, 80)).save(tmp_path / "scene.png")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    assert (tmp_path / "out" / "scene_mask.png").is_file() and (tmp_path / "out" / "scene_overlay.png").is_file()


def test_segmenter_validates_vocabularies_like_the_cli(seg) -> None:
    """Catches: the Python API embedding a prompt CLIP truncates (over 77 tokens) instead of refusing it,
    or applying the CLI's uint8 limit to the API, whose class maps become int32 beyond 255 classes."""
    from gsnet_deploy.errors import VocabularyError

    with pytest.raises(VocabularyError, match="77"):
        seg.encode_classes(["building", " ".join(["very"] * 80) + " long name"])
    many = seg.encode_classes([f"class {i}" for i in range(300)])
    assert many.shape[0] == 300
