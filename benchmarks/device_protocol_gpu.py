"""One GPU session: the paper protocol on the device vs the image graph alone (issue 12.6), torch fp16.

For N in --classes (default 5 40), on one 768x512 image, with the torch backend in fp16 with CUDA
graphs (demo weights unless --checkpoint; timings are real, masks are not):

- graph: the image graph alone on 5 device-resident views (CUDA events), the floor of a whole image;
- per image: ``predict_paper`` as ``gsnet segment`` calls it (host ResizeShortestEdge, the
  backend's combined encoder+head path, class map copied to the host), host wall clock;
  goal: per image <= graph + 2 ms at N=40;
- folder: ``segment_files`` on a folder of --folder images (decode, graphs, mask + overlay written,
  pipelined) through ``bench.folder``; goal: images/s within 10% of 1 / graph at N=40.

With ``--backend tensorrt`` (TensorRT and cuda-python installed) the same rows for the TensorRT
engines: the ONNX graphs are exported (or taken from --onnx), ``gsnet export build`` builds FP16
engines including ``paper_encoder`` / ``paper_head`` (or --engines names built ones; build seconds
are reported), then graph = the image engine on 5 host views (host wall clock, copies included),
device = ``TensorRTBackend.segment_paper`` (encoder + head, features kept on the GPU, class map
copied back), per image = ``predict_paper``, folder as above; and, when the build has the tile
engines, tiled mode on a 768x1280 image (``run_tiled`` into a class-map sink): numpy blending on the
host vs blending on the GPU, seconds per image, alternated per run (an error there is recorded in
the report instead of losing the rows above).

Writes ``device_protocol_<gpu>_<date>.json`` and ``.md`` atomically into --out (``device_protocol_trt_...``
for TensorRT). Exit status 0 even when a goal is missed (the report says so); 2 when no CUDA device
(or, for --backend tensorrt, no TensorRT) is present (unless --dry-run).

Usage: python benchmarks/device_protocol_gpu.py --out benchmarks/results [--model-size paper] [--iters 50]
       python benchmarks/device_protocol_gpu.py --backend tensorrt --out DIR [--engines DIR | --onnx DIR]
       python benchmarks/device_protocol_gpu.py --dry-run   (CPU, tiny model, fp32: checks the script runs)
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gsnet_deploy.backends import BackendKind, BackendOptions, open_backend
from gsnet_deploy.bench.folder import make_folder, measure_folder
from gsnet_deploy.bench.latency_options import CLASS_NAMES, IMAGE_HW
from gsnet_deploy.bench.measure import _tokens
from gsnet_deploy.bench.timers import time_cuda, time_host, timing_stats
from gsnet_deploy.contracts.atomic import write_json_atomic, write_text_atomic
from gsnet_deploy.contracts.io_names import TEXT_EMBEDS, TEXT_TOKENS
from gsnet_deploy.contracts.model_size import ModelSize
from gsnet_deploy.runtime.protocol import paper_views
from gsnet_deploy.runtime.segment import predict_paper
from gsnet_deploy.runtime.vocab import parse_classes

GRAPH_SLACK_MS = 2.0  # per image <= graph + this, at N=40
FOLDER_TOLERANCE = 0.10  # folder images/s >= (1 - this) / graph


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement of the session, as the JSON payload."""
    cuda = torch.cuda.is_available() and not args.dry_run
    options = BackendOptions(kind=BackendKind.TORCH, checkpoint=args.checkpoint, device="cuda" if cuda else "cpu",
                             size=ModelSize.TINY if args.dry_run else ModelSize(args.model_size), fp16=cuda,
                             cuda_graphs=cuda)  # fmt: skip
    iters, warmup = (2, 1) if args.dry_run else (args.iters, 5)
    rgb = np.random.default_rng(0).integers(0, 256, size=(*IMAGE_HW, 3), dtype=np.uint8)  # [512, 768, 3]
    results: dict[str, Any] = {}
    with open_backend(options, warn=False) as backend, tempfile.TemporaryDirectory(prefix="gsnet-gpu-folder-") as tmp:
        images = make_folder(Path(tmp), 2 if args.dry_run else args.folder, *IMAGE_HW)
        for n in args.classes:
            text = backend.text.run({TEXT_TOKENS: _tokens(n)})[TEXT_EMBEDS]  # [N, 512]
            views = torch.from_numpy(paper_views(rgb).views).to(backend.device)  # [5, 3, 384, 384]
            text_dev = torch.from_numpy(text).to(backend.device)  # [N, 512]

            def graph_call(views: torch.Tensor = views, text_dev: torch.Tensor = text_dev) -> object:
                return backend.image.forward(views, text_dev)

            graph = time_cuda(graph_call, iters, warmup) if cuda else time_host(graph_call, iters, warmup)

            def image_call(text: np.ndarray = text) -> object:
                return predict_paper(backend, rgb, text, want_probs=False)

            per_image = time_host(image_call, iters, warmup)
            vocab = parse_classes(",".join(f"{CLASS_NAMES[i % len(CLASS_NAMES)]} {i}" for i in range(n)))
            measure_folder(backend, vocab, images[:2], device_protocol=True)  # warm-up (CUDA graph capture)
            folder = measure_folder(backend, vocab, images, device_protocol=True)
            g, p = statistics.median(graph), statistics.median(per_image)
            results[f"N={n}"] = {
                "graph": {**timing_stats(graph), "timer": "CUDA events, device tensors" if cuda else "host wall clock"},
                "per_image": {**timing_stats(per_image), "timer": "host wall clock, predict_paper"},
                "folder": {**folder, "images_per_s": 1e3 / folder["per_image_ms"], "graph_images_per_s": 1e3 / g},
                "per_image_goal_met": p <= g + GRAPH_SLACK_MS,
                "folder_goal_met": folder["per_image_ms"] <= g / (1 - FOLDER_TOLERANCE),
            }
            print(f"N={n}: graph {g:.2f} ms, per image {p:.2f} ms, folder {folder['per_image_ms']:.2f} ms/image", file=sys.stderr)
    gpu = torch.cuda.get_device_name(0) if cuda else "cpu (dry run)"
    return {"card": gpu, "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
            "model": "tiny" if args.dry_run else args.model_size, "weights": str(args.checkpoint or "demo weights"),
            "precision": "fp16, CUDA graphs" if cuda else "fp32", "image": f"{IMAGE_HW[1]}x{IMAGE_HW[0]}",
            "torch": torch.__version__, "results": results}  # fmt: skip


def _tensorrt_engines(args: argparse.Namespace, work: Path) -> tuple[Path, dict[str, float]]:
    """Engines to time: --engines, or built here (FP16) from --onnx or a fresh export; with the seconds each step took."""
    if args.engines is not None:
        return args.engines, {}
    from gsnet_deploy.contracts.precision import Precision
    from gsnet_deploy.export.build import build_engines

    seconds: dict[str, float] = {}
    onnx_dir = args.onnx
    if onnx_dir is None:
        from gsnet_deploy.export.onnx import export_onnx
        from gsnet_deploy.model import build_gsnet, cfg_for

        start = time.perf_counter()
        onnx_dir = work / "onnx"
        export_onnx(build_gsnet(cfg_for(ModelSize(args.model_size)), checkpoint=args.checkpoint), onnx_dir)
        seconds["onnx_export_s"] = time.perf_counter() - start
    start = time.perf_counter()
    out = work / "engines"
    top = max(args.classes)
    build_engines(onnx_dir, out, Precision.FP16, classes_opt=min(top, 256), text_tokens=_tokens(top))
    seconds["engine_build_s"] = time.perf_counter() - start
    return out, seconds


def run_tensorrt(args: argparse.Namespace) -> dict[str, Any]:
    """The TensorRT rows: image engine alone, encoder + head on the GPU, predict_paper, a folder."""
    from gsnet_deploy.contracts.engine_manifest import Graph
    from gsnet_deploy.contracts.io_names import IMAGES
    from gsnet_deploy.runtime.protocol import resize_shortest_edge
    from gsnet_deploy.runtime.tensorrt_backend import TensorRTBackend, current_gpu

    iters, warmup = args.iters, 5
    rgb = np.random.default_rng(0).integers(0, 256, size=(*IMAGE_HW, 3), dtype=np.uint8)  # [512, 768, 3]
    image = np.ascontiguousarray(resize_shortest_edge(rgb).transpose(2, 0, 1)[None])  # [1, 3, h, w] uint8
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gsnet-gpu-trt-") as tmp:
        engines, seconds = _tensorrt_engines(args, Path(tmp))
        (Path(tmp) / "folder").mkdir()
        images = make_folder(Path(tmp) / "folder", args.folder, *IMAGE_HW)
        with TensorRTBackend(engines) as backend:
            paper = Graph.PAPER_HEAD in backend.manifests  # engines built before the paper graphs: numpy fallback
            for n in args.classes:
                text = backend.text.run({TEXT_TOKENS: _tokens(n)})[TEXT_EMBEDS]  # [N, 512]
                views = paper_views(rgb).views  # [5, 3, 384, 384]
                graph = time_host(lambda t=text: backend.image.run({IMAGES: views, TEXT_EMBEDS: t}), iters, warmup)
                device = time_host(lambda t=text: backend.segment_paper(image, t, IMAGE_HW), iters, warmup) if paper else []
                per_image = time_host(lambda t=text: predict_paper(backend, rgb, t, want_probs=False), iters, warmup)
                vocab = parse_classes(",".join(f"{CLASS_NAMES[i % len(CLASS_NAMES)]} {i}" for i in range(n)))
                measure_folder(backend, vocab, images[:2], device_protocol=True)  # warm-up
                folder = measure_folder(backend, vocab, images, device_protocol=True)
                g, p = statistics.median(graph), statistics.median(per_image)
                results[f"N={n}"] = {
                    "graph": {**timing_stats(graph), "timer": "host wall clock, image engine on 5 host views (copies included)"},
                    "device": {**timing_stats(device), "timer": "host wall clock, segment_paper"} if device else None,
                    "per_image": {**timing_stats(per_image), "timer": "host wall clock, predict_paper"},
                    "folder": {**folder, "images_per_s": 1e3 / folder["per_image_ms"], "graph_images_per_s": 1e3 / g},
                    "per_image_goal_met": p <= g + GRAPH_SLACK_MS,
                    "folder_goal_met": folder["per_image_ms"] <= g / (1 - FOLDER_TOLERANCE),
                }
                print(f"TensorRT N={n}: graph {g:.2f} ms, per image {p:.2f} ms", file=sys.stderr)
            tiled = _tiled_rows(backend, args.classes, runs=3 if iters >= 10 else 1)
            precision = backend.manifests[next(iter(backend.manifests))].precision.value
    import tensorrt

    return {"card": current_gpu()[0], "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
            "model": args.model_size, "weights": str(args.checkpoint or "demo weights"), "backend": "tensorrt",
            "precision": f"TensorRT {tensorrt.__version__}, {precision} engines", "image": f"{IMAGE_HW[1]}x{IMAGE_HW[0]}",
            "torch": torch.__version__, **seconds, "results": results, "tiled": tiled}  # fmt: skip


TILED_HW = (768, 1280)  # the image of the tiled rows (8 windows of 384 at the default overlap)


def _tiled_rows(backend: Any, classes: list[int], runs: int) -> dict[str, Any]:
    """Tiled mode on the engines: seconds per image with numpy blending vs the tile engines, per N (or why not)."""
    from gsnet_deploy.runtime.rows import ArraySource
    from gsnet_deploy.runtime.tiled import run_tiled

    class LabelSink:  # keeps nothing: writing files is not what is timed
        def write(self, rows: Any) -> None:
            np.argmax(rows.probs, axis=0)

        def write_labels(self, *args: Any) -> None:
            pass

    if backend.tile_blender is None:
        return {"skipped": "the engines have no tile_blend / tile_emit engines (ONNX folder exported before them)"}
    rgb = np.random.default_rng(1).integers(0, 256, size=(*TILED_HW, 3), dtype=np.uint8)
    rows: dict[str, Any] = {}
    try:
        for n in classes:
            text = backend.text.run({TEXT_TOKENS: _tokens(n)})[TEXT_EMBEDS]  # [N, 512]
            times: dict[str, list[float]] = {"numpy": [], "device": []}
            for i in range(runs + 1):  # the first round warms both up
                for kind, blend in (("numpy", False), ("device", True)):
                    start = time.perf_counter()
                    run_tiled(ArraySource(rgb), LabelSink(), backend, text, progress=False, device_blend=blend)
                    if i:
                        times[kind].append(time.perf_counter() - start)
            rows[f"N={n}"] = {kind: statistics.median(t) for kind, t in times.items()}
            print(f"TensorRT tiled N={n}: numpy {rows[f'N={n}']['numpy']:.3f} s, device {rows[f'N={n}']['device']:.3f} s",
                  file=sys.stderr)  # fmt: skip
    except Exception as err:  # the rows above stay; say what failed
        rows["error"] = f"{type(err).__name__}: {err}"
    return rows


def markdown(payload: dict[str, Any]) -> str:
    """The payload as a short markdown report."""
    lines = [f"# Paper protocol on the device: {payload['card']}", "",
             f"- Date: {payload['date']}. Command: `{payload['command']}`.",
             f"- Model: {payload['model']}, {payload['weights']}, torch {payload['torch']}, {payload['precision']}; "
             f"image {payload['image']}.", "",
             "| N | graph median ms | per image median ms | goal graph + 2 ms | folder ms/image | folder images/s | "
             "1/graph images/s | goal within 10% |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, r in payload["results"].items():
        lines.append(f"| {key[2:]} | {r['graph']['median_ms']:.2f} | {r['per_image']['median_ms']:.2f} | "
                     f"{'met' if r['per_image_goal_met'] else 'missed'} | {r['folder']['per_image_ms']:.2f} | "
                     f"{r['folder']['images_per_s']:.1f} | {r['folder']['graph_images_per_s']:.1f} | "
                     f"{'met' if r['folder_goal_met'] else 'missed'} |")  # fmt: skip
    devices = {k: r["device"] for k, r in payload["results"].items() if r.get("device")}
    if devices:
        lines += ["", "Paper encoder + head engines (`segment_paper`, features kept on the GPU): "
                  + ", ".join(f"{k} {d['median_ms']:.2f} ms" for k, d in devices.items()) + "."]  # fmt: skip
    tiled = payload.get("tiled") or {}
    timed = {k: r for k, r in tiled.items() if k.startswith("N=")}
    if timed:
        pairs = ", ".join(f"{k} {r['numpy']:.3f} vs {r['device']:.3f}" for k, r in timed.items())
        lines += ["", f"Tiled mode, {TILED_HW[1]}x{TILED_HW[0]} image, seconds per image (median), numpy blending vs the "
                  f"tile engines: {pairs}."]  # fmt: skip
    for key in ("skipped", "error"):
        if key in tiled:
            lines += ["", f"Tiled mode {key}: {tiled[key]}."]
    builds = [f"{k} {payload[k]:.0f} s" for k in ("onnx_export_s", "engine_build_s") if k in payload]
    if builds:
        lines += ["", "Setup: " + ", ".join(builds) + "."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--classes", type=int, nargs="+", default=[5, 40])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--folder", type=int, default=50, help="images in the folder run (default: 50)")
    parser.add_argument("--model-size", choices=[m.value for m in ModelSize], default="paper")
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model: check that the script runs")
    parser.add_argument("--backend", choices=["torch", "tensorrt"], default="torch")
    parser.add_argument("--engines", type=Path, help="tensorrt: engines built by `gsnet export build` (default: build here)")
    parser.add_argument("--onnx", type=Path, help="tensorrt: ONNX folder to build from (default: export here)")
    args = parser.parse_args()
    if args.backend == "tensorrt":
        from gsnet_deploy.export.trt import installed_tensorrt_version

        if installed_tensorrt_version() is None:
            print("TensorRT is not installed here: nothing to time for --backend tensorrt", file=sys.stderr)
            return 2
    elif not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU host, or pass --dry-run", file=sys.stderr)
        return 2
    start = time.perf_counter()
    payload = run_tensorrt(args) if args.backend == "tensorrt" else run(args)
    payload["seconds"] = time.perf_counter() - start
    card = payload["card"].lower().replace(" ", "-").replace("(", "").replace(")", "")
    kind = "trt_" if args.backend == "tensorrt" else ""
    stem = args.out / f"device_protocol_{kind}{card}_{payload['date']}"
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(stem.with_suffix(".json"), payload)
    write_text_atomic(stem.with_suffix(".md"), markdown(payload))
    print(markdown(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
