"""Each GSNet block against the math written plainly (float64 numpy), independent of the model code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from open_clip.transformer import LayerNormFp32, QuickGELU, ResidualAttentionBlock

from gsnet_deploy.model.aggregator import AggregatorCfg, ClassAttention, shifted_window_mask
from gsnet_deploy.model.clip import _block_forward_dense, resize_clip_pos_embed
from gsnet_deploy.model.dino import resize_dino_pos_embed
from gsnet_deploy.model.qgff import Qgff, QgffCfg


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


# ---------------------------------------------------------------- CLIP dense last block
@pytest.mark.parametrize("batch", [1, 3])
def test_clip_dense_block_matches_plain_math(batch: int) -> None:
    width, heads, length = 32, 4, 10
    block = ResidualAttentionBlock(width, heads, act_layer=QuickGELU, norm_layer=LayerNormFp32)
    _randomize(block, seed=batch)
    x = torch.randn(batch, length, width)
    out = _block_forward_dense(block, x)

    xn = _np(x)
    w_in, b_in = _np(block.attn.in_proj_weight), _np(block.attn.in_proj_bias)
    y = _layer_norm(xn, _np(block.ln_1.weight), _np(block.ln_1.bias), 1e-5)
    v = y @ w_in[2 * width :].T + b_in[2 * width :]  # value projection of every token
    o = v @ _np(block.attn.out_proj.weight).T + _np(block.attn.out_proj.bias)
    o = o + xn[:, :1]  # residual: the CLS token's input, broadcast
    h = _layer_norm(o, _np(block.ln_2.weight), _np(block.ln_2.bias), 1e-5)
    h = h @ _np(block.mlp.c_fc.weight).T + _np(block.mlp.c_fc.bias)
    h = h * (1.0 / (1.0 + np.exp(-1.702 * h)))  # QuickGELU
    h = h @ _np(block.mlp.c_proj.weight).T + _np(block.mlp.c_proj.bias)
    expected = o + h
    assert out.shape == (batch, length, width)
    np.testing.assert_allclose(_np(out), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- positional-embedding resizes
def _cubic(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    t = np.abs(t)
    return np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1, np.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, 0.0))


def _bicubic_matrix(n_in: int, n_out: int, ratio: float) -> np.ndarray:
    """[n_out, n_in] matrix of 1-D bicubic interpolation, half-pixel centers, indices clamped at borders."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) * ratio - 0.5
        base = int(np.floor(src))
        frac = src - base
        for k in range(-1, 3):
            m[i, min(max(base + k, 0), n_in - 1)] += _cubic(np.array(k - frac))
    return m


def test_clip_pos_embed_resize_is_bicubic_on_the_grid() -> None:
    dim, src, dst = 5, 14, 24
    table = torch.randn(1 + src * src, dim)
    out = resize_clip_pos_embed(table, dst)
    m = _bicubic_matrix(src, dst, src / dst)  # size given: ratio = in / out
    grid = _np(table[1:]).reshape(src, src, dim)
    expected = np.einsum("ai,ijd,bj->abd", m, grid, m).reshape(dst * dst, dim)
    assert out.shape == (1 + dst * dst, dim)
    np.testing.assert_allclose(_np(out[0]), _np(table[0]))  # CLS row kept
    np.testing.assert_allclose(_np(out[1:]), expected, rtol=1e-4, atol=1e-5)


def test_dino_pos_embed_resize_uses_the_fixed_scale_factor() -> None:
    dim, src, dst, scale = 3, 28, 48, 48.1 / 28
    table = torch.randn(1, 1 + src * src, dim)
    out = resize_dino_pos_embed(table, dst, scale)
    m = _bicubic_matrix(src, dst, 1.0 / scale)  # scale given: sampling ratio is 1/scale, not 28/48
    grid = _np(table[0, 1:]).reshape(src, src, dim)
    expected = np.einsum("ai,ijd,bj->abd", m, grid, m).reshape(dst * dst, dim)
    np.testing.assert_allclose(_np(out[0, 1:]), expected, rtol=1e-4, atol=1e-5)
    # the size ratio would give different numbers: the fixed scale matters
    wrong = np.einsum("ai,ijd,bj->abd", _bicubic_matrix(src, dst, src / dst), grid, _bicubic_matrix(src, dst, src / dst))
    assert np.abs(wrong.reshape(dst * dst, dim) - expected).max() > 1e-3


# ---------------------------------------------------------------- cost volumes and QGFF
def _conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Plain 'same' convolution: x [C_in, H, W], w [C_out, C_in, k, k] -> [C_out, H, W]."""
    c_out, _, k, _ = w.shape
    pad = k // 2
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    h, wd = x.shape[1:]
    out = np.zeros((c_out, h, wd))
    for dy in range(k):
        for dx in range(k):
            out += np.einsum("oi,ihw->ohw", w[:, :, dy, dx], xp[:, dy : dy + h, dx : dx + wd])
    return out + b[:, None, None]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@pytest.mark.parametrize(("batch", "classes"), [(1, 1), (2, 3)])
def test_qgff_matches_plain_math(batch: int, classes: int) -> None:
    hidden, size = 8, 6
    qgff = Qgff(QgffCfg(hidden_dim=hidden))
    e_clip, e_dino = torch.randn(batch, 512, size, size), torch.randn(batch, 512, size, size)
    text = torch.randn(classes, 512)
    out = qgff(e_clip, e_dino, text)

    def norm(a: np.ndarray, axis: int) -> np.ndarray:
        return a / np.linalg.norm(a, axis=axis, keepdims=True)

    t = norm(_np(text), 1)
    expected = np.zeros((batch * classes, hidden, size, size))
    for b in range(batch):
        g, s = norm(_np(e_clip[b]), 0), norm(_np(e_dino[b]), 0)
        for n in range(classes):
            c_g = np.einsum("chw,c->hw", g, t[n])[None]  # cost volume [1, H, W]
            c_s = np.einsum("chw,c->hw", s, t[n])[None]
            z_g = _sigmoid(_conv2d(c_g, _np(qgff.clip_embed.weight), _np(qgff.clip_embed.bias)))
            z_s = _sigmoid(_conv2d(c_s, _np(qgff.dino_embed.weight), _np(qgff.dino_embed.bias)))
            fused = _conv2d(np.concatenate([z_g, z_s]), _np(qgff.fusion.weight), _np(qgff.fusion.bias))
            expected[b * classes + n] = _sigmoid(fused) + z_g
    assert out.shape == (batch * classes, hidden, size, size)
    np.testing.assert_allclose(_np(out), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- class transformer with padding
def _class_attention_plain(layer: ClassAttention, x: np.ndarray, guid: np.ndarray, batch: int) -> np.ndarray:
    """The reference's class transformer with the padding materialized, float64, pooling 1x1."""
    p = {k: _np(v) for k, v in layer.state_dict().items()}
    bn, c, h, w = x.shape
    n = bn // batch
    heads = layer.num_heads
    seq = x.reshape(batch, n, c, h * w).transpose(0, 3, 1, 2).reshape(batch * h * w, n, c)
    s = seq.shape[0]
    pad = max(layer.pad_len - n, 0)
    seq = np.concatenate([seq, np.broadcast_to(p["padding_tokens"], (s, pad, c))], axis=1)
    g = np.concatenate(
        [np.broadcast_to(guid, (s, n, guid.shape[-1])), np.broadcast_to(p["padding_guidance"], (s, pad, guid.shape[-1]))], 1
    )
    t = seq.shape[1]
    y = _layer_norm(seq, p["norm1.weight"], p["norm1.bias"], 1e-5)
    yg = np.concatenate([y, g], -1)
    q = (yg @ p["q.weight"].T + p["q.bias"]).reshape(s, t, heads, -1)
    k = (yg @ p["k.weight"].T + p["k.bias"]).reshape(s, t, heads, -1)
    v = (y @ p["v.weight"].T + p["v.bias"]).reshape(s, t, heads, -1)
    elu1 = lambda a: np.where(a > 0, a + 1.0, np.exp(a))  # noqa: E731 - elu(a) + 1
    q, k = elu1(q), elu1(k)
    out = np.zeros_like(q)
    for si in range(s):
        for hi in range(heads):
            num = np.zeros((t, q.shape[-1]))
            den = np.zeros(t)
            for j in range(t):  # sum over all T tokens, padding included
                num += (q[si, :, hi] @ k[si, j, hi])[:, None] * v[si, j, hi][None]
                den += q[si, :, hi] @ k[si, j, hi]
            out[si, :, hi] = num / (den[:, None] + 1e-6)
    seq = seq + out.reshape(s, t, c)
    hmid = _layer_norm(seq, p["norm2.weight"], p["norm2.bias"], 1e-5) @ p["mlp.fc1.weight"].T + p["mlp.fc1.bias"]
    seq = seq + np.maximum(hmid, 0) @ p["mlp.fc2.weight"].T + p["mlp.fc2.bias"]
    seq = seq[:, :n]
    return x + seq.reshape(batch, h, w, n, c).transpose(0, 3, 4, 1, 2).reshape(bn, c, h, w)


@pytest.mark.parametrize(("batch", "classes", "pad_len"), [(1, 1, 16), (2, 3, 16), (1, 5, 4)])
def test_class_attention_with_padding_matches_plain_math(batch: int, classes: int, pad_len: int) -> None:
    cfg = AggregatorCfg(hidden_dim=8, num_heads=2, text_dim=4, pad_len=pad_len)
    layer = ClassAttention(cfg)
    _randomize(layer, seed=classes)
    x = torch.randn(batch * classes, 8, 2, 3)
    guid = torch.randn(classes, 4)
    out = layer(x, guid, batch)
    expected = _class_attention_plain(layer, _np(x), _np(guid), batch)
    np.testing.assert_allclose(_np(out), expected, rtol=1e-5, atol=1e-5)
    # the padding changes the numbers: without it the result differs (guards against dropping it)
    if classes < pad_len:
        with torch.no_grad():
            layer.padding_tokens.add_(torch.randn_like(layer.padding_tokens))  # LayerNorm ignores a constant shift
        assert np.abs(_np(layer(x, guid, batch)) - expected).max() > 1e-4


def test_materialized_padding_path_equals_closed_form() -> None:
    cfg = AggregatorCfg(hidden_dim=8, num_heads=2, text_dim=4, pad_len=32)
    layer = ClassAttention(cfg)
    _randomize(layer, seed=7)
    x, guid = torch.randn(6, 8, 3, 3), torch.randn(3, 4)
    fast = layer(x, guid, 2)
    layer.materialize_padding = True
    np.testing.assert_allclose(_np(layer(x, guid, 2)), _np(fast), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- Swin shifted-window mask
def test_shifted_window_mask_separates_regions() -> None:
    size, window, shift = 24, 12, 6
    mask = shifted_window_mask(size, window, shift).numpy()
    # plain construction: region id of each pixel of the shifted map, then same-region pairs per window
    region = np.zeros((size, size), dtype=int)
    for y in range(size):
        for x in range(size):
            ry = 0 if y < size - window else (1 if y < size - shift else 2)
            rx = 0 if x < size - window else (1 if x < size - shift else 2)
            region[y, x] = 3 * ry + rx
    n = size // window
    assert mask.shape == (n * n, window * window, window * window)
    for wi in range(n * n):
        wy, wx = divmod(wi, n)
        ids = region[wy * window : (wy + 1) * window, wx * window : (wx + 1) * window].reshape(-1)
        expected = np.where(ids[:, None] == ids[None, :], 0.0, -100.0)
        np.testing.assert_array_equal(mask[wi], expected)
