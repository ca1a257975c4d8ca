"""The derived ONNX models a build needs (FP16, Q/DQ, Q/DQ+FP16): written once, reused while fresh.

A derived model is reused when its ``.json`` sidecar (``contracts.derived``) names the same model
digest as the ONNX folder; otherwise it is made again (AutoCast, or ModelOpt INT8 calibration).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from gsnet_deploy.contracts import io_names
from gsnet_deploy.contracts.derived import INT8_FILE, OnnxVariant, read_sidecar, write_sidecar
from gsnet_deploy.contracts.engine_manifest import PAPER_GRAPHS, Graph
from gsnet_deploy.errors import EngineBuildError
from gsnet_deploy.export.dla import DLA_VIEWS
from gsnet_deploy.export.fp16 import make_fp16_onnx


def _fresh(path: Path, digest: str) -> bool:
    """Whether a derived ONNX model exists and its ``.json`` record names this model digest."""
    record = read_sidecar(path)
    return path.is_file() and record is not None and record.get("model_digest") == digest


def make_variants(
    onnx_dir: Path,
    out_dir: Path,
    needed: Mapping[Graph, Sequence[OnnxVariant]],
    *,
    digest: str,
    calib_images: Sequence[Path] | None,
    text_tokens: np.ndarray | None,
    notes: list[str],
) -> dict[Graph, dict[OnnxVariant, Path]]:
    """Write (or reuse) the FP16, Q/DQ and Q/DQ+FP16 ONNX models the build needs."""
    from gsnet_deploy.calib.quantize import quantize_image_graph, reference_text_embeds
    from gsnet_deploy.calib.views import CalibrationDataWarning, calibration_tokens, calibration_views

    paths: dict[Graph, dict[OnnxVariant, Path]] = {g: {} for g in Graph}
    tokens = text_tokens if text_tokens is not None else calibration_tokens()
    embeds: np.ndarray | None = None
    views: np.ndarray | None = None

    def reference_inputs() -> tuple[np.ndarray, np.ndarray]:
        nonlocal embeds, views
        if embeds is None:
            embeds = reference_text_embeds(onnx_dir, tokens)
        if views is None:
            if calib_images:
                views = calibration_views(calib_images, max_images=32)
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", CalibrationDataWarning)
                    views = calibration_views(None, max_images=2)
                notes.append("AutoCast's reference run used the example images (pass --calib DIR for real imagery)")
        return views, embeds

    for graph in Graph:
        for variant in needed.get(graph, ()):
            if variant is OnnxVariant.FP32:
                paths[graph][variant] = onnx_dir / variant.file_name(graph)
                continue
            dst = out_dir / variant.file_name(graph)
            if variant is OnnxVariant.INT8:
                # a Q/DQ model from `gsnet calib` may sit in the output or the ONNX folder
                int8_file = variant.file_name(graph)  # INT8_FILE for the image graph
                for candidate in (out_dir / int8_file, onnx_dir / int8_file):
                    if _fresh(candidate, digest):
                        paths[graph][variant] = candidate
                        notes.append(f"reused the Q/DQ model {candidate}")
                        break
                else:
                    if graph is not Graph.IMAGE:  # paper Q/DQ graphs come from calibration, never made here
                        raise EngineBuildError(
                            f"No Q/DQ model {int8_file} for this model in {out_dir} or {onnx_dir}; run `gsnet calib` first."
                        )
                    if not calib_images:
                        raise EngineBuildError(
                            f"INT8 needs a Q/DQ model but {out_dir / INT8_FILE} does not exist (or is for "
                            "other weights) "
                            "and no calibration images were given; run `gsnet calib --images DIR` or pass "
                            "--calib DIR."
                        )
                    v, e = reference_inputs()
                    paths[graph][variant] = quantize_image_graph(
                        onnx_dir, out_dir, v, text_embeds=e, calibration_note="--calib images"
                    )
                    notes.append(f"calibrated INT8 on {v.shape[0]} views from the --calib images")
                continue
            if _fresh(dst, digest):
                paths[graph][variant] = dst
                notes.append(f"reused {dst.name}")
                continue
            feeds: list[dict[str, np.ndarray]]
            if graph is Graph.TEXT:
                feeds = [{io_names.TEXT_TOKENS: tokens}]
            elif graph in PAPER_GRAPHS:
                v, e = reference_inputs()
                feeds = [paper_reference_feeds(onnx_dir, graph, v, e)]
            else:
                v, e = reference_inputs()
                # one view per batch, streamed: AutoCast's memory stays one view's inference (export.fp16)
                feeds = [{io_names.IMAGES: v[i : i + 1], io_names.TEXT_EMBEDS: e} for i in range(min(DLA_VIEWS, v.shape[0]))]
            src = (
                paths[graph][OnnxVariant.INT8]
                if variant is OnnxVariant.INT8_FP16
                else onnx_dir / OnnxVariant.FP32.file_name(graph)
            )
            # NOTE: Q/DQ nodes go FP16 too (DQ scales FP16, as ModelOpt's own INT8+FP16 path makes them),
            # so no Cast sits between a DequantizeLinear and its Conv/MatMul (export.fp16.QDQ_OP_TYPES).
            keep_fp32: tuple[str, ...] = ()
            paths[graph][variant] = make_fp16_onnx(src, dst, reference_feeds=feeds, op_types_to_exclude=keep_fp32)
            write_sidecar(
                dst,
                {
                    "model_digest": digest,
                    "made_from": src.name,
                    "made_by": "ModelOpt AutoCast fp16",
                    "kept_fp32_op_types": list(keep_fp32),
                },
            )
    return paths


PAPER_REFERENCE_HW = (640, 2560)  # AutoCast's reference image after ResizeShortestEdge: the widest the profile takes
PAPER_REFERENCE_OUT = (2880, 2880)  # and output size: export.profiles.OUT_SIDE_MAX (import kept out of this module)
PAPER_REFERENCE_CLASSES = 2  # [N, H, W] at the largest output size stays ~66 MB a tensor


def paper_reference_feeds(onnx_dir: Path, graph: Graph, views: np.ndarray, embeds: np.ndarray) -> dict[str, np.ndarray]:
    """One batch for AutoCast's reference run of a paper graph, at the largest sizes its profile takes.

    The paper graphs compute resize coordinates up to the image and output sides; a reference run at
    small sizes would let AutoCast put that arithmetic in FP16 (exact integers only to 2048), so the
    image is 640x2560 (a calibration view tiled) and the output 2880x2880 (few classes, to bound memory).
    The head's features come from the FP32 encoder run on that image with ONNX Runtime.
    """
    reps = (-(-PAPER_REFERENCE_HW[0] // views.shape[2]), -(-PAPER_REFERENCE_HW[1] // views.shape[3]))
    image = np.tile(np.clip(views[:1], 0, 255), (1, 1, *reps))[:, :, : PAPER_REFERENCE_HW[0], : PAPER_REFERENCE_HW[1]]
    image = np.ascontiguousarray(image.astype(np.uint8))  # [1, 3, 640, 2560]
    if graph is Graph.PAPER_ENCODER:
        return {io_names.PAPER_IMAGE: image}
    from gsnet_deploy.runtime.ort_session import CPU_PROVIDER, open_session

    session = open_session(onnx_dir / io_names.PAPER_ENCODER_FILE, [CPU_PROVIDER])
    features = dict(zip(io_names.PAPER_FEATURES, session.run(list(io_names.PAPER_FEATURES), {io_names.PAPER_IMAGE: image})))
    return {
        **features,
        io_names.TEXT_EMBEDS: np.ascontiguousarray(embeds[:PAPER_REFERENCE_CLASSES], dtype=np.float32),
        io_names.OUT_SIZE: np.asarray(PAPER_REFERENCE_OUT, dtype=np.int64),
    }
