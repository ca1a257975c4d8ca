"""The ONNX model folder of ``gsnet export onnx``: its manifest, and the checks made on opening it.

A folder holds ``text_encoder.onnx``, ``image_graph.onnx`` and ``manifest.json``. The manifest
(model digest, prompt template, normalization, view and logit sizes, protocol, opset, tool
versions, embedding width, class-transformer pooling) is also stored in each graph's
``metadata_props``, together with the graph's role, so a graph copied out of its folder still
says what it is. Manifests written before the pooling field read as pooling None (unknown).

This module is torch-free and onnx-free: the runtime imports it on hosts that only have numpy and
ONNX Runtime or TensorRT. ``metadata_props`` are read by walking the top-level fields of the
ONNX protobuf (wire format: https://protobuf.dev/programming-guides/encoding/), skipping the
graph and its weights without reading them into memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from gsnet_deploy.contracts import io_names
from gsnet_deploy.errors import ExportError

MANIFEST_SCHEMA = 1  # of manifest.json; the engine manifests have their own (engine_manifest.MANIFEST_SCHEMA)
PAPER_PROTOCOL = "paper-sliding-window"
METADATA_MANIFEST_KEY = "gsnet_deploy.manifest"  # JSON of the manifest, on both graphs
METADATA_GRAPH_KEY = "gsnet_deploy.graph"  # which graph this file is: "text_encoder" or "image_graph"
METADATA_DIGEST_KEY = "gsnet_deploy.model_digest"  # the digest alone, readable in Netron

TEXT_ROLE = io_names.TEXT_GRAPH_FILE.removesuffix(".onnx")  # "text_encoder", also engine_manifest.Graph.TEXT
IMAGE_ROLE = io_names.IMAGE_GRAPH_FILE.removesuffix(".onnx")  # "image_graph"
PAPER_ENCODER_ROLE = io_names.PAPER_ENCODER_FILE.removesuffix(".onnx")  # "paper_encoder"
PAPER_HEAD_ROLE = io_names.PAPER_HEAD_FILE.removesuffix(".onnx")  # "paper_head"

_METADATA_PROPS_FIELD = 14  # ModelProto.metadata_props (repeated StringStringEntryProto)
_WIRE_VARINT, _WIRE_I64, _WIRE_LEN, _WIRE_I32 = 0, 1, 2, 5


@dataclass(frozen=True)
class OnnxManifest:
    """What an exported ONNX folder was made from and how to feed it.

    Attributes:
        model_digest: digest of the weights (checkpoint hash or demo seed); keys the text cache.
        template: prompt template the text embeddings are made with.
        mean: per-channel RGB mean the image graph subtracts (0..255 scale).
        std: per-channel RGB std the image graph divides by.
        view_size: side of one input view (384).
        logit_size: side of the logits (96).
        embed_dim: width of the text embeddings (512).
        protocol: evaluation protocol the graphs are meant for ("paper-sliding-window").
        opset: ONNX opset of both graphs.
        tool_versions: versions of torch, onnx, onnxslim and gsnet-deploy used for the export.
        pooling: class-transformer pooling the graphs compute (1: the paper's evaluation, 2: training);
            None in folders exported before the manifest recorded it (unknown).
        schema: manifest schema version.
    """

    model_digest: str
    template: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    view_size: int
    logit_size: int
    embed_dim: int
    protocol: str
    opset: int
    tool_versions: Mapping[str, str] = field(default_factory=dict)
    pooling: int | None = None
    schema: int = MANIFEST_SCHEMA

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict; ``model_digest`` is a top-level key (other tools read only that); no ``pooling`` when unknown."""
        payload: dict[str, Any] = {
            "schema": self.schema,
            "model_digest": self.model_digest,
            "template": self.template,
            "mean": list(self.mean),
            "std": list(self.std),
            "view_size": self.view_size,
            "logit_size": self.logit_size,
            "embed_dim": self.embed_dim,
            "protocol": self.protocol,
            "opset": self.opset,
            "tool_versions": dict(sorted(self.tool_versions.items())),
        }
        if self.pooling is not None:
            payload["pooling"] = self.pooling
        return payload

    @classmethod
    def from_json(cls, payload: Mapping[str, Any]) -> OnnxManifest:
        """Inverse of ``to_json``; a manifest without ``pooling`` (an older export) reads as pooling None.

        Raises:
            ValueError: wrong schema, a field is missing or has the wrong type, or the pooling is not a positive integer.
        """
        if not isinstance(payload, Mapping):
            raise ValueError(f"a manifest is a JSON object, not {type(payload).__name__}")
        if payload.get("schema") != MANIFEST_SCHEMA:
            raise ValueError(f"manifest schema {payload.get('schema')!r} is not {MANIFEST_SCHEMA}")
        try:
            mean = tuple(float(v) for v in payload["mean"])
            std = tuple(float(v) for v in payload["std"])
            if len(mean) != 3 or len(std) != 3:
                raise ValueError(f"mean/std need 3 values each, got {len(mean)}/{len(std)}")
            pooling = payload.get("pooling")
            if pooling is not None and (isinstance(pooling, bool) or not isinstance(pooling, int) or pooling < 1):
                raise ValueError(f"pooling must be a positive integer, got {pooling!r}")
            return cls(
                model_digest=str(payload["model_digest"]),
                template=str(payload["template"]),
                mean=(mean[0], mean[1], mean[2]),
                std=(std[0], std[1], std[2]),
                view_size=int(payload["view_size"]),
                logit_size=int(payload["logit_size"]),
                embed_dim=int(payload["embed_dim"]),
                protocol=str(payload["protocol"]),
                opset=int(payload["opset"]),
                tool_versions={str(k): str(v) for k, v in dict(payload["tool_versions"]).items()},
                pooling=pooling,
            )
        except (KeyError, TypeError) as err:
            raise ValueError(f"manifest field missing or malformed: {err}") from err

    def metadata_props(self, role: str) -> dict[str, str]:
        """The ``metadata_props`` entries of the graph ``role`` (``TEXT_ROLE`` or ``IMAGE_ROLE``)."""
        return {
            METADATA_MANIFEST_KEY: json.dumps(self.to_json(), sort_keys=True),
            METADATA_GRAPH_KEY: role,
            METADATA_DIGEST_KEY: self.model_digest,
        }


@dataclass(frozen=True)
class OnnxDir:
    """An opened and validated ONNX folder.

    Attributes:
        path: the folder.
        manifest: its manifest (``manifest.json`` and both graphs agree on it).
        text_path: the text graph file.
        image_path: the image graph file.
        paper_encoder_path: the paper protocol's encoder graph (None in folders exported before it existed).
        paper_head_path: the paper protocol's head graph (None exactly when the encoder is None).
    """

    path: Path
    manifest: OnnxManifest
    text_path: Path
    image_path: Path
    paper_encoder_path: Path | None = None
    paper_head_path: Path | None = None


def _read_varint(fh: BinaryIO, path: Path) -> int:
    """One base-128 varint from ``fh``."""
    value, shift = 0, 0
    while True:
        byte = fh.read(1)
        if not byte:
            raise ExportError(f"{path} ends inside a protobuf field; it is not a complete ONNX file, re-export it.")
        value |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return value
        shift += 7
        if shift > 63:
            raise ExportError(f"{path} has a malformed protobuf varint; it is not an ONNX file, re-export it.")


def _parse_string_entry(data: bytes, path: Path) -> tuple[str, str]:
    """Key and value of a serialized ``StringStringEntryProto``."""
    key, value, pos = "", "", 0
    while pos < len(data):
        tag, pos = _varint_at(data, pos, path)
        number, wire = tag >> 3, tag & 7
        if wire != _WIRE_LEN:
            raise ExportError(f"{path} has a malformed metadata entry; it is not an ONNX file, re-export it.")
        length, pos = _varint_at(data, pos, path)
        text = data[pos : pos + length].decode("utf-8", errors="replace")
        pos += length
        if number == 1:
            key = text
        elif number == 2:
            value = text
    return key, value


def _varint_at(data: bytes, pos: int, path: Path) -> tuple[int, int]:
    """A varint in ``data`` at ``pos``; returns (value, next position)."""
    value, shift = 0, 0
    while pos < len(data):
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise ExportError(f"{path} has a truncated metadata entry; it is not an ONNX file, re-export it.")


def read_metadata_props(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file, read without onnx and without loading the graph.

    Args:
        path: an ``.onnx`` file.

    Returns:
        key -> value of every metadata entry (empty when the file has none).

    Raises:
        ExportError: the file cannot be read or is not a protobuf ONNX model.
    """
    path = Path(path)
    props: dict[str, str] = {}
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            while fh.tell() < size:
                tag = _read_varint(fh, path)
                number, wire = tag >> 3, tag & 7
                if number == 0:
                    raise ExportError(f"{path} has protobuf field number 0; it is not an ONNX file, re-export it.")
                if wire == _WIRE_VARINT:
                    _read_varint(fh, path)
                elif wire == _WIRE_I64:
                    fh.seek(8, os.SEEK_CUR)
                elif wire == _WIRE_I32:
                    fh.seek(4, os.SEEK_CUR)
                elif wire == _WIRE_LEN:
                    length = _read_varint(fh, path)
                    if fh.tell() + length > size:
                        raise ExportError(f"{path} is truncated (a field runs past the end); re-export it.")
                    if number == _METADATA_PROPS_FIELD:
                        key, value = _parse_string_entry(fh.read(length), path)
                        props[key] = value
                    else:
                        fh.seek(length, os.SEEK_CUR)  # the graph and its weights are skipped, not read
                else:
                    raise ExportError(f"{path} has protobuf wire type {wire}; it is not an ONNX file, re-export it.")
    except OSError as err:
        raise ExportError(f"cannot read {path} ({err}); check the path and its permissions.") from err
    return props


def read_graph_manifest(path: str | Path, role: str) -> OnnxManifest:
    """The manifest stored in one graph's ``metadata_props``, checked to be a gsnet graph of ``role``.

    Raises:
        ExportError: the file has no gsnet-deploy metadata, a malformed one, or is the other graph.
    """
    path = Path(path)
    props = read_metadata_props(path)
    if METADATA_MANIFEST_KEY not in props:
        keys = sorted(props)[:5]
        raise ExportError(
            f"{path} is not a gsnet-deploy graph (its metadata has no {METADATA_MANIFEST_KEY!r}, keys: {keys}); "
            "export the model with `gsnet export onnx --out DIR`."
        )
    found_role = props.get(METADATA_GRAPH_KEY)
    if found_role != role:
        raise ExportError(
            f"{path} says it is the {found_role!r} graph, not {role!r}; the files were renamed or swapped, "
            "re-export the folder with `gsnet export onnx`."
        )
    try:
        return OnnxManifest.from_json(json.loads(props[METADATA_MANIFEST_KEY]))
    except ValueError as err:
        raise ExportError(
            f"{path} has a malformed gsnet-deploy manifest ({err}); re-export it with `gsnet export onnx`."
        ) from err


def open_onnx_dir(path: str | Path) -> OnnxDir:
    """Open an ONNX folder and check that its two graphs and ``manifest.json`` belong together.

    Args:
        path: folder written by ``gsnet export onnx``.

    Returns:
        The validated folder.

    Raises:
        ExportError: the folder or a graph is missing, a graph is not ours, ``manifest.json`` is
            missing or malformed, or the manifests disagree (e.g. graphs exported from different
            checkpoints).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ExportError(f"ONNX folder {folder} does not exist; make it with `gsnet export onnx --out {folder}`.")
    text_path = folder / io_names.TEXT_GRAPH_FILE
    image_path = folder / io_names.IMAGE_GRAPH_FILE
    for graph in (text_path, image_path):
        if not graph.is_file():
            raise ExportError(
                f"ONNX folder {folder} has no {graph.name}; re-run `gsnet export onnx --out {folder}` to write both graphs."
            )
    manifest_path = folder / io_names.MANIFEST_FILE
    try:
        manifest = OnnxManifest.from_json(json.loads(manifest_path.read_text(encoding="utf-8")))
    except OSError as err:
        raise ExportError(
            f"ONNX folder {folder} has no readable {io_names.MANIFEST_FILE} ({err.strerror}); re-run `gsnet export onnx`."
        ) from err
    except ValueError as err:
        raise ExportError(f"{manifest_path} is malformed ({err}); re-run `gsnet export onnx --out {folder}`.") from err
    text = read_graph_manifest(text_path, TEXT_ROLE)
    image = read_graph_manifest(image_path, IMAGE_ROLE)
    if text.model_digest != image.model_digest:
        raise ExportError(
            f"{text_path.name} (model {text.model_digest}) and {image_path.name} (model {image.model_digest}) in {folder} "
            "come from different weights; export both graphs again from one checkpoint."
        )
    for name, graph_manifest in ((text_path.name, text), (image_path.name, image)):
        if graph_manifest != manifest:
            inside, beside = graph_manifest.to_json(), manifest.to_json()
            diff = sorted(k for k in inside.keys() | beside.keys() if inside.get(k) != beside.get(k))
            raise ExportError(
                f"{manifest_path} disagrees with the manifest inside {name} (fields {diff}); the folder mixes "
                "exports, re-run `gsnet export onnx`."
            )
    encoder_path, head_path = _paper_graphs(folder, manifest)
    return OnnxDir(
        path=folder, manifest=manifest, text_path=text_path, image_path=image_path,
        paper_encoder_path=encoder_path, paper_head_path=head_path,
    )  # fmt: skip


def _paper_graphs(folder: Path, manifest: OnnxManifest) -> tuple[Path | None, Path | None]:
    """The paper protocol's two graphs of ``folder``, checked against ``manifest``; (None, None) when absent."""
    paths = (folder / io_names.PAPER_ENCODER_FILE, folder / io_names.PAPER_HEAD_FILE)
    present = [p.is_file() for p in paths]
    if not any(present):
        return None, None
    if not all(present):
        missing = next(p.name for p, ok in zip(paths, present) if not ok)
        raise ExportError(f"ONNX folder {folder} has no {missing} beside the other paper graph; re-run `gsnet export onnx`.")
    for graph, role in zip(paths, (PAPER_ENCODER_ROLE, PAPER_HEAD_ROLE)):
        if read_graph_manifest(graph, role) != manifest:
            raise ExportError(
                f"{graph.name} in {folder} comes from another export than {io_names.MANIFEST_FILE}; the folder mixes "
                "exports, re-run `gsnet export onnx`."
            )
    return paths
