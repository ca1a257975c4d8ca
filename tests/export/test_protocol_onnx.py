"""``paper_encoder.onnx`` and ``paper_head.onnx``: written by export_onnx, checked, and equal to PyTorch in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from gsnet_deploy.contracts import io_names
from gsnet_deploy.contracts.onnx_manifest import open_onnx_dir
from gsnet_deploy.model.protocol import PaperEncoder, PaperHead
from gsnet_deploy.runtime.protocol import merge_paper_logits, paper_views, resize_shortest_edge


@pytest.fixture(scope="module")
def sessions(tiny_onnx_dir):
    folder = open_onnx_dir(tiny_onnx_dir)
    assert folder.paper_encoder_path is not None and folder.paper_head_path is not None
    return ort.InferenceSession(str(folder.paper_encoder_path)), ort.InferenceSession(str(folder.paper_head_path))


def test_paper_graphs_have_the_promised_io(tiny_onnx_dir) -> None:
    enc = onnx.load(str(tiny_onnx_dir / io_names.PAPER_ENCODER_FILE), load_external_data=False)
    head = onnx.load(str(tiny_onnx_dir / io_names.PAPER_HEAD_FILE), load_external_data=False)
    assert [i.name for i in enc.graph.input] == [io_names.PAPER_IMAGE]
    assert [o.name for o in enc.graph.output] == list(io_names.PAPER_FEATURES)
    assert [i.name for i in head.graph.input] == list(io_names.PAPER_HEAD_INPUTS)
    assert [o.name for o in head.graph.output] == [io_names.CLASS_MAP, io_names.PROBS]
    image_dims = [d.dim_param or d.dim_value for d in enc.graph.input[0].type.tensor_type.shape.dim]
    assert image_dims == [1, 3, "h", "w"]
    assert enc.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    # out_size is data feeding the resize: no op may take its output shape from anything but N, H, W
    assert {n.op_type for n in head.graph.node} >= {"Range", "Gather", "ArgMax"}


@pytest.mark.parametrize(("hw", "classes"), [((333, 517), 5), ((517, 333), 2), ((1, 1), 1)])
def test_ort_equals_torch_and_the_numpy_reference(tiny_model, sessions, hw: tuple[int, int], classes: int) -> None:
    enc_session, head_session = sessions
    rng = np.random.default_rng(hw[0] + hw[1])
    rgb = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
    resized = np.ascontiguousarray(resize_shortest_edge(rgb).transpose(2, 0, 1))[None]  # [1, 3, h, w]
    text = torch.nn.functional.normalize(torch.randn(classes, 512, generator=torch.Generator().manual_seed(classes)), dim=-1)
    out_size = np.array(hw, dtype=np.int64)

    features = enc_session.run(None, {io_names.PAPER_IMAGE: resized})
    feeds = {**dict(zip(io_names.PAPER_FEATURES, features)), io_names.TEXT_EMBEDS: text.numpy(), io_names.OUT_SIZE: out_size}
    class_map, probs = head_session.run([io_names.CLASS_MAP, io_names.PROBS], feeds)

    with torch.no_grad():
        torch_features = PaperEncoder(tiny_model)(torch.from_numpy(resized))
        _, torch_probs = PaperHead(tiny_model)(torch_features, text, torch.from_numpy(out_size))
        views = paper_views(rgb)
        ref = merge_paper_logits(tiny_model.forward_image(torch.from_numpy(views.views), text).numpy(), *hw)
    for name, got in zip(io_names.PAPER_FEATURES, features):
        np.testing.assert_allclose(got, torch_features[name].numpy(), rtol=1e-4, atol=1e-4, err_msg=name)
    assert class_map.dtype == np.int32 and class_map.shape == hw
    assert probs.dtype == np.float32 and probs.shape == (classes, *hw)
    np.testing.assert_allclose(probs, torch_probs.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(probs, ref, rtol=0, atol=1e-5)
    top2 = np.partition(ref, -2, axis=0)[-2:] if classes > 1 else None
    clear = (top2[1] - top2[0] > 2e-5) if top2 is not None else np.ones(hw, dtype=bool)
    np.testing.assert_array_equal(class_map[clear], ref.argmax(axis=0)[clear])


def test_head_feeds_on_features_of_another_size(tiny_model, sessions) -> None:
    """One set of features, two output sizes: H and W come from out_size alone."""
    enc_session, head_session = sessions
    image = np.random.default_rng(0).integers(0, 256, (1, 3, 640, 700), dtype=np.uint8)
    features = dict(zip(io_names.PAPER_FEATURES, enc_session.run(None, {io_names.PAPER_IMAGE: image})))
    text = np.eye(3, 512, dtype=np.float32)
    for size in ((20, 31), (641, 333)):
        feeds = {**features, io_names.TEXT_EMBEDS: text, io_names.OUT_SIZE: np.array(size, dtype=np.int64)}
        (class_map,) = head_session.run([io_names.CLASS_MAP], feeds)
        assert class_map.shape == size
