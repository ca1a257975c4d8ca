"""One paper path for both entry points (``predict_paper`` and ``Segmenter``), and pooling in the ONNX manifest.

The stand-in backends count every graph call: the orchestrator and the Segmenter must make the
same calls (the path ``runtime.paper_path`` chooses) and give the same outputs, equal to the numpy
reference. The manifest tests relabel a real tiny export (copied) to write a folder that says
pooling 2, or one from before the pooling field, without exporting again.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gsnet_deploy.contracts.io_names import (
    CLASS_MAP,
    IMAGES,
    LOGITS,
    OUT_SIZE,
    PAPER_FEATURES,
    PAPER_IMAGE,
    PROBS,
    TEXT_EMBEDS,
    TEXT_TOKENS,
)
from gsnet_deploy.errors import GSNetError
from gsnet_deploy.runtime import segment
from gsnet_deploy.runtime.protocol import CANVAS, VIEW_SIZE, merge_paper_logits, tile_offsets
from gsnet_deploy.runtime.resize import resize_bilinear

CLASSES = ["building", "road", "tree", "water"]
HW = (150, 230)


class _TextRunner:
    """Text stand-in: a fixed random embedding per distinct token row."""

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        tokens = feeds[TEXT_TOKENS]
        rows = [np.random.default_rng(int(np.abs(row).sum())).normal(size=512) for row in tokens]
        return {TEXT_EMBEDS: np.stack(rows).astype(np.float32)}


class _Counting:
    """A runner that counts its calls and the outputs it was asked for."""

    def __init__(self, inner: object) -> None:
        self.inner, self.calls, self.asked = inner, 0, []

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        self.calls += 1
        self.asked.append(None if outputs is None else tuple(outputs))
        return self.inner.run(feeds) if outputs is None else self.inner.run(feeds, outputs)  # type: ignore[attr-defined]


class _ViewsEncoder:
    """Encoder stand-in: the 5 views (an independent numpy cut) as the first feature."""

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        chw = feeds[PAPER_IMAGE][0].astype(np.float32)  # [3, h, w]
        canvas = resize_bilinear(chw, (CANVAS, CANVAS))  # [3, 640, 640]
        tiles = [canvas[:, r : r + VIEW_SIZE, c : c + VIEW_SIZE] for r, c in tile_offsets()]
        views = np.stack([*tiles, resize_bilinear(chw, (VIEW_SIZE, VIEW_SIZE))])  # [5, 3, 384, 384]
        return {name: (views if i == 0 else np.zeros((5, 1), np.float32)) for i, name in enumerate(PAPER_FEATURES)}


class _MergeHead:
    """Head stand-in: the image stand-in on the views, the numpy merge and argmax; returns only what is asked."""

    def __init__(self, image: object) -> None:
        self.image = image

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        height, width = (int(v) for v in feeds[OUT_SIZE])
        logits = self.image.run({IMAGES: feeds[PAPER_FEATURES[0]], TEXT_EMBEDS: feeds[TEXT_EMBEDS]})[LOGITS]  # type: ignore[attr-defined]
        probs = merge_paper_logits(logits, height, width)  # [N, H, W]
        out = {CLASS_MAP: np.argmax(probs, axis=0).astype(np.int32), PROBS: probs}
        return {name: out[name] for name in (outputs or out)}


class _Backend:
    """A backend of counting stand-in runners; ``split`` adds the paper encoder and head."""

    name, model_digest, max_views, preferred_views = "standin", "standin", None, 5

    def __init__(self, fakes, split: bool) -> None:
        self.text = _TextRunner()
        self.image = _Counting(fakes.linear(len(CLASSES), seed=4))
        if split:
            self.encoder = _Counting(_ViewsEncoder())
            self.head = _Counting(_MergeHead(fakes.linear(len(CLASSES), seed=4)))

    def __enter__(self) -> _Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def calls(self) -> tuple[int, int, int]:
        """(image, encoder, head) calls so far."""
        split = hasattr(self, "encoder")
        return self.image.calls, self.encoder.calls if split else 0, self.head.calls if split else 0


def _rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    bands = [127 + 120 * np.sin(rng.uniform(0.01, 0.08) * xx + rng.uniform(0, 6)) * np.cos(0.05 * yy) for _ in range(3)]
    return np.stack(bands, axis=-1).astype(np.uint8)


@pytest.mark.parametrize("split", [True, False], ids=["split", "one-piece"])
def test_orchestrator_and_segmenter_run_the_same_path(fakes, split: bool) -> None:
    """Catches: the Segmenter and ``predict_paper`` choosing or running the protocol differently (one of them
    on the image graph despite an encoder/head, probabilities asked for when not wanted, another merge)."""
    from gsnet_deploy.runtime.paper_path import OnePiecePath, SplitPath
    from gsnet_deploy.segmenter import Segmenter

    backend = _Backend(fakes, split)
    rgb = _rgb(*HW)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a backend with encoder and head: no warning
        if split:
            seg = Segmenter(backend, encoded_cache_bytes=0)  # type: ignore[arg-type]
        else:
            with pytest.warns(RuntimeWarning, match="no paper encoder/head"):
                seg = Segmenter(backend, encoded_cache_bytes=0)  # type: ignore[arg-type]
    with seg:
        assert type(seg._path) is (SplitPath if split else OnePiecePath) and seg.encoder_split is split
        text = seg.encode_classes(CLASSES)
        before = backend.calls()
        cli_map, cli_probs = segment.predict_paper(backend, rgb, text, want_probs=False)  # type: ignore[arg-type]
        cli_calls = np.subtract(backend.calls(), before)
        before = backend.calls()
        api = seg.segment(rgb, CLASSES)
        api_calls = np.subtract(backend.calls(), before)
        assert cli_calls.tolist() == api_calls.tolist() == ([0, 1, 1] if split else [1, 0, 0])
        if split:
            assert backend.head.asked[-2:] == [(CLASS_MAP,), (CLASS_MAP,)]  # probabilities stay on the device
        assert cli_probs is None and api.probs is None
        np.testing.assert_array_equal(api.class_map, cli_map)
        _, cli_probs = segment.predict_paper(backend, rgb, text, want_probs=True)  # type: ignore[arg-type]
        api_probs = seg.segment(rgb, CLASSES, probs=True).probs
    # the reference: the numpy protocol around the same linear image stand-in, written out here
    views = _ViewsEncoder().run({PAPER_IMAGE: _nchw(rgb)})[PAPER_FEATURES[0]]  # [5, 3, 384, 384]
    logits = fakes.linear(len(CLASSES), seed=4).run({IMAGES: views, TEXT_EMBEDS: text})[LOGITS]
    want = merge_paper_logits(logits, *HW)  # [N, H, W]
    assert cli_probs is not None and api_probs is not None
    np.testing.assert_allclose(cli_probs, want, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(api_probs, cli_probs)
    assert cli_map.dtype == np.uint8 and np.array_equal(cli_map, np.argmax(want, axis=0))


def _nchw(rgb: np.ndarray) -> np.ndarray:
    from gsnet_deploy.runtime.protocol import resize_shortest_edge

    return np.ascontiguousarray(resize_shortest_edge(rgb).transpose(2, 0, 1)[None])


def test_segment_files_chooses_the_path_once(tmp_path: Path, fakes, monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches: the folder pipeline rediscovering the backend's runners per image instead of once per run."""
    from gsnet_deploy.runtime import paper_path as paper_path_module
    from gsnet_deploy.runtime.vocab import TextEmbeddingCache, parse_classes

    chosen: list[object] = []
    real = paper_path_module.paper_path

    def counting(backend: object) -> object:
        chosen.append(backend)
        return real(backend)  # type: ignore[arg-type]

    monkeypatch.setattr(segment, "paper_path", counting)
    images = []
    for i in range(3):
        images.append(tmp_path / f"{i}.png")
        Image.fromarray(_rgb(90, 120, seed=i)).save(images[-1])
    backend = _Backend(fakes, split=True)
    options = segment.SegmentOptions(out_dir=tmp_path / "out", mode=segment.Mode.PAPER, overlay=False, progress=False)
    report = segment.segment_files(
        images, backend, parse_classes(",".join(CLASSES)), options, TextEmbeddingCache(None), log=lambda msg: None
    )  # type: ignore[arg-type]
    assert not report.failed and len(report.written) == 3
    assert len(chosen) == 1 and backend.calls() == (0, 3, 3)


# ---- pooling in the ONNX manifest ----


def _payload(**changes: object) -> dict[str, object]:
    from gsnet_deploy.contracts.onnx_manifest import OnnxManifest

    manifest = OnnxManifest("demo-x", "a {}", (1.0, 2.0, 3.0), (4.0, 5.0, 6.0), 384, 96, 512, "paper-sliding-window", 17)
    payload = manifest.to_json()
    payload.update(changes)
    return payload


def test_manifest_round_trip_keeps_pooling_2(tiny_gsnet) -> None:
    """Catches: ``--pooling 2`` exports whose manifest forgets the pooling (not written, not read, or always 1)."""
    from gsnet_deploy.contracts.onnx_manifest import METADATA_MANIFEST_KEY, OnnxManifest
    from gsnet_deploy.export.onnx import make_manifest
    from gsnet_deploy.model import build_gsnet, tiny_cfg

    manifest = make_manifest(build_gsnet(tiny_cfg((2, 2))), 17)
    assert manifest.pooling == 2 and make_manifest(tiny_gsnet, 17).pooling == 1
    text = json.dumps(manifest.to_json())
    assert json.loads(text)["pooling"] == 2
    assert OnnxManifest.from_json(json.loads(text)) == manifest
    stamped = json.loads(manifest.metadata_props("image_graph")[METADATA_MANIFEST_KEY])
    assert OnnxManifest.from_json(stamped).pooling == 2


def test_manifest_without_pooling_reads_as_unknown() -> None:
    """Catches: older folders (no pooling field) refused or read as pooling 1; a malformed pooling accepted."""
    from gsnet_deploy.contracts.onnx_manifest import OnnxManifest

    old = _payload()
    assert "pooling" not in old  # an export from before the field: written as such, read back the same
    manifest = OnnxManifest.from_json(old)
    assert manifest.pooling is None and manifest.to_json() == old
    for bad in ("2", 0, True, 1.5):
        with pytest.raises(ValueError, match="pooling must be a positive integer"):
            OnnxManifest.from_json(_payload(pooling=bad))


@pytest.mark.parametrize("pooling", [1, 2])
def test_cli_export_onnx_records_its_pooling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pooling: int) -> None:
    """Catches: ``gsnet export onnx --pooling 2`` exporting (and labelling) the pooling-1 model."""
    from types import SimpleNamespace

    from gsnet_deploy.cli import main
    from gsnet_deploy.export import onnx as export_module

    written = []

    def fake_export(model, out_dir, *, opset: int = 17, **kwargs: object) -> SimpleNamespace:  # the graphs are not traced
        manifest = export_module.make_manifest(model, opset)
        written.append((tuple(model.cfg.aggregator.pooling), manifest.pooling))
        out = Path(out_dir)
        return SimpleNamespace(out_dir=out, text_path=out / "t", image_path=out / "i", manifest_path=out / "m", manifest=manifest)

    monkeypatch.setattr(export_module, "export_onnx", fake_export)
    argv = ["export", "onnx", "--model-size", "tiny", "--pooling", str(pooling), "--out", str(tmp_path / "onnx")]
    assert main(argv) == 0
    assert written == [((pooling, pooling), pooling)]


def _relabel(src: Path, dst: Path, pooling: int | None) -> Path:
    """A copy of the ONNX folder ``src`` whose manifest (file and every graph's metadata) says ``pooling``."""
    import onnx

    from gsnet_deploy.contracts.onnx_manifest import METADATA_MANIFEST_KEY

    shutil.copytree(src, dst)

    def relabel(payload: dict[str, object]) -> dict[str, object]:
        payload.pop("pooling", None)
        return payload if pooling is None else {**payload, "pooling": pooling}

    for graph in dst.glob("*.onnx"):
        model = onnx.load(str(graph))
        for prop in model.metadata_props:
            if prop.key == METADATA_MANIFEST_KEY:
                prop.value = json.dumps(relabel(json.loads(prop.value)), sort_keys=True)
        onnx.save(model, str(graph))
    manifest = dst / "manifest.json"
    manifest.write_text(json.dumps(relabel(json.loads(manifest.read_text())), indent=2, sort_keys=True))
    return dst


@pytest.fixture(scope="module")
def relabelled(tiny_onnx_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny export relabelled as pooling 2 and as an older folder without pooling (same weights, same digest)."""
    root = tmp_path_factory.mktemp("relabelled")
    return {"two": _relabel(tiny_onnx_dir, root / "two", 2), "old": _relabel(tiny_onnx_dir, root / "old", None)}


def test_onnxruntime_refuses_features_of_another_pooling(tiny_onnx_dir: Path, relabelled: dict[str, Path]) -> None:
    """Catches: features encoded by a pooling-1 ONNX folder decoded by a pooling-2 folder of the same checkpoint
    (same digest): the ONNX Runtime backend's pooling unknown to the Segmenter, so a wrong mask, silently."""
    from gsnet_deploy import Segmenter

    rgb = _rgb(48, 64)
    with Segmenter.from_onnx(tiny_onnx_dir) as one, Segmenter.from_onnx(relabelled["two"]) as two:
        assert (one.pooling, two.pooling) == (1, 2) and one.model_digest == two.model_digest
        head = two._path.head = _Counting(two._path.head)  # type: ignore[union-attr]
        with pytest.raises(GSNetError, match="made with pooling 1 but this Segmenter uses pooling 2") as info:
            two.segment(one.encode(rgb), "road,tree")
        assert "\n" not in str(info.value) and head.calls == 0  # refused before any graph ran
        with pytest.raises(GSNetError, match="made with pooling 2 but this Segmenter uses pooling 1"):
            one.segment(two.encode(rgb), "road,tree")
        one.segment(one.encode(rgb), "road,tree")  # its own features still work


def test_onnx_folder_pooling_conflicts_and_unknown(tiny_onnx_dir: Path, relabelled: dict[str, Path]) -> None:
    """Catches: an explicit pooling silently overriding the folder's, and older folders' unknown pooling
    taken as a match for a known one."""
    from gsnet_deploy import Segmenter

    with pytest.raises(GSNetError, match=r"runs pooling 2 .* but pooling 1 was asked; pass pooling 2") as info:
        Segmenter.from_onnx(relabelled["two"], pooling=1)
    assert "\n" not in str(info.value)
    rgb = _rgb(40, 40, seed=2)
    with Segmenter.from_onnx(relabelled["old"]) as old, Segmenter.from_onnx(tiny_onnx_dir) as one:
        assert old.pooling is None
        with pytest.raises(GSNetError, match=r"made with an unknown pooling .* but this Segmenter uses pooling 1"):
            one.segment(old.encode(rgb), "road")
    with Segmenter.from_onnx(relabelled["old"], pooling=1) as told, Segmenter.from_onnx(tiny_onnx_dir) as one:
        assert told.pooling == 1  # the user's word for an older folder
        one.segment(told.encode(rgb), "road")


def test_onnx_folder_mixing_pooling_labels_is_refused(relabelled: dict[str, Path], tmp_path: Path) -> None:
    """Catches: a manifest.json that says pooling 2 beside graphs that say nothing accepted, or refused naming no field."""
    from gsnet_deploy.contracts.onnx_manifest import open_onnx_dir
    from gsnet_deploy.errors import ExportError

    mixed = tmp_path / "mixed"
    shutil.copytree(relabelled["old"], mixed)
    shutil.copy(relabelled["two"] / "manifest.json", mixed / "manifest.json")
    with pytest.raises(ExportError, match=r"disagrees with the manifest inside \w+\.onnx \(fields \['pooling'\]\)"):
        open_onnx_dir(mixed)
