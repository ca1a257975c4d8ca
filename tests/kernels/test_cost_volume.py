"""Cost-volume op: reference and Triton kernel (interpreted on the CPU) against plain float64 math."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

from gsnet_deploy.errors import GSNetError
from gsnet_deploy.kernels import cost_volume_reference, fused_cost_volume

requires_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


def plain_cost_volume(e_clip, e_dino, text, w_clip, b_clip, w_dino, b_dino) -> torch.Tensor:
    """The op written out in float64 with explicit sums and an explicit 7x7 tap loop."""
    e_clip, e_dino, text, w_clip, b_clip, w_dino, b_dino = (
        t.detach().to(torch.float64) for t in (e_clip, e_dino, text, w_clip, b_clip, w_dino, b_dino)
    )
    batch, _, h, w = e_clip.shape
    n = text.shape[0]
    out = torch.empty(batch * n, 256, h, w, dtype=torch.float64)
    t_norm = torch.sqrt((text * text).sum(1)).clamp_min(1e-12)  # [N]
    for s, (e, wt, bias) in enumerate(((e_clip, w_clip, b_clip), (e_dino, w_dino, b_dino))):
        e_norm = torch.sqrt((e * e).sum(1)).clamp_min(1e-12)  # [B, H, W]
        for b in range(batch):
            for k in range(n):
                cost = (e[b] * text[k][:, None, None]).sum(0) / (e_norm[b] * t_norm[k])  # [H, W]
                padded = torch.zeros(h + 6, w + 6, dtype=torch.float64)
                padded[3 : 3 + h, 3 : 3 + w] = cost
                z = bias[:, None, None].expand(128, h, w).clone()
                for dy in range(7):
                    for dx in range(7):
                        z += wt[:, 0, dy, dx][:, None, None] * padded[dy : dy + h, dx : dx + w][None]
                out[b * n + k, s * 128 : (s + 1) * 128] = 1.0 / (1.0 + torch.exp(-z))
    return out


def random_inputs(rng: np.random.Generator, batch: int, n: int, h: int, w: int, dtype: torch.dtype):
    def arr(*shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        return torch.from_numpy(rng.standard_normal(shape) * scale + shift).to(dtype)

    return (
        arr(batch, 512, h, w, scale=float(rng.uniform(0.5, 3.0))),
        arr(batch, 512, h, w, shift=float(rng.uniform(-0.5, 0.5))),
        arr(n, 512, scale=float(rng.uniform(0.1, 2.0))),
        arr(128, 1, 7, 7, scale=0.3),
        arr(128, scale=0.2),
        arr(128, 1, 7, 7, scale=0.3),
        arr(128, scale=0.2),
    )


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.to(torch.float64) - ref).norm() / ref.norm())


def fresh_shape(rng: np.random.Generator) -> tuple[int, int, int, int]:
    return int(rng.integers(1, 4)), int(rng.integers(1, 8)), int(rng.integers(5, 13)), int(rng.integers(5, 13))


@pytest.fixture
def rng() -> np.random.Generator:
    # fresh values each run; the seed is printed on failure so a case can be replayed
    seed = int(np.random.SeedSequence().entropy % 2**32)
    print(f"seed={seed}")
    return np.random.default_rng(seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cost_volume_reference_matches_plain_math(rng: np.random.Generator, dtype: torch.dtype) -> None:
    batch, n, h, w = fresh_shape(rng)
    inputs = random_inputs(rng, batch, n, h, w, dtype)
    out = cost_volume_reference(*inputs)
    assert out.shape == (batch * n, 256, h, w) and out.dtype == dtype
    assert rel_err(out, plain_cost_volume(*inputs)) <= 1e-6


def test_cost_volume_reference_hand_example() -> None:
    # one pixel, one class: cosine = 1 when text and features point the same way, so
    # channel o is sigmoid(w[o, 0, 3, 3] * 1 + b[o]) (only the centre tap sees the image)
    e = torch.zeros(1, 512, 1, 1)
    e[0, 0] = 5.0
    text = torch.zeros(1, 512)
    text[0, 0] = 2.0
    w = torch.zeros(128, 1, 7, 7)
    w[:, 0, 3, 3] = torch.linspace(-1, 1, 128)
    b = torch.full((128,), 0.5)
    out = cost_volume_reference(e, -e, text, w, b, w, b)
    expect_g = torch.sigmoid(torch.linspace(-1, 1, 128) + 0.5)
    expect_s = torch.sigmoid(-torch.linspace(-1, 1, 128) + 0.5)
    torch.testing.assert_close(out[0, :128, 0, 0], expect_g, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out[0, 128:, 0, 0], expect_s, rtol=1e-6, atol=1e-7)


def _run_kernel(inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    from gsnet_deploy.kernels import triton_cost_volume as tcv

    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert type(tcv.cost_volume_kernel).__name__ == "InterpretedFunction", (
        "triton was imported before TRITON_INTERPRET=1 was set; run tests/kernels in its own process"
    )
    batch, _, h, w = inputs[0].shape
    n = inputs[2].shape[0]
    out = torch.full((batch * n, 256, h, w), float("nan"), dtype=inputs[0].dtype)
    scratch = torch.full((tcv.scratch_numel(batch, n, h, w),), float("nan"))
    result = tcv.cost_volume_triton(*inputs, out=out, scratch=scratch)
    assert result is out
    assert torch.isfinite(out).all(), "kernel left poisoned (NaN) outputs or read unwritten scratch"
    return out


@requires_triton
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("case", range(3))
def test_cost_volume_kernel_matches_plain_math(rng: np.random.Generator, dtype: torch.dtype, tol: float, case: int) -> None:
    batch, n, h, w = fresh_shape(rng)
    inputs = random_inputs(rng, batch, n, h, w, dtype)
    out = _run_kernel(inputs)
    assert out.shape == (batch * n, 256, h, w) and out.dtype == dtype
    err = rel_err(out, plain_cost_volume(*inputs))
    assert err <= tol, f"B,N,H,W={batch},{n},{h},{w}: rel. error {err:.2e} > {tol:.0e}"


@requires_triton
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_cost_volume_kernel_model_size(rng: np.random.Generator, dtype: torch.dtype, tol: float) -> None:
    # the model's 24x24 grid; N = 17 spans two class blocks of the kernel
    inputs = random_inputs(rng, 1, 17, 24, 24, dtype)
    assert rel_err(_run_kernel(inputs), plain_cost_volume(*inputs)) <= tol


@requires_triton
def test_cost_volume_kernel_rejects_bad_out(rng: np.random.Generator) -> None:
    from gsnet_deploy.kernels.triton_cost_volume import cost_volume_triton

    inputs = random_inputs(rng, 1, 2, 5, 5, torch.float32)
    with pytest.raises(GSNetError, match="out has shape"):
        cost_volume_triton(*inputs, out=torch.empty(2, 255, 5, 5))


def test_fused_cost_volume_uses_reference_on_cpu(rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    if importlib.util.find_spec("triton") is not None:
        from gsnet_deploy.kernels import triton_cost_volume

        def fail(*args: object, **kwargs: object) -> torch.Tensor:
            raise AssertionError("the Triton kernel must not run on CPU tensors")

        monkeypatch.setattr(triton_cost_volume, "cost_volume_triton", fail)
    inputs = random_inputs(rng, 2, 3, 6, 7, torch.float32)
    out = fused_cost_volume(*inputs)
    torch.testing.assert_close(out, cost_volume_reference(*inputs), rtol=0, atol=0)
    assert rel_err(out, plain_cost_volume(*inputs)) <= 1e-5


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"e_clip": torch.zeros(1, 256, 5, 5)}, "e_clip has shape"),
        ({"e_dino": torch.zeros(1, 512, 5, 6)}, "e_dino has shape"),
        ({"text": torch.zeros(3, 500)}, "text has shape"),
        ({"w_clip": torch.zeros(128, 1, 5, 5)}, "w_clip/b_clip"),
        ({"text": torch.zeros(3, 512, dtype=torch.float64)}, "cast them to one dtype"),
    ],
)
def test_check_cost_volume_inputs_errors(rng: np.random.Generator, change: dict, match: str) -> None:
    from gsnet_deploy.kernels.cost_volume import check_cost_volume_inputs

    names = ("e_clip", "e_dino", "text", "w_clip", "b_clip", "w_dino", "b_dino")
    inputs = dict(zip(names, random_inputs(rng, 1, 3, 5, 5, torch.float32)))
    inputs.update(change)
    with pytest.raises(GSNetError, match=match):
        check_cost_volume_inputs(**inputs)


@pytest.mark.parametrize("fused_kernel", [False, True])
def test_qgff_runs_the_kernel_only_when_selected(monkeypatch: pytest.MonkeyPatch, fused_kernel: bool) -> None:
    # catches: the Triton kernel back on QGFF's default path (slower than torch.compile of the plain ops,
    # issue 17), or the explicit option no longer reaching it
    from gsnet_deploy.model import qgff

    calls: list[str] = []

    def recording_kernel(*args: torch.Tensor) -> torch.Tensor:
        calls.append("kernel")
        return cost_volume_reference(*args)

    monkeypatch.setattr(qgff, "fused_cost_volume", recording_kernel)
    module = qgff.Qgff(qgff.QgffCfg(hidden_dim=128, fused_kernel=fused_kernel)).eval()
    with torch.no_grad():
        out = module(torch.randn(1, 512, 6, 6), torch.randn(1, 512, 6, 6), torch.randn(2, 512))
    assert out.shape == (2, 128, 6, 6)
    assert calls == (["kernel"] if fused_kernel else [])
