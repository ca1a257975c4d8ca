"""Tiled mode's window blending in torch, on the model's device: the ``runtime.tiling.WindowBlender`` of the torch backend.

The same steps as the numpy reference (``runtime.tiling.StripAccumulator`` after
``runtime.resize.resize_bilinear`` and ``runtime.protocol.sigmoid``), on the device that runs the
image graph: each window's logits ``[N, 96, 96]`` are upsampled to 384 (torch-style bilinear as two
matrix products with the reference's per-axis matrices, ``runtime.resize.interpolation_matrix``:
four times faster than gathering on a CPU, and only the rows and columns inside the image are
made), passed through a sigmoid, weighted by the ramp of
``runtime.tiling.blend_weights`` and added into a strip of ``(N + 1) x 384 x W`` float32 (the
weighted sums and the weight sum) plus a validity strip. Emitting finished rows normalizes them,
takes the argmax and shifts the strip; only the class map and validity cross to the host, the
probabilities only when asked for. Every device-to-host copy goes through ``to_host``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from gsnet_deploy.runtime.resize import interpolation_matrix
from gsnet_deploy.runtime.tiling import WindowGrid, blend_weights


def to_host(t: torch.Tensor) -> np.ndarray:
    """A device tensor as a host array: the one place blended rows cross to the host."""
    return t.cpu().numpy()


class TorchWindowBlender:
    """One image's strip of blended window probabilities on a torch device (``WindowBlender``).

    Attributes:
        grid: the image's window grid.
        num_classes: N.
        device: where the strip and the image graph live.

    """

    def __init__(
        self,
        forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        text: torch.Tensor,
        grid: WindowGrid,
        device: torch.device,
    ) -> None:
        """Create the strip buffers on ``device``.

        Args:
            forward: the image graph on device tensors: views ``[b, 3, S, S]`` float32, text
                ``[N, 512]`` -> logits ``[b, N, h, w]``.
            text: text embeddings ``[N, 512]`` on ``device``.
            grid: the window grid being visited.
            device: the model's device.

        """
        self.forward, self.text, self.grid, self.device = forward, text, grid, device
        self.num_classes = int(text.shape[0])
        strip = min(grid.size, grid.height)
        self.weights = torch.from_numpy(blend_weights(grid.size, grid.overlap)).to(device)  # [S, S]
        self._acc = torch.zeros(self.num_classes, strip, grid.width, device=device)  # [N, S, W]
        self._wsum = torch.zeros(strip, grid.width, device=device)  # [S, W]
        self._valid = torch.zeros(strip, grid.width, dtype=torch.bool, device=device)  # [S, W]
        self._logits: torch.Tensor | None = None  # [b, N, h, w] of the last infer
        self._label_dtype = torch.uint8 if self.num_classes <= 255 else torch.int32
        self._matrices: dict[int, torch.Tensor] = {}  # logit side -> [S, side] interpolation matrix

    def _upsample_matrix(self, side: int) -> torch.Tensor:
        """The ``[S, side]`` bilinear matrix of one axis, on the device (made once per side)."""
        if side not in self._matrices:
            self._matrices[side] = torch.from_numpy(interpolation_matrix(side, self.grid.size).copy()).to(self.device)
        return self._matrices[side]

    @torch.no_grad()
    def infer(self, views: np.ndarray) -> None:
        """Run the image graph on host views float32 ``[b, 3, S, S]``; logits stay on the device."""
        images = torch.from_numpy(np.ascontiguousarray(views, dtype=np.float32)).to(self.device)
        self._logits = self.forward(images, self.text).float()  # [b, N, h, w]

    @torch.no_grad()
    def blend(self, index: int, row: int, col: int, height: int, width: int, valid: np.ndarray | None) -> None:
        """Upsample, sigmoid, weight and add window ``index`` at strip row ``row``, column ``col``."""
        if self._logits is None:
            raise RuntimeError("blend before infer")
        logits = self._logits[index]  # [N, h', w']
        up_rows = self._upsample_matrix(logits.shape[-2])[:height]  # [h, h']
        up_cols = self._upsample_matrix(logits.shape[-1])[:width]  # [w, w']
        probs = torch.sigmoid(torch.matmul(torch.matmul(up_rows, logits), up_cols.T))  # [N, h, w]
        wgt = self.weights[:height, :width]  # [h, w]
        rows, cols = slice(row, row + height), slice(col, col + width)
        self._acc[:, rows, cols] += probs * wgt  # [N, h, w]
        self._wsum[rows, cols] += wgt
        if valid is None:
            self._valid[rows, cols] = True
        else:
            self._valid[rows, cols] |= torch.from_numpy(np.ascontiguousarray(valid, dtype=bool)).to(self.device)

    @torch.no_grad()
    def emit(self, count: int, with_probs: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Normalize the top ``count`` strip rows, argmax on the device, shift the strip up by ``count``.

        Returns:
            Host arrays: labels ``[count, W]`` (uint8 for N <= 255, int32 beyond), valid bool
            ``[count, W]`` and, only with ``with_probs``, probabilities float32 ``[N, count, W]``.

        """
        wsum = self._wsum[:count]  # [c, W]
        covered = wsum > 0
        valid = self._valid[:count] & covered  # [c, W]
        probs = self._acc[:, :count] / torch.where(covered, wsum, 1.0)  # [N, c, W]
        probs = torch.where(valid, probs, 0.0)
        labels = torch.argmax(probs, dim=0).to(self._label_dtype)  # [c, W]: first maximum, as numpy
        out = (to_host(labels), to_host(valid), to_host(probs) if with_probs else None)
        keep = self._wsum.shape[0] - count
        if keep > 0:  # move the rows still open to the top (clone: source and target overlap)
            self._acc[:, :keep] = self._acc[:, count:].clone()
            self._wsum[:keep] = self._wsum[count:].clone()
            self._valid[:keep] = self._valid[count:].clone()
        self._acc[:, keep:] = 0.0
        self._wsum[keep:] = 0.0
        self._valid[keep:] = False
        return out

    def close(self) -> None:
        """Release the strip's device tensors (the caching allocator keeps them for reuse)."""
        empty = torch.empty(0, device=self._acc.device)
        self._acc, self._wsum, self._valid, self._logits = empty, empty, empty.bool(), None
