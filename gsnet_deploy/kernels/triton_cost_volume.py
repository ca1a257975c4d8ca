"""Triton kernel for the QGFF front end of GSNet (one launch).

Computes the same function as ``cost_volume.cost_volume_reference``: for each view b and class n,
the cosine cost volumes C_G = <norm(E_clip), norm(T[n])> and C_S = <norm(E_dino), norm(T[n])>,
then ``sigmoid(conv7x7 1->128)`` of each, written as ``out[b*N + n, 0:128]`` and
``out[b*N + n, 128:256]``. GSNet: AAAI 2025, github.com/yecy749/GSNet (Apache-2.0).

Design (one launch, grid ``(ceil(H / ROWS), ceil(N / NB), 2 * B)``). A program owns view b, one
stream (CLIP or DINO), a block of NB = 16 classes and a band of ROWS = 2 image rows:

1. The cost volume of its band plus a 3-row halo above and below (the 7x7 receptive field):
   ``acc[NB, Q] = T[NB, 512] @ E[512, Q]`` on tensor cores (``tl.dot``) while summing ``T**2``
   and ``E**2`` in fp32; dividing by ``max(||T||, eps) * max(||E||, eps)`` is exactly
   ``F.normalize`` on both sides. The [NB, (ROWS + 6) * (W + 6)] fp32 result, zero-padded by 3
   columns each side, goes to a scratch area private to the program, then a CTA barrier.
2. The 7x7 convolution as an implicit GEMM on tensor cores: rows are (class, pixel) pairs, the
   49 taps (padded to 64) are gathered from the padded scratch (no border masks), times the
   [64, 128] weight (two halves of 64 output channels); bias, sigmoid, and a store straight into
   the output (runs of 16 contiguous pixels per channel, so the stores coalesce).

Why a scratch buffer and not registers: the im2col step needs each cost value at 49 shifted
positions, which is a gather across threads; Triton has no cheap general register gather, so
the values go through memory written and read by the same CTA. The halo rows are recomputed by
the neighbouring band (4x the cost-volume GEMM at ROWS = 2, W = 24; that GEMM is under a tenth of
the flops). For TensorRT the scratch is the plugin's second output, because an AOT plugin gets
no workspace (see ``trt_plugin.py``).

The floor (fp16, B = 5, H = W = 24, 512 channels; one multiply-add = 2 flops; weights 51 KB):

    N     read (E_clip, E_dino, T)   write (out)     bytes       flops (cost vol. + conv)
    6     5,898,240 + 6,144          8,847,360       14.75 MB    35.4 M + 433.5 M  = 0.47 GFLOP
    40    5,898,240 + 40,960         58,982,400      64.92 MB    235.9 M + 2,890 M = 3.13 GFLOP
    150   5,898,240 + 153,600        221,184,000     227.24 MB   884.7 M + 10,838 M = 11.72 GFLOP

Writing the output dominates: at ~3 TB/s that is ~22 us for N = 40, against ~3 us of fp16
tensor-core work (K = 49 padded to 64), so the op is memory bound and the yardstick is bytes.
The unfused ops move the [B*N, 128, H, W] maps at least three times (conv out, sigmoid, cat).
Measured (H100, see benchmarks/results/kernel_cost_volume.md) this kernel is still far from that
floor and slower than torch.compile: it is limited by L1/shared-memory traffic and occupancy.

``triton`` is imported at module import, so import this module lazily (``cost_volume.py`` does).
"""

# Triton reads kernel argument annotations as types, so the jit kernel leaves its pointers unannotated.
# ruff: noqa: ANN001, ANN201
from __future__ import annotations

import torch
import triton  # type: ignore[import-untyped]
import triton.language as tl  # type: ignore[import-untyped]

from gsnet_deploy.errors import GSNetError
from gsnet_deploy.kernels.cost_volume import (
    CONV_CHANNELS,
    EMBED_DIM,
    KERNEL_SIZE,
    NORM_EPS,
    check_cost_volume_inputs,
)

CLASS_BLOCK = 16  # NB: classes per program (tl.dot needs >= 16)
ROWS = 2  # image rows per program
HALO = KERNEL_SIZE // 2  # 3 rows/cols of context each side
TAPS_PAD = 64  # 49 taps padded to a tensor-core friendly K
BLOCK_K = 64  # channel chunk of the cost-volume GEMM
BLOCK_Q = 64  # pixel chunk of the cost-volume GEMM
BLOCK_M = 64  # (class, pixel) rows per conv GEMM step
BLOCK_O = 64  # output channels per conv GEMM: 128 in two halves, to bound registers
PIXEL_BLOCK = 16  # PB: contiguous pixels per class in a conv GEMM step (BLOCK_M // PB classes)
NUM_WARPS = 8
NUM_STAGES = 1  # no K-loop pipelining: fewer registers and shared memory (best measured on H100)


@triton.jit
def cost_volume_kernel(
    # inputs (TensorRT AOT order: input tensors, then scalars, then outputs)
    e_clip_ptr,
    e_dino_ptr,
    text_ptr,
    w_clip_ptr,
    b_clip_ptr,
    w_dino_ptr,
    b_dino_ptr,
    N,
    H,
    W,
    out_ptr,
    scratch_ptr,
    CH: tl.constexpr,
    OC: tl.constexpr,
    KSIZE: tl.constexpr,
    NB: tl.constexpr,
    ROWS: tl.constexpr,
    TAPS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_O: tl.constexpr,
    PB: tl.constexpr,
    EPS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Fused cost volume + 7x7 conv + sigmoid for one (row band, class block, view * 2 + stream)."""
    HALO_: tl.constexpr = KSIZE // 2
    KK: tl.constexpr = KSIZE * KSIZE
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_z = tl.program_id(2)
    pid_b = pid_z // 2
    stream = pid_z % 2  # 0: CLIP (channels 0..127), 1: DINO (channels 128..255)
    if stream == 0:
        e_ptr = e_clip_ptr
        w_ptr = w_clip_ptr
        b_ptr = b_clip_ptr
    else:
        e_ptr = e_dino_ptr
        w_ptr = w_dino_ptr
        b_ptr = b_dino_ptr
    HW = H * W
    WP = W + 2 * HALO_  # scratch row: the image row with 3 zero columns each side
    QS = (ROWS + 2 * HALO_) * WP  # scratch cells per class: band + halo rows, zero padded
    r0 = pid_r * ROWS
    n0 = pid_n * NB
    n_valid = tl.minimum(N - n0, NB)
    rows_here = tl.minimum(H - r0, ROWS)
    prog = (pid_z * tl.num_programs(1) + pid_n) * tl.num_programs(0) + pid_r
    scr = scratch_ptr + prog.to(tl.int64) * (NB * QS)

    # ---- phase 1: cosine cost volume of the band + halo into the zero-padded scratch ----
    # Cells outside the image load E = 0, so acc = 0 and they hold the conv's zero padding.
    offs_n = tl.arange(0, NB)
    offs_k = tl.arange(0, BLOCK_K)
    offs_q = tl.arange(0, BLOCK_Q)
    n_mask = offs_n < n_valid
    e_base = e_ptr + pid_b.to(tl.int64) * CH * HW
    t_rows = text_ptr + (n0 + offs_n)[:, None].to(tl.int64) * CH
    for q0 in range(0, QS, BLOCK_Q):
        q = q0 + offs_q  # [BQ] scratch cell
        row = r0 - HALO_ + q // WP
        col = q % WP - HALO_
        in_img = (q < QS) & (row >= 0) & (row < H) & (col >= 0) & (col < W)
        pix = row * W + col  # [BQ] flat image pixel (where in_img)
        acc = tl.zeros((NB, BLOCK_Q), dtype=tl.float32)
        ss_t = tl.zeros((NB,), dtype=tl.float32)
        ss_e = tl.zeros((BLOCK_Q,), dtype=tl.float32)
        for k0 in range(0, CH, BLOCK_K):
            t = tl.load(t_rows + (k0 + offs_k)[None, :], mask=n_mask[:, None], other=0.0)  # [NB, BK]
            e_ptrs = e_base + (k0 + offs_k)[:, None] * HW + pix[None, :]
            e = tl.load(e_ptrs, mask=in_img[None, :], other=0.0)  # [BK, BQ]
            acc = tl.dot(t, e, acc=acc, input_precision=DOT_PRECISION)
            tf = t.to(tl.float32)
            ef = e.to(tl.float32)
            ss_t += tl.sum(tf * tf, axis=1)
            ss_e += tl.sum(ef * ef, axis=0)
        inv_t = 1.0 / tl.maximum(tl.sqrt(ss_t), EPS)  # [NB]
        inv_e = 1.0 / tl.maximum(tl.sqrt(ss_e), EPS)  # [BQ]
        dst = offs_n[:, None] * QS + q[None, :]  # [NB, BQ]
        tl.store(scr + dst, acc * inv_t[:, None] * inv_e[None, :], mask=n_mask[:, None] & (q < QS)[None, :])

    # NOTE: the scratch is written and read by this CTA only; the barrier orders the two phases.
    tl.debug_barrier()

    # ---- phase 2: 7x7 conv as implicit GEMM over (class, pixel) rows, sigmoid, store ----
    # A GEMM row m is class j0 + m // PB at band pixel p0 + m % PB: PB is a constexpr power of
    # two, so the compiler sees runs of PB contiguous output addresses and coalesces the stores.
    JB: tl.constexpr = BLOCK_M // PB
    offs_m = tl.arange(0, BLOCK_M)
    offs_t = tl.arange(0, TAPS)
    offs_o = tl.arange(0, BLOCK_O)
    t_mask = offs_t < KK
    tap_off = (offs_t // KSIZE - HALO_) * WP + (offs_t % KSIZE - HALO_)  # [TAPS] scratch offset
    dot_ty = out_ptr.dtype.element_ty
    out_base = out_ptr + (pid_b * N + n0).to(tl.int64) * (2 * OC) * HW + r0 * W
    rw = rows_here * W  # pixels in the band
    n_pix_blocks = tl.cdiv(rw, PB)
    n_steps = n_pix_blocks * tl.cdiv(n_valid, JB)
    # the [49 -> 64, 128] weight matrix, loaded once (both halves of the output channels)
    w_lo = tl.load(w_ptr + offs_o[None, :] * KK + offs_t[:, None], mask=t_mask[:, None], other=0.0)
    w_hi = tl.load(w_ptr + (BLOCK_O + offs_o)[None, :] * KK + offs_t[:, None], mask=t_mask[:, None], other=0.0)
    w_lo = w_lo.to(dot_ty)  # [TAPS, BO]
    w_hi = w_hi.to(dot_ty)  # [TAPS, BO]
    bias_lo = tl.load(b_ptr + offs_o).to(tl.float32)  # [BO]
    bias_hi = tl.load(b_ptr + BLOCK_O + offs_o).to(tl.float32)  # [BO]
    ch_lo = (stream * OC + offs_o) * HW  # [BO] output channel offsets
    for step in range(0, n_steps):
        p = (step % n_pix_blocks) * PB + offs_m % PB  # [M] pixel within the band
        j = (step // n_pix_blocks) * JB + offs_m // PB  # [M] class within the block
        m_mask = (p < rw) & (j < n_valid)
        center = j * QS + (p // W + HALO_) * WP + (p % W + HALO_)  # [M] scratch cell of the pixel
        a_ptrs = scr + center[:, None] + tap_off[None, :]
        a = tl.load(a_ptrs, mask=m_mask[:, None] & t_mask[None, :], other=0.0).to(dot_ty)  # [M, TAPS]
        out_ptrs = out_base + (j * (2 * OC * HW) + p)[:, None] + ch_lo[None, :]  # [M, BO]
        z = tl.dot(a, w_lo, input_precision=DOT_PRECISION) + bias_lo[None, :]  # [M, BO] fp32
        tl.store(out_ptrs, tl.sigmoid(z).to(dot_ty), mask=m_mask[:, None])
        z = tl.dot(a, w_hi, input_precision=DOT_PRECISION) + bias_hi[None, :]  # [M, BO] fp32
        tl.store(out_ptrs + BLOCK_O * HW, tl.sigmoid(z).to(dot_ty), mask=m_mask[:, None])


def launch_grid(batch: int, num_classes: int, height: int) -> tuple[int, int, int]:
    """Grid of ``cost_volume_kernel``: (row bands, class blocks, views * 2 streams)."""
    return (triton.cdiv(height, ROWS), triton.cdiv(num_classes, CLASS_BLOCK), 2 * batch)


def scratch_numel(batch: int, num_classes: int, height: int, width: int) -> int:
    """Number of fp32 scratch elements the kernel needs: NB * (ROWS + 6) * (W + 6) per program."""
    g0, g1, g2 = launch_grid(batch, num_classes, height)
    return g0 * g1 * g2 * CLASS_BLOCK * (ROWS + 2 * HALO) * (width + 2 * HALO)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: exact fp32 products for fp32 inputs (no TF32)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def kernel_constexprs(dtype: torch.dtype) -> dict[str, object]:
    """Compile-time constants of ``cost_volume_kernel`` (shared with the TensorRT AOT build)."""
    return {
        "CH": EMBED_DIM,
        "OC": CONV_CHANNELS,
        "KSIZE": KERNEL_SIZE,
        "NB": CLASS_BLOCK,
        "ROWS": ROWS,
        "TAPS": TAPS_PAD,
        "BLOCK_K": BLOCK_K,
        "BLOCK_Q": BLOCK_Q,
        "BLOCK_M": BLOCK_M,
        "BLOCK_O": BLOCK_O,
        "PB": PIXEL_BLOCK,
        "EPS": NORM_EPS,
        "DOT_PRECISION": dot_precision(dtype),
    }


def cost_volume_triton(
    e_clip: torch.Tensor,
    e_dino: torch.Tensor,
    text: torch.Tensor,
    w_clip: torch.Tensor,
    b_clip: torch.Tensor,
    w_dino: torch.Tensor,
    b_dino: torch.Tensor,
    out: torch.Tensor | None = None,
    scratch: torch.Tensor | None = None,
    num_warps: int = NUM_WARPS,
    num_stages: int = NUM_STAGES,
) -> torch.Tensor:
    """Run ``cost_volume_kernel`` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).

    Args:
        e_clip: CLIP features, [B, 512, H, W], float32 or float16.
        e_dino: DINO features, [B, 512, H, W], same dtype.
        text: text embeddings, [N, 512], same dtype, not normalized.
        w_clip: conv weight, [128, 1, 7, 7], any float dtype.
        b_clip: conv bias, [128].
        w_dino: conv weight, [128, 1, 7, 7].
        b_dino: conv bias, [128].
        out: optional contiguous [B*N, 256, H, W] output of the input dtype (tests poison it).
        scratch: optional contiguous float32 buffer of ``scratch_numel(B, N, H, W)`` elements.
        num_warps: warps per program (a tuning knob; the result does not depend on it).
        num_stages: pipelining depth of the K loop (a tuning knob).

    Returns:
        ``out``: [B*N, 256, H, W] in the dtype of ``e_clip``.

    Raises:
        GSNetError: the inputs, ``out`` or ``scratch`` do not fit.
    """
    check_cost_volume_inputs(e_clip, e_dino, text, w_clip, b_clip, w_dino, b_dino)
    batch, _, height, width = e_clip.shape
    num_classes = text.shape[0]
    out_shape = (batch * num_classes, 2 * CONV_CHANNELS, height, width)
    if out is None:
        out = torch.empty(out_shape, dtype=e_clip.dtype, device=e_clip.device)
    elif tuple(out.shape) != out_shape or out.dtype != e_clip.dtype or not out.is_contiguous():
        raise GSNetError(
            f"out has shape {tuple(out.shape)} and dtype {out.dtype}; pass a contiguous {out_shape} "
            f"tensor of dtype {e_clip.dtype}."
        )
    numel = scratch_numel(batch, num_classes, height, width)
    if scratch is None:
        scratch = torch.empty(numel, dtype=torch.float32, device=e_clip.device)
    elif scratch.numel() < numel or scratch.dtype != torch.float32 or not scratch.is_contiguous():
        raise GSNetError(
            f"scratch has {scratch.numel()} {scratch.dtype} elements; pass a contiguous float32 buffer of at least {numel}."
        )
    tensors = [t.contiguous() for t in (e_clip, e_dino, text, w_clip, b_clip, w_dino, b_dino)]
    grid = launch_grid(batch, num_classes, height)
    cost_volume_kernel[grid](
        *tensors,
        num_classes,
        height,
        width,
        out,
        scratch,
        **kernel_constexprs(e_clip.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
