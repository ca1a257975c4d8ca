"""The paper's sliding-window protocol (the official evaluation), in numpy.

Steps, as the official GSNet code runs them at test time (design.md section 1):
1. detectron2's ``ResizeShortestEdge(640, max 2560)`` on the uint8 image, with PIL bilinear;
2. that image resized to 640x640 (torch-style bilinear), cut into 4 tiles of 384 at stride 256
   (row-major: (0,0), (0,256), (256,0), (256,256)), plus a 5th global view: the step-1 image
   resized to 384x384;
3. the 5 views run as one batch; each view's logits ``[N,96,96]`` are upsampled to 384
   (bilinear), passed through a sigmoid; the 4 tiles are averaged where they overlap, that
   640x640 map is averaged with the global view upsampled to 640, and the result is resized to
   the original image size (bilinear). The predicted class is the argmax.

Everything here is torch-free. The device protocol (``model.protocol``, exported as
``paper_encoder.onnx`` / ``paper_head.onnx``) runs the same steps on each backend's device; this
numpy version is its reference in the tests (equal within 1e-6 on probabilities), and the host's
``ResizeShortestEdge`` (``resize_shortest_edge``) is shared by both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from gsnet_deploy.runtime.resize import resize_bilinear

VIEW_SIZE = 384  # side of one view fed to the image graph
LOGIT_SIZE = 96  # side of the image graph's logits
SHORT_EDGE = 640  # detectron2 ResizeShortestEdge at test time (INPUT.MIN_SIZE_TEST)
MAX_EDGE = 2560  # INPUT.MAX_SIZE_TEST
CANVAS = 640  # the sliding window's working resolution (out_res of the official code)
STRIDE = 256  # int(384 * (1 - 0.333)) in the official code
NUM_VIEWS = 5  # 4 tiles + 1 global view


def shortest_edge_size(height: int, width: int, short: int = SHORT_EDGE, max_size: int = MAX_EDGE) -> tuple[int, int]:
    """Output (height, width) of detectron2's ``ResizeShortestEdge.get_output_shape``."""
    scale = short / min(height, width)
    if height < width:
        new_h, new_w = float(short), scale * width
    else:
        new_h, new_w = scale * height, float(short)
    if max(new_h, new_w) > max_size:
        scale = max_size / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return int(new_h + 0.5), int(new_w + 0.5)


def resize_shortest_edge(image: np.ndarray) -> np.ndarray:
    """Resize an RGB uint8 image ``[H, W, 3]`` as detectron2's test-time augmentation does (PIL bilinear)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 image [H, W, 3], got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    new_h, new_w = shortest_edge_size(h, w)
    if (new_h, new_w) == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))


def tile_offsets(canvas: int = CANVAS, view: int = VIEW_SIZE, stride: int = STRIDE) -> list[tuple[int, int]]:
    """Top-left corners (row, col) of the sliding-window tiles, in ``nn.Unfold`` order (row-major)."""
    starts = list(range(0, canvas - view + 1, stride))
    return [(r, c) for r in starts for c in starts]


@dataclass(frozen=True)
class PaperViews:
    """The 5 views of one image and what is needed to merge their logits back.

    Attributes:
        views: float32 ``[5, 3, 384, 384]``, raw RGB 0..255 (the image graph normalizes).
        height: original image height.
        width: original image width.

    """

    views: np.ndarray
    height: int
    width: int


def paper_views(image: np.ndarray) -> PaperViews:
    """Cut the 4 sliding-window tiles and the global view of an RGB uint8 image ``[H, W, 3]``."""
    height, width = image.shape[:2]
    resized = resize_shortest_edge(image)
    chw = np.ascontiguousarray(resized.transpose(2, 0, 1)).astype(np.float32)  # [3, h, w]
    canvas = resize_bilinear(chw, (CANVAS, CANVAS))  # [3, 640, 640]
    tiles = [canvas[:, r : r + VIEW_SIZE, c : c + VIEW_SIZE] for r, c in tile_offsets()]
    global_view = resize_bilinear(chw, (VIEW_SIZE, VIEW_SIZE))  # [3, 384, 384]
    views = np.stack([*tiles, global_view], axis=0)  # [5, 3, 384, 384]
    return PaperViews(views=np.ascontiguousarray(views, dtype=np.float32), height=height, width=width)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function in float32 (tanh form: one vectorized pass, no overflow for large |x|)."""
    half = np.float32(0.5)
    return (half + half * np.tanh(half * x)).astype(np.float32, copy=False)


def merge_paper_logits(logits: np.ndarray, height: int, width: int) -> np.ndarray:
    """Merge the logits of the 5 views into per-class probabilities at the original size.

    Args:
        logits: float32 ``[5, N, 96, 96]`` from the image graph (tiles in ``tile_offsets`` order,
            then the global view).
        height: original image height.
        width: original image width.

    Returns:
        float32 ``[N, height, width]`` probabilities.

    """
    if logits.ndim != 4 or logits.shape[0] != NUM_VIEWS:
        raise ValueError(f"expected logits [5, N, H, W], got {logits.shape}")
    num_classes = logits.shape[1]
    probs = sigmoid(resize_bilinear(logits.astype(np.float32, copy=False), (VIEW_SIZE, VIEW_SIZE)))  # [5, N, 384, 384]
    acc = np.zeros((num_classes, CANVAS, CANVAS), dtype=np.float32)
    count = np.zeros((CANVAS, CANVAS), dtype=np.float32)
    for tile, (r, c) in zip(probs[:-1], tile_offsets()):
        acc[:, r : r + VIEW_SIZE, c : c + VIEW_SIZE] += tile
        count[r : r + VIEW_SIZE, c : c + VIEW_SIZE] += 1.0
    tiled = acc / count  # [N, 640, 640]
    global_prob = resize_bilinear(probs[-1], (CANVAS, CANVAS))  # [N, 640, 640]
    merged = (tiled + global_prob) / np.float32(2.0)
    return resize_bilinear(merged, (height, width))  # [N, H, W]


def host_class_map(class_map: np.ndarray, num_classes: int) -> np.ndarray:
    """A device class map (int32/int64 ``[H, W]``) as the host keeps it: uint8 up to 255 classes, int32 beyond."""
    return class_map.astype(np.uint8 if num_classes <= 255 else np.int32, copy=False)
