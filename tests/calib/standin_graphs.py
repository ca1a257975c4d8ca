"""Small stand-in ONNX graphs with the names and dynamic axes of the real exported graphs.

The real ``text_encoder.onnx`` / ``image_graph.onnx`` come from the lead's exporter; until a
``tiny_onnx_dir`` fixture exists, these stand-ins let AutoCast, quantization and the checks do real
work: the image graph normalizes, convolves, matches pixel features with the text embeddings and
resizes to 96x96, as the real graph's outer shape does.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gsnet_deploy.contracts import io_names

OPSET = 17
VOCAB = 512  # stand-in vocabulary (token ids are taken modulo this)
EMBED = 512  # width of text_embeds, as in the real graph
FEAT = 16  # pixel feature channels


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name=name)


def make_text_graph(rng: np.random.Generator) -> onnx.ModelProto:
    """tokens int64 [N, 77] -> text_embeds float32 [N, 512], L2-normalized."""
    inits = [
        _init("vocab", np.array([VOCAB], dtype=np.int64)),
        _init("tok_emb", rng.standard_normal((VOCAB, 32)).astype(np.float32)),
        _init("proj", (rng.standard_normal((32, EMBED)) / np.sqrt(32)).astype(np.float32)),
        _init("axes1", np.array([1], dtype=np.int64)),
    ]
    nodes = [
        helper.make_node("Mod", [io_names.TEXT_TOKENS, "vocab"], ["ids"]),
        helper.make_node("Gather", ["tok_emb", "ids"], ["emb"], axis=0),  # [N, 77, 32]
        helper.make_node("ReduceMean", ["emb"], ["pooled"], axes=[1], keepdims=0),  # [N, 32]
        helper.make_node("MatMul", ["pooled", "proj"], ["feat"]),  # [N, 512]
        helper.make_node("ReduceL2", ["feat"], ["norm"], axes=[1], keepdims=1),  # [N, 1]
        helper.make_node("Div", ["feat", "norm"], [io_names.TEXT_EMBEDS]),
    ]
    graph = helper.make_graph(
        nodes,
        "standin_text",
        [helper.make_tensor_value_info(io_names.TEXT_TOKENS, TensorProto.INT64, [io_names.CLASSES, 77])],
        [helper.make_tensor_value_info(io_names.TEXT_EMBEDS, TensorProto.FLOAT, [io_names.CLASSES, EMBED])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def make_image_graph(rng: np.random.Generator) -> onnx.ModelProto:
    """images [B, 3, 384, 384] + text_embeds [N, 512] -> logits [B, N, 96, 96]."""
    mean = np.array([122.77, 116.75, 104.09], dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.array([68.50, 66.63, 70.32], dtype=np.float32).reshape(1, 3, 1, 1)
    inits = [
        _init("mean", mean),
        _init("std", std),
        _init("w1", (rng.standard_normal((8, 3, 4, 4)) / np.sqrt(48)).astype(np.float32)),
        _init("b1", (0.1 * rng.standard_normal(8)).astype(np.float32)),
        _init("w2", (rng.standard_normal((FEAT, 8, 4, 4)) / np.sqrt(128)).astype(np.float32)),
        _init("b2", (0.1 * rng.standard_normal(FEAT)).astype(np.float32)),
        _init("tproj", (rng.standard_normal((EMBED, FEAT)) * 4.0).astype(np.float32)),
        _init("flat_shape", np.array([0, FEAT, 576], dtype=np.int64)),
        _init("grid_shape", np.array([0, 0, 24, 24], dtype=np.int64)),
        _init("scales", np.array([1.0, 1.0, 4.0, 4.0], dtype=np.float32)),
    ]
    nodes = [
        helper.make_node("Sub", [io_names.IMAGES, "mean"], ["centered"]),
        helper.make_node("Div", ["centered", "std"], ["normed"]),
        helper.make_node("Conv", ["normed", "w1", "b1"], ["c1"], kernel_shape=[4, 4], strides=[4, 4]),  # [B, 8, 96, 96]
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], kernel_shape=[4, 4], strides=[4, 4]),  # [B, 16, 24, 24]
        helper.make_node("Reshape", ["c2", "flat_shape"], ["pix"]),  # [B, 16, 576]
        helper.make_node("MatMul", [io_names.TEXT_EMBEDS, "tproj"], ["tfeat"]),  # [N, 16]
        helper.make_node("MatMul", ["tfeat", "pix"], ["cost"]),  # [B, N, 576]
        helper.make_node("Reshape", ["cost", "grid_shape"], ["cost_grid"]),  # [B, N, 24, 24]
        helper.make_node("Resize", ["cost_grid", "", "scales"], [io_names.LOGITS], mode="linear"),  # [B, N, 96, 96]
    ]
    graph = helper.make_graph(
        nodes,
        "standin_image",
        [
            helper.make_tensor_value_info(io_names.IMAGES, TensorProto.FLOAT, [io_names.VIEWS, 3, 384, 384]),
            helper.make_tensor_value_info(io_names.TEXT_EMBEDS, TensorProto.FLOAT, [io_names.CLASSES, EMBED]),
        ],
        [helper.make_tensor_value_info(io_names.LOGITS, TensorProto.FLOAT, [io_names.VIEWS, io_names.CLASSES, 96, 96])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_standin_onnx_dir(directory: Path, seed: int = 0) -> Path:
    """Write both stand-in graphs and a manifest into ``directory`` and return it."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    onnx.save(make_text_graph(rng), directory / io_names.TEXT_GRAPH_FILE)
    onnx.save(make_image_graph(rng), directory / io_names.IMAGE_GRAPH_FILE)
    manifest = {"model_digest": f"standin-{seed}", "opset": OPSET, "demo_weights": True}
    (directory / io_names.MANIFEST_FILE).write_text(json.dumps(manifest))
    return directory


def standin_tokens(num_classes: int, seed: int = 0) -> np.ndarray:
    """Deterministic int64 tokens [N, 77] for the stand-in text graph."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, VOCAB, size=(num_classes, 77), dtype=np.int64)
