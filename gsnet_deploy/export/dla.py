"""DLA (Jetson deep-learning accelerator) rules of ``gsnet export build`` (pure, no TensorRT)."""

from __future__ import annotations

from collections.abc import Sequence

from gsnet_deploy.errors import EngineBuildError

DLA_VIEWS = 5  # DLA needs static shapes: one image's paper views


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
