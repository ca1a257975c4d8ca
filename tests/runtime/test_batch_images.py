"""Several same-size images in one device call (``--batch-images K``, issue 12 item 4).

The torch backend's ``segment_paper_batch`` against its one-image ``segment_paper`` (bit for bit on
CPU fp32) and against the numpy protocol (the reference); the folder pipeline's grouping, order,
memory bound and error handling with a stand-in backend that records its calls.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gsnet_deploy.contracts.io_names import CLASS_MAP, PROBS, TEXT_EMBEDS, TEXT_TOKENS
from gsnet_deploy.errors import BackendError, GSNetError
from gsnet_deploy.model.torch_backend import TorchBackend
from gsnet_deploy.runtime import segment
from gsnet_deploy.runtime.paper_path import OnePiecePath, SplitPath
from gsnet_deploy.runtime.protocol import merge_paper_logits, paper_views, resize_shortest_edge
from gsnet_deploy.runtime.vocab import TextEmbeddingCache, parse_classes

HW = (333, 517)
CLASSES = 4


# --- the torch backend: one call for B images equals B one-image calls and the numpy reference


class CpuGraphCache:
    """``CudaGraphCache`` on the CPU: inputs copied into the buffers captured for ``key``, the function run on them.

    A key that leaves out a shape the function depends on fails here as it would on CUDA: the
    copy into the buffers of another shape raises (or the stale outputs come back).
    """

    def __init__(self, fn) -> None:
        self.fn, self.static, self.keys = fn, {}, []

    def __call__(self, *inputs: torch.Tensor, key: tuple) -> tuple[torch.Tensor, ...]:
        self.keys.append(key)
        if key not in self.static:
            self.static[key] = [t.clone() for t in inputs]
        for buffer, value in zip(self.static[key], inputs, strict=True):
            buffer.copy_(value)
        return self.fn(*self.static[key])


@pytest.fixture(scope="module")
def images() -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Three different images of one size, their encoder inputs ``[3, 3, h, w]`` and unit text embeddings."""
    rng = np.random.default_rng(11)
    rgbs = [rng.integers(0, 256, (*HW, 3), dtype=np.uint8) for _ in range(3)]
    nchw = np.stack([resize_shortest_edge(rgb).transpose(2, 0, 1) for rgb in rgbs])  # [3, 3, h, w]
    text = rng.normal(size=(CLASSES, 512)).astype(np.float32)
    return rgbs, nchw, text / np.linalg.norm(text, axis=1, keepdims=True)


def test_torch_batch_equals_one_image_calls_and_the_numpy_protocol(tiny_model, images) -> None:
    """Catches: views of the B images mixed up (image-major vs view-major), one image's merge used for all,
    results returned out of order, a graph key without the batch size (replaying another batch's buffers),
    and probabilities crossing to the host without being asked."""
    rgbs, nchw, text = images
    with TorchBackend(tiny_model, device="cpu") as backend:
        paper = backend.paper
        paper._encode_graphs = CpuGraphCache(paper._encode_tuple)  # the CUDA path's keys, emulated on the CPU
        paper._head_batch_graphs = CpuGraphCache(paper._head_batch_tuple)
        two = backend.segment_paper_batch(nchw[:2], text, HW, with_probs=True)
        three = backend.segment_paper_batch(nchw, text, HW)  # another batch size after the first; maps only
        ones = [backend.segment_paper(nchw[i : i + 1], text, HW, with_probs=True) for i in range(2)]
        assert paper._head_batch_graphs.keys == [(2, CLASSES, *HW), (3, CLASSES, *HW)]
    assert len(two) == 2 and len(three) == 3 and [list(m) for m in three] == [[CLASS_MAP]] * 3
    for got, one in [*zip(two, ones, strict=True), *zip(three, ones, strict=False)]:
        assert got[CLASS_MAP].dtype == np.uint8 and got[CLASS_MAP].shape == HW
        np.testing.assert_array_equal(got[CLASS_MAP], one[CLASS_MAP])
        if PROBS in got:
            # CPU fp32: batching the views changed no bit of the convolutions and matmuls (max difference 0.0)
            np.testing.assert_allclose(got[PROBS], one[PROBS], rtol=0, atol=1e-6)
    assert not np.array_equal(two[0][CLASS_MAP], two[1][CLASS_MAP])  # the images differ, so a mix-up shows
    with torch.no_grad():  # the reference: the one-piece image graph on the numpy views, merged in numpy
        for index in (0, 2):
            views = torch.from_numpy(paper_views(rgbs[index]).views)  # [5, 3, 384, 384]
            ref = merge_paper_logits(tiny_model.forward_image(views, torch.from_numpy(text)).numpy(), *HW)  # [N, H, W]
            top2 = np.partition(ref, -2, axis=0)[-2:]
            clear = top2[1] - top2[0] > 2e-6
            np.testing.assert_array_equal(three[index][CLASS_MAP][clear], ref.argmax(axis=0)[clear])
            if index < 2:
                np.testing.assert_allclose(two[index][PROBS], ref, rtol=0, atol=1e-6)


def test_torch_batch_rejects_bad_images(tiny_model, images) -> None:
    """Catches: a float or 3-d input accepted (and silently cast or broadcast) instead of a one-line error."""
    _, nchw, text = images
    with TorchBackend(tiny_model, device="cpu") as backend:
        with pytest.raises(BackendError, match=r"uint8 images \[B, 3, h, w\]"):
            backend.segment_paper_batch(nchw.astype(np.float32), text, HW)
        with pytest.raises(BackendError, match=r"uint8 images \[B, 3, h, w\]"):
            backend.segment_paper_batch(nchw[0], text, HW)


# --- the folder pipeline with a stand-in backend that records its device calls

POISON = 13  # an image of this gray level makes the stand-in's device call fail


class _Text:
    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {TEXT_EMBEDS: np.eye(feeds[TEXT_TOKENS].shape[0], 512, dtype=np.float32)}


class _Unused:
    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        raise AssertionError("the combined calls must be used")


class RecordingBackend:
    """A paper-protocol stand-in: each image's class map is its gray level mod N; records every device call."""

    name, model_digest, preferred_views, max_views = "recording", "recording", 5, None

    def __init__(self, batched: bool = True) -> None:
        self.text, self.image, self.encoder, self.head = _Text(), _Unused(), _Unused(), _Unused()
        self.calls: list[tuple[str, list[int]]] = []  # (call, gray levels of its images)
        if batched:
            self.segment_paper_batch = self._segment_paper_batch

    def _one(self, image: np.ndarray, out_size: tuple[int, int], with_probs: bool) -> dict[str, np.ndarray]:
        level = int(image[0, 0, 0])
        if level == POISON:
            raise BackendError(f"the stand-in cannot run gray level {POISON}")
        out = {CLASS_MAP: np.full(out_size, level % CLASSES, np.uint8)}
        if with_probs:
            out[PROBS] = np.full((CLASSES, *out_size), level / 255.0, np.float32)
        return out

    def segment_paper(self, image: np.ndarray, text: np.ndarray, out_size: tuple[int, int], with_probs: bool = False) -> dict:
        assert image.shape[0] == 1
        self.calls.append(("one", [int(image[0, 0, 0, 0])]))
        return self._one(image[0], out_size, with_probs)

    def _segment_paper_batch(
        self, images: np.ndarray, text: np.ndarray, out_size: tuple[int, int], with_probs: bool = False
    ) -> list[dict]:
        levels = [int(v) for v in images[:, 0, 0, 0]]
        self.calls.append(("batch", levels))
        if POISON in levels:
            raise BackendError("the stand-in's batched call failed")
        return [self._one(image, out_size, with_probs) for image in images]

    def __enter__(self) -> RecordingBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _gray(path: Path, level: int, height: int = 40, width: int = 60) -> Path:
    Image.fromarray(np.full((height, width, 3), level, np.uint8)).save(path)
    return path


def _run(paths: list[Path], backend: object, out: Path, k: int, lines: list[str] | None = None, **kw: object):
    vocab = parse_classes(",".join(f"c{i}" for i in range(CLASSES)))
    options = segment.SegmentOptions(out_dir=out, **{"mode": segment.Mode.PAPER, "progress": False, "batch_images": k, **kw})  # type: ignore[arg-type]
    log = (lambda msg: None) if lines is None else lines.append
    return segment.segment_files(paths, backend, vocab, options, TextEmbeddingCache(None), log=log)  # type: ignore[arg-type]


# gray levels and sizes of a folder: a size change, a non-image input, and a run of one size
_FOLDER = [(1, 40), (2, 40), (3, 40), (5, 50), (6, 50), (7, 40), (None, 40), (9, 40), (10, 40)]


def _folder(tmp_path: Path) -> list[Path]:
    paths = []
    for index, (level, height) in enumerate(_FOLDER):
        path = tmp_path / "in" / f"{index}.png"
        path.parent.mkdir(exist_ok=True)
        if level is None:
            path.write_bytes(b"not a png")
        else:
            _gray(path, level, height)
        paths.append(path)
    return paths


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        (2, [("batch", [1, 2]), ("one", [3]), ("batch", [5, 6]), ("one", [7]), ("batch", [9, 10])]),
        (3, [("batch", [1, 2, 3]), ("batch", [5, 6]), ("one", [7]), ("batch", [9, 10])]),
        (8, [("batch", [1, 2, 3]), ("batch", [5, 6]), ("one", [7]), ("batch", [9, 10])]),
    ],
)
def test_groups_respect_k_size_changes_and_input_order(tmp_path: Path, k: int, expected: list) -> None:
    """Catches: a group over K images, images of two sizes in one call, a group spanning an unreadable input,
    results handed to the wrong image of a group, and outputs or log lines out of input order."""
    paths = _folder(tmp_path)
    lines: list[str] = []
    backend = RecordingBackend()
    report = _run(paths, backend, tmp_path / "out", k, lines)
    assert backend.calls == expected
    assert [p.name for p, _ in report.failed] == ["6.png"] and list(report.written) == [p for p in paths if p.name != "6.png"]
    done = [line.split(":")[0] for line in lines if ": wrote " in line or ": error: " in line]
    assert done == [str(p) for p in paths]
    for path, (level, height) in zip(paths, _FOLDER, strict=True):
        if level is not None:
            mask = np.asarray(Image.open(report.written[path][0]))
            assert mask.shape == (height, 60) and (mask == level % CLASSES).all(), path.name


class _Recorder(list):
    """A log that records 'done' for each finished input (wrote or error) into ``order``."""

    def __init__(self, order: list[str]) -> None:
        super().__init__()
        self.order = order

    def append(self, msg: str) -> None:  # type: ignore[override]
        if ": wrote " in msg or ": error: " in msg:
            self.order.append("done")


def test_decoding_is_bounded_by_two_groups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches: every image of a long same-size folder decoded before the first is written (unbounded memory)."""
    paths = [_gray(tmp_path / f"{i}.png", i + 20) for i in range(12)]
    order: list[str] = []
    real_load = segment.load_image
    monkeypatch.setattr(segment, "load_image", lambda path: (order.append("decode"), real_load(path))[1])
    backend = RecordingBackend()
    report = _run(paths, backend, tmp_path / "out", 3, _Recorder(order))
    assert len(report.written) == 12 and [len(levels) for _, levels in backend.calls] == [3, 3, 3, 3]
    held = ahead = 0
    for event in order:
        held += 1 if event == "decode" else -1
        ahead = max(ahead, held)
    assert ahead <= 2 * 3 + 1, order


def test_failing_image_in_a_group_is_reported_alone(tmp_path: Path) -> None:
    """Catches: a failed batched call failing every image of its group (no retry one at a time), or the
    batch's error reported instead of the failing image's own."""
    paths = [_gray(tmp_path / f"{i}.png", level) for i, level in enumerate([30, POISON, 31, 32])]
    backend = RecordingBackend()
    lines: list[str] = []
    report = _run(paths, backend, tmp_path / "out", 4, lines, save_probs=True)
    assert [(p.name, msg) for p, msg in report.failed] == [("1.png", f"the stand-in cannot run gray level {POISON}")]
    assert list(report.written) == [paths[0], paths[2], paths[3]]
    assert backend.calls == [("batch", [30, POISON, 31, 32]), ("one", [30]), ("one", [POISON]), ("one", [31]), ("one", [32])]
    assert not list((tmp_path / "out").glob("1*")), "the failing image left outputs"
    for path, level in ((paths[0], 30), (paths[3], 32)):
        probs = np.load(report.written[path][-1])
        assert probs.shape == (CLASSES, 40, 60) and np.allclose(probs, level / 255.0)


def test_k1_keeps_one_image_calls_and_backends_without_batching_run_one_at_a_time(tmp_path: Path) -> None:
    """Catches: --batch-images 1 (the default) changing today's call pattern, a batched call of one image,
    and a backend without ``segment_paper_batch`` (ONNX Runtime, TensorRT) failing or skipping images."""
    paths = [_gray(tmp_path / f"{i}.png", 40 + i) for i in range(3)]
    for label, backend, k in (("k1", RecordingBackend(), 1), ("plain", RecordingBackend(batched=False), 4)):
        report = _run(paths, backend, tmp_path / label, k)
        assert len(report.written) == 3
        assert backend.calls == [("one", [40]), ("one", [41]), ("one", [42])], label
    assert segment.SegmentOptions(out_dir=tmp_path).batch_images == 1


def test_batch_option_is_validated_before_the_model(tmp_path: Path) -> None:
    """Catches: --batch-images 0 or a huge K accepted (no device call would run, or memory would explode)."""
    vocab = parse_classes("a,b")
    for k in (0, segment.MAX_BATCH_IMAGES + 1):
        with pytest.raises(GSNetError, match="--batch-images"):
            segment.validate_run([], vocab, segment.SegmentOptions(out_dir=tmp_path, batch_images=k))
    segment.validate_run([], vocab, segment.SegmentOptions(out_dir=tmp_path, batch_images=segment.MAX_BATCH_IMAGES))


def test_paper_paths_batch_entry_points(images) -> None:
    """Catches: the numpy path or a path without a batched backend call dropping or reordering images, and a
    batch of mixed sizes reaching the backend."""
    _, _, text = images
    resized = [np.full((64, 96, 3), level, np.uint8) for level in (20, 21, 22)]  # after ResizeShortestEdge
    backend = RecordingBackend()
    split = SplitPath(backend, backend.encoder, backend.head)
    levels = [int(image[0, 0, 0]) for image in resized]
    out = split.segment_batch(resized, text, HW, probs=False)
    assert backend.calls == [("batch", levels)] and [int(m[0, 0]) for m, _ in out] == [v % CLASSES for v in levels]
    with pytest.raises(BackendError, match="one size"):
        split.segment_batch([resized[0], resized[1][:-1]], text, HW, probs=False)
    calls: list[int] = []

    class OnePiece(OnePiecePath):
        def segment(self, resized, text_embeds, out_size, probs):  # type: ignore[no-untyped-def]
            calls.append(int(resized[0, 0, 0]))
            return np.zeros(out_size, np.uint8), None

    assert len(OnePiece(backend).segment_batch(resized, text, HW, probs=False)) == 3 and calls == levels  # type: ignore[arg-type]


def test_torch_folder_with_batches_writes_the_same_files(tmp_path: Path, tiny_model) -> None:
    """Catches: any difference in the written files (mask, overlay, probabilities, bytes) between
    --batch-images 2 and 1 on the real torch model, and K ignored (no batched call made)."""
    rng = np.random.default_rng(5)
    paths = []
    for index, (height, width) in enumerate([(50, 70), (50, 70), (60, 70)]):
        path = tmp_path / "in" / f"{index}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    batches: list[int] = []
    with TorchBackend(tiny_model, device="cpu") as backend:
        real = backend.segment_paper_batch

        def spy(images: np.ndarray, *args: object, **kwargs: object) -> list:
            batches.append(images.shape[0])
            return real(images, *args, **kwargs)  # type: ignore[arg-type]

        backend.segment_paper_batch = spy  # type: ignore[method-assign]
        for k in (1, 2):
            report = _run(paths, backend, tmp_path / f"k{k}", k, save_probs=True)
            assert not report.failed and len(report.written) == 3
    assert batches == [2], f"expected one batched call of the two 50x70 images, got {batches}"
    names = sorted(p.name for p in (tmp_path / "k1").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "k2").iterdir()) and len(names) == 9
    for name in names:
        assert (tmp_path / "k1" / name).read_bytes() == (tmp_path / "k2" / name).read_bytes(), name


def test_cli_segment_passes_batch_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches: ``gsnet segment --batch-images K`` parsed but not handed to the run (K silently 1), and a bad K
    reaching the model instead of a one-line error."""
    from gsnet_deploy import cli

    seen: list[segment.SegmentOptions] = []
    monkeypatch.setattr(cli, "open_backend", lambda options, warn=True: RecordingBackend())
    monkeypatch.setattr(
        segment, "segment_files", lambda paths, backend, vocab, options, cache: seen.append(options) or segment.SegmentReport()
    )
    image = _gray(tmp_path / "a.png", 50)
    args = ["segment", str(image), "--classes", "a,b", "--out", str(tmp_path / "out"), "--no-cache", "--no-progress"]
    assert cli.main([*args, "--batch-images", "3"]) == 0 and seen[-1].batch_images == 3
    assert cli.main(args) == 0 and seen[-1].batch_images == 1
    assert cli.main([*args, "--batch-images", "0"]) == 2 and len(seen) == 2


def test_tiled_inputs_run_as_without_batching(tmp_path: Path, fakes, monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches: --batch-images pulling inputs that are not in paper mode (here --mode tiled) into paper calls
    or changing how their windows reach the device."""
    monkeypatch.setattr(segment, "encode_vocabulary", lambda *args: np.ones((CLASSES, 512), np.float32))
    rng = np.random.default_rng(2)
    paths = []
    for index in range(3):
        path = tmp_path / "in" / f"{index}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    batches = {}
    for k in (1, 4):
        runner = fakes.linear(CLASSES)
        report = _run(paths, fakes.backend(runner), tmp_path / f"k{k}", k, mode=segment.Mode.TILED)
        assert not report.failed and len(report.written) == 3
        batches[k] = runner.batches
    assert batches[1] == batches[4] and batches[1] and 5 not in batches[4]  # tiled windows only, no 5-view paper call
    for name in sorted(p.name for p in (tmp_path / "k1").iterdir()):
        assert (tmp_path / "k1" / name).read_bytes() == (tmp_path / "k4" / name).read_bytes(), name
