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
from gsnet_deploy.contracts.engine_manifest import Graph
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
        for variant in needed[graph]:
            if variant is OnnxVariant.FP32:
                paths[graph][variant] = onnx_dir / variant.file_name(graph)
                continue
            dst = out_dir / variant.file_name(graph)
            if variant is OnnxVariant.INT8:
                # a Q/DQ model from `gsnet calib` may sit in the output or the ONNX folder
                for candidate in (out_dir / INT8_FILE, onnx_dir / INT8_FILE):
                    if _fresh(candidate, digest):
                        paths[graph][variant] = candidate
                        notes.append(f"reused the Q/DQ model {candidate}")
                        break
                else:
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
