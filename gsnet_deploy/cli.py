"""``gsnet``: the command line. Subcommands mirror the package: segment, export, calib, bench, eval.

Handlers parse strings into enums, paths and dataclasses once, then call one library function.
``GSNetError`` messages are printed without a traceback (``--debug`` shows it); the exit status
is non-zero on failure (for ``segment``: the number of inputs that failed, capped at 100).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from gsnet_deploy.backends import BackendKind, BackendOptions, ModelSize, open_backend
from gsnet_deploy.errors import GSNetError, VocabularyError


def _default_cache_dir() -> Path:
    """Text-embedding cache folder: $GSNET_CACHE_DIR or ~/.cache/gsnet-deploy/text."""
    root = os.environ.get("GSNET_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "gsnet-deploy")
    return Path(root) / "text"


def _add_backend_args(p: argparse.ArgumentParser) -> None:
    """Options that choose the model and the engine."""
    g = p.add_argument_group("model and backend")
    g.add_argument("--checkpoint", type=Path, help="official GSNet checkpoint (model_final.pth); default: demo weights")
    g.add_argument("--onnx", type=Path, help="folder made by 'gsnet export onnx' (ONNX Runtime backend)")
    g.add_argument("--engine", type=Path, help="folder made by 'gsnet export build' (TensorRT backend)")
    g.add_argument("--backend", choices=[k.value for k in BackendKind], help="default: from --engine/--onnx, else torch")
    g.add_argument("--device", help="torch device (cpu, cuda, cuda:1); default: cuda when available")
    g.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=False, help="torch backend on CUDA in fp16")
    g.add_argument(
        "--pooling", type=int, choices=[1, 2], default=1, help="class transformer pooling: 1 (paper eval) or 2 (training)"
    )
    g.add_argument("--model-size", choices=[m.value for m in ModelSize], default="paper", help=argparse.SUPPRESS)


def _backend_options(args: argparse.Namespace) -> BackendOptions:
    """BackendOptions from parsed arguments."""
    return BackendOptions(
        kind=BackendKind(args.backend) if args.backend else None,
        checkpoint=args.checkpoint,
        onnx_dir=args.onnx,
        engine_dir=args.engine,
        device=args.device,
        pooling=args.pooling,
        size=ModelSize(args.model_size),
        fp16=args.fp16,
    )


def _vocabulary(args: argparse.Namespace):  # noqa: ANN202 - returns runtime.vocab.Vocabulary
    """The vocabulary from --classes or --classes-file."""
    from gsnet_deploy.runtime.vocab import parse_classes, read_classes_file

    if args.classes and args.classes_file:
        raise VocabularyError("pass --classes or --classes-file, not both")
    if args.classes_file:
        return read_classes_file(args.classes_file)
    if args.classes is None:
        raise VocabularyError("no classes given; pass --classes 'building,road,tree' or --classes-file FILE")
    return parse_classes(args.classes)


def cmd_segment(args: argparse.Namespace) -> int:
    """gsnet segment."""
    from gsnet_deploy.runtime.raster import parse_bands
    from gsnet_deploy.runtime.segment import Mode, SegmentOptions, segment_files
    from gsnet_deploy.runtime.vocab import TextEmbeddingCache

    vocab = _vocabulary(args)
    options = SegmentOptions(
        out_dir=args.out,
        mode=Mode(args.mode),
        save_probs=args.save_probs,
        overlap=args.overlap,
        gsd_scale=args.gsd_scale,
        max_memory=int(args.max_memory * (1 << 30)),
        bands=parse_bands(args.bands) if args.bands else None,
        palette=args.palette,
        progress=args.progress,
    )
    cache = TextEmbeddingCache(None if args.no_cache else _default_cache_dir())
    start = time.perf_counter()
    with open_backend(_backend_options(args)) as backend:
        report = segment_files(args.images, backend, vocab, options, cache)
    done = len(report.written)
    print(
        f"segmented {done} of {len(args.images)} images with {backend.name} in {time.perf_counter() - start:.1f} s; "
        f"outputs in {args.out}",
        file=sys.stderr,
    )
    for written in report.written.values():
        print(written[0])
    return min(len(report.failed), 100)


def cmd_export_onnx(args: argparse.Namespace) -> int:
    """gsnet export onnx."""
    from gsnet_deploy.export.onnx import export_onnx
    from gsnet_deploy.model import DEMO_WARNING, build_gsnet, paper_cfg, tiny_cfg

    pooling = (args.pooling, args.pooling)
    cfg = tiny_cfg(pooling) if args.model_size == "tiny" else paper_cfg(pooling)
    if args.checkpoint is None:
        print(f"warning: {DEMO_WARNING}", file=sys.stderr)
    model = build_gsnet(cfg, checkpoint=args.checkpoint)
    result = export_onnx(model, args.out, opset=args.opset)
    print(f"wrote {result}", file=sys.stderr)
    print(args.out)
    return 0


def cmd_export_build(args: argparse.Namespace) -> int:
    """gsnet export build."""
    from gsnet_deploy.export.build import build_engines
    from gsnet_deploy.export.precision import Precision

    onnx_dir = args.onnx
    if onnx_dir is None:
        from gsnet_deploy.export.onnx import export_onnx
        from gsnet_deploy.model import DEMO_WARNING, build_gsnet, paper_cfg, tiny_cfg

        cfg = tiny_cfg() if args.model_size == "tiny" else paper_cfg()
        if args.checkpoint is None:
            print(f"warning: {DEMO_WARNING}", file=sys.stderr)
        onnx_dir = args.out / "onnx"
        export_onnx(build_gsnet(cfg, checkpoint=args.checkpoint), onnx_dir)
        print(f"exported ONNX to {onnx_dir}", file=sys.stderr)
    result = build_engines(
        onnx_dir,
        args.out,
        Precision(args.precision),
        classes_opt=args.classes_opt,
        workspace_gib=args.workspace,
        dla_core=args.dla_core,
        hardware_compatible=args.hardware_compatible,
        version_compatible=args.version_compatible,
        calib_images=args.calib,
        plugin=args.plugin,
    )
    print(result, file=sys.stderr)
    return 0


def cmd_export_check(args: argparse.Namespace) -> int:
    """gsnet export check."""
    from gsnet_deploy.calib.views import calibration_views
    from gsnet_deploy.export.check import CHECK_FILE, check_build, format_table

    views = calibration_views(args.images, max_images=args.max_images)
    onnx_dir = args.onnx or (args.out / "onnx" if (args.out / "onnx").is_dir() else args.out)
    text_embeds = _check_text_embeds(onnx_dir, args.num_classes)
    results = check_build(args.out, views, text_embeds, onnx_dir=onnx_dir)
    print(format_table(results))
    print(f"wrote {args.out / CHECK_FILE} ({views.shape[0]} views, {text_embeds.shape[0]} classes)", file=sys.stderr)
    return 0


def _check_text_embeds(onnx_dir: Path, num_classes: int):  # noqa: ANN202 - np.ndarray
    """Text embeddings of a stand-in vocabulary from the FP32 text graph."""
    from gsnet_deploy.calib.quantize import reference_text_embeds
    from gsnet_deploy.calib.views import calibration_tokens

    return reference_text_embeds(onnx_dir, calibration_tokens(num_classes))


def cmd_calib(args: argparse.Namespace) -> int:
    """gsnet calib."""
    from gsnet_deploy.calib.quantize import CalibMethod, quantize_image_graph
    from gsnet_deploy.calib.views import calibration_views

    views = calibration_views(args.images, max_images=args.max_images)
    text_embeds = _check_text_embeds(args.onnx, args.num_classes)
    path = quantize_image_graph(args.onnx, args.out, views, text_embeds=text_embeds, method=CalibMethod(args.method))
    print(path)
    return 0


def cmd_bench_table5(args: argparse.Namespace) -> int:
    """gsnet bench table5."""
    from gsnet_deploy.bench.table5 import table5

    report = table5(classes=tuple(args.classes), growth=tuple(args.growth))
    print(report.to_json() if args.json else report.format())
    return 0


def cmd_bench_latency(args: argparse.Namespace) -> int:
    """gsnet bench latency."""
    from gsnet_deploy.bench.latency import LatencyOptions, run_latency

    options = LatencyOptions(
        onnx_dir=args.onnx,
        engine_dirs=tuple(args.engine or ()),
        classes=tuple(args.classes),
        iters=args.iters,
        out_dir=args.out,
        size=ModelSize(args.model_size),
        checkpoint=args.checkpoint,
        warmup=args.warmup,
        tiled=args.tiled,
        label=args.label,
        chart=args.chart,
    )
    print(run_latency(options))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """gsnet eval."""
    from gsnet_deploy.eval.datasets import DatasetName, dataset_spec, list_pairs
    from gsnet_deploy.eval.predict import backend_predictors
    from gsnet_deploy.eval.runner import evaluate, write_report

    spec = dataset_spec(DatasetName(args.dataset))
    pairs = list_pairs(spec, args.root)
    with backend_predictors(_backend_options(args), spec, args.compare) as predictors:
        report = evaluate(spec, pairs, predictors, limit=args.limit, progress=True)
    print(report.format_table())
    if args.json:
        write_report(report, args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``gsnet`` argument parser."""
    parser = argparse.ArgumentParser(prog="gsnet", description="Deploy GSNet open-vocabulary remote-sensing segmentation.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser("segment", help="segment images or rasters with a vocabulary")
    seg.add_argument("images", nargs="+", type=Path, help="PNG/JPEG/TIFF images or GeoTIFF rasters")
    seg.add_argument("--classes", help="comma-separated class names, e.g. 'building,road,tree'")
    seg.add_argument("--classes-file", type=Path, help="one class per line ('low vegetation, grass' = synonyms) or a JSON list")
    seg.add_argument("--out", type=Path, default=Path("gsnet_out"), help="output folder (default: gsnet_out)")
    seg.add_argument("--mode", choices=["auto", "paper", "tiled"], default="auto", help="paper protocol, tiled, or auto by size")
    seg.add_argument("--save-probs", action=argparse.BooleanOptionalAction, default=False, help="also write probabilities")
    seg.add_argument("--overlap", type=int, default=128, help="tiled mode: window overlap in pixels")
    seg.add_argument("--gsd-scale", type=float, default=1.0, help="tiled mode: resample by this factor before tiling")
    seg.add_argument("--max-memory", type=float, default=2.0, help="tiled mode: memory budget in GiB")
    seg.add_argument("--bands", help="raster bands to use as RGB, e.g. 1,2,3")
    seg.add_argument("--palette", type=Path, help="class colors: JSON {name: '#rrggbb'} or one color per line")
    seg.add_argument("--no-cache", action="store_true", help="do not cache text embeddings")
    seg.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    _add_backend_args(seg)
    seg.set_defaults(func=cmd_segment)

    exp = sub.add_parser("export", help="ONNX export, TensorRT build, accuracy check")
    exp_sub = exp.add_subparsers(dest="export_command", required=True)
    onnx = exp_sub.add_parser("onnx", help="export the text and image graphs to ONNX")
    onnx.add_argument("--checkpoint", type=Path, help="official checkpoint; default: demo weights")
    onnx.add_argument("--out", type=Path, required=True)
    onnx.add_argument("--opset", type=int, default=17)
    onnx.add_argument("--pooling", type=int, choices=[1, 2], default=1)
    onnx.add_argument("--model-size", choices=[m.value for m in ModelSize], default="paper", help=argparse.SUPPRESS)
    onnx.set_defaults(func=cmd_export_onnx)

    build = exp_sub.add_parser("build", help="build TensorRT engines (fp16, int8 or best)")
    build.add_argument("--checkpoint", type=Path)
    build.add_argument("--onnx", type=Path, help="ONNX folder (default: export it into OUT/onnx)")
    build.add_argument("--precision", choices=["fp16", "int8", "best"], required=True)
    build.add_argument("--out", type=Path, required=True)
    build.add_argument("--calib", type=Path, nargs="+", help="calibration images or folders (int8/best)")
    build.add_argument("--classes-opt", type=int, default=40, help="class count the engine is tuned for")
    build.add_argument("--workspace", type=float, help="builder workspace in GiB")
    build.add_argument("--dla-core", type=int, help="build the image engine for this DLA core (Jetson; fixed shapes)")
    build.add_argument("--hardware-compatible", action=argparse.BooleanOptionalAction, default=False)
    build.add_argument("--version-compatible", action=argparse.BooleanOptionalAction, default=False)
    build.add_argument("--plugin", action=argparse.BooleanOptionalAction, default=True, help="use the fused cost-volume plugin")
    build.add_argument("--model-size", choices=[m.value for m in ModelSize], default="paper", help=argparse.SUPPRESS)
    build.set_defaults(func=cmd_export_build)

    check = exp_sub.add_parser("check", help="compare engines or FP16/Q-DQ ONNX against the FP32 ONNX")
    check.add_argument("--out", type=Path, required=True, help="folder made by 'gsnet export build'")
    check.add_argument("--onnx", type=Path, help="FP32 ONNX folder (default: OUT/onnx)")
    check.add_argument("--images", type=Path, nargs="+", help="images to cut views from (default: example images)")
    check.add_argument("--max-images", type=int, default=8)
    check.add_argument("--num-classes", type=int, default=6)
    check.set_defaults(func=cmd_export_check)

    cal = sub.add_parser("calib", help="INT8 Q/DQ image graph by post-training quantization")
    cal.add_argument("--onnx", type=Path, required=True)
    cal.add_argument("--images", type=Path, nargs="+", help="calibration images or folders (default: example images)")
    cal.add_argument("--out", type=Path, required=True)
    cal.add_argument("--method", choices=["entropy", "max"], default="entropy")
    cal.add_argument("--max-images", type=int, default=32)
    cal.add_argument("--num-classes", type=int, default=40)
    cal.set_defaults(func=cmd_calib)

    bench = sub.add_parser("bench", help="Table 5 counts and latency")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    t5 = bench_sub.add_parser("table5", help="params and GFLOPs beside the paper's Table 5")
    t5.add_argument("--json", action="store_true")
    t5.add_argument("--classes", type=int, nargs="+", default=[5, 40])
    t5.add_argument("--growth", type=int, nargs="*", default=[], help="more class counts for the head-share table")
    t5.set_defaults(func=cmd_bench_table5)
    lat = bench_sub.add_parser("latency", help="ms per image per backend and precision, side by side")
    lat.add_argument("--onnx", type=Path, help="ONNX folder: adds ONNX Runtime CPU (and CUDA) variants")
    lat.add_argument("--engine", type=Path, nargs="+", help="TensorRT engine folders (fp16, int8...): one variant each")
    lat.add_argument("--checkpoint", type=Path, help="official checkpoint for the torch variants; default: demo weights")
    lat.add_argument("--classes", type=int, nargs="+", default=[6, 40], help="class counts N (default: 6 40)")
    lat.add_argument("--iters", type=int, default=3, help="timed iterations per measurement (default: 3)")
    lat.add_argument("--warmup", type=int, help="warm-up iterations (default: 1 on CPU, 3 on CUDA)")
    lat.add_argument("--tiled", action=argparse.BooleanOptionalAction, default=True, help="tiled views/s (8 views, N=6)")
    lat.add_argument("--chart", action=argparse.BooleanOptionalAction, default=True, help="PNG chart (needs matplotlib)")
    lat.add_argument("--label", help="host part of the file names (default: GPU name or cpu-<cores>core)")
    lat.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="results folder")
    lat.add_argument("--model-size", choices=[m.value for m in ModelSize], default="paper", help="tiny: quick demo-weight runs")
    lat.set_defaults(func=cmd_bench_latency)

    ev = sub.add_parser("eval", help="mIoU on a benchmark beside the paper's Table 2")
    ev.add_argument("--dataset", choices=["potsdam", "floodnet", "flair", "fast"], required=True)
    ev.add_argument("--root", type=Path, required=True, help="datasets folder (as DETECTRON2_DATASETS)")
    ev.add_argument("--limit", type=int, help="first K images only")
    ev.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two backends, e.g. torch onnxruntime:DIR tensorrt:DIR")
    ev.add_argument("--json", type=Path, help="write the report as JSON")
    _add_backend_args(ev)
    ev.set_defaults(func=cmd_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gsnet`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except GSNetError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; no partial outputs were left", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
