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
    """The two engines of a build; the value is the file stem shared by ONNX and engine files."""

    TEXT = io_names.TEXT_GRAPH_FILE.removesuffix(".onnx")  # "text_encoder"
    IMAGE = io_names.IMAGE_GRAPH_FILE.removesuffix(".onnx")  # "image_graph"

    @property
    def onnx_file(self) -> str:
        """File name of this graph's FP32 ONNX model."""
        return f"{self.value}.onnx"

    @property
    def engine_file(self) -> str:
        """File name of this graph's engine."""
        return f"{self.value}.engine"


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
    """One TensorRT optimization profile: a shape range per network input."""

    shapes: Mapping[str, ShapeRange]

    def to_json(self) -> dict[str, dict[str, list[int]]]:
        """JSON-ready dict ``{input: {"min": [...], "opt": [...], "max": [...]}}``."""
        return {name: {"min": list(r.min), "opt": list(r.opt), "max": list(r.max)} for name, r in self.shapes.items()}

    @classmethod
    def from_json(cls, payload: Mapping[str, Mapping[str, list[int]]]) -> Profile:
        """Inverse of ``to_json``."""
        return cls(shapes={name: ShapeRange(tuple(r["min"]), tuple(r["opt"]), tuple(r["max"])) for name, r in payload.items()})


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
    """Refuse a text engine and an image engine built from different weights.

    Raises:
        EngineBuildError: the model digests differ.

    """
    if text.model_digest != image.model_digest:
        raise EngineBuildError(
            f"Text engine model digest {text.model_digest!r} differs from image engine digest "
            f"{image.model_digest!r}; rebuild both engines from one ONNX folder."
        )
