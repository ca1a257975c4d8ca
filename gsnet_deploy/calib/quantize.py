"""INT8 Q/DQ model of the image graph by ModelOpt ONNX post-training quantization, on the CPU.

Explicit quantization only: ``modelopt.onnx.quantization.quantize`` (NVIDIA TensorRT Model
Optimizer, Apache-2.0) writes QuantizeLinear / DequantizeLinear pairs into the graph; TensorRT then
runs INT8 exactly where the Q/DQ nodes say. TensorRT's implicit calibrator (deprecated in 10.1,
removed in 11) is never used. Activation ranges come from ``calib.stats``: ModelOpt places the
nodes after a one-view pass, then the FP32 graph streams the calibration views one at a time through
ONNX Runtime (CPU) returning only the quantized tensors, so memory does not grow with the views
(ModelOpt's own calibration was OOM-killed at 24 GB on the paper-size graph with 10 views).
The rest of the graph keeps FP32 (``high_precision_dtype="fp32"``); the ``best`` precision derives
FP16 elsewhere from this model with AutoCast (``export.build``), so one calibration serves both.

Placement (``qdq_placement``): only the weighted layers are quantized (Conv, ConvTranspose, and
MatMul / Gemm with a weight initializer). Left in high precision: every MatMul of two activations
(softmax attention, QGFF's cosine cost volumes, the class transformer's linear attention, whose
``elu+1`` sums reach thousands), the whole QGFF, the class transformer (its padded class axis mixes
all classes), the text projection, and the 32->1 head conv that writes the logits. With ModelOpt's
default placement (Add, Mul, LayerNorm, Slice inputs quantized too) the tiny config's logits drift
about 0.12 relative L2 from FP32; with this placement about 0.04 (see the closing notes of the
TensorRT issue).
"""

from __future__ import annotations

import enum
import json
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from gsnet_deploy.calib.modelopt_import import modelopt_without_stub_tensorrt
from gsnet_deploy.contracts import io_names
from gsnet_deploy.contracts.derived import INT8_FILE, read_model_digest
from gsnet_deploy.errors import ExportError
from gsnet_deploy.runtime.ort_session import open_session
from gsnet_deploy.runtime.protocol import NUM_VIEWS


class CalibMethod(enum.Enum):
    """How activation ranges are chosen from the calibration data (``calib.stats``).

    NOTE: ``max`` is the default. ModelOpt 0.47's own ``entropy`` used ONNX Runtime's entropy
    calibrator with 128 histogram bins and 128 quantized bins, which leaves a single candidate, the
    full range: it was ``max`` under another name. The real KL search (``entropy`` here) clips, and
    on GSNet's graphs that costs accuracy (relative L2 of the logits against FP32, max vs entropy:
    tiny graph 0.28 vs 0.34, stand-in graph 0.04 vs 0.19).
    """

    MAX = "max"  # absolute maximum, no clipping (what the pre-streaming calibration gave)
    ENTROPY = "entropy"  # KL-divergence threshold over a 2048-bin |x| histogram (TensorRT's classic entropy calibration)


QUANTIZED_OP_TYPES = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# anchored regexes of node names kept in high precision (ModelOpt matches them with re.match)
SENSITIVE_NODES = (
    r"/qgff/.*",  # cosine cost volumes and their 7x7 convs: small differences decide the class
    r".*/class_attn/.*",  # linear attention over the padded class axis
    r"/text_proj/.*",  # text guidance for every class
    # the 32->1 conv that writes the logits; "/head/" where the exporter drops the decoder's scope
    # (Ripd.decode called as a method): quantizing its input cost 78% argmax agreement on the trained tiny model
    r"(/decoder)?/head/.*",
)


def qdq_placement(model_path: Path) -> tuple[list[str], list[str]]:
    """Op types to quantize and node-name patterns to exclude for the image graph at ``model_path``.

    Returns:
        ``(op_types_to_quantize, nodes_to_exclude)`` for ``modelopt.onnx.quantization.quantize``:
        ``QUANTIZED_OP_TYPES``, and ``SENSITIVE_NODES`` plus the names of the MatMuls whose two
        inputs are both activations (no weight initializer).

    """
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    weights = {init.name for init in model.graph.initializer}
    weights |= {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    activation_matmuls = [
        node.name for node in model.graph.node if node.op_type == "MatMul" and not weights.intersection(node.input[:2])
    ]
    return list(QUANTIZED_OP_TYPES), [*SENSITIVE_NODES, *(re.escape(n) + "$" for n in activation_matmuls)]


class _FeedReader:
    """ONNX Runtime ``CalibrationDataReader`` over fixed feed dicts (ModelOpt also calls ``get_first``)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds = feeds
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self._feeds):
            return None
        self._next += 1
        return self._feeds[self._next - 1]

    def get_first(self) -> dict[str, np.ndarray]:
        return self._feeds[0]

    def rewind(self) -> None:
        self._next = 0

    def __len__(self) -> int:
        return len(self._feeds)


def image_graph_feeds(views: np.ndarray, text_embeds: np.ndarray, batch: int = NUM_VIEWS) -> list[dict[str, np.ndarray]]:
    """Split calibration views into image-graph feeds of ``batch`` views, each with all text embeddings.

    Args:
        views: float32 ``[V, 3, 384, 384]``.
        text_embeds: float32 ``[N, 512]``; every feed gets all N classes because the class axis is
            not independent (the class transformer attends over it).
        batch: views per feed (5: one image's paper views).

    Raises:
        ExportError: empty or mis-shaped inputs.

    """
    if views.ndim != 4 or views.shape[0] == 0:
        raise ExportError(f"Calibration views must be a non-empty [V, 3, H, W] array, got shape {views.shape}.")
    if text_embeds.ndim != 2 or text_embeds.shape[0] == 0:
        raise ExportError(f"Calibration text embeddings must be a non-empty [N, D] array, got shape {text_embeds.shape}.")
    embeds = np.ascontiguousarray(text_embeds, dtype=np.float32)
    return [
        {
            io_names.IMAGES: np.ascontiguousarray(views[i : i + batch], dtype=np.float32),
            io_names.TEXT_EMBEDS: embeds,
        }
        for i in range(0, views.shape[0], batch)
    ]


def reference_text_embeds(onnx_dir: Path, tokens: np.ndarray) -> np.ndarray:
    """Run the FP32 text graph on ONNX Runtime CPU: tokens ``int64 [N, 77]`` -> ``float32 [N, 512]``."""
    path = Path(onnx_dir) / io_names.TEXT_GRAPH_FILE
    if not path.is_file():
        raise ExportError(f"Text graph {path} does not exist; run `gsnet export onnx --out {onnx_dir}` first.")
    session = open_session(path)
    (embeds,) = session.run([io_names.TEXT_EMBEDS], {io_names.TEXT_TOKENS: np.asarray(tokens, dtype=np.int64)})
    return np.asarray(embeds, dtype=np.float32)


def _placement_pass(
    src: Path, tmp_out: Path, first_feed: dict[str, np.ndarray], op_types: list[str], excluded: list[str]
) -> None:
    """ModelOpt writes the Q/DQ nodes after a max calibration on ``first_feed`` (one view; its scales are replaced).

    ``calibration_shapes`` makes ModelOpt's GEMV check use shape inference at the engine's opt shape
    (5 views) instead of an inference run that returns every MatMul output.
    """
    from modelopt.onnx.quantization import quantize

    num_classes, embed_dim = first_feed[io_names.TEXT_EMBEDS].shape
    size = first_feed[io_names.IMAGES].shape[-1]
    shapes = f"{io_names.IMAGES}:{NUM_VIEWS}x3x{size}x{size},{io_names.TEXT_EMBEDS}:{num_classes}x{embed_dim}"
    try:
        with modelopt_without_stub_tensorrt():
            quantize(
                onnx_path=str(src),
                quantize_mode="int8",
                calibration_data_reader=_FeedReader([first_feed]),
                calibration_method=CalibMethod.MAX.value,
                calibration_shapes=shapes,
                calibration_eps=["cpu"],
                high_precision_dtype="fp32",
                op_types_to_quantize=op_types,
                nodes_to_exclude=excluded,
                output_path=str(tmp_out),
                log_level="WARNING",
            )
    except (ValueError, RuntimeError, AssertionError) as err:
        raise ExportError(f"ModelOpt INT8 quantization of {src} failed ({err}); check the ONNX model.") from err
    if not tmp_out.is_file():
        raise ExportError(f"ModelOpt wrote no quantized model for {src}; check the log above.")


def _view_feeds(views: np.ndarray, text_embeds: np.ndarray, per_run: int) -> Iterator[dict[str, np.ndarray]]:
    """Feeds of ``per_run`` views each, made one at a time (the views array is not copied as a whole)."""
    embeds = np.ascontiguousarray(text_embeds, dtype=np.float32)
    for i in range(0, views.shape[0], per_run):
        yield {io_names.IMAGES: np.ascontiguousarray(views[i : i + per_run], dtype=np.float32), io_names.TEXT_EMBEDS: embeds}


def quantize_image_graph(
    onnx_dir: Path,
    out_dir: Path,
    views: np.ndarray,
    *,
    text_embeds: np.ndarray,
    method: CalibMethod = CalibMethod.MAX,
    calibration_note: str = "",
    views_per_run: int = 1,
    progress: bool = True,
    isolate: bool = True,
) -> Path:
    """Write ``out_dir/image_graph.int8.onnx``: the image graph with INT8 Q/DQ nodes, calibrated on ``views``.

    Two passes (``calib.stats``): ModelOpt places the Q/DQ nodes after a max calibration on the first
    view; then the FP32 graph runs ``views_per_run`` views at a time returning only the tensors that
    got a QuantizeLinear, each folded into a fixed-size histogram, and the scales from those
    histograms replace ModelOpt's. Peak memory does not depend on the number of views.

    Args:
        onnx_dir: folder with the FP32 ``image_graph.onnx`` and its ``manifest.json``.
        out_dir: where the Q/DQ model (and its ``.json`` record) are written, together and atomically.
        views: float32 ``[V, 3, 384, 384]`` calibration views (``calibration_views``).
        text_embeds: float32 ``[N, 512]`` text embeddings fed with every run (from the text graph,
            e.g. ``reference_text_embeds``); all N together, the class transformer mixes them.
        method: activation range method.
        calibration_note: where the views came from, recorded in the ``.json`` record.
        views_per_run: views per ONNX Runtime run of the streaming pass (memory grows with it).
        progress: show a progress bar with an ETA on stderr.
        isolate: run ModelOpt's placement pass in a child process (its memory is returned before the
            streaming pass; False runs it here, for debugging).

    Returns:
        Path of the Q/DQ model.

    Raises:
        ExportError: the FP32 model is missing, inputs are mis-shaped, or quantization failed.
        InsufficientMemoryError: the host clearly has too little memory (checked before any work).

    """
    import onnx

    from gsnet_deploy.calib import stats
    from gsnet_deploy.calib.memory import calibration_bytes, require_memory
    from gsnet_deploy.contracts.atomic import AtomicFiles
    from gsnet_deploy.contracts.derived import sidecar_path

    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    src = onnx_dir / io_names.IMAGE_GRAPH_FILE
    if not src.is_file():
        raise ExportError(f"Image graph {src} does not exist; run `gsnet export onnx --out {onnx_dir}` first.")
    digest = read_model_digest(onnx_dir)
    image_graph_feeds(views[:1], text_embeds)  # shape checks only
    if views_per_run < 1:
        raise ExportError(f"views_per_run must be at least 1, got {views_per_run}; pass 1 for the least memory.")
    require_memory(
        calibration_bytes(src, int(text_embeds.shape[0])),
        f"INT8 calibration of {src} with {text_embeds.shape[0]} classes",
        hint="calibrate with fewer classes (--num-classes)",
    )
    op_types, excluded = qdq_placement(src)
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / INT8_FILE
    with tempfile.TemporaryDirectory(prefix=".quantize.", dir=out_dir) as tmp:
        tmp_out = Path(tmp) / INT8_FILE
        first = next(_view_feeds(views[:1], text_embeds, 1))
        if isolate:
            # NOTE: ModelOpt holds several copies of the model and leaves garbage that the allocator keeps;
            # in a child process all of it goes back to the system before the streaming pass starts.
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
                pool.submit(_placement_pass, src, tmp_out, first, op_types, excluded).result()
        else:
            _placement_pass(src, tmp_out, first, op_types, excluded)
        qdq = onnx.load(str(tmp_out))
        groups = stats.activation_quantizers(qdq)
        tensors = sorted({t for names in groups.values() for t in names})
        del qdq  # the streaming pass holds only the FP32 model
        session = stats.stats_session(src, tensors, Path(tmp))
        runs = -(-views.shape[0] // views_per_run)
        bar = stats.Progress(runs * views_per_run, f"INT8 calibration ({method.value}, {len(tensors)} tensors)", enabled=progress)
        hists = stats.collect_histograms(
            session, tensors, _view_feeds(views, text_embeds, views_per_run),
            progress=lambda done: bar(min(done * views_per_run, views.shape[0])),
        )  # fmt: skip
        seconds = bar.close()
        del session
        scales = {scale: max(stats.scale_of(hists[t], method.value) for t in names) for scale, names in groups.items()}
        qdq = onnx.load(str(tmp_out))
        stats.write_scales(qdq, scales)
        record = {
            "model_digest": digest,
            "calibration_method": method.value,
            "num_views": int(views.shape[0]),
            "num_classes": int(text_embeds.shape[0]),
            "calibration_note": calibration_note,
            "calibrated_tensors": len(tensors),
            "calibration_seconds": round(seconds, 1),
            "quantized_op_types": op_types,
            "excluded_nodes": list(SENSITIVE_NODES),
        }
        with AtomicFiles() as files:
            onnx.save(qdq, str(files.part(dst)))
            files.part(sidecar_path(dst)).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return dst
