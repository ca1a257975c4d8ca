"""INT8 Q/DQ models of the image graph (and the paper graphs), calibrated on the CPU in bounded memory.

Explicit quantization only: QuantizeLinear / DequantizeLinear pairs in the ONNX graph, written by
``calib.qdq`` (onnx + numpy) where TensorRT's explicit quantization wants them; TensorRT then runs
INT8 exactly there. TensorRT's implicit calibrator (deprecated in 10.1, removed in 11) is never used,
and neither is ModelOpt's ONNX PTQ: its placement pass alone peaked at 10 GiB on the paper-size
graph, and its own calibration was OOM-killed at 24 GB with 10 views. Activation ranges come from
``calib.stats``: the FP32 graph streams the calibration views one at a time through ONNX Runtime
(CPU) returning only the quantized tensors' absolute maxima (``max``) or the tensors themselves
folded into fixed histograms (``entropy``), so memory does not grow with the views. The rest of the
graph keeps FP32; the ``best`` precision derives FP16 elsewhere from this model with AutoCast
(``export.derived_models``), so one calibration serves both.

Placement (``SENSITIVE_NODES``, ``calib.qdq.quantized_layers``): only the weighted layers are
quantized (Conv, ConvTranspose, and MatMul / Gemm with a weight initializer). Left in high precision:
every MatMul of two activations (softmax attention, QGFF's cosine cost volumes, the class
transformer's linear attention, whose ``elu+1`` sums reach thousands), the whole QGFF, the class
transformer (its padded class axis mixes all classes), the text projection, and the 32->1 head conv
that writes the logits. With ModelOpt's default placement (Add, Mul, LayerNorm, Slice inputs
quantized too) the tiny config's logits drift about 0.12 relative L2 from FP32; with this placement
about 0.04 (0.036 on 2026-11-29; ``tests/calib/test_quantize.py`` says why 0.28 was seen in between).

The ranges are recorded by layer (``calib.qdq.LayerKey``, a digest of the layer's weight) in the
model's ``.json`` sidecar, so ``quantize_paper_graphs`` gives ``paper_encoder.onnx`` and
``paper_head.onnx`` the same Q/DQ nodes without calibrating them again.
"""

from __future__ import annotations

import enum
import json
import re
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from gsnet_deploy.calib.qdq import QUANTIZED_OP_TYPES
from gsnet_deploy.contracts import io_names
from gsnet_deploy.contracts.derived import INT8_FILE, INT8_PAPER_FILES, read_model_digest, read_sidecar
from gsnet_deploy.contracts.engine_manifest import PAPER_GRAPHS, Graph
from gsnet_deploy.errors import ExportError
from gsnet_deploy.runtime.ort_session import open_session
from gsnet_deploy.runtime.protocol import NUM_VIEWS


class CalibMethod(enum.Enum):
    """How activation ranges are chosen from the calibration data (``calib.stats``).

    NOTE: ``max`` is the default. ModelOpt 0.47's own ``entropy`` used ONNX Runtime's entropy
    calibrator with 128 histogram bins and 128 quantized bins, which leaves a single candidate, the
    full range: it was ``max`` under another name. The real KL search (``entropy`` here) clips, and
    on GSNet's graphs that costs accuracy (relative L2 of the logits against FP32, max vs entropy:
    tiny graph 0.036 vs 0.26, stand-in graph 0.04 vs 0.19).
    """

    MAX = "max"  # absolute maximum, no clipping (what the pre-streaming calibration gave)
    ENTROPY = "entropy"  # KL-divergence threshold over a 2048-bin |x| histogram (TensorRT's classic entropy calibration)


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
    """The same placement in ModelOpt's terms: op types to quantize and node-name patterns to exclude.

    Used to compare ``calib.qdq`` against ModelOpt's own ONNX PTQ (tests), never to quantize.

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
    paper_graphs: bool = True,
) -> Path:
    """Write ``out_dir/image_graph.int8.onnx``: the image graph with INT8 Q/DQ nodes, calibrated on ``views``.

    Three steps, one model in memory at a time: the quantized layers are read from the FP32 graph
    (``calib.qdq.quantized_layers``); the FP32 graph runs ``views_per_run`` views at a time returning
    only their activation inputs' ranges (``calib.stats``); the Q/DQ nodes are written with those
    ranges (``calib.qdq.insert_qdq``). Peak memory does not depend on the number of views.
    With ``paper_graphs`` and paper graphs in ``onnx_dir``, their Q/DQ models follow
    (``quantize_paper_graphs``).

    Args:
        onnx_dir: folder with the FP32 ``image_graph.onnx`` and its ``manifest.json``.
        out_dir: where the Q/DQ model (and its ``.json`` record) are written, together and atomically.
        views: float32 ``[V, 3, 384, 384]`` calibration views (``calibration_views``).
        text_embeds: float32 ``[N, 512]`` text embeddings fed with every run (from the text graph,
            e.g. ``reference_text_embeds``); all N together, the class transformer mixes them.
        method: activation range method.
        calibration_note: where the views came from, recorded in the ``.json`` record.
        views_per_run: views per ONNX Runtime run (memory grows with it).
        progress: show a progress bar with an ETA on stderr.
        paper_graphs: also write ``paper_encoder.int8.onnx`` / ``paper_head.int8.onnx`` where the
            ONNX folder has their FP32 graphs.

    Returns:
        Path of the Q/DQ model.

    Raises:
        ExportError: the FP32 model is missing, inputs are mis-shaped, or quantization failed.
        InsufficientMemoryError: the host clearly has too little memory (checked before any work).

    """
    import onnx

    from gsnet_deploy.calib import qdq, stats
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
    model = onnx.load(str(src))
    layers = qdq.quantized_layers(model, exclude=SENSITIVE_NODES)
    del model  # the streaming pass holds only its own copy
    if not layers:
        raise ExportError(f"{src} has no weighted layer to quantize; is it GSNet's image graph?")
    tensors = sorted({layer.activation for layer in layers})
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / INT8_FILE
    with tempfile.TemporaryDirectory(prefix=".quantize.", dir=out_dir) as tmp:
        reduce = method is CalibMethod.MAX
        session = stats.stats_session(src, tensors, Path(tmp), reduce=reduce)
        runs = -(-views.shape[0] // views_per_run)
        bar = stats.Progress(runs * views_per_run, f"INT8 calibration ({method.value}, {len(tensors)} tensors)", enabled=progress)
        feeds = _view_feeds(views, text_embeds, views_per_run)
        step = lambda done: bar(min(done * views_per_run, views.shape[0]))  # noqa: E731
        if reduce:
            amax = stats.collect_amax(session, tensors, feeds, progress=step)
        else:
            hists = stats.collect_histograms(session, tensors, feeds, progress=step)
            amax = {t: stats.scale_of(h, method.value) * stats.INT8_MAX for t, h in hists.items()}
        seconds = bar.close()
        del session
    by_key: dict[str, float] = {}
    for layer in layers:
        by_key[layer.key] = max(by_key.get(layer.key, 0.0), float(amax[layer.activation]))
    model = onnx.load(str(src))
    qdq.insert_qdq(model, layers, by_key)
    record = {
        "model_digest": digest,
        "calibration_method": method.value,
        "num_views": int(views.shape[0]),
        "num_classes": int(text_embeds.shape[0]),
        "calibration_note": calibration_note,
        "calibrated_tensors": len(tensors),
        "calibration_seconds": round(seconds, 1),
        "quantized_op_types": list(QUANTIZED_OP_TYPES),
        "excluded_nodes": list(SENSITIVE_NODES),
        "made_by": "gsnet_deploy.calib.qdq",
        "activation_amax": dict(sorted(by_key.items())),  # by layer key: what quantize_paper_graphs reads
    }
    with AtomicFiles() as files:
        onnx.save(model, str(files.part(dst)))
        files.part(sidecar_path(dst)).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    del model
    if paper_graphs:
        quantize_paper_graphs(onnx_dir, out_dir)
    return dst


def quantize_paper_graphs(onnx_dir: Path, int8_dir: Path) -> dict[Graph, Path]:
    """Write ``paper_encoder.int8.onnx`` / ``paper_head.int8.onnx`` next to ``int8_dir/image_graph.int8.onnx``.

    The paper graphs hold the image graph's layers under other names; each layer whose weight matches
    a calibrated layer of the image graph (``calib.qdq.LayerKey``) gets the same Q/DQ nodes, with the
    activation range recorded in ``image_graph.int8.onnx.json``. No calibration run: this takes
    one graph load and save each. What TensorRT's INT8 paper engines are built from.

    Args:
        onnx_dir: the exported ONNX folder (FP32 paper graphs and ``manifest.json``).
        int8_dir: folder of ``image_graph.int8.onnx`` (from ``quantize_image_graph``); the paper Q/DQ
            models and their ``.json`` records are written there.

    Returns:
        The Q/DQ model of each paper graph the ONNX folder has (none for a folder without them).

    Raises:
        ExportError: no image Q/DQ model with recorded ranges for these weights in ``int8_dir``, or a
            paper graph has none of the calibrated layers.

    """
    import onnx

    from gsnet_deploy.calib import qdq
    from gsnet_deploy.contracts.atomic import AtomicFiles
    from gsnet_deploy.contracts.derived import sidecar_path

    onnx_dir, int8_dir = Path(onnx_dir), Path(int8_dir)
    image_qdq = int8_dir / INT8_FILE
    record = read_sidecar(image_qdq) or {}
    digest = read_model_digest(onnx_dir)
    amax = record.get("activation_amax")
    if not image_qdq.is_file() or record.get("model_digest") != digest or not isinstance(amax, Mapping):
        raise ExportError(
            f"No Q/DQ image model with ranges for these weights in {int8_dir}; run `gsnet calib --onnx {onnx_dir}` first."
        )
    written: dict[Graph, Path] = {}
    for graph in PAPER_GRAPHS:
        src = onnx_dir / graph.onnx_file
        if not src.is_file():
            continue
        model = onnx.load(str(src))
        layers = qdq.quantized_layers(model, keys=set(amax))
        if not layers:
            raise ExportError(f"{src.name} has none of the layers calibrated in {image_qdq.name}; re-export the ONNX folder.")
        qdq.insert_qdq(model, layers, {k: float(v) for k, v in amax.items()})
        dst = int8_dir / INT8_PAPER_FILES[graph]
        payload = {
            "model_digest": digest,
            "made_from": f"{graph.onnx_file} with the ranges of {INT8_FILE}",
            "made_by": "gsnet_deploy.calib.qdq",
            "quantized_layers": len(layers),
            "calibration_method": record.get("calibration_method"),
            "num_views": record.get("num_views"),
        }
        with AtomicFiles() as files:
            onnx.save(model, str(files.part(dst)))
            files.part(sidecar_path(dst)).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        del model
        written[graph] = dst
    return written
