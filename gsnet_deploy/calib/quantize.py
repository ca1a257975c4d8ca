"""INT8 Q/DQ model of the image graph by ModelOpt ONNX post-training quantization, on the CPU.

Explicit quantization only: ``modelopt.onnx.quantization.quantize`` (NVIDIA TensorRT Model
Optimizer, Apache-2.0) calibrates activation ranges with ONNX Runtime's CPU provider and writes
QuantizeLinear / DequantizeLinear pairs into the graph; TensorRT then runs INT8 exactly where the
Q/DQ nodes say. TensorRT's implicit calibrator (deprecated in 10.1, removed in 11) is never used.
The rest of the graph keeps FP32 (``high_precision_dtype="fp32"``); the ``best`` precision derives
FP16 elsewhere from this model with AutoCast (``export.build``), so one calibration serves both.

Placement (``qdq_placement``): only the weighted layers are quantized (Conv, ConvTranspose, and
MatMul / Gemm with a weight initializer). Left in high precision: every MatMul of two activations
(softmax attention, QGFF's cosine cost volumes, the class transformer's linear attention, whose
``elu+1`` sums reach thousands), the whole QGFF, the class transformer (its padded class axis mixes
all classes), the text projection, and the 32->1 head conv that writes the logits. With ModelOpt's
default placement (Add, Mul, LayerNorm, Slice inputs quantized too) the tiny config's logits drift
about 0.12 relative L2 from FP32; with this placement about 0.04 (see the closing notes of the
TensorRT issue).
"""

from __future__ import annotations

import enum
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from gsnet_deploy import io_names
from gsnet_deploy.errors import ExportError
from gsnet_deploy.export.fp16 import modelopt_without_stub_tensorrt
from gsnet_deploy.export.manifest import write_json_atomic
from gsnet_deploy.runtime.protocol import NUM_VIEWS

INT8_FILE = "image_graph.int8.onnx"
SIDECAR_SUFFIX = ".json"  # image_graph.int8.onnx.json records what the Q/DQ model was made from


class CalibMethod(enum.Enum):
    """How activation ranges are chosen from the calibration data (ModelOpt's int8 methods)."""

    ENTROPY = "entropy"  # KL-divergence-optimal clipping (TensorRT's classic entropy calibration)
    MAX = "max"  # absolute maximum, no clipping


QUANTIZED_OP_TYPES = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# anchored regexes of node names kept in high precision (ModelOpt matches them with re.match)
SENSITIVE_NODES = (
    r"/qgff/.*",  # cosine cost volumes and their 7x7 convs: small differences decide the class
    r".*/class_attn/.*",  # linear attention over the padded class axis
    r"/text_proj/.*",  # text guidance for every class
    r"/decoder/head/.*",  # the 32->1 conv that writes the logits
)


def qdq_placement(model_path: Path) -> tuple[list[str], list[str]]:
    """Op types to quantize and node-name patterns to exclude for the image graph at ``model_path``.

    Returns:
        ``(op_types_to_quantize, nodes_to_exclude)`` for ``modelopt.onnx.quantization.quantize``:
        ``QUANTIZED_OP_TYPES``, and ``SENSITIVE_NODES`` plus the names of the MatMuls whose two
        inputs are both activations (no weight initializer).

    """
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    weights = {init.name for init in model.graph.initializer}
    weights |= {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    activation_matmuls = [
        node.name for node in model.graph.node if node.op_type == "MatMul" and not weights.intersection(node.input[:2])
    ]
    return list(QUANTIZED_OP_TYPES), [*SENSITIVE_NODES, *(re.escape(n) + "$" for n in activation_matmuls)]


class _FeedReader:
    """ONNX Runtime ``CalibrationDataReader`` over fixed feed dicts (ModelOpt also calls ``get_first``)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds = feeds
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self._feeds):
            return None
        self._next += 1
        return self._feeds[self._next - 1]

    def get_first(self) -> dict[str, np.ndarray]:
        return self._feeds[0]

    def rewind(self) -> None:
        self._next = 0

    def __len__(self) -> int:
        return len(self._feeds)


def image_graph_feeds(views: np.ndarray, text_embeds: np.ndarray, batch: int = NUM_VIEWS) -> list[dict[str, np.ndarray]]:
    """Split calibration views into image-graph feeds of ``batch`` views, each with all text embeddings.

    Args:
        views: float32 ``[V, 3, 384, 384]``.
        text_embeds: float32 ``[N, 512]``; every feed gets all N classes because the class axis is
            not independent (the class transformer attends over it).
        batch: views per feed (5: one image's paper views).

    Raises:
        ExportError: empty or mis-shaped inputs.

    """
    if views.ndim != 4 or views.shape[0] == 0:
        raise ExportError(f"Calibration views must be a non-empty [V, 3, H, W] array, got shape {views.shape}.")
    if text_embeds.ndim != 2 or text_embeds.shape[0] == 0:
        raise ExportError(f"Calibration text embeddings must be a non-empty [N, D] array, got shape {text_embeds.shape}.")
    embeds = np.ascontiguousarray(text_embeds, dtype=np.float32)
    return [
        {
            io_names.IMAGES: np.ascontiguousarray(views[i : i + batch], dtype=np.float32),
            io_names.TEXT_EMBEDS: embeds,
        }
        for i in range(0, views.shape[0], batch)
    ]


def reference_text_embeds(onnx_dir: Path, tokens: np.ndarray) -> np.ndarray:
    """Run the FP32 text graph on ONNX Runtime CPU: tokens ``int64 [N, 77]`` -> ``float32 [N, 512]``."""
    import onnxruntime as ort

    path = Path(onnx_dir) / io_names.TEXT_GRAPH_FILE
    if not path.is_file():
        raise ExportError(f"Text graph {path} does not exist; run `gsnet export onnx --out {onnx_dir}` first.")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (embeds,) = session.run([io_names.TEXT_EMBEDS], {io_names.TEXT_TOKENS: np.asarray(tokens, dtype=np.int64)})
    return np.asarray(embeds, dtype=np.float32)


def read_model_digest(onnx_dir: Path) -> str:
    """The ``model_digest`` of an ONNX folder's manifest.

    Raises:
        ExportError: the manifest is missing or has no digest.

    """
    import json

    path = Path(onnx_dir) / io_names.MANIFEST_FILE
    try:
        payload: Any = json.loads(path.read_text())
        return str(payload["model_digest"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ExportError(
            f"ONNX folder manifest {path} is missing or has no model_digest ({err}); re-run `gsnet export onnx`."
        ) from err


def read_sidecar(model_path: Path) -> Mapping[str, Any] | None:
    """The JSON record written beside a derived ONNX model, or None where absent or unreadable."""
    import json

    path = Path(model_path).with_name(Path(model_path).name + SIDECAR_SUFFIX)
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return payload if isinstance(payload, dict) else None


def quantize_image_graph(
    onnx_dir: Path,
    out_dir: Path,
    views: np.ndarray,
    *,
    text_embeds: np.ndarray,
    method: CalibMethod = CalibMethod.ENTROPY,
    calibration_note: str = "",
) -> Path:
    """Write ``out_dir/image_graph.int8.onnx``: the image graph with INT8 Q/DQ nodes, calibrated on ``views``.

    Args:
        onnx_dir: folder with the FP32 ``image_graph.onnx`` and its ``manifest.json``.
        out_dir: where the Q/DQ model (and its ``.json`` record) are written, atomically.
        views: float32 ``[V, 3, 384, 384]`` calibration views (``calibration_views``).
        text_embeds: float32 ``[N, 512]`` text embeddings fed with every batch of views (from the text
            graph, e.g. ``reference_text_embeds``).
        method: activation range method.
        calibration_note: where the views came from, recorded in the ``.json`` record.

    Returns:
        Path of the Q/DQ model.

    Raises:
        ExportError: the FP32 model is missing or quantization failed.

    """
    from modelopt.onnx.quantization import quantize

    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    src = onnx_dir / io_names.IMAGE_GRAPH_FILE
    if not src.is_file():
        raise ExportError(f"Image graph {src} does not exist; run `gsnet export onnx --out {onnx_dir}` first.")
    digest = read_model_digest(onnx_dir)
    feeds = image_graph_feeds(views, text_embeds)
    op_types, excluded = qdq_placement(src)
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / INT8_FILE
    with tempfile.TemporaryDirectory(prefix=".quantize.", dir=out_dir) as tmp:
        tmp_out = Path(tmp) / INT8_FILE
        try:
            with modelopt_without_stub_tensorrt():
                quantize(
                    onnx_path=str(src),
                    quantize_mode="int8",
                    calibration_data_reader=_FeedReader(feeds),
                    calibration_method=method.value,
                    calibration_eps=["cpu"],
                    high_precision_dtype="fp32",
                    op_types_to_quantize=op_types,
                    nodes_to_exclude=excluded,
                    output_path=str(tmp_out),
                    log_level="WARNING",
                )
        except (ValueError, RuntimeError, AssertionError) as err:
            raise ExportError(f"ModelOpt INT8 quantization of {src} failed ({err}); check the ONNX model.") from err
        if not tmp_out.is_file():
            raise ExportError(f"ModelOpt wrote no quantized model for {src}; check the log above.")
        os.replace(tmp_out, dst)
    write_json_atomic(
        dst.with_name(dst.name + SIDECAR_SUFFIX),
        {
            "model_digest": digest,
            "calibration_method": method.value,
            "num_views": int(views.shape[0]),
            "num_classes": int(text_embeds.shape[0]),
            "calibration_note": calibration_note,
            "quantized_op_types": op_types,
            "excluded_nodes": list(SENSITIVE_NODES),
        },
    )
    return dst
