"""Engine manifests: what an engine was built from, how, and for which host; and the checks on load.

Every ``*.engine`` file gets a ``*.engine.json`` manifest beside it (TensorRT version, GPU name and
compute capability, precision and how it was obtained, optimization profiles, model digest,
plugin used or not). The runtime refuses an engine whose manifest does not fit this host, because a
TensorRT plan is only valid for the TensorRT version and GPU it was built on unless it was built
version- or hardware-compatible (TensorRT developer guide, "Engine Compatibility").

This module is torch-free and TensorRT-free: the runtime imports it (``runtime.tensorrt_backend``).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gsnet_deploy.contracts import io_names
from gsnet_deploy.contracts.atomic import write_json_atomic
from gsnet_deploy.contracts.precision import Precision
from gsnet_deploy.errors import EngineBuildError

MANIFEST_SCHEMA = 1
MANIFEST_SUFFIX = ".json"  # text_encoder.engine -> text_encoder.engine.json

# Hardware-compatible engines (HardwareCompatibilityLevel.AMPERE_PLUS) run on Ampere and newer.
AMPERE_PLUS_MIN_CC = (8, 0)


class Graph(enum.Enum):
    """The engines of a build; the value is the file stem shared by ONNX and engine files.

    ``TEXT`` and ``IMAGE`` are always built; ``PAPER_ENCODER`` and ``PAPER_HEAD`` (the paper protocol
    on the device) and ``TILE_BLEND`` and ``TILE_EMIT`` (tiled mode's window blending on the device,
    weight-free and always FP32) only from ONNX folders that hold their graphs (``PAPER_GRAPHS``,
    ``TILE_GRAPHS``).
    """

    TEXT = io_names.TEXT_GRAPH_FILE.removesuffix(".onnx")  # "text_encoder"
    IMAGE = io_names.IMAGE_GRAPH_FILE.removesuffix(".onnx")  # "image_graph"
    PAPER_ENCODER = io_names.PAPER_ENCODER_FILE.removesuffix(".onnx")  # "paper_encoder"
    PAPER_HEAD = io_names.PAPER_HEAD_FILE.removesuffix(".onnx")  # "paper_head"
    TILE_BLEND = io_names.TILE_BLEND_FILE.removesuffix(".onnx")  # "tile_blend"
    TILE_EMIT = io_names.TILE_EMIT_FILE.removesuffix(".onnx")  # "tile_emit"

    @property
    def onnx_file(self) -> str:
        """File name of this graph's FP32 ONNX model."""
        return f"{self.value}.onnx"

    @property
    def engine_file(self) -> str:
        """File name of this graph's engine."""
        return f"{self.value}.engine"


CORE_GRAPHS: tuple[Graph, ...] = (Graph.TEXT, Graph.IMAGE)  # every build has these
PAPER_GRAPHS: tuple[Graph, ...] = (Graph.PAPER_ENCODER, Graph.PAPER_HEAD)  # built when the ONNX folder has them
TILE_GRAPHS: tuple[Graph, ...] = (Graph.TILE_BLEND, Graph.TILE_EMIT)  # likewise; FP32 whatever the precision


def parse_version(text: str) -> tuple[int, ...]:
    """Parse a dotted version such as ``"10.3.0.30"`` into integers; suffixes like ``"rc1"`` are dropped."""
    parts: list[int] = []
    for piece in text.split("."):
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
    if not parts:
        raise EngineBuildError(f"Cannot read the TensorRT version {text!r}; expected a dotted version such as 10.3.0.")
    return tuple(parts)


@dataclass(frozen=True)
class ShapeRange:
    """Min / opt / max shape of one input in one optimization profile."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def __post_init__(self) -> None:
        if not (len(self.min) == len(self.opt) == len(self.max)):
            raise EngineBuildError(f"Profile shapes differ in rank: {self.min}, {self.opt}, {self.max}; fix the profile.")
        if any(not (lo <= mid <= hi) for lo, mid, hi in zip(self.min, self.opt, self.max)):
            raise EngineBuildError(f"Profile shapes are not ordered min <= opt <= max: {self.min}, {self.opt}, {self.max}.")

    @property
    def is_static(self) -> bool:
        """Whether min, opt and max are the same shape."""
        return self.min == self.opt == self.max


@dataclass(frozen=True)
class Profile:
    """One TensorRT optimization profile: a shape range per network input.

    Attributes:
        shapes: input name -> range of its shape.
        values: shape-tensor input name -> range of its *values* (``IOptimizationProfile.set_shape_input``;
            the paper head's ``out_size``, whose values are the output's H and W); empty for other graphs.
    """

    shapes: Mapping[str, ShapeRange]
    values: Mapping[str, ShapeRange] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, value_range in self.values.items():
            shape = self.shapes.get(name)
            if shape is None or not shape.is_static or len(shape.min) != 1 or shape.min[0] != len(value_range.min):
                raise EngineBuildError(
                    f"Shape input {name!r} needs a static 1-D shape of {len(value_range.min)} values; fix the profile."
                )

    def to_json(self) -> dict[str, dict[str, Any]]:
        """JSON-ready dict ``{input: {"min": [...], "opt": [...], "max": [...]}}`` (+ ``"values"`` for shape inputs)."""
        payload: dict[str, dict[str, Any]] = {
            name: {"min": list(r.min), "opt": list(r.opt), "max": list(r.max)} for name, r in self.shapes.items()
        }
        for name, r in self.values.items():
            payload[name]["values"] = {"min": list(r.min), "opt": list(r.opt), "max": list(r.max)}
        return payload

    @classmethod
    def from_json(cls, payload: Mapping[str, Mapping[str, Any]]) -> Profile:
        """Inverse of ``to_json`` (profiles written before shape inputs existed have no ``"values"``)."""

        def shape_range(r: Mapping[str, Any]) -> ShapeRange:
            return ShapeRange(tuple(r["min"]), tuple(r["opt"]), tuple(r["max"]))

        return cls(
            shapes={name: shape_range(r) for name, r in payload.items()},
            values={name: shape_range(r["values"]) for name, r in payload.items() if "values" in r},
        )


@dataclass(frozen=True)
class HostInfo:
    """The TensorRT version, GPU and platform of the machine that builds or runs an engine.

    ``system`` / ``machine`` are ``platform.system()`` / ``platform.machine()`` (``"Linux"``,
    ``"x86_64"`` or ``"aarch64"``); empty where unknown (manifests written before they were recorded).
    """

    tensorrt_version: str
    gpu_name: str
    compute_capability: tuple[int, int]
    system: str = ""
    machine: str = ""


def this_platform() -> tuple[str, str]:
    """``(platform.system(), platform.machine())`` of this host, as recorded in ``HostInfo``."""
    import platform

    return platform.system(), platform.machine()


@dataclass(frozen=True)
class EngineManifest:
    """Everything recorded about one built engine.

    Attributes:
        graph: which of the two graphs this engine runs.
        engine_file: engine file name (relative to the manifest's folder).
        onnx_file: the ONNX file the engine was parsed from.
        precision: the precision the user asked for.
        precision_path: how that precision was obtained (strong typing from an AutoCast ONNX, builder
            flags, Q/DQ model...), in words.
        strongly_typed: whether the network was created strongly typed.
        host: TensorRT version, GPU name and compute capability of the build machine.
        profiles: the optimization profiles (one per entry).
        model_digest: digest of the weights, copied from the ONNX folder's manifest.
        plugin_used: whether the fused cost-volume plugin replaced the ONNX cost volume.
        plugin_note: why the plugin was or was not used.
        dla_core: DLA core the engine targets, None for GPU only.
        hardware_compatible: built with HardwareCompatibilityLevel.AMPERE_PLUS.
        version_compatible: built with BuilderFlag.VERSION_COMPATIBLE.
        notes: anything else the user should know (calibration data, reused files).
        pooling: class-transformer pooling the ONNX graphs were exported with (from the ONNX folder's
            manifest; None: unknown, e.g. a folder exported before it was recorded).
        output_shapes: static output shapes by name (the paper encoder's features, which the paper
            head's profile must take); empty where not recorded.

    """

    graph: Graph
    engine_file: str
    onnx_file: str
    precision: Precision
    precision_path: str
    strongly_typed: bool
    host: HostInfo
    profiles: tuple[Profile, ...]
    model_digest: str
    plugin_used: bool = False
    plugin_note: str = ""
    dla_core: int | None = None
    hardware_compatible: bool = False
    version_compatible: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)
    pooling: int | None = None
    output_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (schema ``MANIFEST_SCHEMA``)."""
        return {
            "schema": MANIFEST_SCHEMA,
            "graph": self.graph.value,
            "engine_file": self.engine_file,
            "onnx_file": self.onnx_file,
            "precision": self.precision.value,
            "precision_path": self.precision_path,
            "strongly_typed": self.strongly_typed,
            "tensorrt_version": self.host.tensorrt_version,
            "gpu_name": self.host.gpu_name,
            "compute_capability": list(self.host.compute_capability),
            "system": self.host.system,
            "machine": self.host.machine,
            "profiles": [p.to_json() for p in self.profiles],
            "model_digest": self.model_digest,
            "plugin_used": self.plugin_used,
            "plugin_note": self.plugin_note,
            "dla_core": self.dla_core,
            "hardware_compatible": self.hardware_compatible,
            "version_compatible": self.version_compatible,
            "notes": list(self.notes),
            "pooling": self.pooling,
            "output_shapes": {name: list(shape) for name, shape in self.output_shapes.items()},
        }

    @classmethod
    def from_json(cls, payload: Mapping[str, Any]) -> EngineManifest:
        """Inverse of ``to_json``; raises ``KeyError`` / ``ValueError`` on a malformed payload."""
        if payload.get("schema") != MANIFEST_SCHEMA:
            raise ValueError(f"manifest schema {payload.get('schema')!r} is not {MANIFEST_SCHEMA}")
        major, minor = (int(v) for v in payload["compute_capability"])
        return cls(
            graph=Graph(payload["graph"]),
            engine_file=str(payload["engine_file"]),
            onnx_file=str(payload["onnx_file"]),
            precision=Precision(payload["precision"]),
            precision_path=str(payload["precision_path"]),
            strongly_typed=bool(payload["strongly_typed"]),
            host=HostInfo(
                str(payload["tensorrt_version"]),
                str(payload["gpu_name"]),
                (major, minor),
                str(payload.get("system", "")),
                str(payload.get("machine", "")),
            ),
            profiles=tuple(Profile.from_json(p) for p in payload["profiles"]),
            model_digest=str(payload["model_digest"]),
            plugin_used=bool(payload.get("plugin_used", False)),
            plugin_note=str(payload.get("plugin_note", "")),
            dla_core=None if payload.get("dla_core") is None else int(payload["dla_core"]),
            hardware_compatible=bool(payload.get("hardware_compatible", False)),
            version_compatible=bool(payload.get("version_compatible", False)),
            notes=tuple(str(n) for n in payload.get("notes", ())),
            pooling=None if payload.get("pooling") is None else int(payload["pooling"]),
            output_shapes={str(k): tuple(int(d) for d in v) for k, v in dict(payload.get("output_shapes", {})).items()},
        )


def manifest_path(engine_path: Path) -> Path:
    """Path of the manifest that belongs to ``engine_path``."""
    return engine_path.with_name(engine_path.name + MANIFEST_SUFFIX)


def write_manifest(manifest: EngineManifest, folder: Path) -> Path:
    """Write ``manifest`` beside its engine in ``folder`` (atomically) and return the path."""
    return write_json_atomic(manifest_path(Path(folder) / manifest.engine_file), manifest.to_json())


def read_manifest(engine_path: Path) -> EngineManifest:
    """Read the manifest of ``engine_path``.

    Raises:
        EngineBuildError: the manifest is missing or malformed.

    """
    path = manifest_path(Path(engine_path))
    if not path.is_file():
        raise EngineBuildError(f"Engine manifest {path} is missing; rebuild the engines with `gsnet export build`.")
    try:
        return EngineManifest.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as err:
        raise EngineBuildError(
            f"Engine manifest {path} is malformed ({err}); rebuild the engines with `gsnet export build`."
        ) from err


def check_tensorrt_version(built: str, running: str, *, version_compatible: bool) -> None:
    """Refuse a TensorRT runtime that cannot deserialize an engine built with ``built``.

    Without version compatibility the versions must match exactly. With it, the runtime must be the
    same or newer, within the same major version, or 11.x running a 10.x engine (the only
    cross-major pair TensorRT 11 supports).

    Raises:
        EngineBuildError: the runtime cannot load the engine.

    """
    b, r = parse_version(built), parse_version(running)
    if not version_compatible:
        if b != r:
            raise EngineBuildError(
                f"Engine was built with TensorRT {built} but this host runs TensorRT {running}; rebuild the "
                "engines here or build them with --version-compatible."
            )
        return
    cross_major_ok = b[0] == r[0] or (b[0], r[0]) == (10, 11)
    if r < b or not cross_major_ok:
        raise EngineBuildError(
            f"Version-compatible engine built with TensorRT {built} cannot run on TensorRT {running} (needs "
            "the "
            f"same or a newer {b[0]}.x runtime); rebuild the engines on this host."
        )


def check_gpu(manifest: EngineManifest, host: HostInfo) -> None:
    """Refuse a GPU the engine was not built for (name and capability; Ampere+ if hardware-compatible).

    Raises:
        EngineBuildError: the engine does not fit this GPU.

    """
    built = manifest.host
    if manifest.hardware_compatible:
        if manifest.plugin_used and host.compute_capability != built.compute_capability:
            raise EngineBuildError(
                f"Hardware-compatible engine {manifest.engine_file} contains the cost-volume plugin, compiled for compute "
                f"capability {built.compute_capability[0]}.{built.compute_capability[1]} only, but this GPU ({host.gpu_name}) "
                f"has {host.compute_capability[0]}.{host.compute_capability[1]}; rebuild the engines on this host."
            )
        if host.compute_capability < AMPERE_PLUS_MIN_CC:
            raise EngineBuildError(
                f"Hardware-compatible engine {manifest.engine_file} needs an Ampere or newer GPU but this "
                "GPU "
                f"({host.gpu_name}) has compute capability "
                f"{host.compute_capability[0]}.{host.compute_capability[1]}; "
                "rebuild the engines on this host."
            )
        return
    if built.compute_capability != host.compute_capability or built.gpu_name != host.gpu_name:
        raise EngineBuildError(
            f"Engine {manifest.engine_file} was built for {built.gpu_name} (compute capability "
            f"{built.compute_capability[0]}.{built.compute_capability[1]}) but this GPU is {host.gpu_name} "
            f"({host.compute_capability[0]}.{host.compute_capability[1]}); rebuild the engines here or "
            "build them "
            "with --hardware-compatible."
        )


def check_platform(manifest: EngineManifest, host: HostInfo) -> None:
    """Refuse an engine built on another OS or CPU architecture (x86_64 vs aarch64), hardware-compatible or not.

    Raises:
        EngineBuildError: both platforms are known and differ.

    """
    built = (manifest.host.system, manifest.host.machine)
    here = (host.system, host.machine)
    if all(built) and all(here) and built != here:
        raise EngineBuildError(
            f"Engine {manifest.engine_file} was built on {built[0]} {built[1]} but this host is {here[0]} {here[1]}; "
            "TensorRT engines do not move between platforms, rebuild the engines here."
        )


def check_engine_compatible(manifest: EngineManifest, host: HostInfo) -> None:
    """Refuse an engine this host cannot run (``check_tensorrt_version``, ``check_platform``, ``check_gpu``)."""
    check_tensorrt_version(manifest.host.tensorrt_version, host.tensorrt_version, version_compatible=manifest.version_compatible)
    check_platform(manifest, host)
    check_gpu(manifest, host)


def check_same_model(text: EngineManifest, image: EngineManifest) -> None:
    """Refuse two engines (the text engine and another) built from different weights.

    Raises:
        EngineBuildError: the model digests differ.

    """
    if text.model_digest != image.model_digest:
        other = "image engine" if image.graph is Graph.IMAGE else image.engine_file
        raise EngineBuildError(
            f"Text engine model digest {text.model_digest!r} differs from {other} digest "
            f"{image.model_digest!r}; rebuild the engines from one ONNX folder."
        )


def check_same_pooling(manifests: Mapping[Graph, EngineManifest]) -> int | None:
    """The pooling all ``manifests`` were exported with (None: unknown in all of them).

    Raises:
        EngineBuildError: two engines record different poolings.

    """
    known = {graph: m.pooling for graph, m in manifests.items() if m.pooling is not None}
    if len(set(known.values())) > 1:
        shown = ", ".join(f"{g.engine_file} {p}" for g, p in known.items())
        raise EngineBuildError(f"The engines were exported with different poolings ({shown}); rebuild them from one ONNX folder.")
    return next(iter(known.values()), None)


def check_head_takes_encoder(encoder: EngineManifest, head: EngineManifest) -> None:
    """Refuse a paper head engine whose profile cannot take the paper encoder engine's features.

    Every feature the encoder outputs (its recorded ``output_shapes``) must be an input of the head's
    profile with a shape inside the profile's range, so the encoder's device buffers can be bound as
    the head's inputs as they are.

    Raises:
        EngineBuildError: the encoder recorded no feature shapes, or a feature does not fit the head.

    """
    if not encoder.output_shapes:
        raise EngineBuildError(
            f"{encoder.engine_file}'s manifest records no feature shapes; rebuild the engines with `gsnet export build`."
        )
    profile = head.profiles[0]
    for name, shape in encoder.output_shapes.items():
        shape_range = profile.shapes.get(name)
        fits = (
            shape_range is not None
            and len(shape) == len(shape_range.min)
            and all(lo <= d <= hi for d, lo, hi in zip(shape, shape_range.min, shape_range.max))
        )
        if not fits:
            accepted = "no such input" if shape_range is None else f"{shape_range.min}..{shape_range.max}"
            raise EngineBuildError(
                f"{head.engine_file} cannot take {encoder.engine_file}'s feature {name!r} of shape {tuple(shape)} "
                f"(its profile: {accepted}); rebuild both engines from one ONNX folder."
            )
