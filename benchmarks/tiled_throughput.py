"""Windows per second of tiled mode (``runtime.segment.segment_raster``) on this machine.

Runs a synthetic GeoTIFF (or ``--image``) through the full streaming path (reader thread, batching,
upsampling, blending, GeoTIFF writing) ``--runs`` times after ``--warmup`` runs and prints the
median and p90 windows per second, with the device and library versions.

Backends:
- ``--onnx DIR``: ONNX Runtime on ``DIR/image_graph.onnx`` (CPU provider unless ``--provider``).
- ``--fake``: a numpy stand-in whose logits are a linear function of the pixels; it measures the
  pipeline's own overhead (I/O, resize, blending, writing), not the model.

Examples::

    python benchmarks/tiled_throughput.py --onnx exports/tiny --size 2048x2048 --classes 6
    python benchmarks/tiled_throughput.py --fake --size 4096x4096
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from gsnet_deploy.contracts.io_names import IMAGE_GRAPH_FILE, IMAGES, LOGITS
from gsnet_deploy.runtime.palette import default_palette
from gsnet_deploy.runtime.segment import segment_raster as segment_tiled


class _FakeImageRunner:
    """Logits ``[B, N, 96, 96]`` from a fixed random linear map of 4x4-pooled pixels."""

    def __init__(self, num_classes: int) -> None:
        rng = np.random.default_rng(0)
        self.a = rng.normal(0.0, 3.0, size=(num_classes, 3)).astype(np.float32)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        views = feeds[IMAGES]
        b = views.shape[0]
        pooled = views.reshape(b, 3, 96, 4, 96, 4).mean(axis=(3, 5)) / 255.0  # [B, 3, 96, 96]
        return {LOGITS: np.einsum("nc,bchw->bnhw", self.a, pooled).astype(np.float32)}  # [B, N, 96, 96]


class _BenchBackend:
    """Just enough of the ``Backend`` protocol for tiled mode."""

    def __init__(self, name: str, image: Any, preferred_views: int) -> None:
        self.name = name
        self.model_digest = name
        self.max_views: int | None = None
        self.preferred_views = preferred_views
        self._image = image

    @property
    def text(self) -> Any:
        raise RuntimeError("tiled benchmark does not run the text graph")

    @property
    def image(self) -> Any:
        return self._image

    def __enter__(self) -> _BenchBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _make_raster(path: Path, height: int, width: int) -> None:
    """A smooth random 3-band uint8 GeoTIFF (EPSG:32633), written in strips."""
    import rasterio
    from affine import Affine
    from rasterio.windows import Window

    profile = {
        "driver": "GTiff",
        "height": height,
        "width": width,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:32633",
        "transform": Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 5400000.0),
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
    }
    xx = np.arange(width, dtype=np.float32)[None, :]
    with rasterio.open(path, "w", **profile) as dst:
        for r0 in range(0, height, 512):
            yy = np.arange(r0, min(r0 + 512, height), dtype=np.float32)[:, None]
            bands = [127 + 100 * np.sin(f * xx + 0.7 * c) * np.cos(f * yy) for c, f in enumerate((0.01, 0.02, 0.005))]
            dst.write(np.stack(bands).astype(np.uint8), window=Window(0, r0, width, yy.shape[0]))


def _versions(provider: str | None) -> str:
    import rasterio

    parts = [
        f"python {platform.python_version()}",
        f"numpy {np.__version__}",
        f"rasterio {rasterio.__version__}",
    ]
    if provider is not None:
        import onnxruntime as ort

        parts.append(f"onnxruntime {ort.__version__} ({provider})")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the benchmark, print the results; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--onnx", type=Path, help=f"folder holding {IMAGE_GRAPH_FILE}")
    src.add_argument("--fake", action="store_true", help="numpy stand-in backend (pipeline overhead only)")
    parser.add_argument("--provider", default="CPUExecutionProvider", help="ONNX Runtime execution provider")
    parser.add_argument("--image", type=Path, help="raster to segment (default: a synthetic GeoTIFF)")
    parser.add_argument("--size", default="2048x2048", help="synthetic raster HEIGHTxWIDTH")
    parser.add_argument("--classes", type=int, default=6, help="number of classes N")
    parser.add_argument("--views", type=int, default=4, help="views per batch (backend.preferred_views)")
    parser.add_argument("--overlap", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)

    if args.onnx is not None:
        graph = args.onnx / IMAGE_GRAPH_FILE
        if not graph.is_file():
            print(
                f"error: {graph} does not exist; export the model first (gsnet export onnx --out DIR)",
                file=sys.stderr,
            )
            return 2
        from gsnet_deploy.runtime.onnxruntime_backend import OnnxRuntimeBackend

        backend = OnnxRuntimeBackend(args.onnx, providers=[args.provider])
        backend.preferred_views = args.views
        provider: str | None = args.provider
    else:
        backend = _BenchBackend("fake", _FakeImageRunner(args.classes), args.views)
        provider = None

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(args.classes, 512)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    names = [f"class{i}" for i in range(args.classes)]
    print(f"device: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; {_versions(provider)}")

    with tempfile.TemporaryDirectory(prefix="gsnet-tiled-bench-") as tmp:
        image = args.image
        if image is None:
            height, width = (int(v) for v in args.size.lower().split("x"))
            image = Path(tmp) / "bench.tif"
            _make_raster(image, height, width)
        times, windows = [], 0
        with backend:
            for i in range(args.warmup + args.runs):
                start = time.perf_counter()
                result = segment_tiled(
                    image,
                    backend,  # type: ignore[arg-type]
                    emb,
                    out_dir=Path(tmp) / "out",
                    class_names=names,
                    palette=default_palette(args.classes),
                    overlap=args.overlap,
                    overlay=False,
                    progress=False,
                )
                if i >= args.warmup:
                    times.append(time.perf_counter() - start)
                    windows = result.windows
    median_s = statistics.median(times)
    p90_s = float(np.percentile(times, 90))
    print(
        f"backend {backend.name}, image {image.name if args.image else args.size}, N={args.classes}, "
        f"views/batch {args.views}, overlap {args.overlap}: {windows} windows per run, "
        f"warmup {args.warmup}, runs {args.runs}"
    )
    print(
        f"seconds per run: median {median_s:.3f}, p90 {p90_s:.3f}; "
        f"windows/s: median {windows / median_s:.2f} (p90-run {windows / p90_s:.2f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
