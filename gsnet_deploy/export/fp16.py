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
import importlib.util
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gsnet_deploy.errors import ExportError
from gsnet_deploy.tensorrt_import import find_tensorrt

if TYPE_CHECKING:
    import onnx

# NOTE: AutoCast of a Q/DQ model keeps QuantizeLinear / DequantizeLinear (scales, dequantized
# values) in FP32. Converted to FP16 they doubled the tiny config's logit error against FP32
# (relative L2 0.08 against 0.04 with them kept in FP32, example images, N=6).
QDQ_OP_TYPES = ("QuantizeLinear", "DequantizeLinear")

# Protobuf cannot serialize a single message over 2 GiB; larger models keep weights outside.
_PROTOBUF_LIMIT = 2_000_000_000


@contextlib.contextmanager
def modelopt_without_stub_tensorrt() -> Iterator[None]:
    """Stop ModelOpt from mistaking the ``tensorrt-stubs`` namespace package for TensorRT.

    NOTE: with only ``tensorrt-stubs`` installed, ``import tensorrt`` succeeds as an empty namespace
    package, ModelOpt sets ``trt_utils.TRT_PYTHON_AVAILABLE`` and then fails on ``trt.Logger`` while
    looking for plugin ops. Where TensorRT is not really present (no ``tensorrt.Builder``), the flag is
    set to False for the duration of the call and restored afterwards.
    """
    if importlib.util.find_spec("tensorrt") is None or find_tensorrt() is not None:
        yield  # no tensorrt at all, or the real one: ModelOpt's own detection is right
        return
    from modelopt.onnx import trt_utils

    saved = getattr(trt_utils, "TRT_PYTHON_AVAILABLE", False)
    trt_utils.TRT_PYTHON_AVAILABLE = False
    try:
        yield
    finally:
        trt_utils.TRT_PYTHON_AVAILABLE = saved


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


def save_onnx_atomic(model: onnx.ModelProto, path: Path) -> Path:
    """Save an ONNX model to ``path`` through a temporary file and ``os.replace``.

    Models over protobuf's 2 GiB limit store their weights in ``<name>.data`` beside the file; the
    data file is moved into place before the model file.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp:
        tmp_model = Path(tmp) / path.name
        if model.ByteSize() > _PROTOBUF_LIMIT:
            data_name = f"{path.name}.data"
            onnx.save_model(model, tmp_model, save_as_external_data=True, all_tensors_to_one_file=True, location=data_name)
            os.replace(Path(tmp) / data_name, path.parent / data_name)
        else:
            onnx.save_model(model, tmp_model)
        os.replace(tmp_model, path)
    return path


def make_fp16_onnx(
    src: Path,
    dst: Path,
    *,
    reference_feeds: Mapping[str, np.ndarray] | None = None,
    data_max: float = 512.0,
    op_types_to_exclude: Sequence[str] = (),
) -> Path:
    """Convert an FP32 ONNX model to FP16 with ModelOpt AutoCast, on the CPU, and save it atomically.

    Args:
        src: FP32 ONNX model.
        dst: where to write the mixed-precision model.
        reference_feeds: one input batch by graph input name (e.g. calibration views and text
            embeddings); AutoCast runs the model on it to find nodes whose values leave FP16's range.
            None: AutoCast's random inputs in [-1, 1], which say little about a graph fed 0..255 pixels.
        data_max: AutoCast's largest absolute activation kept in FP16 (its default, 512: FP16's
            spacing there is 0.5).
        op_types_to_exclude: op types AutoCast must keep in FP32 (``QDQ_OP_TYPES`` for a Q/DQ model).

    Returns:
        ``dst``.

    Raises:
        ExportError: AutoCast failed on the model.

    """
    from modelopt.onnx.autocast import convert_to_mixed_precision

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ExportError(f"ONNX model {src} does not exist; run `gsnet export onnx` first.")
    with tempfile.TemporaryDirectory(prefix=".autocast.") as tmp:
        calibration: str | None = None
        if reference_feeds is not None:
            calibration = str(Path(tmp) / "reference_feeds.npz")
            arrays: dict[str, Any] = {name: np.asarray(value) for name, value in reference_feeds.items()}
            np.savez(calibration, **arrays)
        try:
            with modelopt_without_stub_tensorrt(), quiet_modelopt():
                model = convert_to_mixed_precision(
                    onnx_path=str(src),
                    low_precision_type="fp16",
                    keep_io_types=True,
                    calibration_data=calibration,
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
