"""Whether the fused cost-volume TensorRT plugin can be used for this build; its absence is not an error."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def find_plugin(enabled: bool, trt_version: Sequence[int], notes: list[str]) -> tuple[bool, str, Any]:
    """Whether to use the cost-volume plugin: (usable, note, (trt_plugin, plugin_rewrite) or None).

    A TensorRT without AOT plugin support is not an error: the note says the build went without it.
    """
    if not enabled:
        return False, "plugin not requested", None
    # lazy: the rewrite needs onnx, and neither is needed for a build without the plugin
    from gsnet_deploy.export import plugin_rewrite
    from gsnet_deploy.kernels import trt_plugin

    if not trt_plugin.plugin_supported(tuple(trt_version)):
        shown = ".".join(map(str, trt_version))
        note = f"plugin requested but not supported by TensorRT {shown}; built without it"
        notes.append(note)
        return False, note, None
    return True, "fused cost-volume plugin", (trt_plugin, plugin_rewrite)
