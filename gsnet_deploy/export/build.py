"""``gsnet export build``: TensorRT engines of the exported graphs, by the installed TensorRT's path.

Always the text and image graphs; also the paper protocol's encoder and head when the ONNX folder
has them (``paper_encoder.onnx`` / ``paper_head.onnx``), with the profiles of ``export.profiles``
(h, w of the resized image, N, and the value range of the head's ``out_size`` shape tensor). The
paper engines follow the image graph's precision; for INT8 / best they need Q/DQ paper graphs
(``paper_encoder.int8.onnx`` / ``paper_head.int8.onnx`` from calibration): without them they are
built in FP16 and their manifests say so. Also tiled mode's blending graphs when the folder has
them (``tile_blend.onnx`` / ``tile_emit.onnx``): weight-free, always FP32, with the strip's and the
``place`` / ``count`` shape tensors' ranges of ``export.profiles``. Every manifest records the pooling
the graphs were exported with (from the ONNX folder's manifest; None when it does not say).

The build loop. Its decisions live beside it: ``version_policy`` (which ONNX model and flags per
TensorRT version and precision), ``dla`` (DLA rules), ``profiles`` (optimization profiles),
``derived_models`` (FP16 / Q/DQ models, written once and reused while fresh) and
``plugin_discovery`` (the fused cost-volume plugin).

Without TensorRT (CI, this workstation) the FP16 / Q/DQ ONNX models are still written, then one
``EngineBuildError`` line says how to finish on the target.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gsnet_deploy.contracts import io_names
from gsnet_deploy.contracts.atomic import write_json_atomic
from gsnet_deploy.contracts.derived import OnnxVariant, read_model_digest, read_sidecar
from gsnet_deploy.contracts.engine_manifest import (
    CORE_GRAPHS,
    PAPER_GRAPHS,
    TILE_GRAPHS,
    EngineManifest,
    Graph,
    HostInfo,
    this_platform,
    write_manifest,
)
from gsnet_deploy.contracts.precision import Precision
from gsnet_deploy.errors import EngineBuildError, ExportError
from gsnet_deploy.export.derived_models import make_variants
from gsnet_deploy.export.dla import resolve_dla
from gsnet_deploy.export.plugin_discovery import find_plugin
from gsnet_deploy.export.profiles import (
    DEFAULT_CLASSES_OPT,
    TILE_SHAPE_INPUTS,
    dim_ranges,
    onnx_input_shapes,
    paper_dim_ranges,
    profile_for,
    static_output_shapes,
    tile_dim_ranges,
)
from gsnet_deploy.export.version_policy import (
    STRONG_TYPING_MIN,
    BuildPath,
    GraphPlan,
    fp32_plan,
    select_build_path,
    variants_for_any_target,
)

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


def read_pooling(onnx_dir: Path) -> int | None:
    """The class-transformer pooling recorded in an ONNX folder's manifest (None: not recorded, an older export)."""
    try:
        payload = json.loads((Path(onnx_dir) / io_names.MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    pooling = payload.get("pooling") if isinstance(payload, dict) else None
    if isinstance(pooling, (list, tuple)):
        pooling = pooling[0] if pooling else None
    return None if pooling is None else int(pooling)


def graphs_present(onnx_dir: Path, pair: tuple[Graph, ...], what: str) -> bool:
    """Whether the ONNX folder has both graphs of ``pair`` (``PAPER_GRAPHS``, ``TILE_GRAPHS``; an older export has neither).

    Raises:
        ExportError: only one of the two is there.

    """
    present = [(Path(onnx_dir) / g.onnx_file).is_file() for g in pair]
    if any(present) and not all(present):
        missing = next(g.onnx_file for g, ok in zip(pair, present) if not ok)
        raise ExportError(f"ONNX folder {onnx_dir} has no {missing} beside the other {what} graph; re-run `gsnet export onnx`.")
    return all(present)


def paper_int8_ready(onnx_dir: Path, out_dir: Path, digest: str) -> bool:
    """Whether Q/DQ paper graphs of these weights exist (in the output or the ONNX folder) for INT8 paper engines."""

    def fresh(graph: Graph) -> bool:
        name = OnnxVariant.INT8.file_name(graph)
        for folder in (out_dir, onnx_dir):
            record = read_sidecar(folder / name)
            if (folder / name).is_file() and record is not None and record.get("model_digest") == digest:
                return True
        return False

    return all(fresh(g) for g in PAPER_GRAPHS)


def _paper_qdq_from_image(onnx_dir: Path, int8_dir: Path, notes: list[str]) -> bool:
    """Q/DQ paper graphs with the ranges of the image graph's Q/DQ model in ``int8_dir`` (no calibration run).

    Returns:
        Whether both were written; False where the image Q/DQ model records no ranges (made before
        they were recorded), with a note saying why.
    """
    from gsnet_deploy.calib.quantize import quantize_paper_graphs

    try:
        written = quantize_paper_graphs(onnx_dir, int8_dir)
    except ExportError as err:
        notes.append(f"no INT8 paper graphs: {err}")
        return False
    notes.append(f"wrote the INT8 paper graphs with the ranges of {int8_dir / 'image_graph.int8.onnx'}")
    return all(g in written for g in PAPER_GRAPHS)


PAPER_FP16_NOTE = (
    "paper engines built in FP16: no INT8 paper graphs (paper_encoder.int8.onnx, paper_head.int8.onnx) of this model; "
    "calibrate them and rebuild for INT8 paper engines"
)


SIZE_MATH_NOTE = (
    "{count} layers computing resize coordinates from sizes alone kept in FP32 by precision constraints (weakly typed FP16 build)"
)


def paper_plan(path: BuildPath, fp16_path: BuildPath, int8_ready: bool) -> tuple[GraphPlan, bool]:
    """The paper graphs' plan: the image graph's, or its FP16 plan when INT8 needs Q/DQ paper graphs that do not exist.

    Returns:
        The plan and whether it fell back to FP16.
    """
    image = path.plan(Graph.IMAGE)
    if image.variant in (OnnxVariant.INT8, OnnxVariant.INT8_FP16) and not int8_ready:
        return fp16_path.plan(Graph.IMAGE), True
    return image, False


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
    """Build ``text_encoder.engine`` and ``image_graph.engine`` (+ the paper engines) with manifests in ``out_dir``.

    Args:
        onnx_dir: folder of ``gsnet export onnx`` (both graphs and ``manifest.json``; the paper
            encoder and head engines are built when it has their graphs).
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
    for graph in CORE_GRAPHS:
        if not (onnx_dir / f"{graph.value}.onnx").is_file():
            raise ExportError(
                f"{onnx_dir / (graph.value + '.onnx')} does not exist; run `gsnet export onnx --out {onnx_dir}` first."
            )
    graphs = (
        CORE_GRAPHS
        + (PAPER_GRAPHS if graphs_present(onnx_dir, PAPER_GRAPHS, "paper") else ())
        + (TILE_GRAPHS if graphs_present(onnx_dir, TILE_GRAPHS, "tile") else ())
    )
    digest = read_model_digest(onnx_dir)
    pooling = read_pooling(onnx_dir)
    dims = dim_ranges(classes_opt, fixed=dla_core is not None)
    text_dims = dim_ranges(classes_opt)
    paper_dims = paper_dim_ranges(classes_opt)
    tile_dims = tile_dim_ranges(classes_opt)
    out_dir.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    int8_ready = paper_int8_ready(onnx_dir, out_dir, digest)

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
        else {g: (select_build_path(version, precision).plan(g).variant,) for g in CORE_GRAPHS}
    )
    if version is not None and precision is Precision.BEST and version >= STRONG_TYPING_MIN:
        needed = {Graph.TEXT: needed[Graph.TEXT], Graph.IMAGE: (OnnxVariant.INT8, OnnxVariant.INT8_FP16)}
    variants = make_variants(
        onnx_dir, out_dir, needed, digest=digest, calib_images=calib_images, text_tokens=text_tokens, notes=notes
    )
    if PAPER_GRAPHS[0] in graphs:
        image_qdq = variants[Graph.IMAGE].get(OnnxVariant.INT8)
        if image_qdq is not None and not int8_ready:
            int8_ready = _paper_qdq_from_image(onnx_dir, image_qdq.parent, notes)
        targets = ((10, 3), STRONG_TYPING_MIN) if version is None else (version,)
        plans = [
            paper_plan(select_build_path(v, precision), select_build_path(v, Precision.FP16), int8_ready)[0] for v in targets
        ]
        found = {p.variant for p in plans}
        if OnnxVariant.INT8_FP16 in found:
            found.add(OnnxVariant.INT8)  # AutoCast makes it from the Q/DQ model
        paper_needed = {g: tuple(v for v in OnnxVariant if v in found) for g in PAPER_GRAPHS}
        paper_variants = make_variants(
            onnx_dir, out_dir, paper_needed, digest=digest, calib_images=None, text_tokens=text_tokens, notes=notes
        )
        variants.update({g: paper_variants[g] for g in PAPER_GRAPHS})
    variants.update({g: {OnnxVariant.FP32: onnx_dir / g.onnx_file} for g in TILE_GRAPHS if g in graphs})  # FP32 only
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

    fp16_path = select_build_path(version, Precision.FP16)
    feature_shapes = (
        static_output_shapes(onnx_dir / Graph.PAPER_ENCODER.onnx_file, io_names.PAPER_FEATURES)
        if PAPER_GRAPHS[0] in graphs
        else {}
    )
    engines: dict[Graph, Path] = {}
    manifests: dict[Graph, EngineManifest] = {}
    paper_fell_back = False
    for graph in graphs:
        if graph in TILE_GRAPHS:
            plan, paper_fp16 = fp32_plan(version), False
        elif graph in PAPER_GRAPHS:
            plan, paper_fp16 = paper_plan(path, fp16_path, int8_ready)
        else:
            plan, paper_fp16 = path.plan(graph), False
        graph_notes = (*notes, PAPER_FP16_NOTE) if paper_fp16 else tuple(notes)
        paper_fell_back |= paper_fp16
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
        if graph in TILE_GRAPHS:
            profile = profile_for(onnx_input_shapes(src), tile_dims, TILE_SHAPE_INPUTS)
        else:
            graph_dims = dims if graph is Graph.IMAGE else paper_dims if graph in PAPER_GRAPHS else text_dims
            profile = profile_for(onnx_input_shapes(src), graph_dims)
        engine_path = out_dir / graph.engine_file
        config = BuildConfig(
            plan.flags,
            profiles=[profile],
            workspace_gib=workspace_gib,
            timing_cache=out_dir / TIMING_CACHE_FILE,
            dla_core=dla if graph is Graph.IMAGE else None,
            hardware_compatible=hardware_compatible,
            version_compatible=version_compatible,
            activation_resize=graph is Graph.PAPER_HEAD or graph in TILE_GRAPHS,  # sized per call at run time
            size_math_fp32=graph in PAPER_GRAPHS,  # resize coordinates up to 2880 px: FP16 misplaces them
        )
        SaveEngine(
            EngineFromNetwork(NetworkFromOnnx(src, strongly_typed=plan.flags.strongly_typed, plugin_hook=hook), config),
            engine_path,
        )()
        if config.pinned_layers:
            graph_notes = (*graph_notes, SIZE_MATH_NOTE.format(count=config.pinned_layers))
        manifest = EngineManifest(
            graph=graph,
            engine_file=graph.engine_file,
            onnx_file=src.name,
            precision=Precision.FP16 if paper_fp16 else precision,
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
            notes=graph_notes,
            pooling=pooling,
            output_shapes=feature_shapes if graph is Graph.PAPER_ENCODER else {},
        )
        write_manifest(manifest, out_dir)
        engines[graph], manifests[graph] = engine_path, manifest
    return BuildResult(
        out_dir=out_dir,
        precision=precision,
        engines=engines,
        manifests=manifests,
        onnx_models=onnx_models,
        notes=tuple(notes) + ((PAPER_FP16_NOTE,) if paper_fell_back else ()),
    )
