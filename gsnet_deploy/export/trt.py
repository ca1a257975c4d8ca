"""TensorRT build loaders, in the style of Polygraphy's ``backend/trt/loader.py`` (NVIDIA, Apache-2.0).

A loader is a CapWords noun: ``__init__`` only records its arguments (values, or callables that
return them) and ``__call__`` does the work, so a build reads as one lazy expression::

    SaveEngine(
        EngineFromNetwork(
            NetworkFromOnnx(path, strongly_typed=True),
            BuildConfig(plan, profiles=[profile], timing_cache=out / "timing.cache"),
        ),
        out / "image_graph.engine",
    )()

TensorRT is imported inside ``__call__``; the TensorRT version picks the build path once, in
``export.build.select_build_path``, and the loaders only carry it out. We call the TensorRT Python
API directly (no trtexec, no subprocess) rather than Polygraphy's ``CreateConfig``, whose precision
arguments map onto builder flags that TensorRT 11 removed, and so that mypy checks every TensorRT call
against ``tensorrt-stubs``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, TypeAlias, TypeVar

from gsnet_deploy.contracts.atomic import write_bytes_atomic
from gsnet_deploy.contracts.engine_manifest import Profile, parse_version
from gsnet_deploy.contracts.tensorrt_import import require_tensorrt
from gsnet_deploy.errors import EngineBuildError

if TYPE_CHECKING:
    import tensorrt as trt

T = TypeVar("T")
ValueOrCallable: TypeAlias = T | Callable[[], T]

GIB = 1 << 30


def _resolve(value: ValueOrCallable[T]) -> T:
    """Call ``value`` if it is a loader (callable), else return it."""
    return value() if callable(value) else value


def import_tensorrt() -> ModuleType:
    """Import the real TensorRT Python package.

    Raises:
        EngineBuildError: TensorRT is not installed (``tensorrt-stubs`` alone is an empty namespace
            package without ``Builder``).

    """
    return require_tensorrt(EngineBuildError, "install TensorRT >= 10 on this host.")


def installed_tensorrt_version() -> tuple[int, ...] | None:
    """Version of the real TensorRT here, or None where it is absent (not importable or only stubs)."""
    try:
        trt_module = import_tensorrt()
    except EngineBuildError:
        return None
    return parse_version(str(trt_module.__version__))


@dataclass(frozen=True)
class BuildFlags:
    """Precision decisions for one network, made by ``export.build.select_build_path``.

    Attributes:
        strongly_typed: create the network with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``
            (TensorRT >= 10.12; ignored but accepted by 11.x, where strong typing is always on).
        fp16: set ``BuilderFlag.FP16`` (weakly typed 10.x only).
        int8: set ``BuilderFlag.INT8`` (weakly typed 10.x with a Q/DQ model only; no calibrator).

    """

    strongly_typed: bool
    fp16: bool = False
    int8: bool = False

    def __post_init__(self) -> None:
        if self.strongly_typed and (self.fp16 or self.int8):
            raise EngineBuildError(
                "Precision builder flags cannot be combined with a strongly typed network; precision comes from the ONNX types."
            )


@dataclass
class ParsedNetwork:
    """What ``NetworkFromOnnx`` returns: the builder, the network and the parser that owns its weights."""

    builder: trt.Builder
    network: trt.INetworkDefinition
    parser: trt.OnnxParser
    logger: trt.ILogger


class NetworkFromOnnx:
    """Parse an ONNX file into a TensorRT network (from the file, so external weights beside it load too)."""

    def __init__(
        self,
        path: ValueOrCallable[Path],
        *,
        strongly_typed: bool,
        plugin_hook: Callable[[], None] | None = None,
    ) -> None:
        """Record the arguments.

        Args:
            path: the ONNX model, or a loader returning it.
            strongly_typed: whether to create a strongly typed network.
            plugin_hook: called before parsing to register plugins (e.g. the cost-volume plugin).

        """
        self._path = path
        self._strongly_typed = strongly_typed
        self._plugin_hook = plugin_hook

    def __call__(self) -> ParsedNetwork:
        """Create builder, network and parser and parse the ONNX file.

        Raises:
            EngineBuildError: the parser rejected the model (its first errors are quoted).

        """
        import_tensorrt()
        import tensorrt as trt

        path = Path(_resolve(self._path))
        if self._plugin_hook is not None:
            self._plugin_hook()
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        flags = 0
        if self._strongly_typed:
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(path)):
            errors = "; ".join(str(parser.get_error(i).desc()) for i in range(min(parser.num_errors, 3)))
            raise EngineBuildError(f"TensorRT could not parse {path} ({errors}); check the ONNX model and the TensorRT version.")
        return ParsedNetwork(builder=builder, network=network, parser=parser, logger=logger)


def size_math_layers(network: trt.INetworkDefinition, shape_inputs: Collection[str]) -> list[trt.ILayer]:
    """Layers of ``network`` that compute from sizes alone: never from the data of a tensor.

    A size is a shape-tensor input (``shape_inputs``, e.g. the paper head's ``out_size``) or the
    output of an ``IShapeLayer`` (which reads only its input's dimensions); constants are neutral. A
    layer whose inputs are all sizes or constants, at least one a size, computes sizes too: the
    paper graphs' resize coordinates ``(dst + 0.5) * in / out - 0.5``, their floors and weights.
    The network's layers are visited in order (the ONNX parser adds them in topological order).
    """
    import tensorrt as trt

    sizes = set(shape_inputs)
    constants: set[str] = set()
    found: list[trt.ILayer] = []
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        inputs = [t.name for t in (layer.get_input(i) for i in range(layer.num_inputs)) if t is not None]
        outputs = {layer.get_output(i).name for i in range(layer.num_outputs)}
        if layer.type == trt.LayerType.SHAPE:
            sizes |= outputs
        elif layer.type == trt.LayerType.CONSTANT or all(name in constants for name in inputs):
            constants |= outputs
        elif all(name in sizes or name in constants for name in inputs):
            sizes |= outputs
            found.append(layer)
    return found


def pin_size_math_fp32(layers: Sequence[trt.ILayer]) -> int:
    """Constrain the float arithmetic of ``layers`` (from ``size_math_layers``) to FP32; returns how many were pinned.

    With ``BuilderFlag.FP16`` a weakly typed build may run any layer in FP16 (ILayer::setPrecision,
    TensorRT 10.x), whose integers are exact only to 2048 and whose spacing near 2880 is 2: resize
    coordinates would land on the wrong pixel and their fractional weights would round to 0 or 1.
    A layer with a float input gets ``precision`` FP32, each float output that is an execution
    tensor ``set_output_type`` FP32; pure shape computations (host) and integer layers are left
    alone. The constraints bind only with ``BuilderFlag.OBEY_PRECISION_CONSTRAINTS`` (or PREFER).
    """
    import tensorrt as trt

    fp32 = trt.DataType.FLOAT
    pinned = 0
    for layer in layers:
        inputs = [t for t in (layer.get_input(i) for i in range(layer.num_inputs)) if t is not None]
        outputs = [layer.get_output(i) for i in range(layer.num_outputs)]
        if not any(t.is_execution_tensor for t in outputs):
            continue  # computed on the host for shapes only, in its own type
        float_in = any(t.dtype == fp32 for t in inputs)
        float_out = [i for i, t in enumerate(outputs) if t.dtype == fp32 and t.is_execution_tensor]
        if not float_in and not float_out:
            continue  # integer index arithmetic: exact in any mode
        if float_in:
            layer.precision = fp32
        for i in float_out:
            layer.set_output_type(i, fp32)
        pinned += 1
    return pinned


class BuildConfig:
    """Builder configuration: precision flags, profiles, workspace, timing cache, DLA and compatibility."""

    def __init__(
        self,
        flags: BuildFlags,
        *,
        profiles: Sequence[Profile],
        workspace_gib: float | None = None,
        timing_cache: Path | None = None,
        dla_core: int | None = None,
        hardware_compatible: bool = False,
        version_compatible: bool = False,
        activation_resize: bool = False,
        size_math_fp32: bool = False,
    ) -> None:
        """Record the arguments.

        Args:
            flags: precision decisions (``BuildFlags``).
            profiles: optimization profiles, one entry each; shape-tensor inputs (``Profile.values``)
                get value ranges (``set_shape_input``) instead of shape ranges.
            workspace_gib: workspace memory pool limit in GiB (None: TensorRT's default, the device memory).
            timing_cache: timing cache file loaded if present (``EngineFromNetwork`` saves it back).
            dla_core: DLA core to build for, with GPU fallback; None for GPU only. The caller has
                checked it with ``export.build.resolve_dla``.
            hardware_compatible: ``HardwareCompatibilityLevel.AMPERE_PLUS``.
            version_compatible: ``BuilderFlag.VERSION_COMPATIBLE`` (the plan embeds a lean runtime).
            activation_resize: let the runtime size activation memory for the shapes it runs
                (``PreviewFeature.RUNTIME_ACTIVATION_RESIZE_10_10``, TensorRT >= 10.10; ignored where
                absent): the paper head's ``[N, H, W]`` tensors at the profile maximum would otherwise
                reserve gigabytes for every run.
            size_math_fp32: with ``BuilderFlag.FP16`` (weak typing), keep the arithmetic computed from
                sizes alone (the paper graphs' resize coordinates, up to 2880) in FP32 with layer
                precision constraints (``pin_size_math_fp32``); ``pinned_layers`` then says how many.

        """
        if not profiles:
            raise EngineBuildError("No optimization profile was given; pass at least one profile.")
        self.flags = flags
        self.profiles = tuple(profiles)
        self.workspace_gib = workspace_gib
        self.timing_cache = timing_cache
        self.dla_core = dla_core
        self.hardware_compatible = hardware_compatible
        self.version_compatible = version_compatible
        self.activation_resize = activation_resize
        self.size_math_fp32 = size_math_fp32
        self.pinned_layers: int | None = None  # set by __call__ where size_math_fp32 applies

    def __call__(self, parsed: ParsedNetwork) -> trt.IBuilderConfig:
        """Create the ``IBuilderConfig`` for ``parsed``'s builder."""
        import_tensorrt()
        import tensorrt as trt

        builder = parsed.builder
        config = builder.create_builder_config()
        if self.flags.fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        if self.flags.int8:
            config.set_flag(trt.BuilderFlag.INT8)
        if self.size_math_fp32 and self.flags.fp16:
            shape_inputs = {name for profile in self.profiles for name in profile.values}
            self.pinned_layers = pin_size_math_fp32(size_math_layers(parsed.network, shape_inputs))
            if self.pinned_layers:
                # NOTE: OBEY fails the build rather than run a pinned layer in FP16. With INT8 too, PREFER:
                # the ONNX parser also constrains weakly typed Q/DQ layers, and those must stay hints.
                flag = trt.BuilderFlag
                config.set_flag(flag.PREFER_PRECISION_CONSTRAINTS if self.flags.int8 else flag.OBEY_PRECISION_CONSTRAINTS)
        if self.workspace_gib is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(self.workspace_gib * GIB))
        for profile in self.profiles:
            opt_profile = builder.create_optimization_profile()
            for name, shape in profile.shapes.items():
                if name in profile.values:
                    # a shape tensor (values set output shapes): its values get the range, its shape is static
                    # (set_shape is optional for static shapes). Python name in 10.x and 11.x alike; int32
                    # values (setShapeValues) up to 10.10, int64 (setShapeValuesV2) from 10.11 on.
                    values = profile.values[name]
                    opt_profile.set_shape_input(name, list(values.min), list(values.opt), list(values.max))
                    continue
                opt_profile.set_shape(name, trt.Dims(list(shape.min)), trt.Dims(list(shape.opt)), trt.Dims(list(shape.max)))
            config.add_optimization_profile(opt_profile)
        if self.activation_resize:
            resize_feature = getattr(trt.PreviewFeature, "RUNTIME_ACTIVATION_RESIZE_10_10", None)
            if resize_feature is not None:
                config.set_preview_feature(resize_feature, True)
        cache_bytes = self.timing_cache.read_bytes() if self.timing_cache and self.timing_cache.is_file() else b""
        cache = config.create_timing_cache(cache_bytes)
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            raise EngineBuildError(
                f"TensorRT rejected the timing cache {self.timing_cache} (made by another TensorRT version or GPU); "
                "delete it and build again."
            )
        # the engine inspector reports layer precisions only for DETAILED (export check reads them)
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        if self.dla_core is not None:
            config.default_device_type = trt.DeviceType.DLA
            config.DLA_core = self.dla_core
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
        if self.hardware_compatible:
            config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
        if self.version_compatible:
            config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        return config


class EngineFromNetwork:
    """Build a serialized engine (plan bytes) from a parsed network and a config; save the timing cache."""

    def __init__(self, network: ValueOrCallable[ParsedNetwork], config: BuildConfig) -> None:
        """Record the arguments.

        Args:
            network: a ``ParsedNetwork`` or a loader returning one (e.g. ``NetworkFromOnnx``).
            config: the ``BuildConfig``; its ``timing_cache`` file is written back after the build.

        """
        self._network = network
        self._config = config

    def __call__(self) -> bytes:
        """Build and return the serialized engine.

        Raises:
            EngineBuildError: TensorRT returned no engine (its log says why).

        """
        parsed = _resolve(self._network)
        config = self._config(parsed)
        plan = parsed.builder.build_serialized_network(parsed.network, config)
        if plan is None:
            raise EngineBuildError(
                "TensorRT failed to build the engine (see the TensorRT log above); try a larger --workspace or another precision."
            )
        if self._config.timing_cache is not None:
            cache = config.get_timing_cache()
            if cache is not None:
                write_bytes_atomic(self._config.timing_cache, bytes(memoryview(cache.serialize())))
        return bytes(memoryview(plan))


class SaveEngine:
    """Write serialized engine bytes to a file atomically and return the path."""

    def __init__(self, engine: ValueOrCallable[bytes], path: Path) -> None:
        """Record the arguments: engine bytes (or a loader returning them) and the destination path."""
        self._engine = engine
        self._path = Path(path)

    def __call__(self) -> Path:
        """Resolve the engine and write it."""
        return write_bytes_atomic(self._path, _resolve(self._engine))


@dataclass(frozen=True)
class LayerPrecision:
    """One layer of a built engine as TensorRT's engine inspector describes it.

    Attributes:
        name: the layer name (TensorRT's, often a fusion of several ONNX nodes).
        layer_type: the inspector's ``LayerType`` (e.g. ``CaskConvolution``, ``Reformat``).
        precisions: the distinct data types of its inputs and outputs (``FP16``, ``INT8``, ``FP32``...).
    """

    name: str
    layer_type: str
    precisions: tuple[str, ...]


_PRECISION_WORDS = {"INT8": "INT8", "FP8": "FP8", "HALF": "FP16", "FP16": "FP16", "FLOAT": "FP32", "FP32": "FP32", "BF16": "BF16"}


def parse_layer_information(info: str) -> list[LayerPrecision]:
    """Layers and their I/O precisions from ``EngineInspector.get_engine_information(JSON)`` (pure).

    Each layer lists ``Inputs`` / ``Outputs`` whose ``Format/Datatype`` reads e.g. "Row major linear
    FP16 format" or "Channel major INT8 format"; layers given only as names (engines built without
    ``ProfilingVerbosity.DETAILED``) get no precisions.
    """
    import json

    payload = json.loads(info)
    layers: list[LayerPrecision] = []
    for layer in payload.get("Layers", []):
        if isinstance(layer, str):
            layers.append(LayerPrecision(name=layer, layer_type="", precisions=()))
            continue
        found: list[str] = []
        for tensor in (*layer.get("Inputs", []), *layer.get("Outputs", [])):
            text = str(tensor.get("Format/Datatype", "")).upper()
            for word, precision in _PRECISION_WORDS.items():
                if word in text and precision not in found:
                    found.append(precision)
        layers.append(
            LayerPrecision(name=str(layer.get("Name", "")), layer_type=str(layer.get("LayerType", "")), precisions=tuple(found))
        )
    return layers


def summarize_layer_precisions(layers: Sequence[LayerPrecision]) -> dict[str, object]:
    """Layer counts per precision and the convolution / matrix-multiply layers that run without INT8 (pure)."""
    by_precision: dict[str, int] = {}
    for layer in layers:
        for precision in layer.precisions:
            by_precision[precision] = by_precision.get(precision, 0) + 1
    heavy = [layer for layer in layers if any(k in layer.layer_type for k in ("Convolution", "Gemm", "MatrixMultiply", "Conv"))]
    return {
        "layers": len(layers),
        "by_precision": dict(sorted(by_precision.items())),
        "conv_or_matmul_layers": len(heavy),
        "conv_or_matmul_without_int8": [layer.name for layer in heavy if "INT8" not in layer.precisions],
    }


def engine_layer_precisions(plan: bytes, dla_core: int | None = None) -> list[LayerPrecision]:
    """Deserialize ``plan`` and read its layers' precisions with TensorRT's engine inspector.

    Raises:
        EngineBuildError: TensorRT is missing or cannot load the plan.
    """
    import_tensorrt()
    import tensorrt as trt

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    if dla_core is not None:
        runtime.DLA_core = dla_core
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise EngineBuildError("TensorRT could not load the engine to inspect it; rebuild it with `gsnet export build`.")
    inspector = engine.create_engine_inspector()
    return parse_layer_information(inspector.get_engine_information(trt.LayerInformationFormat.JSON))


def builder_dla_cores() -> tuple[bool, int]:
    """Whether this TensorRT has a DLA device type, and how many DLA cores its builder reports."""
    import_tensorrt()
    import tensorrt as trt

    has_dla = hasattr(trt.DeviceType, "DLA")
    builder = trt.Builder(trt.Logger(trt.Logger.WARNING))
    return has_dla, int(getattr(builder, "num_DLA_cores", 0)) if has_dla else 0
