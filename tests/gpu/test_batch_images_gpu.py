"""The torch backend's batched paper call on CUDA (CUDA graphs keyed by the batch size), fp32 and fp16.

Runs only where torch sees a GPU (``benchmarks/device_check.sh``, step ``tests``). On CUDA the
convolutions and matmuls may pick other kernels for 5B views than for 5, so per image the batched
call is compared with the one-image call within a tolerance (TF32 off for fp32), not bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gsnet_deploy.contracts.io_names import CLASS_MAP, PROBS
from gsnet_deploy.runtime.protocol import resize_shortest_edge

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

HW = (333, 517)
CLASSES = 6


@pytest.fixture
def no_tf32():
    """fp32 without TF32 for the test's duration (restored after)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize(("precision", "atol", "margin"), [("fp32", 1e-5, 1e-4), ("fp16", 5e-3, 2e-2)])
def test_cuda_batch_equals_one_image_calls(no_tf32, precision: str, atol: float, margin: float) -> None:
    """Catches: CUDA graphs keyed without the batch size (a batch of 2 replaying the buffers of 3), and the
    views or results of a batch mixed up on the GPU path."""
    from gsnet_deploy.model import build_gsnet, tiny_cfg
    from gsnet_deploy.model.torch_backend import TorchBackend, TorchPrecision

    rng = np.random.default_rng(4)
    nchw = np.stack([resize_shortest_edge(rng.integers(0, 256, (*HW, 3), dtype=np.uint8)).transpose(2, 0, 1) for _ in range(3)])
    text = rng.normal(size=(CLASSES, 512)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    model = build_gsnet(tiny_cfg()).eval()
    with TorchBackend(model, device="cuda", precision=TorchPrecision(precision), cuda_graphs=True) as backend:
        three = backend.segment_paper_batch(nchw, text, HW, with_probs=True)
        two = backend.segment_paper_batch(nchw[1:], text, HW, with_probs=True)
        three_again = backend.segment_paper_batch(nchw, text, HW, with_probs=True)  # replays the first capture
        ones = [backend.segment_paper(nchw[i : i + 1], text, HW, with_probs=True) for i in range(3)]
    pairs = [*zip(three, ones, strict=True), *zip(two, ones[1:], strict=True), *zip(three_again, ones, strict=True)]
    for got, one in pairs:
        diff = float(np.abs(got[PROBS] - one[PROBS]).max())
        assert diff <= atol, f"{precision}: batched vs one image differ by {diff:.2e} in probabilities"
        top2 = np.partition(one[PROBS], -2, axis=0)[-2:]
        clear = top2[1] - top2[0] > margin
        np.testing.assert_array_equal(got[CLASS_MAP][clear], one[CLASS_MAP][clear])
