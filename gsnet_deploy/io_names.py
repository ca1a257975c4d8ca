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
