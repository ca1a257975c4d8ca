"""ONNX Runtime backend: protocol, parity with the PyTorch model, paper protocol, folder validation, no torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from gsnet_deploy.errors import BackendError, ExportError, GSNetError

ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[2]
ATOL = 1e-5


@pytest.fixture(scope="module")
def model(request):
    """The session ``tiny_model`` where a conftest provides it, else the same model built here."""
    try:
        return request.getfixturevalue("tiny_model")
    except pytest.FixtureLookupError:
        from gsnet_deploy.model import build_gsnet, tiny_cfg

        return build_gsnet(tiny_cfg())


@pytest.fixture(scope="module")
def onnx_dir(request, model, tmp_path_factory) -> Path:
    """The session ``tiny_onnx_dir`` where a conftest provides it, else an export made here."""
    try:
        return request.getfixturevalue("tiny_onnx_dir")
    except pytest.FixtureLookupError:
        from gsnet_deploy.export.onnx import export_onnx

        out = tmp_path_factory.mktemp("ort_backend") / "onnx"
        export_onnx(model, out)
        return out


@pytest.fixture(scope="module")
def backend(onnx_dir):
    from gsnet_deploy.runtime.onnxruntime_backend import OnnxRuntimeBackend

    with OnnxRuntimeBackend(onnx_dir, providers=["CPUExecutionProvider"]) as opened:
        yield opened


def _copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _restamp(path: Path, **changes: str) -> None:
    """Rewrite the manifest stored in one graph's metadata with ``changes``."""
    import onnx

    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    manifest = json.loads(props["gsnet_deploy.manifest"])
    manifest.update(changes)
    props["gsnet_deploy.manifest"] = json.dumps(manifest, sort_keys=True)
    props["gsnet_deploy.model_digest"] = manifest["model_digest"]
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    onnx.save(model, str(path))


def test_backend_follows_the_protocol(backend, model):
    from gsnet_deploy.runtime.backend import Backend, GraphRunner

    assert isinstance(backend, Backend)
    assert isinstance(backend.text, GraphRunner) and isinstance(backend.image, GraphRunner)
    assert backend.name == "onnxruntime"
    assert backend.model_digest == model.digest
    assert backend.max_views is None and backend.preferred_views == 5
    assert backend.providers == ["CPUExecutionProvider"]
    assert backend.manifest.template == "A photo of a {} in the scene"


def test_backend_default_providers_are_cpu_without_a_gpu(onnx_dir):
    from gsnet_deploy.runtime.onnxruntime_backend import OnnxRuntimeBackend, cuda_device_count, default_providers

    assert default_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    if cuda_device_count() > 0:
        pytest.skip("a CUDA device is present; the CPU-only default does not apply")
    assert default_providers(["CUDAExecutionProvider", "CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with OnnxRuntimeBackend(onnx_dir) as opened:
        assert opened.providers == ["CPUExecutionProvider"]
    assert opened.providers == []


def test_backend_text_runner_matches_torch(backend, model):
    from gsnet_deploy.runtime.tokenizer import BpeTokenizer

    tokens = BpeTokenizer()(
        ["A photo of a building in the scene", "A photo of a road in the scene", "A photo of a tree in the scene"]
    )
    got = backend.text.run({"tokens": tokens})["text_embeds"]
    with torch.no_grad():
        want = model.encode_text(torch.from_numpy(tokens)).numpy()
    assert got.shape == (3, 512) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


def test_backend_image_runner_matches_torch_and_converts_dtypes(backend, model):
    rng = np.random.default_rng(0)
    images = rng.random((5, 3, 384, 384)) * 255.0  # float64 on purpose: the runner casts to float32
    embeds = rng.standard_normal((5, 512))
    embeds /= np.linalg.norm(embeds, axis=1, keepdims=True)
    got = backend.image.run({"images": images, "text_embeds": embeds})["logits"]
    with torch.no_grad():
        want = model.forward_image(torch.from_numpy(images).float(), torch.from_numpy(embeds).float()).numpy()
    assert got.shape == (5, 5, 96, 96) and got.dtype == np.float32
    assert np.abs(got - want).max() <= ATOL


def test_backend_paper_protocol_matches_torch(backend, model):
    from gsnet_deploy.runtime.protocol import merge_paper_logits, paper_views

    rng = np.random.default_rng(1)
    coarse = rng.integers(0, 256, size=(6, 9, 3)).astype(np.float64)
    image = np.kron(coarse, np.ones((50, 50, 1))).astype(np.uint8)  # [300, 450, 3] blocks
    embeds = rng.standard_normal((5, 512)).astype(np.float32)
    embeds /= np.linalg.norm(embeds, axis=1, keepdims=True)
    views = paper_views(image)
    got_logits = backend.image.run({"images": views.views, "text_embeds": embeds})["logits"]
    with torch.no_grad():
        want_logits = model.forward_image(torch.from_numpy(views.views), torch.from_numpy(embeds)).numpy()
    got = merge_paper_logits(got_logits, views.height, views.width)
    want = merge_paper_logits(want_logits, views.height, views.width)
    assert got.shape == (5, 300, 450) and np.isfinite(got).all()
    assert got.min() >= 0.0 and got.max() <= 1.0
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


def test_backend_rejects_bad_feeds(backend):
    embeds = np.zeros((2, 512), np.float32)
    with pytest.raises(BackendError, match=r"got no \['images'\]"):
        backend.image.run({"text_embeds": embeds})
    with pytest.raises(BackendError, match=r"axis 2 must be 384"):
        backend.image.run({"images": np.zeros((1, 3, 256, 384), np.float32), "text_embeds": embeds})
    with pytest.raises(BackendError, match=r"has shape \(3, 384, 384\)"):
        backend.image.run({"images": np.zeros((3, 384, 384), np.float32), "text_embeds": embeds})
    with pytest.raises(BackendError, match=r"N=0"):
        backend.text.run({"tokens": np.zeros((0, 77), np.int64)})


def test_backend_runners_need_the_with_block(onnx_dir):
    from gsnet_deploy.runtime.onnxruntime_backend import OnnxRuntimeBackend

    closed = OnnxRuntimeBackend(onnx_dir)
    with pytest.raises(BackendError, match=r"not open"):
        closed.image.run({})


def test_backend_refuses_unknown_provider(onnx_dir):
    from gsnet_deploy.runtime.onnxruntime_backend import OnnxRuntimeBackend

    with pytest.raises(BackendError, match=r"NoSuchExecutionProvider"):
        with OnnxRuntimeBackend(onnx_dir, providers=["NoSuchExecutionProvider"]):
            pass


def test_open_onnx_dir_missing_graph(onnx_dir, tmp_path):
    from gsnet_deploy.contracts.onnx_manifest import open_onnx_dir
    from gsnet_deploy.runtime.onnxruntime_backend import OnnxRuntimeBackend

    broken = _copy_dir(onnx_dir, tmp_path / "onnx")
    (broken / "image_graph.onnx").unlink()
    with pytest.raises(ExportError, match=r"has no image_graph.onnx"):
        open_onnx_dir(broken)
    with pytest.raises(GSNetError, match=r"has no image_graph.onnx"):
        OnnxRuntimeBackend(broken)
    with pytest.raises(ExportError, match=r"does not exist"):
        open_onnx_dir(tmp_path / "nowhere")


def test_open_onnx_dir_graphs_from_different_weights(onnx_dir, tmp_path):
    from gsnet_deploy.contracts.onnx_manifest import open_onnx_dir

    mixed = _copy_dir(onnx_dir, tmp_path / "onnx")
    _restamp(mixed / "image_graph.onnx", model_digest="0123456789abcdef")
    with pytest.raises(ExportError, match=r"0123456789abcdef.*different weights"):
        open_onnx_dir(mixed)


def test_open_onnx_dir_manifest_json_disagrees(onnx_dir, tmp_path):
    from gsnet_deploy.contracts.onnx_manifest import open_onnx_dir

    mixed = _copy_dir(onnx_dir, tmp_path / "onnx")
    manifest = json.loads((mixed / "manifest.json").read_text())
    manifest["template"] = "a satellite photo of {}"
    (mixed / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match=r"disagrees with the manifest inside text_encoder.onnx \(fields \['template'\]\)"):
        open_onnx_dir(mixed)


def test_open_onnx_dir_foreign_onnx_file(onnx_dir, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from gsnet_deploy.contracts.onnx_manifest import open_onnx_dir

    foreign = _copy_dir(onnx_dir, tmp_path / "onnx")
    graph = helper.make_graph(
        [helper.make_node("Relu", ["images"], ["logits"])], "other",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["B", 3, 384, 384])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", 3, 384, 384])],
    )  # fmt: skip
    other = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    other.metadata_props.append(onnx.StringStringEntryProto(key="author", value="someone else"))
    onnx.save(other, str(foreign / "image_graph.onnx"))
    with pytest.raises(ExportError, match=r"image_graph.onnx is not a gsnet-deploy graph.*'author'"):
        open_onnx_dir(foreign)


def test_open_onnx_dir_not_an_onnx_file(onnx_dir, tmp_path):
    from gsnet_deploy.contracts.onnx_manifest import open_onnx_dir

    junk = _copy_dir(onnx_dir, tmp_path / "onnx")
    (junk / "text_encoder.onnx").write_bytes(b"\x00\x01 definitely not protobuf")
    with pytest.raises(ExportError, match=r"text_encoder.onnx has protobuf field number 0; it is not an ONNX file"):
        open_onnx_dir(junk)


def test_open_onnx_dir_swapped_graphs(onnx_dir, tmp_path):
    from gsnet_deploy.contracts.onnx_manifest import open_onnx_dir

    swapped = _copy_dir(onnx_dir, tmp_path / "onnx")
    shutil.copy(onnx_dir / "text_encoder.onnx", swapped / "image_graph.onnx")
    with pytest.raises(ExportError, match=r"says it is the 'text_encoder' graph, not 'image_graph'"):
        open_onnx_dir(swapped)


def test_open_onnx_dir_missing_manifest_json(onnx_dir, tmp_path):
    from gsnet_deploy.contracts.onnx_manifest import open_onnx_dir

    bare = _copy_dir(onnx_dir, tmp_path / "onnx")
    (bare / "manifest.json").unlink()
    with pytest.raises(ExportError, match=r"no readable manifest.json"):
        open_onnx_dir(bare)


def test_read_metadata_props_agrees_with_onnx(onnx_dir, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from gsnet_deploy.contracts.onnx_manifest import read_metadata_props

    for name in ("text_encoder.onnx", "image_graph.onnx"):
        model = onnx.load(str(onnx_dir / name))
        assert read_metadata_props(onnx_dir / name) == {p.key: p.value for p in model.metadata_props}
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    plain = helper.make_model(graph)
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    assert read_metadata_props(tmp_path / "plain.onnx") == {}


def test_runtime_modules_import_and_run_without_torch(onnx_dir):
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
        from gsnet_deploy.contracts.onnx_manifest import open_onnx_dir
        from gsnet_deploy.runtime.onnxruntime_backend import OnnxRuntimeBackend

        assert open_onnx_dir({str(onnx_dir)!r}).manifest.view_size == 384
        with OnnxRuntimeBackend({str(onnx_dir)!r}) as backend:
            out = backend.text.run({{"tokens": np.ones((2, 77), np.int64)}})["text_embeds"]
        assert out.shape == (2, 512)
        assert "torch" not in sys.modules
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"
