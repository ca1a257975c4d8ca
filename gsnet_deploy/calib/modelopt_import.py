"""Importing NVIDIA ModelOpt where only TensorRT's type stubs are installed.

The FP16 AutoCast (``export.fp16``) calls ModelOpt (the INT8 Q/DQ nodes are written by ``calib.qdq``
without it; tests still call ModelOpt's ONNX PTQ as an independent reference); the workaround lives
here, on the lower floor, so that ``export`` imports ``calib`` and never the other way round.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator

from gsnet_deploy.contracts.tensorrt_import import find_tensorrt


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
