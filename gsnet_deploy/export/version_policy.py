"""Which ONNX model and which builder flags each TensorRT version and precision take (pure, no TensorRT).

Version paths (NVIDIA TensorRT docs: "Migrating from TensorRT 10.x to 11.x", "Explicit Quantization"):

- TensorRT >= 10.12, including 11.x: strongly typed networks. FP16 comes from an ONNX model made
  FP16 by ModelOpt AutoCast; INT8 from the Q/DQ model; ``best`` from the Q/DQ model made FP16
  elsewhere by AutoCast. No precision builder flags (11.x removed them; 10.12 deprecated weak typing).
- TensorRT 10.0 to 10.11 (JetPack 6 ships 10.3): weakly typed networks from the FP32 ONNX with
  ``BuilderFlag.FP16``; INT8 from the Q/DQ model with ``BuilderFlag.INT8`` (never a calibrator), plus
  ``BuilderFlag.FP16`` for ``best``.
- Older than 10: refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gsnet_deploy.contracts.derived import OnnxVariant
from gsnet_deploy.contracts.engine_manifest import Graph
from gsnet_deploy.contracts.precision import Precision
from gsnet_deploy.errors import EngineBuildError
from gsnet_deploy.export.trt import BuildFlags

STRONG_TYPING_MIN = (10, 12)  # weak typing deprecated from here on; required from 11.0
OLDEST_SUPPORTED = (10, 0)


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
        """The plan of ``graph`` (the paper graphs, parts of the image graph, follow the image plan)."""
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


def fp32_plan(trt_version: Sequence[int]) -> GraphPlan:
    """The FP32 plan of a TensorRT version: the tile graphs' (weight-free blending stays in full precision).

    Raises:
        EngineBuildError: TensorRT older than 10.0.
    """
    return select_build_path(trt_version, Precision.INT8).text  # an INT8 build's text engine is FP32 on every path


def variants_for_any_target(precision: Precision) -> dict[Graph, tuple[OnnxVariant, ...]]:
    """ONNX variants any target TensorRT might build ``precision`` from (used without TensorRT)."""
    needed: dict[Graph, set[OnnxVariant]] = {Graph.TEXT: set(), Graph.IMAGE: set()}
    for version in ((10, 3), STRONG_TYPING_MIN):
        path = select_build_path(version, precision)
        for graph in needed:  # the paper graphs' variants are chosen by export.build (paper_plan)
            needed[graph].add(path.plan(graph).variant)
    order = list(OnnxVariant)
    return {g: tuple(sorted(v, key=order.index)) for g, v in needed.items()}
