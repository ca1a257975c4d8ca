"""Replace the exported QGFF cost-volume subgraph with one TensorRT plugin node.

``kernels.cost_volume_reference`` exports as: ``F.normalize`` of the text and of both feature
maps (ReduceL2 / Clip / Expand / Div), MatMul, Reshape, two Conv 1->128 7x7 with padding 3,
two Sigmoid, one Concat on channels. ``replace_cost_volume_with_plugin`` finds that region in a
larger graph and puts in its place a single node ``gsnet::fused_cost_volume`` (the namespace and
name under which ``kernels/trt_plugin.py`` registers the TensorRT plugin) with inputs
``(e_clip, e_dino, text, w_clip, b_clip, w_dino, b_dino)``. The node keeps the Concat's output
name; its second output is the kernel's fp32 scratch, which nothing consumes.

Matching starts at the distinctive end (Concat of two Sigmoid(Conv) with [128, 1, 7, 7]
weights) and walks back to the three source tensors, checking each step, so an unrelated
graph is left alone. Nodes only the region used are removed by ``graph.cleanup()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

PLUGIN_DOMAIN = "gsnet"
PLUGIN_OP = "fused_cost_volume"
PLUGIN_DOMAIN_VERSION = 1
SCRATCH_SUFFIX = "__cost_volume_scratch"
_SHAPE_OPS = frozenset({"Reshape", "Flatten", "Unsqueeze", "Squeeze", "Transpose", "Identity"})
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


def _depends_only_on(tensor: Any, source: Any, budget: int = 64) -> bool:
    """Whether every non-constant leaf above ``tensor`` is ``source`` (bounded walk)."""
    import onnx_graphsurgeon as gs  # type: ignore[import-untyped]

    stack, seen = [tensor], set()
    while stack:
        t = stack.pop()
        if t is source or isinstance(t, gs.Constant) or id(t) in seen or t.name == "":
            continue
        seen.add(id(t))
        if len(seen) > budget:
            return False
        node = _producer(t)
        if node is None:
            return False  # a graph input or initializer-free leaf other than the source
        stack.extend(node.inputs)
    return True


def _normalized_source(tensor: Any) -> Any | None:
    """Tensor x when ``tensor`` is ``F.normalize(x)`` as exported (x / f(x)), else None."""
    node = _producer(_skip_shape_ops(tensor))
    if node is None or node.op != "Div" or len(node.inputs) != 2:
        return None
    source, divisor = node.inputs
    if not any(n.op == "ReduceL2" for n in _ancestors(divisor)):
        return None
    return source if _depends_only_on(divisor, source) else None


def _ancestors(tensor: Any, limit: int = 32) -> list[Any]:
    out: list[Any] = []
    stack = [tensor]
    while stack and len(out) < limit:
        node = _producer(stack.pop())
        if node is not None and node not in out:
            out.append(node)
            stack.extend(node.inputs)
    return out


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
        if node.op != "Concat" or len(node.inputs) != 2 or _attr(node, "axis", None) != 1:
            continue
        clip = _match_branch(node.inputs[0])
        dino = _match_branch(node.inputs[1])
        if clip is None or dino is None or clip.text is not dino.text or clip.feature is dino.feature:
            continue
        return node, clip, dino
    return None


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
