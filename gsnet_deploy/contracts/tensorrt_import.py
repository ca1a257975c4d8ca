"""Finding the real TensorRT Python package: the one place that tells it from its type stubs.

``tensorrt-stubs`` installs ``tensorrt/*.pyi`` only, so ``import tensorrt`` can succeed as an empty
namespace package. Real TensorRT has ``Builder``; this module is torch-free so the runtime uses it.
"""

from __future__ import annotations

from types import ModuleType

from gsnet_deploy.errors import GSNetError


def find_tensorrt() -> ModuleType | None:
    """The real ``tensorrt`` module, or None where it is missing or only its stubs are installed."""
    try:
        import tensorrt  # type: ignore[import-untyped]
    except ImportError:
        return None
    return tensorrt if hasattr(tensorrt, "Builder") else None


def require_tensorrt(error: type[GSNetError], hint: str) -> ModuleType:
    """The real ``tensorrt`` module, or ``error`` saying it is missing and what to do (``hint``)."""
    trt = find_tensorrt()
    if trt is None:
        raise error(f"TensorRT is not installed (or only its type stubs are); {hint}")
    return trt
