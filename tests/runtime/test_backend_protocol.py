"""The paper protocol's encoder and head runners of the torch and ONNX Runtime backends, against the numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gsnet_deploy.contracts import io_names
from gsnet_deploy.errors import BackendError
from gsnet_deploy.model.torch_backend import TorchBackend
from gsnet_deploy.runtime.onnxruntime_backend import OnnxRuntimeBackend
from gsnet_deploy.runtime.protocol import merge_paper_logits, paper_views, resize_shortest_edge

HW = (333, 517)
CLASSES = 4


@pytest.fixture(scope="module")
def case(tiny_model):
    """An image, its encoder input, text embeddings and the numpy protocol's probabilities."""
    rgb = np.random.default_rng(7).integers(0, 256, (*HW, 3), dtype=np.uint8)
    image = np.ascontiguousarray(resize_shortest_edge(rgb).transpose(2, 0, 1))[None]
    text = torch.nn.functional.normalize(torch.randn(CLASSES, 512, generator=torch.Generator().manual_seed(3)), dim=-1)
    with torch.no_grad():
        logits = tiny_model.forward_image(torch.from_numpy(paper_views(rgb).views), text).numpy()
    return image, text.numpy(), merge_paper_logits(logits, *HW)


def _check(result: dict[str, np.ndarray], ref: np.ndarray, atol: float) -> None:
    np.testing.assert_allclose(result[io_names.PROBS], ref, rtol=0, atol=atol)
    cm = result[io_names.CLASS_MAP]
    assert cm.dtype == np.uint8 and cm.shape == HW  # N <= 255: the host gets uint8
    top2 = np.partition(ref, -2, axis=0)[-2:]
    clear = top2[1] - top2[0] > 2 * atol
    np.testing.assert_array_equal(cm[clear], ref.argmax(axis=0)[clear])


def _run(backend, case, outputs):
    image, text, _ = case
    features = backend.encoder.run({io_names.PAPER_IMAGE: image})
    assert list(features) == list(io_names.PAPER_FEATURES)
    feeds = {**features, io_names.TEXT_EMBEDS: text, io_names.OUT_SIZE: np.array(HW, dtype=np.int64)}
    return backend.head.run(feeds, outputs=outputs)


def test_torch_runners_equal_the_numpy_protocol(tiny_model, case) -> None:
    with TorchBackend(tiny_model, device="cpu") as backend:
        _check(_run(backend, case, None), case[2], atol=1e-6)
        only_map = _run(backend, case, (io_names.CLASS_MAP,))
        assert list(only_map) == [io_names.CLASS_MAP]  # probabilities stay on the device unless asked for
        combined = backend.segment_paper(case[0], case[1], HW, with_probs=True)
        _check(combined, case[2], atol=1e-6)


def test_onnxruntime_runners_equal_the_numpy_protocol(tiny_onnx_dir, case) -> None:
    with OnnxRuntimeBackend(tiny_onnx_dir, providers=["CPUExecutionProvider"]) as backend:
        _check(_run(backend, case, None), case[2], atol=1e-5)
        assert list(_run(backend, case, (io_names.CLASS_MAP,))) == [io_names.CLASS_MAP]


def test_torch_head_rejects_bad_out_size(tiny_model, case) -> None:
    image, text, _ = case
    with TorchBackend(tiny_model, device="cpu") as backend:
        with pytest.raises(BackendError, match="uint8 image"):
            backend.encoder.run({io_names.PAPER_IMAGE: image.astype(np.float32)})
        features = backend.encoder.run({io_names.PAPER_IMAGE: image})
        with pytest.raises(BackendError, match="out_size"):
            backend.head.run({**features, io_names.TEXT_EMBEDS: text, io_names.OUT_SIZE: np.array([0, 5])})
