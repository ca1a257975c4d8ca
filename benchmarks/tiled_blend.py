"""Tiled mode's windows per second: numpy blending on the host vs blending on the device, same run.

The torch backend (tiny config by default, demo weights, ``--device``), or ONNX Runtime on an
exported folder with the tile graphs (``--onnx DIR``, CPU provider), runs ``runtime.tiled.run_tiled``
on one synthetic RGB image into a class-map sink, once with ``device_blend=False`` (the logits of
each window cross to the host, are upsampled, passed through a sigmoid and merged in numpy: the
reference) and once with the device blender (``model.tile_blend`` or ``tile_blend.onnx`` /
``tile_emit.onnx`` with IOBinding: only class-map rows cross),
alternating the two per run so a busy machine slows both alike. Reported per class count: median
seconds per image, windows per second, and the image graph alone on as many batches, measured in
the same alternation (numpy, device, graph per round).

Examples::

    python benchmarks/tiled_blend.py --classes 5 40 --out benchmarks/results/tiled_blend_cpu-2core_tiny
    python benchmarks/tiled_blend.py --onnx exports/tiny --classes 5 40 --out benchmarks/results/tiled_blend_ort_cpu-2core_tiny
    python benchmarks/tiled_blend.py --device cuda --model-size paper --classes 40
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gsnet_deploy.contracts.io_names import IMAGES, TEXT_EMBEDS
from gsnet_deploy.model import build_gsnet, cfg_for
from gsnet_deploy.model.torch_backend import TorchBackend
from gsnet_deploy.runtime.rows import ArraySource
from gsnet_deploy.runtime.tiled import run_tiled
from gsnet_deploy.runtime.tiling import WINDOW, WindowGrid


class _LabelSink:
    """A class-map sink that keeps the class map in memory (writing files costs nothing here)."""

    def __init__(self, height: int, width: int) -> None:
        self.labels = np.zeros((height, width), dtype=np.uint8)

    def write(self, rows: Any) -> None:
        self.write_labels(rows.row_off, np.argmax(rows.probs, axis=0).astype(np.uint8), rows.valid, None)

    def write_labels(self, row_off: int, labels: np.ndarray, valid: np.ndarray | None, probs: np.ndarray | None) -> None:
        self.labels[row_off : row_off + labels.shape[0]] = labels


def _image(height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    bands = [127 + 100 * np.sin(f * xx + 0.7 * c) * np.cos(f * yy) for c, f in enumerate((0.01, 0.02, 0.005))]
    return np.stack(bands, axis=-1).astype(np.uint8)


def _text(n: int) -> np.ndarray:
    gen = torch.Generator().manual_seed(0)
    return torch.nn.functional.normalize(torch.randn(n, 512, generator=gen), dim=-1).numpy()


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table and, with ``--out``, write ``.json`` and ``.md``; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-size", default="tiny", help="tiny or paper (demo weights)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--onnx", type=Path, help="ONNX folder (with tile_blend.onnx, tile_emit.onnx): ONNX Runtime, CPU")
    parser.add_argument("--size", default="768x1280", help="image HEIGHTxWIDTH")
    parser.add_argument("--classes", type=int, nargs="+", default=[5, 40])
    parser.add_argument("--overlap", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--card", default=f"cpu-{os.cpu_count()}core", help="machine label for the report")
    parser.add_argument("--out", type=Path, help="write OUT.json and OUT.md (dated results)")
    args = parser.parse_args(argv)

    from gsnet_deploy.contracts.model_size import ModelSize

    height, width = (int(v) for v in args.size.lower().split("x"))
    if args.onnx is not None:
        from gsnet_deploy.runtime.onnxruntime_backend import OnnxRuntimeBackend

        backend_cm: Any = OnnxRuntimeBackend(args.onnx, providers=["CPUExecutionProvider"])
        label = f"ONNX Runtime (CPU provider) on {args.onnx}"
    else:
        backend_cm = TorchBackend(build_gsnet(cfg_for(ModelSize(args.model_size))), device=args.device)
        label = f"{args.model_size} config, demo weights, torch backend on {args.device}"
    rgb = _image(height, width)
    windows = len(WindowGrid(height, width, WINDOW, args.overlap))
    rows: list[dict[str, Any]] = []
    with backend_cm as backend:
        for n in args.classes:
            text = _text(n)
            times: dict[str, list[float]] = {"numpy": [], "device": [], "graph": []}
            labels: dict[str, np.ndarray] = {}
            views = np.zeros((backend.preferred_views, 3, WINDOW, WINDOW), np.float32)
            batches = -(-windows // backend.preferred_views)
            for i in range(args.warmup + args.runs):
                for path in ("numpy", "device", "graph"):
                    sink = _LabelSink(height, width)
                    start = time.perf_counter()
                    if path == "graph":  # the image graph alone on as many batches (logits to the host)
                        for _ in range(batches):
                            backend.image.run({IMAGES: views, TEXT_EMBEDS: text})
                    else:
                        run_tiled(
                            ArraySource(rgb), sink, backend, text, overlap=args.overlap, progress=False,
                            device_blend=path == "device",
                        )  # fmt: skip
                    if args.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    if i >= args.warmup:
                        times[path].append(time.perf_counter() - start)
                    labels[path] = sink.labels
            graph = times["graph"]
            row = {"classes": n, "windows": windows, "graph_s": statistics.median(graph)}
            for path in ("numpy", "device"):
                row[f"{path}_s"] = statistics.median(times[path])
                row[f"{path}_windows_per_s"] = windows / row[f"{path}_s"]
            row["pixels_differing"] = int((labels["numpy"] != labels["device"]).sum())
            rows.append(row)
            print(
                f"N={n}: {windows} windows; numpy blend {row['numpy_s']:.2f} s ({row['numpy_windows_per_s']:.2f} win/s), "
                f"device blend {row['device_s']:.2f} s ({row['device_windows_per_s']:.2f} win/s), "
                f"image graph alone {row['graph_s']:.2f} s; {row['pixels_differing']} pixels' classes differ (ties)"
            )
    result = {
        "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs ({args.card})",
        "versions": f"python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}",
        "model": label,
        "image": f"{height}x{width} synthetic RGB, overlap {args.overlap}, {args.warmup} warmup + {args.runs} runs (medians)",
        "rows": rows,
    }
    if args.out is not None:
        md = [
            f"# Tiled mode: numpy blending vs device blending, {'onnxruntime' if args.onnx else 'torch'}, "
            f"{args.model_size}, {args.card}, {result['date']}",
            "",
            f"Command: `{result['command']}`  ",
            f"Machine: {result['machine']}; {result['versions']}  ",
            f"Model: {result['model']}; image: {result['image']}.",
            "",
            "| N | windows | numpy blend s | numpy win/s | device blend s | device win/s | graph alone s | pixels differing |",
            "|---|---|---|---|---|---|---|---|",
        ]
        md += [
            f"| {r['classes']} | {r['windows']} | {r['numpy_s']:.2f} | {r['numpy_windows_per_s']:.2f} | "
            f"{r['device_s']:.2f} | {r['device_windows_per_s']:.2f} | {r['graph_s']:.2f} | {r['pixels_differing']} |"
            for r in rows
        ]
        md += [
            "",
            "Numpy, device and graph-alone runs alternate in one process (one of each per round). "
            "Pixels differing: class maps of the two paths compared "
            "pixel by pixel (probabilities agree within 1e-6, so only near-exact ties of the top two classes may "
            "differ). The machine was shared with other jobs: absolute times vary, the side-by-side ratio is the result.",
            "",
        ]
        from gsnet_deploy.contracts.atomic import write_json_atomic, write_text_atomic

        write_json_atomic(args.out.with_suffix(".json"), result)
        write_text_atomic(args.out.with_suffix(".md"), "\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
