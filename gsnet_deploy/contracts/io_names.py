"""Input/output names and dynamic axes of the two exported graphs.

One table used by ONNX export, the TensorRT build, the graph checks and the runtime, so that a
name is spelled in exactly one place (design.md section 2).
"""

from __future__ import annotations

# text graph: tokens int64 [N, 77] -> text_embeds float32 [N, 512] (L2-normalized)
TEXT_TOKENS = "tokens"
TEXT_EMBEDS = "text_embeds"

# image graph: images float32 [B, 3, 384, 384] (raw RGB 0..255) + text_embeds [N, 512]
#   -> logits float32 [B, N, 96, 96]
IMAGES = "images"
LOGITS = "logits"

TEXT_INPUTS: tuple[str, ...] = (TEXT_TOKENS,)
TEXT_OUTPUTS: tuple[str, ...] = (TEXT_EMBEDS,)
IMAGE_INPUTS: tuple[str, ...] = (IMAGES, TEXT_EMBEDS)
IMAGE_OUTPUTS: tuple[str, ...] = (LOGITS,)

# symbolic dimension names: B = views, N = classes
VIEWS = "B"
CLASSES = "N"

TEXT_DYNAMIC_AXES: dict[str, dict[int, str]] = {
    TEXT_TOKENS: {0: CLASSES},
    TEXT_EMBEDS: {0: CLASSES},
}
IMAGE_DYNAMIC_AXES: dict[str, dict[int, str]] = {
    IMAGES: {0: VIEWS},
    TEXT_EMBEDS: {0: CLASSES},
    LOGITS: {0: VIEWS, 1: CLASSES},
}

TEXT_GRAPH_FILE = "text_encoder.onnx"
IMAGE_GRAPH_FILE = "image_graph.onnx"
MANIFEST_FILE = "manifest.json"

# paper protocol on the device (issues 12 and 15): an encoder graph and a head graph around the image graph.
# paper_encoder.onnx: image uint8 [1, 3, h, w] (after ResizeShortestEdge) -> PAPER_FEATURES of the 5 views
# paper_head.onnx: PAPER_FEATURES + text_embeds [N, 512] + out_size int64 [2] (H, W)
#   -> class_map [H, W] (int32 in the graph; the host gets uint8 for N <= 255) and probs float32 [N, H, W]
PAPER_IMAGE = "image"
OUT_SIZE = "out_size"
CLASS_MAP = "class_map"
PROBS = "probs"
PAPER_FEATURES: tuple[str, ...] = (
    "clip_features",  # E_G [5, 512, 24, 24]
    "dino_features",  # E_S [5, 512, 24, 24]
    "appearance_guidance",  # ReLU(conv3x3(E_G)) [5, G, 24, 24]
    "clip_guidance_1",  # RIPD-projected CLIP guidance [5, 32, 48, 48]
    "clip_guidance_2",  # [5, 16, 96, 96]
    "dino_guidance_1",  # RIPD-projected DINO guidance [5, 32, 48, 48]
    "dino_guidance_2",  # [5, 16, 96, 96]
)
PAPER_ENCODER_INPUTS: tuple[str, ...] = (PAPER_IMAGE,)
PAPER_ENCODER_OUTPUTS: tuple[str, ...] = PAPER_FEATURES
PAPER_HEAD_INPUTS: tuple[str, ...] = (*PAPER_FEATURES, TEXT_EMBEDS, OUT_SIZE)
PAPER_HEAD_OUTPUTS: tuple[str, ...] = (CLASS_MAP, PROBS)

# symbolic dimension names of the paper graphs: image height/width after ResizeShortestEdge, output size
IMAGE_HEIGHT = "h"
IMAGE_WIDTH = "w"
OUT_HEIGHT = "H"
OUT_WIDTH = "W"

PAPER_ENCODER_DYNAMIC_AXES: dict[str, dict[int, str]] = {PAPER_IMAGE: {2: IMAGE_HEIGHT, 3: IMAGE_WIDTH}}
PAPER_HEAD_DYNAMIC_AXES: dict[str, dict[int, str]] = {
    TEXT_EMBEDS: {0: CLASSES},
    CLASS_MAP: {0: OUT_HEIGHT, 1: OUT_WIDTH},
    PROBS: {0: CLASSES, 1: OUT_HEIGHT, 2: OUT_WIDTH},
}

PAPER_ENCODER_FILE = "paper_encoder.onnx"
PAPER_HEAD_FILE = "paper_head.onnx"

# tiled mode's weight-free window blending graphs (export.tile_onnx); optional in an ONNX folder
TILE_BLEND_FILE = "tile_blend.onnx"
TILE_EMIT_FILE = "tile_emit.onnx"
# the strip (state carried between calls): acc float32 [N + 1, R, W] (weighted class sums, then the weight sum),
# valid float32 0/1 [R, W]; place int64 [5] (view index, strip row, column, height, width) and count int64 [1]
# (rows to emit) are shape tensors: their values set slice and pad sizes inside the graphs
TILE_ACC = "acc"
TILE_VALID = "valid"
TILE_PLACE = "place"
TILE_WINDOW_VALID = "window_valid"
TILE_WEIGHTS = "weights"
TILE_COUNT = "count"
TILE_LABELS = "labels"
TILE_VALID_ROWS = "valid_rows"
TILE_ACC_OUT = "acc_out"
TILE_VALID_OUT = "valid_out"
TILE_BLEND_INPUTS: tuple[str, ...] = (TILE_ACC, TILE_VALID, LOGITS, TILE_PLACE, TILE_WINDOW_VALID, TILE_WEIGHTS)
TILE_BLEND_OUTPUTS: tuple[str, ...] = (TILE_ACC_OUT, TILE_VALID_OUT)
TILE_EMIT_INPUTS: tuple[str, ...] = (TILE_ACC, TILE_VALID, TILE_COUNT)
TILE_EMIT_OUTPUTS: tuple[str, ...] = (TILE_LABELS, TILE_VALID_ROWS, PROBS, TILE_ACC_OUT, TILE_VALID_OUT)

# symbolic dimension names of the tile graphs: strip channels N + 1, strip rows, strip (image) width, rows emitted
STRIP_CHANNELS = "N1"
STRIP_ROWS = "R"
STRIP_WIDTH = "W"
EMIT_COUNT = "C"
# the values of the shape tensor place, named like dims so that a profile can give their ranges
PLACE_VALUES: tuple[str, ...] = ("place_view", "place_row", "place_col", "place_height", "place_width")

TILE_BLEND_DYNAMIC_AXES: dict[str, dict[int, str]] = {
    TILE_ACC: {0: STRIP_CHANNELS, 1: STRIP_ROWS, 2: STRIP_WIDTH},
    TILE_VALID: {0: STRIP_ROWS, 1: STRIP_WIDTH},
    LOGITS: {0: VIEWS, 1: CLASSES},
    TILE_ACC_OUT: {0: STRIP_CHANNELS, 1: STRIP_ROWS, 2: STRIP_WIDTH},
    TILE_VALID_OUT: {0: STRIP_ROWS, 1: STRIP_WIDTH},
}
TILE_EMIT_DYNAMIC_AXES: dict[str, dict[int, str]] = {
    TILE_ACC: {0: STRIP_CHANNELS, 1: STRIP_ROWS, 2: STRIP_WIDTH},
    TILE_VALID: {0: STRIP_ROWS, 1: STRIP_WIDTH},
    TILE_LABELS: {0: EMIT_COUNT, 1: STRIP_WIDTH},
    TILE_VALID_ROWS: {0: EMIT_COUNT, 1: STRIP_WIDTH},
    PROBS: {0: CLASSES, 1: EMIT_COUNT, 2: STRIP_WIDTH},
    TILE_ACC_OUT: {0: STRIP_CHANNELS, 1: STRIP_ROWS, 2: STRIP_WIDTH},
    TILE_VALID_OUT: {0: STRIP_ROWS, 1: STRIP_WIDTH},
}
