"""``gsnet export build``: TensorRT engines of both graphs, by the installed TensorRT's path.

Version paths (NVIDIA TensorRT docs: "Migrating from TensorRT 10.x to 11.x", "Explicit Quantization"):

- TensorRT >= 10.12, including 11.x: strongly typed networks. FP16 comes from an ONNX model made
  FP16 by ModelOpt AutoCast; INT8 from the Q/DQ model; ``best`` from the Q/DQ model made FP16
  elsewhere by AutoCast. No precision builder flags (11.x removed them; 10.12 deprecated weak typing).
- TensorRT 10.0 to 10.11 (JetPack 6 ships 10.3): weakly typed networks from the FP32 ONNX with
  ``BuilderFlag.FP16``; INT8 from the Q/DQ model with ``BuilderFlag.INT8`` (never a calibrator), plus
  ``BuilderFlag.FP16`` for ``best``.
- Older than 10: refused.

Without TensorRT (CI, this workstation) the FP16 / Q/DQ ONNX models are still written, then one
``EngineBuildError`` line says how to finish on the target.
"""

from __future__ import annotations

import enum
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gsnet_deploy import io_names
from gsnet_deploy.errors import EngineBuildError, ExportError
from gsnet_deploy.export.manifest import (
    EngineManifest,
    Graph,
    HostInfo,
    Profile,
    ShapeRange,
    write_json_atomic,
    write_manifest,
)
from gsnet_deploy.export.precision import Precision
from gsnet_deploy.export.trt import BuildFlags

STRONG_TYPING_MIN = (10, 12)  # weak typing deprecated from here on; required from 11.0
OLDEST_SUPPORTED = (10, 0)

VIEWS_MIN, VIEWS_OPT, VIEWS_MAX = 1, 5, 8  # B: 5 = the paper protocol's views of one image
CLASSES_MIN, CLASSES_MAX = 1, 256  # N: the class transformer pads the class axis to 256
DEFAULT_CLASSES_OPT = 40
DLA_VIEWS = 5  # DLA needs static shapes: one image's paper views

TIMING_CACHE_FILE = "timing.cache"
BUILD_RECORD_FILE = "build.json"


class OnnxVariant(enum.Enum):
    """Which ONNX model an engine is parsed from; the value is the file-name infix."""

    FP32 = ""  # the exported model itself
    FP16 = "fp16"  # AutoCast of the FP32 model
    INT8 = "int8"  # Q/DQ, FP32 elsewhere (calib.quantize)
    INT8_FP16 = "int8.fp16"  # AutoCast of the Q/DQ model

    def file_name(self, graph: Graph) -> str:
        """File name of this variant of ``graph``'s ONNX model."""
        return f"{graph.value}.onnx" if self is OnnxVariant.FP32 else f"{graph.value}.{self.value}.onnx"


@dataclass(frozen=True)
class GraphPlan:
    """How one engine is built: which ONNX variant, which flags, and in words for the manifest."""

    variant: OnnxVariant
    flags: BuildFlags
    how: str


@dataclass(frozen=True)
class BuildPath:
    """The plans of both engines for one TensorRT version and precision."""

    text: GraphPlan
    image: GraphPlan

    def plan(self, graph: Graph) -> GraphPlan:
        """The plan of ``graph``."""
        return self.text if graph is Graph.TEXT else self.image


def select_build_path(trt_version: Sequence[int], precision: Precision) -> BuildPath:
    """Choose the build path for a TensorRT version and a precision (pure; see the module docstring).

    Raises:
        EngineBuildError: TensorRT older than 10.0.

    """
    version = tuple(trt_version)
    shown = ".".join(map(str, version))
    if version < OLDEST_SUPPORTED:
        raise EngineBuildError(
            f"TensorRT {shown} is older than 10.0, the oldest version gsnet-deploy builds with; install "
            "TensorRT 10.x "
            "or newer (JetPack 6 ships 10.3)."
        )
    if version >= STRONG_TYPING_MIN:
        strong = BuildFlags(strongly_typed=True)
        fp16 = GraphPlan(
            OnnxVariant.FP16,
            strong,
            f"strongly typed (TensorRT {shown}) from the ModelOpt AutoCast FP16 ONNX",
        )
        fp32 = GraphPlan(OnnxVariant.FP32, strong, f"strongly typed (TensorRT {shown}) from the FP32 ONNX")
        int8 = GraphPlan(
            OnnxVariant.INT8,
            strong,
            f"strongly typed (TensorRT {shown}) from the INT8 Q/DQ ONNX, FP32 elsewhere",
        )
        best = GraphPlan(
            OnnxVariant.INT8_FP16,
            strong,
            f"strongly typed (TensorRT {shown}) from the INT8 Q/DQ ONNX made FP16 elsewhere by AutoCast",
        )
        table = {Precision.FP16: (fp16, fp16), Precision.INT8: (fp32, int8), Precision.BEST: (fp16, best)}
    else:
        weak = f"weakly typed (TensorRT {shown})"
        fp16 = GraphPlan(OnnxVariant.FP32, BuildFlags(False, fp16=True), f"{weak} from the FP32 ONNX with BuilderFlag.FP16")
        fp32 = GraphPlan(OnnxVariant.FP32, BuildFlags(False), f"{weak} from the FP32 ONNX, no precision flags")
        int8 = GraphPlan(
            OnnxVariant.INT8,
            BuildFlags(False, int8=True),
            f"{weak} from the INT8 Q/DQ ONNX with BuilderFlag.INT8",
        )
        best = GraphPlan(
            OnnxVariant.INT8,
            BuildFlags(False, fp16=True, int8=True),
            f"{weak} from the INT8 Q/DQ ONNX with BuilderFlag.INT8 and FP16",
        )
        table = {Precision.FP16: (fp16, fp16), Precision.INT8: (fp32, int8), Precision.BEST: (fp16, best)}
    text, image = table[precision]
    return BuildPath(text=text, image=image)


def variants_for_any_target(precision: Precision) -> dict[Graph, tuple[OnnxVariant, ...]]:
    """ONNX variants any target TensorRT might build ``precision`` from (used without TensorRT)."""
    needed: dict[Graph, set[OnnxVariant]] = {Graph.TEXT: set(), Graph.IMAGE: set()}
    for version in ((10, 3), STRONG_TYPING_MIN):
        path = select_build_path(version, precision)
        for graph in Graph:
            needed[graph].add(path.plan(graph).variant)
    order = list(OnnxVariant)
    return {g: tuple(sorted(v, key=order.index)) for g, v in needed.items()}


def resolve_dla(
    trt_version: Sequence[int], num_dla_cores: int, dla_core: int | None, *, has_dla_device_type: bool = True
) -> int | None:
    """Check a ``--dla-core`` request against the TensorRT version and the device (pure).

    Args:
        trt_version: installed TensorRT version.
        num_dla_cores: DLA cores the builder reports (``Builder.num_DLA_cores``).
        dla_core: requested core, None for GPU only.
        has_dla_device_type: whether ``trt.DeviceType`` has ``DLA`` (most 11.x releases dropped DLA).

    Returns:
        The DLA core to build for, or None.

    Raises:
        EngineBuildError: DLA requested where this TensorRT or device has none, or the core does not exist.

    """
    if dla_core is None:
        return None
    shown = ".".join(map(str, trt_version))
    if dla_core < 0:
        raise EngineBuildError(f"--dla-core must be 0 or more, got {dla_core}; pass a DLA core index such as 0.")
    if tuple(trt_version)[:1] >= (11,) and not has_dla_device_type:
        raise EngineBuildError(
            f"TensorRT {shown} has no DLA support (removed from most 11.x releases); drop --dla-core or "
            "build with "
            "TensorRT 10.x on the Jetson."
        )
    if num_dla_cores <= 0:
        raise EngineBuildError(
            f"--dla-core {dla_core} was requested but this device has no DLA cores (TensorRT {shown}); drop "
            "--dla-core "
            "or build on a Jetson with DLA (e.g. AGX Orin)."
        )
    if dla_core >= num_dla_cores:
        raise EngineBuildError(
            f"--dla-core {dla_core} does not exist; this device has {num_dla_cores} DLA core(s), pass 0..{num_dla_cores - 1}."
        )
    return dla_core


@dataclass(frozen=True)
class DimRange:
    """Min / opt / max of one symbolic dimension."""

    min: int
    opt: int
    max: int


def dim_ranges(
    classes_opt: int = DEFAULT_CLASSES_OPT, *, fixed: bool = False, fixed_views: int = DLA_VIEWS
) -> dict[str, DimRange]:
    """Ranges of the symbolic dims: views B 1/5/8 and classes N 1/``classes_opt``/256, or fixed (DLA).

    Raises:
        EngineBuildError: ``classes_opt`` outside 1..256.

    """
    if not CLASSES_MIN <= classes_opt <= CLASSES_MAX:
        raise EngineBuildError(
            f"--classes-opt must be between {CLASSES_MIN} and {CLASSES_MAX}, got {classes_opt}; pass the "
            "class count "
            "you run most often."
        )
    if fixed:
        return {
            io_names.VIEWS: DimRange(fixed_views, fixed_views, fixed_views),
            io_names.CLASSES: DimRange(classes_opt, classes_opt, classes_opt),
        }
    return {
        io_names.VIEWS: DimRange(VIEWS_MIN, VIEWS_OPT, VIEWS_MAX),
        io_names.CLASSES: DimRange(CLASSES_MIN, classes_opt, CLASSES_MAX),
    }


def profile_for(inputs: Mapping[str, Sequence[int | str]], dims: Mapping[str, DimRange]) -> Profile:
    """One optimization profile for a graph whose inputs have these (possibly symbolic) shapes (pure).

    Args:
        inputs: input name -> shape with ints for static dims and names (``"B"``, ``"N"``) for symbolic ones.
        dims: range of each symbolic dim name.

    Raises:
        EngineBuildError: a symbolic dim has no range.

    """
    shapes: dict[str, ShapeRange] = {}
    for name, shape in inputs.items():
        ranges: list[DimRange] = []
        for dim in shape:
            if isinstance(dim, int) and dim > 0:
                ranges.append(DimRange(dim, dim, dim))
                continue
            if dim not in dims:
                raise EngineBuildError(
                    f"Input {name!r} has a dynamic dimension {dim!r} without a profile range; export the "
                    "graph with the "
                    f"dynamic axes of gsnet_deploy.io_names ({', '.join(dims)})."
                )
            ranges.append(dims[str(dim)])
        shapes[name] = ShapeRange(tuple(r.min for r in ranges), tuple(r.opt for r in ranges), tuple(r.max for r in ranges))
    return Profile(shapes=shapes)


def onnx_input_shapes(path: Path) -> dict[str, tuple[int | str, ...]]:
    """Graph input shapes of an ONNX file (symbolic dims as their names), read without its weights."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    shapes: dict[str, tuple[int | str, ...]] = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims)
    return shapes


@dataclass(frozen=True)
class BuildResult:
    """What ``build_engines`` produced.

    Attributes:
        out_dir: the output folder.
        precision: the precision asked for.
        engines: engine path per graph.
        manifests: manifest per graph.
        onnx_models: every ONNX model the engines were (or would be) built from, by file name.
        notes: things the user should know (calibration data, reused files, plugin).

    """

    out_dir: Path
    precision: Precision
    engines: dict[Graph, Path]
    manifests: dict[Graph, EngineManifest]
    onnx_models: dict[str, Path]
    notes: tuple[str, ...] = field(default_factory=tuple)


def _fresh(path: Path, digest: str) -> bool:
    """Whether a derived ONNX model exists and its ``.json`` record names this model digest."""
    from gsnet_deploy.calib.quantize import read_sidecar

    record = read_sidecar(path)
    return path.is_file() and record is not None and record.get("model_digest") == digest


def _write_sidecar(path: Path, payload: Mapping[str, Any]) -> None:
    from gsnet_deploy.calib.quantize import SIDECAR_SUFFIX

    write_json_atomic(path.with_name(path.name + SIDECAR_SUFFIX), dict(payload))


def _make_variants(
    onnx_dir: Path,
    out_dir: Path,
    needed: Mapping[Graph, Sequence[OnnxVariant]],
    *,
    digest: str,
    calib_images: Sequence[Path] | None,
    text_tokens: np.ndarray | None,
    notes: list[str],
) -> dict[Graph, dict[OnnxVariant, Path]]:
    """Write (or reuse) the FP16, Q/DQ and Q/DQ+FP16 ONNX models the build needs."""
    from gsnet_deploy.calib.quantize import INT8_FILE, quantize_image_graph, reference_text_embeds
    from gsnet_deploy.calib.views import CalibrationDataWarning, calibration_tokens, calibration_views
    from gsnet_deploy.export.fp16 import QDQ_OP_TYPES, make_fp16_onnx

    paths: dict[Graph, dict[OnnxVariant, Path]] = {g: {} for g in Graph}
    tokens = text_tokens if text_tokens is not None else calibration_tokens()
    embeds: np.ndarray | None = None
    views: np.ndarray | None = None

    def reference_inputs() -> tuple[np.ndarray, np.ndarray]:
        nonlocal embeds, views
        if embeds is None:
            embeds = reference_text_embeds(onnx_dir, tokens)
        if views is None:
            if calib_images:
                views = calibration_views(calib_images, max_images=32)
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", CalibrationDataWarning)
                    views = calibration_views(None, max_images=2)
                notes.append("AutoCast's reference run used the example images (pass --calib DIR for real imagery)")
        return views, embeds

    for graph in Graph:
        for variant in needed[graph]:
            if variant is OnnxVariant.FP32:
                paths[graph][variant] = onnx_dir / variant.file_name(graph)
                continue
            dst = out_dir / variant.file_name(graph)
            if variant is OnnxVariant.INT8:
                # a Q/DQ model from `gsnet calib` may sit in the output or the ONNX folder
                for candidate in (out_dir / INT8_FILE, onnx_dir / INT8_FILE):
                    if _fresh(candidate, digest):
                        paths[graph][variant] = candidate
                        notes.append(f"reused the Q/DQ model {candidate}")
                        break
                else:
                    if not calib_images:
                        raise EngineBuildError(
                            f"INT8 needs a Q/DQ model but {out_dir / INT8_FILE} does not exist (or is for "
                            "other weights) "
                            "and no calibration images were given; run `gsnet calib --images DIR` or pass "
                            "--calib DIR."
                        )
                    v, e = reference_inputs()
                    paths[graph][variant] = quantize_image_graph(
                        onnx_dir, out_dir, v, text_embeds=e, calibration_note="--calib images"
                    )
                    notes.append(f"calibrated INT8 on {v.shape[0]} views from the --calib images")
                continue
            if _fresh(dst, digest):
                paths[graph][variant] = dst
                notes.append(f"reused {dst.name}")
                continue
            if graph is Graph.TEXT:
                feeds = {io_names.TEXT_TOKENS: tokens}
            else:
                v, e = reference_inputs()
                feeds = {io_names.IMAGES: v[:DLA_VIEWS], io_names.TEXT_EMBEDS: e}
            src = (
                paths[graph][OnnxVariant.INT8]
                if variant is OnnxVariant.INT8_FP16
                else onnx_dir / OnnxVariant.FP32.file_name(graph)
            )
            keep_fp32 = QDQ_OP_TYPES if variant is OnnxVariant.INT8_FP16 else ()
            paths[graph][variant] = make_fp16_onnx(src, dst, reference_feeds=feeds, op_types_to_exclude=keep_fp32)
            _write_sidecar(
                dst,
                {
                    "model_digest": digest,
                    "made_from": src.name,
                    "made_by": "ModelOpt AutoCast fp16",
                    "kept_fp32_op_types": list(keep_fp32),
                },
            )
    return paths


def _plugin_hook(enabled: bool, trt_version: Sequence[int], notes: list[str]) -> tuple[bool, str, Any]:
    """Find the cost-volume plugin: (usable, note, module pair or None); absence is not an error."""
    if not enabled:
        return False, "plugin not requested", None
    import importlib

    try:
        # the kernel issue's modules; absent until that work lands
        plugin_rewrite = importlib.import_module("gsnet_deploy.export.plugin_rewrite")
        trt_plugin = importlib.import_module("gsnet_deploy.kernels.trt_plugin")
    except ImportError as err:
        note = f"plugin requested but unavailable ({err}); built without it"
        notes.append(note)
        return False, note, None
    if not trt_plugin.plugin_supported(tuple(trt_version)):
        shown = ".".join(map(str, trt_version))
        note = f"plugin requested but not supported by TensorRT {shown}; built without it"
        notes.append(note)
        return False, note, None
    return True, "fused cost-volume plugin", (trt_plugin, plugin_rewrite)


def _current_host(trt_version_text: str) -> HostInfo:
    from gsnet_deploy.runtime.tensorrt_backend import current_gpu

    name, capability = current_gpu()
    return HostInfo(tensorrt_version=trt_version_text, gpu_name=name, compute_capability=capability)


def build_engines(
    onnx_dir: Path,
    out_dir: Path,
    precision: Precision,
    *,
    classes_opt: int = DEFAULT_CLASSES_OPT,
    workspace_gib: float | None = None,
    dla_core: int | None = None,
    hardware_compatible: bool = False,
    version_compatible: bool = False,
    calib_images: Sequence[Path] | None = None,
    plugin: bool = False,
    text_tokens: np.ndarray | None = None,
) -> BuildResult:
    """Build ``text_encoder.engine`` and ``image_graph.engine`` (+ manifests) in ``out_dir``.

    Args:
        onnx_dir: folder of ``gsnet export onnx`` (both graphs and ``manifest.json``).
        out_dir: where engines, manifests, derived ONNX models and the timing cache go.
        precision: FP16, INT8 or BEST.
        classes_opt: the class count the engines are tuned for (opt of the N profile).
        workspace_gib: workspace pool limit (None: TensorRT default).
        dla_core: build the image graph for this DLA core (static B=5, N=classes_opt, GPU fallback).
        hardware_compatible: Ampere+ hardware-compatible engines.
        version_compatible: version-compatible engines.
        calib_images: images (files or folders) for INT8 calibration when no Q/DQ model exists yet.
        plugin: try the fused cost-volume plugin (recorded in the manifest either way).
        text_tokens: int64 ``[N, 77]`` tokens of a real vocabulary for AutoCast's reference run and
            the calibration text embeddings (None: ``calib.views.calibration_tokens``).

    Returns:
        A ``BuildResult``.

    Raises:
        EngineBuildError: TensorRT missing (after the ONNX models are written), too old, or the
            build failed; or settings that do not fit together.
        ExportError: the ONNX folder is incomplete.

    """
    from gsnet_deploy.calib.quantize import read_model_digest
    from gsnet_deploy.export.trt import (
        BuildConfig,
        EngineFromNetwork,
        NetworkFromOnnx,
        SaveEngine,
        builder_dla_cores,
        import_tensorrt,
        installed_tensorrt_version,
    )

    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    for graph in Graph:
        if not (onnx_dir / f"{graph.value}.onnx").is_file():
            raise ExportError(
                f"{onnx_dir / (graph.value + '.onnx')} does not exist; run `gsnet export onnx --out {onnx_dir}` first."
            )
    digest = read_model_digest(onnx_dir)
    dims = dim_ranges(classes_opt, fixed=dla_core is not None)
    text_dims = dim_ranges(classes_opt)
    out_dir.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []

    version = installed_tensorrt_version()
    needed = (
        variants_for_any_target(precision)
        if version is None
        else {g: (select_build_path(version, precision).plan(g).variant,) for g in Graph}
    )
    if version is not None and precision is Precision.BEST and version >= STRONG_TYPING_MIN:
        needed = {Graph.TEXT: needed[Graph.TEXT], Graph.IMAGE: (OnnxVariant.INT8, OnnxVariant.INT8_FP16)}
    variants = _make_variants(
        onnx_dir,
        out_dir,
        needed,
        digest=digest,
        calib_images=calib_images,
        text_tokens=text_tokens,
        notes=notes,
    )
    onnx_models = {p.name: p for per_graph in variants.values() for p in per_graph.values()}
    write_json_atomic(
        out_dir / BUILD_RECORD_FILE,
        {
            "onnx_dir": str(onnx_dir.resolve()),
            "precision": precision.value,
            "model_digest": digest,
            "onnx_models": sorted(onnx_models),
            "notes": notes,
        },
    )
    if version is None:
        raise EngineBuildError(
            f"TensorRT is not installed here, so only the ONNX models were written to {out_dir}; copy "
            f"{onnx_dir} and "
            f"{out_dir} to the target and run the same `gsnet export build` command there."
        )

    trt_module = import_tensorrt()
    path = select_build_path(version, precision)
    has_dla, cores = builder_dla_cores() if dla_core is not None else (True, 0)
    dla = resolve_dla(version, cores, dla_core, has_dla_device_type=has_dla)
    host = _current_host(str(trt_module.__version__))
    use_plugin, plugin_note, plugin_modules = _plugin_hook(plugin, version, notes)

    engines: dict[Graph, Path] = {}
    manifests: dict[Graph, EngineManifest] = {}
    for graph in Graph:
        plan = path.plan(graph)
        src = variants[graph][plan.variant]
        hook = None
        graph_plugin = False
        if use_plugin and graph is Graph.IMAGE:
            import onnx

            trt_plugin, plugin_rewrite = plugin_modules
            model, replaced = plugin_rewrite.replace_cost_volume_with_plugin(onnx.load(str(src)))
            if replaced:
                from gsnet_deploy.export.fp16 import save_onnx_atomic

                src = save_onnx_atomic(model, out_dir / src.name.replace(".onnx", ".plugin.onnx"))
                hook = trt_plugin.register_plugin
                graph_plugin = True
            else:
                notes.append("plugin requested but no cost volume was found to replace; built without it")
        graph_dims = dims if graph is Graph.IMAGE else text_dims
        profile = profile_for(onnx_input_shapes(src), graph_dims)
        engine_path = out_dir / graph.engine_file
        SaveEngine(
            EngineFromNetwork(
                NetworkFromOnnx(src, strongly_typed=plan.flags.strongly_typed, plugin_hook=hook),
                BuildConfig(
                    plan.flags,
                    profiles=[profile],
                    workspace_gib=workspace_gib,
                    timing_cache=out_dir / TIMING_CACHE_FILE,
                    dla_core=dla if graph is Graph.IMAGE else None,
                    hardware_compatible=hardware_compatible,
                    version_compatible=version_compatible,
                ),
            ),
            engine_path,
        )()
        manifest = EngineManifest(
            graph=graph,
            engine_file=graph.engine_file,
            onnx_file=src.name,
            precision=precision,
            precision_path=plan.how,
            strongly_typed=plan.flags.strongly_typed,
            host=host,
            profiles=(profile,),
            model_digest=digest,
            plugin_used=graph_plugin,
            plugin_note=plugin_note if graph is Graph.IMAGE else "plugin applies to the image graph only",
            dla_core=dla if graph is Graph.IMAGE else None,
            hardware_compatible=hardware_compatible,
            version_compatible=version_compatible,
            notes=tuple(notes),
        )
        write_manifest(manifest, out_dir)
        engines[graph], manifests[graph] = engine_path, manifest
    return BuildResult(
        out_dir=out_dir,
        precision=precision,
        engines=engines,
        manifests=manifests,
        onnx_models=onnx_models,
        notes=tuple(notes),
    )
