"""FP16 ONNX models made by ModelOpt AutoCast, for strongly typed TensorRT builds (TensorRT >= 10.12).

TensorRT 10.12 deprecated weak typing and TensorRT 11 removed ``BuilderFlag.FP16``; FP16 now comes
from an ONNX model that is already mixed precision. ModelOpt AutoCast
(``modelopt.onnx.autocast.convert_to_mixed_precision``, NVIDIA TensorRT Model Optimizer, Apache-2.0)
runs the FP32 model on reference inputs with ONNX Runtime (CPU provider here) and keeps in FP32 the
nodes whose values or initializers exceed FP16's comfortable range; everything else becomes FP16,
with Cast nodes at the boundaries. Graph inputs and outputs keep their FP32 types
(``keep_io_types=True``), so every engine takes and returns the same dtypes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gsnet_deploy.calib.modelopt_import import modelopt_without_stub_tensorrt
from gsnet_deploy.errors import ExportError
from gsnet_deploy.export.onnx_save import save_onnx_atomic

if TYPE_CHECKING:
    import onnx

# NOTE: the ``best`` model (AutoCast of the Q/DQ model) converts Q/DQ nodes too: DQ scales become FP16
# as in ModelOpt's own INT8+FP16 path (``quantize(high_precision_dtype="fp16")``), so no Cast sits
# between a DequantizeLinear and its Conv/MatMul, the pattern TensorRT fuses into INT8 kernels
# (``casts_after_dequantize``). Tiny config, 1 example image calibrated, 2 views, N=6, rel. L2 to
# FP32: Q/DQ FP16 0.342, Q/DQ kept FP32 (a Cast after each of the 145 DQ) 0.400, INT8 alone 0.400.
# ``QDQ_OP_TYPES`` stays for callers that want the old placement.
QDQ_OP_TYPES = ("QuantizeLinear", "DequantizeLinear")


@contextlib.contextmanager
def quiet_modelopt(level: int = logging.ERROR) -> Iterator[None]:
    """Raise the ``modelopt`` loggers to ``level`` for the duration of a call, then restore them.

    NOTE: AutoCast logs one INFO line per node it keeps in FP32 (hundreds on GSNet), which buries
    the one-line outcome of ``gsnet export build``; its warnings still show.
    """
    loggers = [logging.getLogger(name) for name in ("modelopt", "modelopt.onnx", "modelopt.onnx.autocast")]
    saved = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, old in zip(loggers, saved):
            logger.setLevel(old)


def drop_ambiguous_dims(model: onnx.ModelProto) -> onnx.ModelProto:
    """Forget symbolic dims of intermediate values that are not graph input / output dims, in place.

    NOTE: AutoCast's shape inference names unknown dims ``unk`` in ``value_info`` and reuses that one
    name for unrelated sizes (CLIP's class token ``[B, 1, 64]`` and its ``[B, 577, 64]`` tokens on the
    real image graph). ONNX Runtime trusts equal names to mean equal sizes, plans to share a buffer
    and fails at run time ("Shape mismatch attempting to re-use buffer"); TensorRT would read the
    same wrong promise. Clearing those names keeps the dims unknown, which is always correct.

    Returns:
        ``model``.
    """
    io_params = {
        dim.dim_param
        for value in (*model.graph.input, *model.graph.output)
        for dim in value.type.tensor_type.shape.dim
        if dim.dim_param
    }
    for value in model.graph.value_info:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param not in io_params:
                dim.ClearField("dim_param")
    return model


@contextlib.contextmanager
def streamed_reference_run(batches: Sequence[Mapping[str, np.ndarray]] | None) -> Iterator[None]:
    """Make AutoCast's reference run stream ``batches`` with in-graph range reductions (None: leave it alone).

    NOTE: AutoCast's own ``ReferenceRunner.run`` (ModelOpt 0.47) marks every tensor as a graph output
    and keeps all of them for every batch (paper-size image graph: DINO's attention maps alone are
    ~0.8 GB per block per view), and it splits an NPZ file's arrays into batches along axis 0 of
    *every* input, which cuts ``text_embeds`` by class: with fewer classes than views one batch got
    an empty ``[0, 512]`` and ONNX Runtime failed at the first Swin reshape (the 4-class failure).
    Here each batch runs whole, and only absmax / min / max / shape per tensor come back, as the
    ``TensorStats`` AutoCast aggregates for several batches itself.
    """
    if batches is None:
        yield
        return
    from modelopt.onnx.autocast import referencerunner

    from gsnet_deploy.calib import stats

    def run(self: Any, inputs: Any = None) -> dict[str, Any]:
        del inputs
        bar = stats.Progress(len(batches), "FP16 AutoCast reference run", unit="batch")
        try:
            ranges = stats.tensor_ranges(self.model, ({k: np.asarray(v) for k, v in b.items()} for b in batches), progress=bar)
        finally:
            bar.close()
        return {
            name: referencerunner.TensorStats(absmax=r.absmax, min_val=r.min, max_val=r.max, shape=r.shape)
            for name, r in ranges.items()
        }

    saved = referencerunner.ReferenceRunner.run
    referencerunner.ReferenceRunner.run = run
    try:
        yield
    finally:
        referencerunner.ReferenceRunner.run = saved


def casts_after_dequantize(model: onnx.ModelProto) -> list[str]:
    """Names of the Cast nodes that read a DequantizeLinear output directly (empty on a well-made ``best`` model)."""
    dq_outputs = {out for node in model.graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    return [node.name for node in model.graph.node if node.op_type == "Cast" and set(node.input) & dq_outputs]


def make_fp16_onnx(
    src: Path,
    dst: Path,
    *,
    reference_feeds: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]] | None = None,
    data_max: float = 512.0,
    op_types_to_exclude: Sequence[str] = (),
) -> Path:
    """Convert an FP32 ONNX model to FP16 with ModelOpt AutoCast, on the CPU, and save it atomically.

    Args:
        src: FP32 ONNX model.
        dst: where to write the mixed-precision model.
        reference_feeds: one input batch by graph input name (e.g. calibration views and text
            embeddings), or a sequence of such batches; the FP32 model runs on each, batch by batch, to
            find nodes whose values leave FP16's range (``calib.stats.tensor_ranges``: the ranges are
            reduced inside the graph, so memory is one plain inference of one batch; one view per
            batch is the least). None: AutoCast's random inputs in [-1, 1], which say little about a
            graph fed 0..255 pixels.
        data_max: AutoCast's largest absolute activation kept in FP16 (its default, 512: FP16's
            spacing there is 0.5).
        op_types_to_exclude: op types AutoCast must keep in FP32 (``QDQ_OP_TYPES`` for a Q/DQ model).

    Returns:
        ``dst``.

    Raises:
        ExportError: AutoCast failed on the model.
        InsufficientMemoryError: the host clearly has too little memory (checked before any work).

    """
    from modelopt.onnx.autocast import convert_to_mixed_precision

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ExportError(f"ONNX model {src} does not exist; run `gsnet export onnx` first.")
    batches: list[Mapping[str, np.ndarray]] | None = None
    if reference_feeds is not None:
        batches = [reference_feeds] if isinstance(reference_feeds, Mapping) else list(reference_feeds)
    from gsnet_deploy.calib.memory import autocast_bytes, require_memory
    from gsnet_deploy.contracts import io_names

    embeds = batches[0].get(io_names.TEXT_EMBEDS) if batches else None
    require_memory(autocast_bytes(src, 0 if embeds is None else len(embeds)), f"FP16 AutoCast of {src.name}")
    try:
        with modelopt_without_stub_tensorrt(), quiet_modelopt(), streamed_reference_run(batches):
            model = convert_to_mixed_precision(
                onnx_path=str(src),
                low_precision_type="fp16",
                keep_io_types=True,
                calibration_data=None,
                data_max=data_max,
                op_types_to_exclude=list(op_types_to_exclude) or None,
                providers=["cpu"],
            )
    except Exception as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ExportError(
            f"ModelOpt AutoCast could not convert {src} to FP16 ({first}); "
            "retry with another --classes-opt or report the ONNX model."
        ) from err
    return save_onnx_atomic(drop_ambiguous_dims(model), dst)
