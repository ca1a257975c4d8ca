"""ONNX export of GSNet's two graphs: files, manifest, IO contract, parity with PyTorch, atomic writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from gsnet_deploy.errors import ExportError

ort = pytest.importorskip("onnxruntime")

# The CLIP statistics the image graph must bake in (design.md section 1), written out here on purpose.
CLIP_MEAN = [122.7709383, 116.7460125, 104.09373615]
CLIP_STD = [68.5005327, 66.6321579, 70.3231630]
ATOL = 1e-5


def _session(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _dims(value_info) -> list:
    return [d.dim_param if d.dim_param else d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _embeds(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, 512))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _views(b: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random((b, 3, 384, 384)) * 255.0).astype(np.float32)


@pytest.fixture(scope="module")
def image_session(tiny_onnx_dir):
    return _session(tiny_onnx_dir / "image_graph.onnx")


def test_export_onnx_writes_both_graphs_and_manifest(tiny_onnx_dir, tiny_model):
    names = sorted(p.name for p in tiny_onnx_dir.iterdir())
    assert names == [
        "image_graph.onnx", "manifest.json", "paper_encoder.onnx", "paper_head.onnx", "text_encoder.onnx",
        "tile_blend.onnx", "tile_emit.onnx",
    ]  # fmt: skip
    assert sorted(p.name for p in tiny_onnx_dir.parent.iterdir()) == ["onnx"]  # no temp folder left behind
    manifest = json.loads((tiny_onnx_dir / "manifest.json").read_text())
    assert manifest["model_digest"] == tiny_model.digest
    assert manifest["template"] == "A photo of a {} in the scene"
    np.testing.assert_allclose(manifest["mean"], CLIP_MEAN, rtol=0, atol=1e-4)
    np.testing.assert_allclose(manifest["std"], CLIP_STD, rtol=0, atol=1e-4)
    assert (manifest["view_size"], manifest["logit_size"], manifest["embed_dim"]) == (384, 96, 512)
    assert manifest["protocol"] == "paper-sliding-window"
    assert manifest["opset"] >= 17
    assert {"torch", "onnx", "onnxslim", "gsnet-deploy"} <= set(manifest["tool_versions"])
    assert manifest["tool_versions"]["torch"] == torch.__version__


@pytest.mark.parametrize(("file_name", "role"), [("text_encoder.onnx", "text_encoder"), ("image_graph.onnx", "image_graph")])
def test_export_onnx_metadata_props_carry_the_manifest(tiny_onnx_dir, file_name, role):
    model = onnx.load(str(tiny_onnx_dir / file_name), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    on_disk = json.loads((tiny_onnx_dir / "manifest.json").read_text())
    assert json.loads(props["gsnet_deploy.manifest"]) == on_disk
    assert props["gsnet_deploy.graph"] == role
    assert props["gsnet_deploy.model_digest"] == on_disk["model_digest"]
    assert all(entry.version >= 17 for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


def test_export_onnx_io_names_and_dynamic_axes(tiny_onnx_dir):
    text = onnx.load(str(tiny_onnx_dir / "text_encoder.onnx"), load_external_data=False)
    image = onnx.load(str(tiny_onnx_dir / "image_graph.onnx"), load_external_data=False)
    assert [(i.name, _dims(i)) for i in text.graph.input] == [("tokens", ["N", 77])]
    assert [(o.name, _dims(o)) for o in text.graph.output] == [("text_embeds", ["N", 512])]
    assert text.graph.input[0].type.tensor_type.elem_type == TensorProto.INT64
    assert [(i.name, _dims(i)) for i in image.graph.input] == [("images", ["B", 3, 384, 384]), ("text_embeds", ["N", 512])]
    assert [(o.name, _dims(o)) for o in image.graph.output] == [("logits", ["B", "N", 96, 96])]


@pytest.mark.parametrize("num_classes", [1, 5, 40])
def test_export_onnx_text_graph_matches_torch(tiny_onnx_dir, tiny_model, num_classes):
    from gsnet_deploy.runtime.tokenizer import BpeTokenizer

    prompts = [f"A photo of a class number {i} in the scene" for i in range(num_classes)]
    tokens = BpeTokenizer()(prompts)
    (got,) = _session(tiny_onnx_dir / "text_encoder.onnx").run(None, {"tokens": tokens})
    with torch.no_grad():
        want = tiny_model.encode_text(torch.from_numpy(tokens)).numpy()
    assert got.shape == (num_classes, 512) and np.isfinite(got).all()
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("views", [1, 5])
@pytest.mark.parametrize("num_classes", [1, 5, 40])
def test_export_onnx_image_graph_matches_torch(image_session, tiny_model, views, num_classes):
    images, embeds = _views(views, seed=views), _embeds(num_classes, seed=num_classes)
    (got,) = image_session.run(None, {"images": images, "text_embeds": embeds})
    with torch.no_grad():
        want = tiny_model.forward_image(torch.from_numpy(images), torch.from_numpy(embeds)).numpy()
    assert got.shape == (views, num_classes, 96, 96) and np.isfinite(got).all()
    assert np.abs(got - want).max() <= ATOL


def test_export_onnx_image_graph_beyond_class_padding(image_session, tiny_model):
    # N = 300 > 256: the padding count clamps to zero inside the graph, as in PyTorch
    images, embeds = _views(1, seed=3), _embeds(300, seed=300)
    (got,) = image_session.run(None, {"images": images, "text_embeds": embeds})
    with torch.no_grad():
        want = tiny_model.forward_image(torch.from_numpy(images), torch.from_numpy(embeds)).numpy()
    assert got.shape == (1, 300, 96, 96)
    assert np.abs(got - want).max() <= ATOL


def test_export_onnx_refuses_old_opset(tiny_model, tmp_path):
    from gsnet_deploy.export.onnx import export_onnx

    with pytest.raises(ExportError, match="opset 16"):
        export_onnx(tiny_model, tmp_path / "out", opset=16)
    assert not (tmp_path / "out").exists()


def test_export_onnx_refuses_a_file_as_out_dir(tiny_model, tmp_path):
    from gsnet_deploy.export.onnx import export_onnx

    target = tmp_path / "out"
    target.write_text("not a folder")
    with pytest.raises(ExportError, match="is a file"):
        export_onnx(tiny_model, target)


def test_export_onnx_failure_leaves_nothing(tiny_model, tmp_path, monkeypatch):
    from gsnet_deploy.export import onnx as export_mod

    def broken(model, name):
        raise ExportError(f"onnxslim failed on {name} (simulated)")

    monkeypatch.setattr(export_mod, "_simplify", broken)
    with pytest.raises(ExportError, match="simulated"):
        export_mod.export_onnx(tiny_model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temp folder


def test_export_onnx_replaces_files_of_an_existing_folder(tiny_model, tmp_path):
    """Bug caught: the set of three files not committed into an existing folder (or part files left)."""
    from gsnet_deploy.contracts.atomic import leftover_parts
    from gsnet_deploy.export.onnx import export_onnx

    names = ("text_encoder.onnx", "image_graph.onnx", "manifest.json")
    out = tmp_path / "out"
    out.mkdir()
    for name in names:
        (out / name).write_text("old")
    (out / "notes.txt").write_text("kept")
    export_onnx(tiny_model, out)
    tile = ["tile_blend.onnx", "tile_emit.onnx"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "paper_encoder.onnx", "paper_head.onnx", *tile, "notes.txt"])
    assert (out / "notes.txt").read_text() == "kept"
    assert all((out / name).read_bytes() != b"old" for name in names)
    assert json.loads((out / "manifest.json").read_text())["model_digest"] == tiny_model.digest
    assert leftover_parts(out) == [] and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_save_onnx_atomic_commits_model_and_external_data_together(tmp_path, monkeypatch):
    """Bug caught: the external-data file written straight under its final name, or left as a part file."""
    from gsnet_deploy.contracts.atomic import AtomicFiles
    from gsnet_deploy.export import onnx_save

    values = np.arange(3 * 400, dtype=np.float32).reshape(3, 400)  # over onnx's 1 KiB external-data threshold
    weight = numpy_helper.from_array(values, name="w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 400])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    monkeypatch.setattr(onnx_save, "PROTOBUF_LIMIT", 0)  # force the external-data path on a tiny model
    path = tmp_path / "m.onnx"
    with AtomicFiles() as files:
        onnx_save.save_onnx_atomic(model, path, files)
        assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == []  # nothing final yet
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    loaded = onnx.load(str(path))
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), values)


def test_flatten_to_reshape_keeps_values_and_symbolic_dims():
    from gsnet_deploy.export.onnx import flatten_to_reshape

    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["y"], axis=2, name="flat")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 7, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    assert flatten_to_reshape(model) == 1
    assert [n.op_type for n in model.graph.node] == ["Reshape"]
    x = np.arange(3 * 7 * 4, dtype=np.float32).reshape(3, 7, 4)
    (y,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_array_equal(y, x.reshape(21, 4))  # Flatten(axis=2) of [3, 7, 4] is [21, 4]


@pytest.mark.slow
def test_export_onnx_full_model_matches_torch_on_one_view(paper_onnx_dir):
    from gsnet_deploy.model import build_gsnet, paper_cfg

    model = build_gsnet(paper_cfg()).eval()  # the same deterministic demo weights as the session's paper export
    image_path = paper_onnx_dir / "image_graph.onnx"
    images, embeds = _views(1, seed=11), _embeds(5, seed=5)
    session = _session(image_path)
    (got,) = session.run(None, {"images": images, "text_embeds": embeds})
    del session
    with torch.no_grad():
        want = model.forward_image(torch.from_numpy(images), torch.from_numpy(embeds)).numpy()
    assert got.shape == (1, 5, 96, 96) and np.isfinite(got).all()
    assert np.abs(got - want).max() <= FULL_ATOL, np.abs(got - want).max()
    assert os.path.getsize(image_path) > 500e6  # the full weights are in the graph


FULL_ATOL = 1e-5


class _ShapeArithmetic(torch.nn.Module):
    """Shape-dependent reshapes around a weight over 64 KB: onnxslim folds the shape ops only with inferred shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(256, 256)  # 256 KB of weights: left out of the weight-free view

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        y = self.proj(x).reshape(b * n, c).reshape(b, n, 16, c // 16)  # [B, N, 16, 16]
        return y.permute(0, 2, 1, 3).reshape(b, 16, n * (c // 16))  # [B, 16, N * 16]


def test_slim_infers_shapes_without_weights_and_gets_plain_onnxslims_graph(tmp_path: Path, monkeypatch) -> None:
    # catches: the inferred shapes not copied back (onnxslim then folds differently), the weights still handed to
    # the shape inference (the memory it was meant to save), onnxslim's own function left patched afterwards
    import onnxslim
    import onnxslim.core

    from gsnet_deploy.export import onnx as export_onnx_module

    path = tmp_path / "raw.onnx"
    torch.onnx.export(
        _ShapeArithmetic(), (torch.randn(2, 3, 256),), str(path), input_names=["x"], output_names=["y"],
        dynamic_axes={"x": {0: "B", 1: "N"}, "y": {0: "B", 2: "M"}}, opset_version=17, dynamo=False,
    )  # fmt: skip
    plain = onnxslim.slim(onnx.load(str(path)))
    seen: list[int] = []
    original = onnxslim.core.shape_infer

    def spy(model: onnx.ModelProto) -> onnx.ModelProto:
        seen.append(max((init.ByteSize() for init in model.graph.initializer), default=0))
        return original(model)

    monkeypatch.setattr(onnxslim.core, "shape_infer", spy)
    lean = export_onnx_module._simplify(onnx.load(str(path)), "raw.onnx")
    assert onnxslim.core.shape_infer is spy  # restored
    assert seen and max(seen) <= 1 << 16  # never the 256 KB weight
    assert len(lean.graph.node) < 20  # folded: the shape arithmetic is gone
    assert [n.SerializeToString() for n in lean.graph.node] == [n.SerializeToString() for n in plain.graph.node]
    assert {v.name: v.SerializeToString() for v in lean.graph.value_info} == {
        v.name: v.SerializeToString() for v in plain.graph.value_info
    }
    assert [o.SerializeToString() for o in lean.graph.output] == [o.SerializeToString() for o in plain.graph.output]
