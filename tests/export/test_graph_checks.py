"""Graph checks: the exported tiny graphs pass them, and hand-made bad graphs fail each one."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from gsnet_deploy.contracts import io_names
from gsnet_deploy.errors import ExportError
from gsnet_deploy.export.graph_checks import (
    check_forbidden_ops,
    check_graph,
    check_io,
    check_no_constant_resize,
    check_onnx_checker,
    check_opset,
    check_supported_ops,
    check_symbolic_dims,
)

TRT_OPS_FILE = Path(__file__).resolve().parents[1] / "data" / "trt_onnx_ops.json"

pytest.importorskip("onnxruntime")


def _model(nodes, inputs, outputs, inits=(), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _relu_model(opset=17, dims=("B", 4)) -> onnx.ModelProto:
    return _model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(dims))],
        opset=opset,
    )


def test_trt_op_list_records_its_source():
    data = json.loads(TRT_OPS_FILE.read_text())
    source = data["source"]
    assert source["repository"] == "https://github.com/onnx/onnx-tensorrt"
    assert source["path"] == "docs/operators.md"
    assert re.fullmatch(r"[0-9a-f]{40}", source["commit"])
    assert source["tensorrt_version"].startswith("10.")
    ops = data["operators"]
    # spot checks against the page: supported, and listed as not supported
    assert ops["Conv"]["supported"] and ops["LayerNormalization"]["supported"] and ops["InstanceNormalization"]["supported"]
    assert not ops["Unique"]["supported"]
    assert not ops["Col2Im"]["supported"] and not ops["STFT"]["supported"]
    assert len(ops) > 150


@pytest.mark.parametrize(
    ("file_name", "inputs", "outputs", "axes"),
    [
        ("text_encoder.onnx", io_names.TEXT_INPUTS, io_names.TEXT_OUTPUTS, io_names.TEXT_DYNAMIC_AXES),
        ("image_graph.onnx", io_names.IMAGE_INPUTS, io_names.IMAGE_OUTPUTS, io_names.IMAGE_DYNAMIC_AXES),
    ],
)
def test_exported_graphs_pass_every_check(tiny_onnx_dir, trt_supported_ops, file_name, inputs, outputs, axes):
    path = tiny_onnx_dir / file_name
    model = onnx.load(str(path))
    report = check_graph(
        model, name=file_name, inputs=inputs, outputs=outputs, dynamic_axes=axes,
        supported_ops=trt_supported_ops, checker_path=path,
    )  # fmt: skip
    assert report.opset >= 17
    assert set(report.op_types) <= trt_supported_ops
    assert not {"Einsum", "Loop", "If", "Resize"} & set(report.op_types)


def test_image_graph_keeps_products_of_b_and_n_only(tiny_onnx_dir):
    # the symbolic check accepts B*N expressions but nothing else: prove it saw B*N in this graph
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = onnx.load(str(tiny_onnx_dir / "image_graph.onnx"))
    inferred = SymbolicShapeInference.infer_shapes(model)
    params = {d.dim_param for vi in inferred.graph.value_info for d in vi.type.tensor_type.shape.dim if d.dim_param}
    assert "B*N" in params
    assert all(set(re.findall(r"[A-Za-z_]\w*", p)) <= {"B", "N"} for p in params), params


def test_check_opset_flags_old_opset():
    assert check_opset(_relu_model(opset=17)) == []
    assert check_opset(_relu_model(opset=16)) == ["opset 16 is older than 17"]
    with pytest.raises(ExportError, match="opset 16 is older than 17"):
        check_graph(
            _relu_model(opset=16), name="m.onnx", inputs=["x"], outputs=["y"], dynamic_axes={"x": {0: "B"}, "y": {0: "B"}}
        )


def test_check_forbidden_ops_finds_einsum_and_subgraph_ops():
    einsum = _model(
        [helper.make_node("Einsum", ["a", "b"], ["c"], equation="ij,jk->ik", name="mix")],
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 3]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [3, 4]),
        ],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2, 4])],
    )
    assert check_forbidden_ops(einsum) == ["forbidden ops: Einsum (mix)"]
    branch = helper.make_graph(
        [helper.make_node("Einsum", ["a", "a"], ["z"], equation="ij,ij->ij", name="inner")], "branch", [],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3])],
    )  # fmt: skip
    cond = _model(
        [helper.make_node("If", ["c"], ["out"], then_branch=branch, else_branch=branch, name="choose")],
        [helper.make_tensor_value_info("c", TensorProto.BOOL, []), helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 3])],
    )
    assert check_forbidden_ops(cond) == ["forbidden ops: Einsum (inner), If (choose)"]
    with pytest.raises(ExportError, match=r"forbidden ops: Einsum \(mix\)"):
        check_graph(einsum, name="m.onnx", inputs=["a", "b"], outputs=["c"], dynamic_axes={})


def test_check_no_constant_resize_flags_a_resized_table_only():
    table = numpy_helper.from_array(np.zeros((1, 8, 14, 14), np.float32), "pos_table")
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    nodes = [
        helper.make_node("Resize", ["pos_table", "", "scales"], ["pos"], mode="cubic", name="pos_resize"),
        helper.make_node("Add", ["x", "pos"], ["y"]),
        helper.make_node("Resize", ["y", "", "scales"], ["z"], mode="linear", name="feature_resize"),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 8, 28, 28])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["B", 8, 56, 56])],
        inits=[table, scales],
    )
    assert check_no_constant_resize(model) == ["run-time interpolation of constants: Resize (pos_resize)"]


def test_check_symbolic_dims_accepts_products_and_rejects_other_symbols():
    shape = numpy_helper.from_array(np.array([-1, 4], np.int64), "shape")
    flat = _model(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits=[shape],
    )
    assert check_symbolic_dims(flat, {"B", "N"}) == []  # y is [B*N, 4]
    assert check_symbolic_dims(flat, {"B"}) == ["dims other than ['B'] and integers: y: B*N"]
    data_dependent = _model(
        [helper.make_node("NonZero", ["x"], ["idx"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4])],
        [helper.make_tensor_value_info("idx", TensorProto.INT64, None)],
    )
    problems = check_symbolic_dims(data_dependent, {"B"})
    assert len(problems) == 1 and problems[0].startswith("dims other than ['B'] and integers: idx:")


def test_check_onnx_checker_reports_invalid_graph():
    assert check_onnx_checker(_relu_model()) == []
    bad = _model(
        [helper.make_node("Relu", ["x", "x"], ["y"])],  # Relu takes one input
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    problems = check_onnx_checker(bad)
    assert len(problems) == 1 and problems[0].startswith("onnx.checker failed:")


def test_check_supported_ops_uses_the_trt_list(trt_supported_ops):
    unique = _model(
        [helper.make_node("Unique", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    assert check_supported_ops(unique, trt_supported_ops) == ["ops outside the support list: Unique"]
    assert check_supported_ops(_relu_model(), trt_supported_ops) == []


def test_check_io_wants_exact_names_and_symbols():
    model = _relu_model(dims=("B", 4))
    assert check_io(model, ["x"], ["y"], {"x": {0: "B"}, "y": {0: "B"}}) == []
    assert check_io(model, ["images"], ["y"], {"y": {0: "B"}}) == ["inputs are ['x'], expected ['images']"]
    assert check_io(model, ["x"], ["y"], {"x": {0: "N"}, "y": {0: "B"}}) == ["x axis 0 is 'B', expected symbol 'N'"]
    assert check_io(model, ["x"], ["y"], {"x": {0: "B"}}) == ["y axis 0 is 'B', expected a number"]
