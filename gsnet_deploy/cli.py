"""``gsnet``: the command line. Subcommands mirror the package: segment, export, calib, bench, eval.

Handlers parse strings into enums, paths and dataclasses once, check what they can before the
model loads, then call one library function. Nothing prints a traceback without ``--debug``.

Exit codes: 0 success; 1 the run finished but some inputs failed (``segment``) or samples were
skipped (``eval``); 2 usage or configuration error (a ``GSNetError``: bad option, file, model);
3 internal error (a bug: one line, ``--debug`` for the traceback); 130 interrupted (SIGINT,
Ctrl-C); 143 terminated (SIGTERM). On 130 and 143 the outputs of the input in progress are
discarded (``contracts.atomic``); finished inputs keep theirs.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from gsnet_deploy.backends import BackendKind, BackendOptions, open_backend
from gsnet_deploy.contracts.model_size import ModelSize
from gsnet_deploy.errors import BackendError, GSNetError, VocabularyError

EXIT_OK = 0
EXIT_INPUTS_FAILED = 1  # segment: some inputs failed; eval: some samples were skipped
EXIT_USAGE = 2  # GSNetError: bad option, input, model or environment
EXIT_INTERNAL = 3  # an unexpected exception (a bug)
EXIT_SIGINT = 130  # 128 + SIGINT
EXIT_SIGTERM = 143  # 128 + SIGTERM
_DEVICE = re.compile(r"(cpu|cuda(:\d+)?|mps|xpu(:\d+)?)")


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM, so that cleanup runs as it does for Ctrl-C."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated


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
        "--pooling",
        type=int,
        choices=[1, 2],
        help="class transformer pooling: 1 (paper eval, the torch default) or 2 (training); ONNX/TensorRT run their export's",
    )
    g.add_argument("--model-size", choices=[m.value for m in ModelSize], default="paper", help=argparse.SUPPRESS)


def _backend_options(args: argparse.Namespace) -> BackendOptions:
    """BackendOptions from parsed arguments, with the checks that need no model.

    Raises:
        BackendError: ``--engine`` with ``--onnx``, or a ``--device`` torch would not parse.

    """
    if args.engine is not None and args.onnx is not None:
        raise BackendError("--engine and --onnx both name a model; pass one (--engine for TensorRT, --onnx for ONNX Runtime)")
    if args.device is not None and not _DEVICE.fullmatch(args.device):
        raise BackendError(f"--device {args.device!r} is not a device; pass cpu, cuda or cuda:N")
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


def _vocabularies(args: argparse.Namespace) -> list:
    """Every vocabulary of the run: --classes (repeatable), --classes-file, or --vocabularies (one per line)."""
    from gsnet_deploy.runtime.vocab import parse_classes, read_classes_file

    given = [bool(args.classes), bool(args.classes_file), bool(args.vocabularies)]
    if sum(given) > 1:
        raise VocabularyError("pass one of --classes, --classes-file or --vocabularies")
    if args.vocabularies:
        try:
            lines = args.vocabularies.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise VocabularyError(f"cannot read vocabulary file {args.vocabularies} ({exc}); pass a UTF-8 text file") from exc
        vocabs = [parse_classes(line) for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not vocabs:
            raise VocabularyError(f"{args.vocabularies} holds no vocabulary; write one comma-separated class list per line")
        return vocabs
    if args.classes_file:
        return [read_classes_file(args.classes_file)]
    if not args.classes:
        raise VocabularyError("no classes given; pass --classes 'building,road,tree' or --classes-file FILE")
    return [parse_classes(text) for text in args.classes]


def _segment_vocabularies(args: argparse.Namespace, vocabs: list) -> int:
    """``gsnet segment`` with several vocabularies: each image is encoded once, then each vocabulary runs the head.

    Outputs of vocabulary k go to ``<out>/vocab<k>/`` (mask, overlay, probabilities as for one vocabulary).
    """
    from gsnet_deploy.runtime.segment import Mode, SegmentOptions, is_raster, validate_run
    from gsnet_deploy.segmenter import Segmenter

    if args.mode == Mode.TILED.value:
        raise VocabularyError("several vocabularies run the paper protocol only; drop --mode tiled or pass one vocabulary")
    rasters = [p for p in args.images if is_raster(p)]
    if rasters:
        raise VocabularyError(f"{rasters[0]} is a georeferenced raster (tiled mode): segment it with one vocabulary at a time")
    options = SegmentOptions(out_dir=args.out, mode=Mode.PAPER, save_probs=args.save_probs, palette=args.palette)
    for vocab in vocabs:
        validate_run(args.images, vocab, options)  # before the model loads
    failed = 0
    start = time.perf_counter()
    backend = open_backend(_backend_options(args))
    with Segmenter(backend, text_cache_dir=None if args.no_cache else _default_cache_dir()) as seg:
        for path in args.images:
            try:
                results = seg.segment_many(path, [list(v.names) for v in vocabs], probs=args.save_probs)
                for k, result in enumerate(results, start=1):
                    written = result.save(args.out / f"vocab{k}", path.stem, palette=args.palette)
                    print(written[0])
            except GSNetError as exc:
                failed += 1
                print(f"{path}: error: {exc}", file=sys.stderr)
    print(
        f"segmented {len(args.images) - failed} of {len(args.images)} images with {len(vocabs)} vocabularies "
        f"in {time.perf_counter() - start:.1f} s (each image encoded once); outputs in {args.out}/vocab*",
        file=sys.stderr,
    )
    return EXIT_INPUTS_FAILED if failed else EXIT_OK


def cmd_segment(args: argparse.Namespace) -> int:
    """gsnet segment."""
    from gsnet_deploy.runtime import segment
    from gsnet_deploy.runtime.raster import parse_bands
    from gsnet_deploy.runtime.segment import Mode, SegmentOptions, validate_run
    from gsnet_deploy.runtime.vocab import TextEmbeddingCache

    vocabs = _vocabularies(args)
    if len(vocabs) > 1:
        return _segment_vocabularies(args, vocabs)
    vocab = vocabs[0]
    backend_options = _backend_options(args)
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
        batch_images=args.batch_images,
    )
    validate_run(args.images, vocab, options)  # before the model loads
    cache = TextEmbeddingCache(None if args.no_cache else _default_cache_dir())
    start = time.perf_counter()
    with open_backend(backend_options) as backend:
        report = segment.segment_files(args.images, backend, vocab, options, cache)
    done = len(report.written)
    print(
        f"segmented {done} of {len(args.images)} images with {backend.name} in {time.perf_counter() - start:.1f} s; "
        f"outputs in {args.out}",
        file=sys.stderr,
    )
    for written in report.written.values():
        print(written[0])
    return EXIT_INPUTS_FAILED if report.failed else EXIT_OK


def cmd_export_onnx(args: argparse.Namespace) -> int:
    """gsnet export onnx."""
    from gsnet_deploy.runtime.outputs import prepare_out_dir

    prepare_out_dir(args.out)  # before torch is imported and the model built

    from gsnet_deploy.export.onnx import export_onnx
    from gsnet_deploy.model import DEMO_WARNING, build_gsnet, cfg_for

    cfg = cfg_for(ModelSize(args.model_size), args.pooling)
    if args.checkpoint is None:
        print(f"warning: {DEMO_WARNING}", file=sys.stderr)
    model = build_gsnet(cfg, checkpoint=args.checkpoint)
    result = export_onnx(model, args.out, opset=args.opset)
    names = ", ".join(p.name for p in (result.text_path, result.image_path, result.manifest_path))
    print(f"wrote {names} to {result.out_dir} (model digest {result.manifest.model_digest})", file=sys.stderr)
    print(args.out)
    return 0


def cmd_export_build(args: argparse.Namespace) -> int:
    """gsnet export build."""
    from gsnet_deploy.contracts.precision import Precision
    from gsnet_deploy.export.build import build_engines

    onnx_dir = args.onnx
    if onnx_dir is None:
        from gsnet_deploy.export.onnx import export_onnx
        from gsnet_deploy.model import DEMO_WARNING, build_gsnet, cfg_for

        cfg = cfg_for(ModelSize(args.model_size))
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
    from gsnet_deploy.contracts.derived import read_model_digest
    from gsnet_deploy.errors import ExportError
    from gsnet_deploy.export.check import CHECK_FILE, check_build, format_table

    onnx_dir = args.onnx or (args.out / "onnx" if (args.out / "onnx").is_dir() else args.out)
    labels = None
    if args.synthetic:
        from gsnet_deploy.calib.quantize import reference_text_embeds
        from gsnet_deploy.eval.synthetic import CLASS_NAMES, synthetic_scenes
        from gsnet_deploy.runtime.tokenizer import BpeTokenizer
        from gsnet_deploy.runtime.vocab import DEFAULT_TEMPLATE, Vocabulary

        scenes = synthetic_scenes(args.synthetic)
        views, labels = scenes.images, scenes.labels
        text_embeds = reference_text_embeds(onnx_dir, BpeTokenizer()(Vocabulary(CLASS_NAMES).prompts(DEFAULT_TEMPLATE)))
    else:
        views = calibration_views(args.images, max_images=args.max_images)
        text_embeds = _check_text_embeds(onnx_dir, args.num_classes)
    results = check_build(args.out, views, text_embeds, onnx_dir=onnx_dir, labels=labels)
    print(format_table(results))
    print(f"wrote {args.out / CHECK_FILE} ({views.shape[0]} views, {text_embeds.shape[0]} classes)", file=sys.stderr)
    failed = [r.candidate.split()[0] for r in results if not r.passed]
    if failed and read_model_digest(onnx_dir).startswith("demo-"):
        print("note: demo weights score every class alike, so the accuracy gates are not enforced", file=sys.stderr)
    elif failed:
        raise ExportError(f"accuracy check failed for {', '.join(failed)} (see the table above and {args.out / CHECK_FILE})")
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
        folder=args.folder,
        backends=tuple(BackendKind(b) for b in args.backend or ()),
        batch_images=tuple(args.batch_images),
        variants=tuple(args.variant or ()),
    )
    print(run_latency(options))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """gsnet eval."""
    from gsnet_deploy.eval.datasets import DatasetName, dataset_spec, list_pairs
    from gsnet_deploy.eval.predict import backend_predictors
    from gsnet_deploy.eval.runner import evaluate, write_report
    from gsnet_deploy.runtime.outputs import prepare_out_file

    if args.json:
        prepare_out_file(args.json, "--json")  # before the evaluation, not after it
    spec = dataset_spec(DatasetName(args.dataset))
    pairs = list_pairs(spec, args.root)
    with backend_predictors(_backend_options(args), spec, args.compare) as predictors:
        report = evaluate(spec, pairs, predictors, limit=args.limit, progress=True)
    print(report.format_table())
    if args.json:
        write_report(report, args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    if report.skipped:
        print(f"error: {len(report.skipped)} samples were skipped (listed above); the scores leave them out", file=sys.stderr)
        return EXIT_INPUTS_FAILED
    return EXIT_OK


def cmd_export_triton(args: argparse.Namespace) -> int:
    """gsnet export triton."""
    from gsnet_deploy.errors import ExportError
    from gsnet_deploy.serve.repository import GraphFormat, InstanceKind, RepositoryOptions, export_triton_repository

    if (args.onnx is None) == (args.engine is None):
        raise ExportError("pass one of --onnx DIR (ONNX Runtime backend) or --engine DIR (tensorrt_plan backend)")
    if args.instances < 1 or args.segment_instances < 1:
        raise ExportError("--instances and --segment-instances must be at least 1")
    fmt, source = (GraphFormat.ONNX, args.onnx) if args.onnx is not None else (GraphFormat.ENGINE, args.engine)
    options = RepositoryOptions(
        instances=args.instances, segment_instances=args.segment_instances, kind=InstanceKind[args.kind.upper()]
    )
    out = export_triton_repository(source, fmt, args.out, options)
    print(f"wrote Triton model repository {out}; serve it with: tritonserver --model-repository {out.resolve()}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """gsnet serve."""
    from gsnet_deploy.segmenter import Segmenter
    from gsnet_deploy.serve.requests import Limits
    from gsnet_deploy.serve.server import ServeError, ServeOptions, serve

    for flag, value, low, high in (
        ("--http-port", args.http_port, 1, 65535), ("--grpc-port", args.grpc_port, 1, 65535),
        ("--metrics-port", args.metrics_port, 1, 65535), ("--instances", args.instances, 1, 64),
        ("--max-batch", args.max_batch, 1, 1024), ("--max-classes", args.max_classes, 1, 100_000),
        ("--max-pixels", args.max_pixels, 1, 10**10), ("--exit-timeout", args.exit_timeout, 0, 86_400),
    ):  # fmt: skip
        if not low <= value <= high:
            raise ServeError(f"{flag} {value} is out of range; pass a value from {low} to {high}")
    if len({args.http_port, args.grpc_port, args.metrics_port}) != 3:
        raise ServeError("--http-port, --grpc-port and --metrics-port must differ")
    options = _backend_options(args)
    serve_options = ServeOptions(
        host=args.host, http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
        instances=args.instances, max_batch=args.max_batch, exit_timeout_s=args.exit_timeout,
        limits=Limits(max_pixels=args.max_pixels, max_classes=args.max_classes),
    )  # fmt: skip
    warned: list[bool] = []

    def open_predictor() -> Segmenter:
        backend = open_backend(options, warn=not warned)
        warned.append(True)
        return Segmenter(backend)  # pooling: from the backend (--pooling for torch, else its manifest)

    return serve(open_predictor, serve_options)


def build_parser() -> argparse.ArgumentParser:
    """The ``gsnet`` argument parser."""
    parser = argparse.ArgumentParser(prog="gsnet", description="Deploy GSNet open-vocabulary remote-sensing segmentation.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser("segment", help="segment images or rasters with a vocabulary")
    seg.add_argument("images", nargs="+", type=Path, help="PNG/JPEG/TIFF images or GeoTIFF rasters")
    seg.add_argument(
        "--classes", action="append",
        help="comma-separated class names, e.g. 'building,road,tree'; repeat for several vocabularies (each image encoded once)",
    )  # fmt: skip
    seg.add_argument("--vocabularies", type=Path, help="several vocabularies, one comma-separated class list per line")
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
    seg.add_argument(
        "--batch-images", type=int, default=1, metavar="K",
        help="paper mode: up to K consecutive images of one size share one device call (torch backend; default: 1)",
    )  # fmt: skip
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

    build = exp_sub.add_parser("build", help="build TensorRT engines (fp16, int8, best); paper encoder, head when exported")
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
    build.add_argument(
        "--plugin",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="replace the QGFF front with the fused cost-volume plugin (TensorRT >= 10.9, paper-size model; fails if absent)",
    )
    build.add_argument("--model-size", choices=[m.value for m in ModelSize], default="paper", help=argparse.SUPPRESS)
    build.set_defaults(func=cmd_export_build)

    check = exp_sub.add_parser("check", help="compare engines or FP16/Q-DQ ONNX against the FP32 ONNX")
    check.add_argument("--out", type=Path, required=True, help="folder made by 'gsnet export build'")
    check.add_argument("--onnx", type=Path, help="FP32 ONNX folder (default: OUT/onnx)")
    check.add_argument("--images", type=Path, nargs="+", help="images to cut views from (default: example images)")
    check.add_argument("--max-images", type=int, default=8)
    check.add_argument("--num-classes", type=int, default=6)
    check.add_argument(
        "--synthetic",
        type=int,
        metavar="N",
        help="check on N held-out synthetic scenes with labels (for a model trained by tools/train_synthetic.py)",
    )
    check.set_defaults(func=cmd_export_check)

    tri = exp_sub.add_parser("triton", help="a Triton Inference Server model repository (graphs + protocol model)")
    tri.add_argument("--onnx", type=Path, help="folder made by 'gsnet export onnx' (served by Triton's onnxruntime backend)")
    tri.add_argument("--engine", type=Path, help="folder made by 'gsnet export build' (served by Triton's tensorrt_plan backend)")
    tri.add_argument("--out", type=Path, required=True, help="new model repository folder")
    tri.add_argument("--instances", type=int, default=1, help="instances of each graph model")
    tri.add_argument("--segment-instances", type=int, default=2, help="instances of the Python protocol model")
    tri.add_argument("--kind", choices=["gpu", "cpu"], default="gpu", help="where the graph models run")
    tri.set_defaults(func=cmd_export_triton)

    cal = sub.add_parser("calib", help="INT8 Q/DQ image graph by post-training quantization")
    cal.add_argument("--onnx", type=Path, required=True)
    cal.add_argument("--images", type=Path, nargs="+", help="calibration images or folders (default: example images)")
    cal.add_argument("--out", type=Path, required=True)
    cal.add_argument("--method", choices=["max", "entropy"], default="max", help="activation ranges (entropy clips: KL search)")
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
    lat.add_argument(
        "--folder",
        type=int,
        default=0,
        metavar="K",
        help="also segment a folder of K 768x512 images per N: numpy vs device protocol (default: 0, skip)",
    )
    lat.add_argument(
        "--backend",
        action="append",
        choices=[k.value for k in BackendKind],
        help="only this backend's variants (repeatable; default: every backend the host can run)",
    )
    lat.add_argument(
        "--batch-images", type=int, nargs="+", default=[1], metavar="K",
        help="with --folder: the device protocol's folder run once per K (up to K same-size images per device call; "
        "K > 1 on the torch backend only; default: 1)",
    )  # fmt: skip
    lat.add_argument("--variant", action="append", help="only variants whose name contains this text (repeatable)")
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

    srv = sub.add_parser("serve", help="serve GSNet on Triton Inference Server (HTTP, gRPC, metrics)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    srv.add_argument("--http-port", type=int, default=8000)
    srv.add_argument("--grpc-port", type=int, default=8001)
    srv.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics at /metrics")
    srv.add_argument("--instances", type=int, default=1, help="gsnet_segment model instances (each opens the backend)")
    srv.add_argument("--max-batch", type=int, default=8, help="dynamic batching of gsnet_text requests (1: off)")
    srv.add_argument("--exit-timeout", type=int, default=60, help="seconds SIGTERM waits for requests in flight")
    srv.add_argument("--max-pixels", type=int, default=64_000_000, help="largest image a request may send")
    srv.add_argument("--max-classes", type=int, default=512, help="most classes a request may send")
    _add_backend_args(srv)
    srv.set_defaults(func=cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gsnet`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        return int(args.func(args))
    except GSNetError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted; the outputs of the input in progress were discarded", file=sys.stderr)
        return EXIT_SIGINT
    except Terminated:
        print("terminated (SIGTERM); the outputs of the input in progress were discarded", file=sys.stderr)
        return EXIT_SIGTERM
    except Exception as exc:
        if args.debug:
            raise
        print(f"internal error: {type(exc).__name__}: {exc}; rerun with --debug for the traceback", file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
