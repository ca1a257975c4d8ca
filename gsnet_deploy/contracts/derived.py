"""Derived ONNX models (FP16, INT8 Q/DQ, Q/DQ made FP16): their file names and ``.json`` sidecars.

``gsnet calib`` and ``gsnet export build`` write models derived from an exported ONNX folder
beside the engines (``image_graph.int8.onnx``, ``text_encoder.fp16.onnx``, ...). Each gets a
sidecar ``<model>.json`` that records the model digest it was made from, so a later build reuses it
only for the same weights. Torch-free and onnx-free: names and small JSON records only.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gsnet_deploy.contracts import io_names
from gsnet_deploy.contracts.atomic import write_json_atomic
from gsnet_deploy.contracts.engine_manifest import Graph
from gsnet_deploy.errors import ExportError

SIDECAR_SUFFIX = ".json"  # image_graph.int8.onnx.json records what the Q/DQ model was made from


class OnnxVariant(enum.Enum):
    """Which ONNX model an engine is parsed from; the value is the file-name infix."""

    FP32 = ""  # the exported model itself
    FP16 = "fp16"  # AutoCast of the FP32 model
    INT8 = "int8"  # Q/DQ, FP32 elsewhere (calib.quantize)
    INT8_FP16 = "int8.fp16"  # AutoCast of the Q/DQ model

    def file_name(self, graph: Graph) -> str:
        """File name of this variant of ``graph``'s ONNX model."""
        return graph.onnx_file if self is OnnxVariant.FP32 else f"{graph.value}.{self.value}.onnx"


INT8_FILE = OnnxVariant.INT8.file_name(Graph.IMAGE)  # "image_graph.int8.onnx", from `gsnet calib`
# paper_encoder.int8.onnx, paper_head.int8.onnx: Q/DQ with the image graph's ranges (calib.quantize.quantize_paper_graphs)
INT8_PAPER_FILES = {graph: OnnxVariant.INT8.file_name(graph) for graph in (Graph.PAPER_ENCODER, Graph.PAPER_HEAD)}


def sidecar_path(model_path: Path) -> Path:
    """Path of the ``.json`` record that belongs to a derived model."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + SIDECAR_SUFFIX)


def write_sidecar(model_path: Path, payload: Mapping[str, Any]) -> Path:
    """Write the ``.json`` record of a derived model atomically; returns its path."""
    return write_json_atomic(sidecar_path(model_path), dict(payload))


def read_sidecar(model_path: Path) -> Mapping[str, Any] | None:
    """The JSON record written beside a derived ONNX model, or None where absent or unreadable."""
    try:
        payload = json.loads(sidecar_path(model_path).read_text())
    except (OSError, ValueError):
        return None
    return payload if isinstance(payload, dict) else None


def read_model_digest(onnx_dir: Path) -> str:
    """The ``model_digest`` of an ONNX folder's manifest.

    Raises:
        ExportError: the manifest is missing or has no digest.

    """
    path = Path(onnx_dir) / io_names.MANIFEST_FILE
    try:
        payload: Any = json.loads(path.read_text())
        return str(payload["model_digest"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ExportError(
            f"ONNX folder manifest {path} is missing or has no model_digest ({err}); re-run `gsnet export onnx`."
        ) from err
