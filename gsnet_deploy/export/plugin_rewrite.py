"""Replace the exported QGFF cost-volume subgraph with one TensorRT plugin node.

``kernels.cost_volume_reference`` exports as: ``F.normalize`` of the text and of both feature
maps (ReduceL2 / Clip / Expand / Div), MatMul, Reshape, two Conv 1->128 7x7 with padding 3,
two Sigmoid, one Concat on channels. ``replace_cost_volume_with_plugin`` finds that region in a
larger graph and puts in its place a single node ``gsnet::fused_cost_volume`` (the namespace and
name under which ``kernels/trt_plugin.py`` registers the TensorRT plugin) with inputs
``(e_clip, e_dino, text, w_clip, b_clip, w_dino, b_dino)``. The node keeps the Concat's output
name; its second output is the kernel's fp32 scratch, which nothing consumes.

Matching is structural and local: it starts at the distinctive end (Concat of two
Sigmoid(Conv) with [128, 1, 7, 7] weights), walks back through reshapes to the MatMul, and
recognizes each ``F.normalize`` by its Div whose divisor chain (Expand, Clip) ends in a ReduceL2
of the Div's own numerator. It never walks above the three source tensors, so the size of the
backbones above them does not matter, and an unrelated graph is left alone. Nodes only the
region used are removed by ``graph.cleanup()``. The plugin node carries the attributes TensorRT's
ONNX parser needs (``plugin_node_attrs``); ``require_cost_volume_plugin`` fails when nothing matches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from gsnet_deploy.errors import EngineBuildError

PLUGIN_DOMAIN = "gsnet"
PLUGIN_OP = "fused_cost_volume"
PLUGIN_DOMAIN_VERSION = 1
SCRATCH_SUFFIX = "__cost_volume_scratch"
_SHAPE_OPS = frozenset({"Reshape", "Flatten", "Unsqueeze", "Squeeze", "Transpose", "Identity"})
_NORM_CHAIN_OPS = frozenset({"Expand", "Clip", "Max", "Cast", "Identity", "Reshape", "Unsqueeze"})
_NORM_CHAIN_MAX = 8  # nodes between the Div and its ReduceL2 (Expand, Clip as exported)
_WEIGHT_SHAPE = (128, 1, 7, 7)


@dataclass(frozen=True)
class _Branch:
    """One Conv/Sigmoid branch of the matched region (graphsurgeon objects)."""

    feature: Any  # gs.Variable, [B, 512, H, W]
    text: Any  # gs.Variable, [N, 512]
    weight: Any  # gs.Constant, [128, 1, 7, 7]
    bias: Any  # gs.Constant, [128]


def _producer(tensor: Any) -> Any | None:
    inputs = getattr(tensor, "inputs", [])
    return inputs[0] if len(inputs) == 1 else None


def _skip_shape_ops(tensor: Any) -> Any:
    """Follow data inputs back through reshapes/transposes."""
    node = _producer(tensor)
    while node is not None and node.op in _SHAPE_OPS and node.inputs:
        tensor = node.inputs[0]
        node = _producer(tensor)
    return tensor


def _l2_norm_source(divisor: Any) -> Any | None:
    """Tensor x when ``divisor`` is ``F.normalize``'s ``expand(clamp(||x||_2, eps))`` as exported, else None.

    Follows only the data input (input 0) of the ops that sit between the norm and the Div
    (Expand, Clip, Max, Cast, Identity and reshapes) down to ``ReduceL2(x)`` or
    ``Sqrt(ReduceSum(x * x))``: a walk of a handful of nodes whatever lies above x (on the
    paper-size graph x has the whole DINO or CLIP backbone above it).
    """
    tensor = divisor
    for _ in range(_NORM_CHAIN_MAX):
        node = _producer(tensor)
        if node is None or not node.inputs:
            return None
        if node.op == "ReduceL2":
            return node.inputs[0] if _attr(node, "keepdims", 1) == 1 else None
        if node.op == "Sqrt":
            reduce = _producer(node.inputs[0])
            if reduce is None or reduce.op != "ReduceSum" or _attr(reduce, "keepdims", 1) != 1:
                return None
            square = _producer(reduce.inputs[0])
            if square is not None and square.op == "Mul" and square.inputs[0] is square.inputs[1]:
                return square.inputs[0]
            return None
        if node.op not in _NORM_CHAIN_OPS:
            return None
        tensor = node.inputs[0]
    return None


def _normalized_source(tensor: Any) -> Any | None:
    """Tensor x when ``tensor`` is ``F.normalize(x)`` as exported (x / f(||x||)), else None."""
    node = _producer(_skip_shape_ops(tensor))
    if node is None or node.op != "Div" or len(node.inputs) != 2:
        return None
    source, divisor = node.inputs
    return source if _l2_norm_source(divisor) is source else None


def _attr(node: Any, name: str, default: Any) -> Any:
    value = node.attrs.get(name, default)
    return list(value) if isinstance(value, (list, tuple)) else value


def _match_branch(sigmoid_out: Any) -> _Branch | None:
    import onnx_graphsurgeon as gs  # type: ignore[import-untyped]

    sig = _producer(sigmoid_out)
    if sig is None or sig.op != "Sigmoid":
        return None
    conv = _producer(sig.inputs[0])
    if conv is None or conv.op != "Conv" or len(conv.inputs) != 3:
        return None
    _, weight, bias = conv.inputs
    if not (isinstance(weight, gs.Constant) and isinstance(bias, gs.Constant)):
        return None
    if tuple(weight.shape) != _WEIGHT_SHAPE or tuple(bias.shape) != (_WEIGHT_SHAPE[0],):
        return None
    if (
        _attr(conv, "pads", [0, 0, 0, 0]) != [3, 3, 3, 3]
        or _attr(conv, "strides", [1, 1]) != [1, 1]
        or _attr(conv, "dilations", [1, 1]) != [1, 1]
        or _attr(conv, "group", 1) != 1
    ):
        return None
    matmul = _producer(_skip_shape_ops(conv.inputs[0]))
    if matmul is None or matmul.op != "MatMul":
        return None
    text = _normalized_source(matmul.inputs[0])
    feature = _normalized_source(matmul.inputs[1])
    if text is None or feature is None:
        return None
    return _Branch(feature=feature, text=text, weight=weight, bias=bias)


def _find_region(graph: Any) -> tuple[Any, _Branch, _Branch] | None:
    for node in graph.nodes:
        if node.op != "Concat" or len(node.inputs) != 2 or _attr(node, "axis", None) not in (1, -3):
            continue
        clip = _match_branch(node.inputs[0])
        dino = _match_branch(node.inputs[1])
        if clip is None or dino is None or clip.text is not dino.text or clip.feature is dino.feature:
            continue
        return node, clip, dino
    return None


def plugin_node_attrs() -> dict[str, Any]:
    """Attributes of the plugin node that TensorRT's ONNX parser reads (and does not pass to the plugin).

    ``plugin_namespace``: the ONNX parser before TensorRT 10.10 looks the plugin up with the
    namespace from this attribute only (10.10 added the node's domain as a fallback), and
    ``export build --plugin`` supports 10.9, the first release with AOT plugins.
    ``aot``: the parser picks a Quickly Deployable Plugin's ahead-of-time implementation only when
    this is set; the plugin has no JIT implementation (``kernels/trt_plugin.py``).
    """
    return {"plugin_namespace": PLUGIN_DOMAIN, "aot": True}


def replace_cost_volume_with_plugin(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """Replace the cost-volume subgraph with one ``gsnet::fused_cost_volume`` node.

    Args:
        model: an ONNX model that contains ``cost_volume_reference`` as exported (e.g. the
            image graph); it is not modified.

    Returns:
        ``(rewritten model, True)``, or ``(model, False)`` unchanged when no region matches.
    """
    import onnx_graphsurgeon as gs  # type: ignore[import-untyped]

    graph = gs.import_onnx(model)
    found = _find_region(graph)
    if found is None:
        return model, False
    concat, clip, dino = found
    output = concat.outputs[0]
    scratch = gs.Variable(output.name + SCRATCH_SUFFIX, dtype=np.float32)
    concat.outputs.clear()
    graph.nodes.append(
        gs.Node(
            op=PLUGIN_OP,
            name=f"{PLUGIN_DOMAIN}_{PLUGIN_OP}",
            domain=PLUGIN_DOMAIN,
            attrs=plugin_node_attrs(),
            inputs=[clip.feature, dino.feature, clip.text, clip.weight, clip.bias, dino.weight, dino.bias],
            outputs=[output, scratch],
        )
    )
    graph.cleanup().toposort()
    new_model = gs.export_onnx(graph)
    if not any(op.domain == PLUGIN_DOMAIN for op in new_model.opset_import):
        new_model.opset_import.append(onnx.helper.make_opsetid(PLUGIN_DOMAIN, PLUGIN_DOMAIN_VERSION))
    new_model.ir_version = model.ir_version
    new_model.producer_name = model.producer_name
    new_model.producer_version = model.producer_version
    del new_model.metadata_props[:]
    new_model.metadata_props.extend(model.metadata_props)
    return new_model, True


def require_cost_volume_plugin(model: onnx.ModelProto, name: str = "the image graph") -> onnx.ModelProto:
    """``replace_cost_volume_with_plugin`` that fails when the QGFF front is not found.

    Raises:
        EngineBuildError: ``model`` has no cost-volume region of the plugin's shapes.
    """
    new_model, replaced = replace_cost_volume_with_plugin(model)
    if not replaced:
        raise EngineBuildError(
            f"--plugin: no QGFF cost volume (512-d features, 128-channel 7x7 convs) was found in {name}; "
            "export the paper-size model or build without --plugin."
        )
    return new_model
