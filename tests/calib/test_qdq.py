"""The Q/DQ writer (calib.qdq) on small hand-made graphs, against float64 / numpy references."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from gsnet_deploy.calib import qdq
from gsnet_deploy.errors import ExportError
from gsnet_deploy.runtime.ort_session import open_session


def _weighted_graph(rng: np.random.Generator) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x [1, 4, 6, 6] -> Conv -> ConvTranspose -> flatten -> MatMul -> Gemm(transB=1) -> y; opset 17."""
    w = {
        "conv_w": rng.normal(size=(8, 4, 3, 3)).astype(np.float32),  # [O, I, k, k]
        "convt_w": rng.normal(size=(8, 5, 2, 2)).astype(np.float32),  # [I, O, k, k]
        "mm_w": rng.normal(size=(5, 7)).astype(np.float32),  # [K, N]
        "gemm_w": rng.normal(size=(3, 7)).astype(np.float32),  # [N, K] with transB=1
    }
    w["conv_w"][2] = 0.0  # an all-zero output channel
    nodes = [
        helper.make_node("Conv", ["x", "conv_w"], ["c"], name="/enc/conv/Conv", pads=[1, 1, 1, 1]),
        helper.make_node("ConvTranspose", ["c", "convt_w"], ["t"], name="/enc/up/ConvTranspose", strides=[2, 2]),
        helper.make_node("Transpose", ["t"], ["tt"], name="/enc/Transpose", perm=[0, 2, 3, 1]),  # [1, 12, 12, 5]
        helper.make_node("MatMul", ["tt", "mm_w"], ["m"], name="/enc/fc/MatMul"),  # [1, 12, 12, 7]
        helper.make_node("Reshape", ["m", "shape"], ["m2"], name="/enc/Reshape"),  # [144, 7]
        helper.make_node("Gemm", ["m2", "gemm_w"], ["y"], name="/enc/head/Gemm", transB=1),  # [144, 3]
        helper.make_node("MatMul", ["m2", "m2t"], ["gram"], name="/enc/gram/MatMul"),  # two activations
        helper.make_node("Transpose", ["m2"], ["m2t"], name="/enc/T2", perm=[1, 0]),
    ]
    nodes = [*nodes[:6], nodes[7], nodes[6]]  # topological order
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()]
    inits.append(numpy_helper.from_array(np.array([-1, 7], np.int64), "shape"))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [144, 3]),
            helper.make_tensor_value_info("gram", TensorProto.FLOAT, [144, 144]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, w


def test_layers_axes_and_weight_scales_against_float64() -> None:
    """Bug caught: a per-channel axis on the input channels (MatMul axis 0, ConvTranspose 0, Gemm ignoring transB)."""
    model, w = _weighted_graph(np.random.default_rng(0))
    layers = qdq.quantized_layers(model)
    got = {layer.node: (layer.activation, layer.weight, layer.axis) for layer in layers}
    assert got == {
        "/enc/conv/Conv": ("x", "conv_w", 0),
        "/enc/up/ConvTranspose": ("c", "convt_w", 1),
        "/enc/fc/MatMul": ("tt", "mm_w", 1),
        "/enc/head/Gemm": ("m2", "gemm_w", 0),
    }  # the MatMul of two activations is not a weighted layer
    qdq.insert_qdq(model, layers, {layer.key: 2.0 for layer in layers})
    onnx.checker.check_model(model, full_check=True)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out_channel_max = {  # float64, by hand: the output channels of each layout
        "conv_w": np.abs(w["conv_w"].astype(np.float64)).max(axis=(1, 2, 3)),
        "convt_w": np.abs(w["convt_w"].astype(np.float64)).max(axis=(0, 2, 3)),
        "mm_w": np.abs(w["mm_w"].astype(np.float64)).max(axis=0),
        "gemm_w": np.abs(w["gemm_w"].astype(np.float64)).max(axis=1),
    }
    for name, amax in out_channel_max.items():
        expected = np.where(amax > 0, amax / 127.0, 1.0)
        np.testing.assert_allclose(inits[f"{name}_scale"], expected, rtol=1e-6)
        assert inits[f"{name}_zero_point"].dtype == np.int8 and not inits[f"{name}_zero_point"].any()
    for tensor in ("x", "c", "tt", "m2"):
        assert inits[f"{tensor}_scale"] == pytest.approx(2.0 / 127.0) and inits[f"{tensor}_zero_point"].dtype == np.int8
    assert next(o.version for o in model.opset_import if o.domain == "") == qdq.QDQ_OPSET


def test_qdq_model_computes_the_numpy_fake_quantized_layer() -> None:
    """Bug caught: a reader that skips the DQ (FP32 runs on), a weight read through the wrong axis, a wrong scale."""
    rng = np.random.default_rng(1)
    model, w = _weighted_graph(rng)
    x = rng.uniform(-3, 3, size=(1, 4, 6, 6)).astype(np.float32)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_tensor_value_info("m2", TensorProto.FLOAT, [144, 7]))
    m2 = open_session(probe.SerializeToString()).run(["m2"], {"x": x})[0].astype(np.float64)  # FP32 input of the Gemm
    layers = qdq.quantized_layers(model, exclude=[r"/enc/(conv|up|fc)/.*"])  # only the Gemm
    assert [layer.node for layer in layers] == ["/enc/head/Gemm"]
    amax = 0.8 * float(np.abs(m2).max())  # clips the largest values too
    qdq.insert_qdq(model, layers, {layers[0].key: amax})

    def fake_quant(v: np.ndarray, scale: np.ndarray | float) -> np.ndarray:
        return np.clip(np.round(v / scale), -128, 127) * scale  # round half to even, as QuantizeLinear

    gemm = w["gemm_w"].astype(np.float64)  # [N, K]
    expected = fake_quant(m2, amax / 127.0) @ fake_quant(gemm, np.abs(gemm).max(axis=1, keepdims=True) / 127.0).T
    y = open_session(model.SerializeToString()).run(["y"], {"x": x})[0]
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


def test_layer_key_names_a_layer_whatever_its_layout() -> None:
    """Bug caught: keys from raw bytes, so MatMul(x, W) and Gemm(x, W^T, transB=1) of one layer would not match."""
    w = np.random.default_rng(2).normal(size=(6, 4)).astype(np.float32)  # [K, N]
    assert qdq.layer_key(w, 1) == qdq.layer_key(np.ascontiguousarray(w.T), 0)
    assert qdq.layer_key(w, 1) != qdq.layer_key(w, 0)  # another channel axis is another layer
    assert qdq.layer_key(w, 1) != qdq.layer_key(w * 1.001, 1)


def test_paper_style_graph_gets_the_calibrated_layers_by_key() -> None:
    """Bug caught: placement by node name, which misses the same layers under another module prefix and layout."""
    rng = np.random.default_rng(3)
    image, _ = _weighted_graph(rng)
    layers = qdq.quantized_layers(image, exclude=[r"/enc/head/.*"])
    ranges = {layer.key: 1.0 + i for i, layer in enumerate(layers)}
    paper = onnx.ModelProto()
    paper.CopyFrom(image)
    for node in paper.graph.node:
        node.name = node.name.replace("/enc/", "/encoder/enc/")
    for init in paper.graph.initializer:
        init.name = "encoder." + init.name
    for node in paper.graph.node:
        node.input[:] = ["encoder." + i if i in {"conv_w", "convt_w", "mm_w", "gemm_w", "shape"} else i for i in node.input]
    mm = next(n for n in paper.graph.node if n.op_type == "MatMul" and n.input[1] == "encoder.mm_w")
    mm.op_type = "Gemm"  # the paper exporter's layout: the weight transposed, transB=1
    init = next(i for i in paper.graph.initializer if i.name == "encoder.mm_w")
    init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(init).T), init.name))
    mm.attribute.append(helper.make_attribute("transB", 1))
    mm.input[0] = "m2"  # (the graph is not run: only which layers and ranges it gets)
    got = qdq.quantized_layers(paper, keys=set(ranges))
    assert sorted(layer.node for layer in got) == [
        "/encoder/enc/conv/Conv",
        "/encoder/enc/fc/MatMul",
        "/encoder/enc/up/ConvTranspose",
    ]
    assert {layer.key for layer in got} == set(ranges)  # the excluded head is not calibrated, so not quantized


def test_insert_qdq_refuses_a_layer_without_a_range() -> None:
    model, _ = _weighted_graph(np.random.default_rng(4))
    layers = qdq.quantized_layers(model)
    with pytest.raises(ExportError, match="No calibrated range"):
        qdq.insert_qdq(model, layers, {layers[0].key: 1.0})


def test_upgrade_opset_keeps_reduce_semantics() -> None:
    """Bug caught: raising the opset number without moving ``axes`` to an input (ReduceL2 would reduce every axis)."""
    x = np.random.default_rng(5).normal(size=(2, 3, 4)).astype(np.float32)
    node = helper.make_node("ReduceL2", ["x"], ["y"], name="r", axes=[1], keepdims=1)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    qdq.upgrade_opset(model)
    onnx.checker.check_model(model, full_check=True)
    y = open_session(model.SerializeToString()).run(["y"], {"x": x})[0]
    np.testing.assert_allclose(y, np.sqrt((x.astype(np.float64) ** 2).sum(axis=1, keepdims=True)), rtol=1e-5)
