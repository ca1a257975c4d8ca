"""Tiled mode's window blending as two small weight-free graphs: ``tile_blend.onnx`` and ``tile_emit.onnx``.

The ONNX Runtime (and, later, TensorRT) side of ``model.tile_blend``: the strip of blended
probabilities stays on the session's device between calls as the graphs' state (inputs ``acc``,
``valid``; outputs ``acc_out``, ``valid_out``, bound back as the next call's inputs).

``tile_blend``: ``acc [N + 1, R, W]`` (weighted class sums, then the weight sum), ``valid [R, W]``
float32 0/1, ``logits [b, N, 96, 96]`` (the image graph's output, left on the device),
``place`` int64 ``[5]`` (view index, strip row, column, height, width), ``window_valid [S, S]``
float32 0/1, ``weights [S, S]`` (the ramp of ``runtime.tiling.blend_weights``) -> ``acc_out``,
``valid_out``. One window: upsampling 96 -> S as two matrix products with the reference's
interpolation matrices (constants), sigmoid, ramp, placed into the strip with ``Pad`` (no ScatterND:
the exported graph uses only ops of TensorRT's list).

``tile_emit``: ``acc``, ``valid``, ``count`` int64 ``[1]`` -> ``labels`` int32 ``[count, W]``,
``valid_rows`` float32 ``[count, W]``, ``probs`` float32 ``[N, count, W]`` (fetched only when
asked), ``acc_out``, ``valid_out`` (the strip shifted up by ``count`` rows, zeros below).
"""

from __future__ import annotations

import warnings
from collections.abc import Collection
from pathlib import Path
from typing import Any

import onnx
import torch
import torch.nn.functional as F
from torch import nn
from torch.onnx.operators import shape_as_tensor

from gsnet_deploy.contracts import io_names
from gsnet_deploy.contracts.atomic import AtomicFiles
from gsnet_deploy.contracts.io_names import (
    TILE_BLEND_FILE,
    TILE_BLEND_INPUTS,
    TILE_BLEND_OUTPUTS,
    TILE_EMIT_FILE,
    TILE_EMIT_INPUTS,
    TILE_EMIT_OUTPUTS,
)
from gsnet_deploy.errors import ExportError
from gsnet_deploy.runtime.resize import interpolation_matrix
from gsnet_deploy.runtime.tiling import WINDOW

LOGIT_SIDE = WINDOW // 4  # the image graph's logits are [b, N, 96, 96]
TILE_BLEND_AXES = io_names.TILE_BLEND_DYNAMIC_AXES
TILE_EMIT_AXES = io_names.TILE_EMIT_DYNAMIC_AXES


class TileBlendGraph(nn.Module):
    """One window's logits blended into the strip (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        up = torch.from_numpy(interpolation_matrix(LOGIT_SIDE, WINDOW).copy())  # [S, 96]
        self.register_buffer("up", up, persistent=False)

    def forward(
        self,
        acc: torch.Tensor,
        valid: torch.Tensor,
        logits: torch.Tensor,
        place: torch.Tensor,
        window_valid: torch.Tensor,
        weights: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``acc_out`` ``[N + 1, R, W]`` and ``valid_out`` ``[R, W]``."""
        index, row, col, height, width = place[0], place[1], place[2], place[3], place[4]
        up = self.get_buffer("up")
        rows = up[:height]  # [h, 96]
        cols = up[:width]  # [w, 96]
        x = torch.index_select(logits, 0, index.reshape(1))[0]  # [N, 96, 96]
        probs = torch.sigmoid(torch.matmul(torch.matmul(rows, x), cols.transpose(0, 1)))  # [N, h, w]
        wgt = weights[:height, :width]  # [h, w]
        contrib = torch.cat([probs * wgt, wgt[None]], dim=0)  # [N + 1, h, w]
        shape = shape_as_tensor(acc)
        strip_rows, strip_width = shape[1], shape[2]
        # left, right, top, bottom: traced tensors, so the exported Pad takes them as data (mypy wants ints)
        pads: Any = (col, strip_width - col - width, row, strip_rows - row - height)
        acc_out = acc + F.pad(contrib, pads)  # [N + 1, R, W]: adding zeros elsewhere leaves them exact
        valid_out = torch.maximum(valid, F.pad(window_valid[:height, :width], pads))  # [R, W]
        return acc_out, valid_out


class TileEmitGraph(nn.Module):
    """The top ``count`` strip rows normalized, their argmax, and the strip shifted up."""

    def forward(self, acc: torch.Tensor, valid: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``labels``, ``valid_rows``, ``probs``, ``acc_out``, ``valid_out``."""
        c = count[0]
        n1 = shape_as_tensor(acc)[0]
        top = acc[:, :c]  # [N + 1, c, W]
        wsum = top[n1 - 1]  # [c, W]
        covered = wsum > 0
        valid_rows = valid[:c] * covered.to(valid.dtype)  # [c, W]
        probs = top[: n1 - 1] / torch.where(covered, wsum, torch.ones_like(wsum))  # [N, c, W]
        probs = probs * valid_rows  # 0 where not valid
        labels = torch.argmax(probs, dim=0).to(torch.int32)  # [c, W]
        acc_out = torch.cat([acc[:, c:], torch.zeros_like(top)], dim=1)  # [N + 1, R, W]
        valid_out = torch.cat([valid[c:], torch.zeros_like(valid[:c])], dim=0)  # [R, W]
        return labels, valid_rows, probs, acc_out, valid_out


def tile_example_inputs() -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Traced example inputs of both graphs: sizes all different from each other and from S."""
    gen = torch.Generator().manual_seed(0)
    n, rows, width = 3, 300, 700
    acc = torch.rand(n + 1, rows, width, generator=gen)
    valid = (torch.rand(rows, width, generator=gen) > 0.5).float()
    logits = torch.randn(2, n, LOGIT_SIDE, LOGIT_SIDE, generator=gen)
    place = torch.tensor([1, 0, 250, 300, 384], dtype=torch.int64)
    window_valid = torch.ones(WINDOW, WINDOW)
    weights = torch.rand(WINDOW, WINDOW, generator=gen)
    count = torch.tensor([128], dtype=torch.int64)
    return (acc, valid, logits, place, window_valid, weights), (acc, valid, count)


def export_tile_graphs(
    out_dir: str | Path, opset: int = 17, files: AtomicFiles | None = None, supported_ops: Collection[str] | None = None
) -> tuple[Path, Path]:
    """Write ``tile_blend.onnx`` and ``tile_emit.onnx`` into ``out_dir``; returns their final paths.

    With ``files``, both become parts of that set (renamed with the rest of the folder on commit);
    without, they are written through their own ``AtomicFiles``.

    Raises:
        ExportError: a graph uses an op outside ``supported_ops`` (when given).
    """
    if files is None:
        with AtomicFiles() as own:
            return export_tile_graphs(out_dir, opset, own, supported_ops)
    out = Path(out_dir)
    blend_args, emit_args = tile_example_inputs()
    paths = (out / TILE_BLEND_FILE, out / TILE_EMIT_FILE)
    graphs = (
        (TileBlendGraph(), blend_args, paths[0], TILE_BLEND_INPUTS, TILE_BLEND_OUTPUTS, TILE_BLEND_AXES),
        (TileEmitGraph(), emit_args, paths[1], TILE_EMIT_INPUTS, TILE_EMIT_OUTPUTS, TILE_EMIT_AXES),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        for module, args, path, inputs, outputs, axes in graphs:
            with torch.no_grad():
                part = files.part(path)
                torch.onnx.export(
                    module, args, str(part), input_names=list(inputs), output_names=list(outputs),
                    dynamic_axes=axes, opset_version=opset, do_constant_folding=True, dynamo=False,
                )  # fmt: skip
            if supported_ops is not None:
                ops = {node.op_type for node in onnx.load(str(part)).graph.node}
                if not ops <= set(supported_ops):
                    raise ExportError(f"{path.name} uses ops {sorted(ops - set(supported_ops))} outside the supported list.")
    return paths
