"""INT8 Q/DQ nodes written into an ONNX graph with onnx + numpy, the way TensorRT's explicit quantization reads them.

What is written (one rule for every graph of the model):
- a quantized layer is a Conv, ConvTranspose, MatMul or Gemm whose weight (input 1) is an
  initializer; ``quantized_layers`` lists them, less the names an ``exclude`` pattern matches;
- its activation input gets one per-tensor QuantizeLinear -> DequantizeLinear pair (scale
  ``amax / 127``, INT8 zero point 0: TensorRT takes only symmetric INT8), shared by every reader
  of that tensor, as ModelOpt's ONNX PTQ writes it;
- its weight keeps its FP32 values and gets a per-channel pair on the output-channel axis (Conv 0,
  ConvTranspose 1, MatMul ``[K, N]`` 1, Gemm 0 with ``transB=1`` else 1), scale
  ``max|w| / 127`` per channel; TensorRT quantizes the weights at build time;
- the graph goes to opset 19 (``upgrade_opset``), where DequantizeLinear takes FP16 scales
  (AutoCast of the Q/DQ model, the ``best`` precision, makes them FP16).

Layers are named by their weights, not by node or tensor names (``LayerKey``): a digest of the weight
in output-channel-major layout. ``paper_encoder.onnx`` / ``paper_head.onnx`` hold the same layers as
``image_graph.onnx`` under another module prefix (and some MatMuls lowered to Gemm with the weight
transposed), so activation ranges calibrated on the image graph, keyed this way, give the paper
graphs the same Q/DQ nodes (``quantized_layers(model, keys=...)``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from gsnet_deploy.errors import ExportError

if TYPE_CHECKING:
    import onnx

QUANTIZED_OP_TYPES = ("Conv", "ConvTranspose", "MatMul", "Gemm")
INT8_MAX = 127.0
QDQ_OPSET = 19  # DequantizeLinear-19 takes FP16 scales (the `best` model); ModelOpt writes 19 as well
# Reduce ops whose ``axes`` moved from an attribute to an input at opset 18 (ReduceSum moved at 13)
_REDUCE_AXES_INPUT_AT_18 = (
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceProd",
    "ReduceSumSquare",
)


@dataclass(frozen=True)
class QuantLayer:
    """One weighted layer that gets Q/DQ nodes."""

    node: str  # node name
    activation: str  # tensor quantized per tensor (input 0)
    weight: str  # initializer quantized per channel (input 1)
    axis: int  # output-channel axis of the weight
    key: str  # LayerKey: digest of the weight, output channels first (graph-agnostic)


def weight_axis(node: onnx.NodeProto, ndim: int) -> int | None:
    """Output-channel axis of ``node``'s weight (input 1) of rank ``ndim``, or None where not per-channel quantizable."""
    if node.op_type == "Conv" and ndim >= 3:
        return 0
    if node.op_type == "ConvTranspose" and ndim >= 3:
        return 1  # [C_in, C_out / group, k...]
    if node.op_type == "MatMul" and ndim == 2:
        return 1  # x @ W with W [K, N]
    if node.op_type == "Gemm" and ndim == 2:
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return None


def layer_key(weight: np.ndarray, axis: int) -> str:
    """Graph-agnostic name of a layer: a digest of its weight with the output channels first, and that shape.

    The same layer exported as ``MatMul(x, W)`` and as ``Gemm(x, W^T, transB=1)`` gets the same key.
    """
    canonical = np.ascontiguousarray(np.moveaxis(np.asarray(weight, dtype=np.float32), axis, 0))
    digest = hashlib.blake2b(canonical.tobytes(), digest_size=12)
    digest.update(repr(canonical.shape).encode())
    return digest.hexdigest()


def _initializer_arrays(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {init.name: init for init in model.graph.initializer}


def quantized_layers(
    model: onnx.ModelProto,
    *,
    exclude: Sequence[str] = (),
    keys: Collection[str] | None = None,
) -> list[QuantLayer]:
    """The layers of ``model`` that get Q/DQ nodes, in graph order.

    Args:
        model: an ONNX model with its weights loaded.
        exclude: anchored regexes (``re.match``) of node names kept in high precision.
        keys: where given, exactly the layers whose ``LayerKey`` is in ``keys`` (``exclude`` still
            applies): how a graph gets the layers that were calibrated on another graph.

    """
    from onnx import numpy_helper

    inits = _initializer_arrays(model)
    patterns = [re.compile(p) for p in exclude]
    layers: list[QuantLayer] = []
    for node in model.graph.node:
        if node.op_type not in QUANTIZED_OP_TYPES or len(node.input) < 2 or node.input[1] not in inits:
            continue
        if node.input[0] in inits or any(p.match(node.name) for p in patterns):
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        if weight.dtype != np.float32:
            continue
        axis = weight_axis(node, weight.ndim)
        if axis is None:
            continue
        key = layer_key(weight, axis)
        if keys is not None and key not in keys:
            continue
        layers.append(QuantLayer(node.name, node.input[0], node.input[1], axis, key))
    return layers


def weight_scales(weight: np.ndarray, axis: int) -> np.ndarray:
    """Per-channel symmetric INT8 scales ``max|w| / 127`` along ``axis`` (1.0 for an all-zero channel: exact anyway)."""
    other = tuple(i for i in range(weight.ndim) if i != axis)
    amax = np.abs(np.asarray(weight, dtype=np.float64)).max(axis=other)  # [C]
    return np.where(amax > 0.0, amax / INT8_MAX, 1.0).astype(np.float32)


def upgrade_opset(model: onnx.ModelProto, version: int = QDQ_OPSET) -> onnx.ModelProto:
    """Raise the default-domain opset of ``model`` to ``version`` (>= 17 graphs to 19), in place.

    Between opsets 17 and 19 only the Reduce ops (but ReduceSum) change what a node means: ``axes``
    moves from an attribute to an input (18); the attribute becomes an int64 initializer here. The other
    changes add optional inputs, attributes or types (Pad, Resize, Split, Cast to float8, ...).
    Unlike ``onnx.version_converter`` this never copies the model (the paper graph is 0.7 GB).

    Raises:
        ExportError: the model's opset is below 17 (another exporter: re-export with ``--opset 17``).

    """
    from onnx import numpy_helper

    current = next((o for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if current is None or current.version >= version:
        return model
    if current.version < 17:
        raise ExportError(f"The ONNX model has opset {current.version}; the Q/DQ writer needs 17 or newer (gsnet export onnx).")
    taken = {init.name for init in model.graph.initializer} | {o for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in _REDUCE_AXES_INPUT_AT_18:
            continue
        axes = next((a for a in node.attribute if a.name == "axes"), None)
        if axes is None:
            continue
        name = f"{node.name or node.output[0]}_axes"
        while name in taken:
            name += "_"
        taken.add(name)
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(list(axes.ints), dtype=np.int64), name))
        node.attribute.remove(axes)
        node.input.append(name)
    current.version = version
    return model


def insert_qdq(
    model: onnx.ModelProto,
    layers: Sequence[QuantLayer],
    activation_amax: Mapping[str, float],
) -> onnx.ModelProto:
    """Write the Q/DQ nodes of ``layers`` into ``model`` (in place) and raise it to opset 19.

    Args:
        model: the FP32 model, weights loaded.
        layers: from ``quantized_layers``.
        activation_amax: absolute maximum of each layer's activation input, by ``LayerKey``; a tensor
            read by several quantized layers takes the largest of theirs.

    Returns:
        ``model``.

    Raises:
        ExportError: a layer has no activation range.

    """
    from onnx import numpy_helper

    missing = sorted({layer.key for layer in layers} - set(activation_amax))
    if missing:
        node = next(layer.node for layer in layers if layer.key == missing[0])
        raise ExportError(f"No calibrated range for layer {node!r} ({len(missing)} missing); calibrate this model again.")
    graph = model.graph
    inits = _initializer_arrays(model)
    act_amax: dict[str, float] = {}
    weights: dict[str, int] = {}
    for layer in layers:
        act_amax[layer.activation] = max(act_amax.get(layer.activation, 0.0), float(activation_amax[layer.key]))
        if weights.setdefault(layer.weight, layer.axis) != layer.axis:
            raise ExportError(f"Weight {layer.weight!r} is read on two channel axes; it cannot be quantized per channel.")

    new_nodes: dict[str, list[onnx.NodeProto]] = {}  # tensor -> its Q, DQ (inserted after its producer)
    renamed: dict[str, str] = {}
    for tensor, amax in act_amax.items():
        if not np.isfinite(amax):
            raise ExportError(f"The calibrated range of {tensor!r} is not finite; check the FP32 model on the calibration views.")
        scale = amax / INT8_MAX if amax > 0.0 else 1.0  # an all-zero tensor: any positive scale is exact
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.asarray(scale, dtype=np.float32), f"{tensor}_scale"),
                numpy_helper.from_array(np.asarray(0, dtype=np.int8), f"{tensor}_zero_point"),
            ]
        )
        new_nodes[tensor] = _qdq_pair(tensor, axis=None)
        renamed[tensor] = f"{tensor}_DequantizeLinear_Output"
    weight_renamed: dict[str, str] = {}
    for name, axis in weights.items():
        value = numpy_helper.to_array(inits[name])
        scales = weight_scales(value, axis)  # [C]
        graph.initializer.extend(
            [
                numpy_helper.from_array(scales, f"{name}_scale"),
                numpy_helper.from_array(np.zeros(scales.shape, dtype=np.int8), f"{name}_zero_point"),
            ]
        )
        new_nodes[name] = _qdq_pair(name, axis=axis)
        weight_renamed[name] = f"{name}_DequantizeLinear_Output"

    quantized_nodes = {layer.node for layer in layers}
    rebuilt: list[onnx.NodeProto] = []
    for name in weights:  # weight Q/DQ first: their inputs are initializers
        rebuilt.extend(new_nodes[name])
    for tensor in (i.name for i in graph.input):
        rebuilt.extend(new_nodes.get(tensor, ()))
    for node in graph.node:
        for index, name in enumerate(node.input):
            # every reader of a quantized activation reads its DQ (ModelOpt's placement); a graph output keeps FP32
            if name in renamed:
                node.input[index] = renamed[name]
            elif name in weight_renamed and node.name in quantized_nodes and index == 1:
                node.input[index] = weight_renamed[name]
        rebuilt.append(node)
        for out in node.output:
            rebuilt.extend(new_nodes.get(out, ()))
    del graph.node[:]
    graph.node.extend(rebuilt)
    return upgrade_opset(model)


def _qdq_pair(tensor: str, *, axis: int | None) -> list[onnx.NodeProto]:
    """QuantizeLinear -> DequantizeLinear of ``tensor`` with its ``_scale`` / ``_zero_point`` initializers."""
    from onnx.helper import make_node

    extra: dict[str, Any] = {} if axis is None else {"axis": axis}
    scale, zero = f"{tensor}_scale", f"{tensor}_zero_point"
    return [
        make_node(
            "QuantizeLinear", [tensor, scale, zero], [f"{tensor}_QuantizeLinear_Output"], name=f"{tensor}_QuantizeLinear", **extra
        ),
        make_node(
            "DequantizeLinear",
            [f"{tensor}_QuantizeLinear_Output", scale, zero],
            [f"{tensor}_DequantizeLinear_Output"],
            name=f"{tensor}_DequantizeLinear",
            **extra,
        ),
    ]
