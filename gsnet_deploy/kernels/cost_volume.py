"""QGFF front end: two cost volumes, two 7x7 convolutions from one channel, sigmoid.

GSNet (AAAI 2025, github.com/yecy749/GSNet, Apache-2.0) fuses a CLIP and a DINO feature map
with the text embeddings in its QGFF module. Per view ``b`` and class ``n``:

    C_G[b, n] = <norm(E_clip[b]), norm(T[n])>      over the 512 channels, a [H, W] map
    C_S[b, n] = <norm(E_dino[b]), norm(T[n])>
    out[b * N + n] = sigmoid(conv7x7(C_G, w_clip, b_clip)) ++ sigmoid(conv7x7(C_S, w_dino, b_dino))

``cost_volume_reference`` is that math in plain PyTorch. It is what the model runs on CPU and
what ``torch.onnx.export`` records (MatMul/Reshape/Conv/Sigmoid/Concat plus the ops of
``F.normalize``; no einsum), so ``export/plugin_rewrite.py`` can find it in the image graph.
``fused_cost_volume`` has the same signature and runs the Triton kernel of
``triton_cost_volume.py`` when it can, the reference otherwise.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from gsnet_deploy.errors import GSNetError

EMBED_DIM = 512  # channels of E_clip, E_dino and the text embeddings
CONV_CHANNELS = 128  # output channels of each 7x7 convolution
KERNEL_SIZE = 7
NORM_EPS = 1e-12  # F.normalize's default eps


def check_cost_volume_inputs(
    e_clip: torch.Tensor,
    e_dino: torch.Tensor,
    text: torch.Tensor,
    w_clip: torch.Tensor,
    b_clip: torch.Tensor,
    w_dino: torch.Tensor,
    b_dino: torch.Tensor,
) -> None:
    """Raise ``GSNetError`` when the inputs of the cost-volume op do not fit together.

    Args:
        e_clip: CLIP features, [B, 512, H, W].
        e_dino: DINO features, [B, 512, H, W].
        text: text embeddings, [N, 512].
        w_clip: conv weight, [128, 1, 7, 7].
        b_clip: conv bias, [128].
        w_dino: conv weight, [128, 1, 7, 7].
        b_dino: conv bias, [128].

    Raises:
        GSNetError: a shape or dtype does not match the op's contract.
    """
    if e_clip.dim() != 4 or e_clip.shape[1] != EMBED_DIM or e_clip.shape[0] < 1:
        raise GSNetError(f"e_clip has shape {tuple(e_clip.shape)}; pass CLIP features of shape [B, {EMBED_DIM}, H, W].")
    if e_dino.shape != e_clip.shape:
        raise GSNetError(
            f"e_dino has shape {tuple(e_dino.shape)} but e_clip has {tuple(e_clip.shape)}; "
            "pass both feature maps at the same size."
        )
    if text.dim() != 2 or text.shape[1] != EMBED_DIM or text.shape[0] < 1:
        raise GSNetError(f"text has shape {tuple(text.shape)}; pass text embeddings of shape [N, {EMBED_DIM}].")
    weight_shape = (CONV_CHANNELS, 1, KERNEL_SIZE, KERNEL_SIZE)
    for name, w, b in (("clip", w_clip, b_clip), ("dino", w_dino, b_dino)):
        if tuple(w.shape) != weight_shape or tuple(b.shape) != (CONV_CHANNELS,):
            raise GSNetError(
                f"w_{name}/b_{name} have shapes {tuple(w.shape)}/{tuple(b.shape)}; "
                f"pass a conv weight {weight_shape} and a bias ({CONV_CHANNELS},)."
            )
    if e_dino.dtype != e_clip.dtype or text.dtype != e_clip.dtype:
        raise GSNetError(
            f"e_clip, e_dino and text have dtypes {e_clip.dtype}, {e_dino.dtype}, {text.dtype}; cast them to one dtype."
        )
    if e_clip.dtype not in (torch.float32, torch.float16):
        raise GSNetError(f"cost volume inputs have dtype {e_clip.dtype}; pass float32 or float16 tensors.")


def cost_volume_reference(
    e_clip: torch.Tensor,
    e_dino: torch.Tensor,
    text: torch.Tensor,
    w_clip: torch.Tensor,
    b_clip: torch.Tensor,
    w_dino: torch.Tensor,
    b_dino: torch.Tensor,
) -> torch.Tensor:
    """QGFF front end in plain PyTorch (exports to ONNX opset 17).

    Args:
        e_clip: CLIP features E_G, [B, 512, H, W], not normalized.
        e_dino: DINO features E_S, [B, 512, H, W], not normalized.
        text: text embeddings T, [N, 512], not normalized.
        w_clip: 7x7 conv weight applied to C_G, [128, 1, 7, 7].
        b_clip: its bias, [128].
        w_dino: 7x7 conv weight applied to C_S, [128, 1, 7, 7].
        b_dino: its bias, [128].

    Returns:
        [B * N, 256, H, W] in the dtype of ``e_clip``, b-major then n; channels 0..127 are
        sigmoid(conv(C_G)), 128..255 sigmoid(conv(C_S)).
    """
    h, w = e_clip.shape[-2:]
    text_n = F.normalize(text, dim=-1, eps=NORM_EPS)  # [N, 512]

    def branch(e: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        e_n = F.normalize(e, dim=1, eps=NORM_EPS)  # [B, 512, H, W]
        e_n = e_n.flatten(2)  # [B, 512, H*W]
        cost = torch.matmul(text_n, e_n)  # [N, 512] @ [B, 512, HW] -> [B, N, HW]
        cost = cost.reshape(-1, 1, h, w)  # [B*N, 1, H, W], b-major then n
        return torch.sigmoid(F.conv2d(cost, weight, bias, padding=KERNEL_SIZE // 2))  # [B*N, 128, H, W]

    z_g = branch(e_clip, w_clip, b_clip)
    z_s = branch(e_dino, w_dino, b_dino)
    return torch.cat([z_g, z_s], dim=1)  # [B*N, 256, H, W]


def triton_available() -> bool:
    """Whether the ``triton`` package can be imported (it is not imported here)."""
    return importlib.util.find_spec("triton") is not None


def _kernel_applies(tensors: tuple[torch.Tensor, ...]) -> bool:
    """Whether the Triton kernel may run on these inputs (CUDA, no autograd needed)."""
    if not all(t.is_cuda for t in tensors):
        return False
    # NOTE: the kernel has no backward; fine-tuning QGFF needs the reference's autograd graph.
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return False
    return triton_available()


def fused_cost_volume(
    e_clip: torch.Tensor,
    e_dino: torch.Tensor,
    text: torch.Tensor,
    w_clip: torch.Tensor,
    b_clip: torch.Tensor,
    w_dino: torch.Tensor,
    b_dino: torch.Tensor,
) -> torch.Tensor:
    """QGFF front end: the Triton kernel on CUDA, ``cost_volume_reference`` elsewhere.

    The kernel runs when every input is a CUDA tensor, Triton is installed, no gradient is
    needed and no ONNX export or tracing is in progress; otherwise the reference runs (on CPU,
    during ``torch.onnx.export``, and when training). Both compute the same function.

    Args:
        e_clip: CLIP features E_G, [B, 512, H, W], float32 or float16.
        e_dino: DINO features E_S, [B, 512, H, W], same dtype.
        text: text embeddings T, [N, 512], same dtype (normalized inside).
        w_clip: conv weight, [128, 1, 7, 7].
        b_clip: conv bias, [128].
        w_dino: conv weight, [128, 1, 7, 7].
        b_dino: conv bias, [128].

    Returns:
        [B * N, 256, H, W] in the dtype of ``e_clip`` (see ``cost_volume_reference``).

    Raises:
        GSNetError: the kernel path was taken and the inputs do not fit the op's contract.
    """
    tensors = (e_clip, e_dino, text, w_clip, b_clip, w_dino, b_dino)
    if not _kernel_applies(tensors):
        return cost_volume_reference(*tensors)
    from gsnet_deploy.kernels.triton_cost_volume import cost_volume_triton

    return cost_volume_triton(*tensors)
