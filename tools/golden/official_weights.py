"""Deterministic weights in the official GSNet checkpoint layout, for the golden fixture.

Every tensor named in ``tests/data/official_checkpoint_keys.json`` gets seeded normal values
(seed = CRC-32 of its key, so one key's values never depend on the others), scaled per tensor
from its owning module's class so that activations stay of order one through the 12-layer
towers: LayerNorm/GroupNorm weights near 1, projection weights ``N(0, 1/fan_in)``, small biases,
embeddings and the class transformer's padding tokens clearly non-zero (so that dropping them
changes the numbers). The two persistent Swin ``attn_mask`` buffers get the shifted-window mask,
computed here from its definition (regions of the cyclically shifted 24x24 map, -100 between
different regions), not from the project's code.

Used twice: by ``make_fixture.py`` (loads these weights into the official modules) and by
``tests/model/test_golden.py`` (loads the same weights into our model). Nothing here imports
``gsnet_deploy.model``, so a wrong key table there cannot make both sides agree.

Run ``python tools/golden/official_weights.py OUT.pth`` to write a detectron2-style checkpoint
(``{"model": state_dict}``, about 1 GB); tests build the dict in memory instead (a few seconds).
"""

from __future__ import annotations

import json
import math
import sys
import zlib
from pathlib import Path

import numpy as np
import torch

KEYS_JSON = Path(__file__).resolve().parents[2] / "tests" / "data" / "official_checkpoint_keys.json"
WINDOW = 12  # Swin window of the official config (WINDOW_SIZES)
SHIFT = WINDOW // 2  # shift of the second Swin block of each pair
FEATURE = 24  # side of the cost maps (FEATURE_RESOLUTION)

_NORMS = ("LayerNorm", "GroupNorm")
_EMBEDDINGS = (
    "class_embedding",
    "positional_embedding",
    "cls_token",
    "pos_embed",
    "padding_tokens",
    "padding_guidance",
)


def key_list(path: Path = KEYS_JSON) -> list[dict]:
    """Entries (key, shape, kind, module_class, ...) of the official checkpoint, in order."""
    return json.loads(path.read_text())["keys"]


def swin_shift_mask(size: int = FEATURE, window: int = WINDOW, shift: int = SHIFT) -> np.ndarray:
    """Additive mask ``[num_windows, window**2, window**2]`` of a shifted-window block.

    After rolling the map by ``-shift``, each axis has three bands: ``[0, size-window)``,
    ``[size-window, size-shift)`` and ``[size-shift, size)``. Two tokens of a window may attend
    to each other only when they lie in the same band on both axes; otherwise the mask is -100.
    """
    band = np.zeros(size, dtype=np.int64)
    band[size - window :] = 1
    band[size - shift :] = 2
    region = band[:, None] * 3 + band[None, :]  # [size, size]
    n = size // window
    masks = []
    for wr in range(n):
        for wc in range(n):
            ids = region[wr * window : (wr + 1) * window, wc * window : (wc + 1) * window].reshape(-1)  # row-major
            masks.append(np.where(ids[:, None] == ids[None, :], 0.0, -100.0))
    return np.stack(masks).astype(np.float32)


def _fan_in(entry: dict) -> int:
    """Inputs feeding one output unit of the tensor's module."""
    shape, cls, leaf = entry["shape"], entry["module_class"], entry["key"].rsplit(".", 1)[-1]
    if cls.endswith("ConvTranspose2d"):
        return shape[0]  # kernel == stride in GSNet: each output sees in_channels inputs
    if leaf in ("proj", "text_projection"):
        return shape[0]  # used as x @ W
    return int(np.prod(shape[1:]))


def _scaled(entry: dict, noise: torch.Tensor) -> torch.Tensor:
    """Scale unit normal ``noise`` for the tensor described by ``entry``."""
    cls, leaf = entry["module_class"], entry["key"].rsplit(".", 1)[-1]
    if leaf == "logit_scale":
        return torch.tensor(math.log(100.0))
    if any(cls.endswith(n) for n in _NORMS):
        return 1.0 + 0.1 * noise if leaf == "weight" else 0.1 * noise
    if leaf in _EMBEDDINGS or cls.endswith("Embedding"):
        return 0.5 * noise
    if leaf in ("bias", "in_proj_bias"):
        return 0.1 * noise
    return noise / math.sqrt(_fan_in(entry))


def official_state_dict() -> dict[str, torch.Tensor]:
    """The deterministic state dict, every key of the official checkpoint, in its order."""
    out: dict[str, torch.Tensor] = {}
    for entry in key_list():
        key = entry["key"]
        if key.endswith(".attn_mask"):
            out[key] = torch.from_numpy(swin_shift_mask())
            if list(out[key].shape) != entry["shape"]:
                raise ValueError(f"{key}: mask shape {tuple(out[key].shape)} != {entry['shape']}")
            continue
        gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        noise = torch.randn(entry["shape"], generator=gen, dtype=torch.float32)
        out[key] = _scaled(entry, noise).to(torch.float32).contiguous()
    return out


def main(argv: list[str]) -> int:
    """Write ``{"model": state_dict}`` to ``argv[0]``."""
    if len(argv) != 1:
        print("usage: official_weights.py OUT.pth", file=sys.stderr)
        return 2
    torch.save({"model": official_state_dict()}, argv[0])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
