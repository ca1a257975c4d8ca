"""``gsnet export build``: TensorRT engines of both graphs, by the installed TensorRT's path.

The build loop. Its decisions live beside it: ``version_policy`` (which ONNX model and flags per
TensorRT version and precision), ``dla`` (DLA rules), ``profiles`` (optimization profiles),
``derived_models`` (FP16 / Q/DQ models, written once and reused while fresh) and
``plugin_discovery`` (the fused cost-volume plugin).

Without TensorRT (CI, this workstation) the FP16 / Q/DQ ONNX models are still written, then one
``EngineBuildError`` line says how to finish on the target.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gsnet_deploy.contracts.atomic import write_json_atomic
from gsnet_deploy.contracts.derived import OnnxVariant, read_model_digest
from gsnet_deploy.contracts.engine_manifest import EngineManifest, Graph, HostInfo, this_platform, write_manifest
from gsnet_deploy.contracts.precision import Precision
from gsnet_deploy.errors import EngineBuildError, ExportError
from gsnet_deploy.export.derived_models import make_variants
from gsnet_deploy.export.dla import resolve_dla
from gsnet_deploy.export.plugin_discovery import find_plugin
from gsnet_deploy.export.profiles import DEFAULT_CLASSES_OPT, dim_ranges, onnx_input_shapes, profile_for
from gsnet_deploy.export.version_policy import STRONG_TYPING_MIN, select_build_path, variants_for_any_target

TIMING_CACHE_FILE = "timing.cache"
BUILD_RECORD_FILE = "build.json"


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


def _current_host(trt_version_text: str) -> HostInfo:
    from gsnet_deploy.runtime.tensorrt_backend import current_gpu

    name, capability = current_gpu()
    system, machine = this_platform()
    return HostInfo(trt_version_text, name, capability, system, machine)


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
    from gsnet_deploy.export.trt import (
        BuildConfig,
        EngineFromNetwork,
        NetworkFromOnnx,
        SaveEngine,
        builder_dla_cores,
        import_tensorrt,
        installed_tensorrt_version,
    )

    if plugin and hardware_compatible:
        raise EngineBuildError(
            "--plugin cannot be combined with --hardware-compatible: the plugin's kernel is compiled for this GPU "
            "only; drop one of the two."
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
    if plugin and version is not None:
        from gsnet_deploy.kernels.trt_plugin import MIN_AOT_VERSION, plugin_supported

        if not plugin_supported(version):
            raise EngineBuildError(
                f"--plugin needs TensorRT {'.'.join(map(str, MIN_AOT_VERSION))} or newer (AOT plugins) but this host "
                f"has {'.'.join(map(str, version))}; build without --plugin."
            )
    needed = (
        variants_for_any_target(precision)
        if version is None
        else {g: (select_build_path(version, precision).plan(g).variant,) for g in Graph}
    )
    if version is not None and precision is Precision.BEST and version >= STRONG_TYPING_MIN:
        needed = {Graph.TEXT: needed[Graph.TEXT], Graph.IMAGE: (OnnxVariant.INT8, OnnxVariant.INT8_FP16)}
    variants = make_variants(
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
    use_plugin, plugin_note, plugin_modules = find_plugin(plugin, version, notes)

    engines: dict[Graph, Path] = {}
    manifests: dict[Graph, EngineManifest] = {}
    for graph in Graph:
        plan = path.plan(graph)
        src = variants[graph][plan.variant]
        hook = None
        graph_plugin = False
        if use_plugin and graph is Graph.IMAGE:
            import onnx

            from gsnet_deploy.export.onnx_save import save_onnx_atomic

            trt_plugin, plugin_rewrite = plugin_modules
            # fails with one line when the QGFF front is not in the graph (never a silent build without it)
            model = plugin_rewrite.require_cost_volume_plugin(onnx.load(str(src)), src.name)
            src = save_onnx_atomic(model, out_dir / src.name.replace(".onnx", ".plugin.onnx"))
            hook = functools.partial(trt_plugin.register_plugin, trt_plugin.ptx_arch(host.compute_capability))
            graph_plugin = True
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
