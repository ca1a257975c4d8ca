"""``gsnet segment`` runs the paper protocol through a backend's encoder/head runners when it has them.

The stand-in protocol backend implements the encoder and head with the numpy reference around the
same linear image stand-in as the plain backend, so both paths must give the same files; what the
tests check is the orchestration: what the host sends (the image after ResizeShortestEdge, the
output size), what it asks back (probabilities only with --save-probs), and the one fallback note.
"""

from __future__ import annotations

import threading
import time
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
)
from gsnet_deploy.runtime import segment
from gsnet_deploy.runtime.protocol import CANVAS, VIEW_SIZE, merge_paper_logits, shortest_edge_size, tile_offsets
from gsnet_deploy.runtime.resize import resize_bilinear

NUM_CLASSES = 5


class NumpyEncoder:
    """Encoder stand-in: the 5 views of an image already resized by ResizeShortestEdge, as the first feature."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        image = feeds[PAPER_IMAGE]
        assert image.dtype == np.uint8 and image.ndim == 4 and image.shape[:2] == (1, 3)
        self.shapes.append(image.shape)
        chw = image[0].astype(np.float32)  # [3, h, w]
        canvas = resize_bilinear(chw, (CANVAS, CANVAS))  # [3, 640, 640]
        tiles = [canvas[:, r : r + VIEW_SIZE, c : c + VIEW_SIZE] for r, c in tile_offsets()]
        views = np.stack([*tiles, resize_bilinear(chw, (VIEW_SIZE, VIEW_SIZE))])  # [5, 3, 384, 384]
        empty = np.zeros((5, 1), np.float32)
        return {name: (views if i == 0 else empty) for i, name in enumerate(PAPER_FEATURES)}


class NumpyHead:
    """Head stand-in: the image stand-in on the views, then the numpy merge and argmax; returns only what is asked."""

    def __init__(self, image_runner: object) -> None:
        self.image_runner = image_runner
        self.asked: list[tuple[str, ...]] = []

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        assert set(feeds) == {*PAPER_FEATURES, TEXT_EMBEDS, OUT_SIZE}
        assert feeds[OUT_SIZE].dtype == np.int64 and feeds[OUT_SIZE].shape == (2,)
        height, width = (int(v) for v in feeds[OUT_SIZE])
        logits = self.image_runner.run({IMAGES: feeds[PAPER_FEATURES[0]], TEXT_EMBEDS: feeds[TEXT_EMBEDS]})[LOGITS]  # type: ignore[attr-defined]
        probs = merge_paper_logits(logits, height, width)  # [N, H, W]
        out = {CLASS_MAP: np.argmax(probs, axis=0).astype(np.int32), PROBS: probs}
        names = tuple(out) if outputs is None else tuple(outputs)
        self.asked.append(names)
        return {name: out[name] for name in names}


def protocol_backend(fakes, seed: int = 0):
    backend = fakes.backend(fakes.linear(NUM_CLASSES, seed=seed))
    backend.encoder = NumpyEncoder()
    backend.head = NumpyHead(fakes.linear(NUM_CLASSES, seed=seed))
    return backend


def write_image(path: Path, height: int, width: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    bands = [127 + 120 * np.sin(rng.uniform(0.01, 0.05) * xx + rng.uniform(0, 6)) * np.cos(0.03 * yy) for _ in range(3)]
    Image.fromarray(np.stack(bands, axis=-1).astype(np.uint8)).save(path)
    return path


@pytest.mark.parametrize(("height", "width"), [(333, 517), (700, 300)])
@pytest.mark.parametrize("save_probs", [False, True])
def test_device_protocol_matches_numpy_protocol(tmp_path: Path, fakes, height: int, width: int, save_probs: bool) -> None:
    """Catches: the host feeding the encoder the unresized image, a wrong (W, H) out size, or probs always crossing."""
    image = write_image(tmp_path / "a.png", height, width)
    text = np.random.default_rng(1).normal(size=(NUM_CLASSES, 512)).astype(np.float32)
    names = [f"c{i}" for i in range(NUM_CLASSES)]
    results = {}
    for label, backend in (("numpy", fakes.backend(fakes.linear(NUM_CLASSES))), ("device", protocol_backend(fakes))):
        out = tmp_path / label
        out.mkdir()
        options = segment.SegmentOptions(out_dir=out, mode=segment.Mode.PAPER, save_probs=save_probs, overlay=False)
        result = segment.segment_one(image, backend, text, names, options)
        results[label] = result.paths
    mask_np = np.asarray(Image.open(results["numpy"][0]))
    mask_dev = np.asarray(Image.open(results["device"][0]))
    assert mask_dev.shape == (height, width)
    np.testing.assert_array_equal(mask_dev, mask_np)
    if save_probs:
        np.testing.assert_allclose(np.load(results["device"][-1]), np.load(results["numpy"][-1]), atol=1e-6, rtol=0)


def test_host_sends_resized_image_and_asks_probs_only_when_saving(tmp_path: Path, fakes) -> None:
    """Catches: probabilities asked from the device without --save-probs, or the encoder fed the original size."""
    backend = protocol_backend(fakes)
    rgb = np.asarray(Image.open(write_image(tmp_path / "a.png", 333, 517)))
    text = np.ones((NUM_CLASSES, 512), np.float32)
    class_map, probs = segment.predict_paper(backend, rgb, text, want_probs=False)
    assert probs is None and class_map.dtype == np.uint8 and class_map.shape == (333, 517)
    assert backend.head.asked == [(CLASS_MAP,)]
    assert backend.encoder.shapes == [(1, 3, *shortest_edge_size(333, 517))]
    _, probs = segment.predict_paper(backend, rgb, text, want_probs=True)
    assert backend.head.asked[-1] == (CLASS_MAP, PROBS) and probs is not None and probs.shape == (NUM_CLASSES, 333, 517)


def test_numpy_fallback_is_said_once(tmp_path: Path, fakes, monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches: the fallback note missing, or repeated per image; and a note with a protocol backend."""
    images = [write_image(tmp_path / f"{i}.png", 200, 260, seed=i) for i in range(2)]
    text = np.ones((NUM_CLASSES, 512), np.float32)
    monkeypatch.setattr(segment, "encode_vocabulary", lambda *args: text)
    from gsnet_deploy.runtime.vocab import TextEmbeddingCache, parse_classes

    vocab = parse_classes(",".join(f"c{i}" for i in range(NUM_CLASSES)))
    cases = (("numpy", fakes.backend(fakes.linear(NUM_CLASSES)), 1), ("device", protocol_backend(fakes), 0))
    for label, backend, expected in cases:
        lines: list[str] = []
        options = segment.SegmentOptions(out_dir=tmp_path / label, mode=segment.Mode.PAPER, overlay=False, progress=False)
        report = segment.segment_files(images, backend, vocab, options, TextEmbeddingCache(tmp_path / "cache"), log=lines.append)
        assert not report.failed and len(report.written) == 2
        assert sum("no paper protocol graphs" in line for line in lines) == expected, lines


class SlowRunner:
    """Image stand-in that takes ``delay`` seconds and records when each call ran."""

    def __init__(self, inner: object, events: list[tuple[str, str, float]], delay: float) -> None:
        self.inner, self.events, self.delay = inner, events, delay
        self.second_call = threading.Event()

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if any(kind == "device" for kind, _, _ in self.events):
            self.second_call.set()
        self.events.append(("device", "start", time.perf_counter()))
        time.sleep(self.delay)
        out = self.inner.run(feeds)  # type: ignore[attr-defined]
        self.events.append(("device", "end", time.perf_counter()))
        return out


def test_folder_pipeline_overlaps_stays_bounded_and_ordered(tmp_path: Path, fakes, monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches: no overlap of writing with device work, decoding more than one image ahead, log lines out of
    order, a bad input stopping the run, and pipelined outputs differing from one-at-a-time ones."""
    from gsnet_deploy.runtime import outputs
    from gsnet_deploy.runtime.vocab import TextEmbeddingCache, parse_classes

    names = ["a", "b", "bad", "d", "e"]
    images = [write_image(tmp_path / f"{n}.png", 200, 260 + 10 * i, seed=i) for i, n in enumerate(names)]
    images[2].write_bytes(b"not a png")
    text = np.random.default_rng(3).normal(size=(NUM_CLASSES, 512)).astype(np.float32)
    events: list[tuple[str, str, float]] = []
    real_load, real_overlay = segment.load_image, outputs.write_overlay

    def load(path: Path):
        events.append(("decode", Path(path).stem, time.perf_counter()))
        return real_load(path)

    overlapped: list[bool] = []

    def overlay(*args: object, **kwargs: object) -> Path:
        if not overlapped:  # the first image's write waits (bounded) for the second image's device call
            overlapped.append(runner.second_call.wait(timeout=20))
        path = real_overlay(*args, **kwargs)  # type: ignore[arg-type]
        events.append(("write", "end", time.perf_counter()))
        return path

    monkeypatch.setattr(segment, "load_image", load)
    monkeypatch.setattr(outputs, "write_overlay", overlay)
    monkeypatch.setattr(segment, "encode_vocabulary", lambda *args: text)
    runner = SlowRunner(fakes.linear(NUM_CLASSES), events, delay=0.1)
    backend = fakes.backend(runner)
    lines: list[str] = []
    options = segment.SegmentOptions(out_dir=tmp_path / "out", mode=segment.Mode.PAPER, progress=False)
    vocab = parse_classes(",".join(f"c{i}" for i in range(NUM_CLASSES)))
    report = segment.segment_files(images, backend, vocab, options, TextEmbeddingCache(None), log=lines.append)

    assert [p.stem for p, _ in report.failed] == ["bad"] and [p.stem for p in report.written] == ["a", "b", "d", "e"]
    done = [line.split(":")[0] for line in lines if ": wrote " in line or ": error: " in line]
    assert [Path(p).stem for p in done] == names
    # bounded: image k is decoded only after image k-2 was written (at most one ahead of the device, one behind)
    decodes = [(i, t) for i, (kind, _, t) in enumerate(events) if kind == "decode"]
    writes = [t for kind, _, t in events if kind == "write"]
    min_written = [0, 0, 1, 2, 2]  # image k waits for image k-2's outputs ("bad" writes none)
    assert [sum(w < t for w in writes) >= m for (_, t), m in zip(decodes, min_written, strict=True)] == [True] * 5
    assert overlapped == [True], "image b did not reach the device while image a was being written"
    # same files as one input at a time
    for path in report.written:
        ref_dir = tmp_path / f"ref_{path.stem}"
        ref_dir.mkdir()
        ref = segment.segment_one(path, fakes.backend(fakes.linear(NUM_CLASSES)), text, list(vocab.display_names),
                                  segment.SegmentOptions(out_dir=ref_dir, mode=segment.Mode.PAPER, overlay=False))  # fmt: skip
        np.testing.assert_array_equal(np.asarray(Image.open(report.written[path][0])), np.asarray(Image.open(ref.paths[0])))


def test_combined_path_is_preferred(tmp_path: Path, fakes) -> None:
    """Catches: a GPU backend's features copied to the host (encoder/head runners used despite ``segment_paper``)."""
    backend = protocol_backend(fakes)
    calls: list[tuple[tuple[int, ...], tuple[int, int], bool]] = []

    def combined(image: np.ndarray, text: np.ndarray, out_size: tuple[int, int], with_probs: bool = False) -> dict:
        calls.append((image.shape, out_size, with_probs))
        features = backend.encoder.run({PAPER_IMAGE: image})
        feeds = {**features, TEXT_EMBEDS: text, OUT_SIZE: np.array(out_size, np.int64)}
        return backend.head.run(feeds, outputs=(CLASS_MAP, PROBS) if with_probs else (CLASS_MAP,))

    backend.segment_paper = combined
    rgb = np.asarray(Image.open(write_image(tmp_path / "a.png", 333, 517)))
    class_map, probs = segment.predict_paper(backend, rgb, np.ones((NUM_CLASSES, 512), np.float32), want_probs=False)
    assert calls == [((1, 3, *shortest_edge_size(333, 517)), (333, 517), False)]
    assert probs is None and class_map.shape == (333, 517)
