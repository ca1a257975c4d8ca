"""A new vocabulary on an encoded image vs a full run, through the public ``Segmenter`` API, same process.

Three timings of the paper protocol on one image, medians over ``--runs`` after ``--warmup``:
- ``full``: ``seg.segment(image, vocab)`` with the encoded-image cache off (encoder + head + merge);
  text embeddings already cached, so it is the image's cost;
- ``requery``: ``seg.segment(encoded, vocab)`` on an ``EncodedImage`` (head + merge only), text cached;
- ``requery_new_text``: the same with a vocabulary never seen before (its text graph runs too).
It also checks that the re-queried probabilities equal the full run's (max abs difference).

Examples::

    python benchmarks/requery.py --onnx exports/tiny --classes 5 --out benchmarks/results/requery_cpu_tiny
    python benchmarks/requery.py --model-size paper --classes 5   # torch backend, demo weights
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gsnet_deploy import Segmenter
from gsnet_deploy.contracts.model_size import ModelSize

WORDS = (
    "building road tree car water grass roof bridge ship field forest river parking lot court pool tank "
    "runway track harbor farmland bare soil meadow pond dam wetland greenhouse church stadium quarry"
).split()


def _vocab(num_classes: int, offset: int) -> list[str]:
    """``num_classes`` distinct names; different ``offset``s give different vocabularies."""
    return [f"{WORDS[(offset + i) % len(WORDS)]} {offset}" for i in range(num_classes)]


def _image(height: int, width: int) -> np.ndarray:
    """A smooth random RGB uint8 image."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    bands = [127 + 120 * np.sin(rng.uniform(0.01, 0.05) * xx + c) * np.cos(rng.uniform(0.01, 0.05) * yy) for c in range(3)]
    return np.clip(np.stack(bands, axis=-1), 0, 255).astype(np.uint8)


def _time(fn: Callable[[int], Any], warmup: int, runs: int) -> list[float]:
    """Milliseconds of ``fn(i)`` for ``runs`` calls after ``warmup`` calls."""
    for i in range(warmup):
        fn(-1 - i)
    times = []
    for i in range(runs):
        start = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _stats(times: list[float]) -> dict[str, Any]:
    ordered = sorted(times)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return {"median_ms": statistics.median(times), "p90_ms": p90, "all_ms": times}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print (and optionally write) the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, help="ONNX folder (ONNX Runtime); default: torch with demo weights")
    parser.add_argument("--model-size", choices=[m.value for m in ModelSize], default="tiny")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda); torch backend only")
    parser.add_argument("--fp16", action="store_true", help="torch backend on CUDA in fp16")
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--size", default="512x512", help="image HxW")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--card", default=f"cpu-{os.cpu_count()}core", help="hardware label for the results")
    parser.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    parser.add_argument("--note", default="", help="context for the results (e.g. other jobs sharing the CPU)")
    args = parser.parse_args(argv)

    height, width = (int(v) for v in args.size.lower().split("x"))
    image = _image(height, width)
    if args.onnx is not None:
        seg = Segmenter.from_onnx(args.onnx, encoded_cache_bytes=0)
        source = f"onnxruntime {args.onnx}"
    else:
        seg = Segmenter.from_checkpoint(
            None, device=args.device, fp16=args.fp16, model_size=ModelSize(args.model_size), warn=False, encoded_cache_bytes=0
        )
        source = f"torch demo weights ({args.model_size}) on {args.device}{' fp16' if args.fp16 else ''}"
    with seg:
        vocab = _vocab(args.classes, 0)
        seg.encode_classes(vocab)
        full = _time(lambda i: seg.segment(image, vocab), args.warmup, args.runs)
        encoded = seg.encode(image)
        requery = _time(lambda i: seg.segment(encoded, vocab), args.warmup, args.runs)
        fresh = _time(lambda i: seg.segment(encoded, _vocab(args.classes, 1000 + i)), args.warmup, args.runs)
        a = seg.segment(image, vocab, probs=True).probs
        b = seg.segment(encoded, vocab, probs=True).probs
        assert a is not None and b is not None
        max_diff = float(np.abs(a - b).max())
        split = seg.encoder_split
        backend_name = seg.backend.name
    result = {
        "benchmark": "requery",
        "card": args.card,
        "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "host": {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count()},
        "backend": backend_name,
        "model": source,
        "encoder_head_split": bool(split),
        "image": [height, width],
        "classes": args.classes,
        "warmup": args.warmup,
        "runs": args.runs,
        "encoded_nbytes": encoded.nbytes,
        "full": _stats(full),
        "requery": _stats(requery),
        "requery_new_text": _stats(fresh),
        "speedup_requery": statistics.median(full) / statistics.median(requery),
        "speedup_requery_new_text": statistics.median(full) / statistics.median(fresh),
        "max_abs_diff_probs": max_diff,
        "note": args.note,
    }
    md = "\n".join(
        [
            f"# Re-query an encoded image: {backend_name}, {source}, {args.card}, {result['date']}",
            "",
            f"Command: `{result['command']}`  ",
            f"Image {width}x{height}, N={args.classes} classes, paper protocol, {args.warmup} warmup + {args.runs} runs, "
            f"encoder/head split: {result['encoder_head_split']}, encoded image {encoded.nbytes / 2**20:.1f} MiB.",
            "",
            "| path | median ms | p90 ms | speedup vs full |",
            "|---|---:|---:|---:|",
            f"| full run (encode + head), text cached | {result['full']['median_ms']:.1f} | "
            f"{result['full']['p90_ms']:.1f} | 1.0x |",
            f"| encoded image, text cached | {result['requery']['median_ms']:.1f} | {result['requery']['p90_ms']:.1f} | "
            f"{result['speedup_requery']:.1f}x |",
            f"| encoded image, new vocabulary (text graph runs) | {result['requery_new_text']['median_ms']:.1f} | "
            f"{result['requery_new_text']['p90_ms']:.1f} | {result['speedup_requery_new_text']:.1f}x |",
            "",
            f"Max abs difference of probabilities, encoded vs full: {max_diff:.2e}.",
            *([f"Note: {args.note}", ""] if args.note else []),
            "",
        ]
    )
    print(md)
    if args.out is not None:
        from gsnet_deploy.contracts.atomic import write_json_atomic, write_text_atomic

        write_json_atomic(args.out.with_suffix(".json"), result)
        write_text_atomic(args.out.with_suffix(".md"), md)
        print(f"wrote {args.out.with_suffix('.json')} and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
