"""Throughput and latency of ``gsnet serve`` under concurrent clients, on this machine.

Starts ``gsnet serve --onnx DIR`` on free loopback ports, sends ``--requests`` segmentation
requests (PNG bytes + a vocabulary) from ``--clients`` concurrent HTTP clients, checks every
answer against the one the same request got alone, and writes p50/p99 latency and requests per
second, with the machine card and the command, to ``--out`` (JSON and markdown).

Example (the tiny demo model; its numbers say what the serving path costs, not GSNet's speed)::

    gsnet export onnx --model-size tiny --out /tmp/tiny_onnx
    python benchmarks/serve_load.py --onnx /tmp/tiny_onnx --instances 1 --requests 200 --clients 16
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

from gsnet_deploy.contracts.atomic import write_json_atomic, write_text_atomic
from gsnet_deploy.serve.client import SegmentClient

CLASS_SETS = [("building", "road", "tree"), ("water", "car", "tree", "road"), ("grass", "roof")]


def free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def ready(port: int) -> bool:
    try:
        for model in ("gsnet_segment", "gsnet_text"):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/{model}/ready", timeout=2) as r:
                if r.status != 200:
                    return False
        return True
    except OSError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--onnx", type=Path, required=True)
    parser.add_argument("--instances", type=int, default=1)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--size", default="512x768", help="HxW of the test images")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default=None, help="result file stem (default: serve_load_<date>)")
    parser.add_argument("--note", default="", help="what the model is (e.g. 'tiny demo config')")
    args = parser.parse_args()

    h, w = (int(v) for v in args.size.split("x"))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for _ in range(3)]
    http, grpc, metrics = free_ports(3)
    cmd = [
        sys.executable, "-m", "gsnet_deploy.cli", "serve", "--onnx", str(args.onnx), "--http-port", str(http),
        "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--instances", str(args.instances),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not ready(http):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start (exit {proc.poll()})")
            time.sleep(0.5)
        url = f"127.0.0.1:{http}"
        with SegmentClient(url) as client:  # the reference answer of each (image, vocabulary), one at a time
            reference = {(i, c): client.segment(img, c).class_map for i, img in enumerate(images) for c in CLASS_SETS}
        jobs = [(k % len(images), CLASS_SETS[(k // len(images)) % len(CLASS_SETS)]) for k in range(args.requests)]

        def one(job: tuple[int, tuple[str, ...]]) -> float:
            start = time.perf_counter()
            with SegmentClient(url) as client:
                class_map = client.segment(images[job[0]], job[1]).class_map
            if not np.array_equal(class_map, reference[job]):
                raise SystemExit(f"response for {job} does not match its request")
            return time.perf_counter() - start

        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.clients) as pool:
            latencies = np.array(list(pool.map(one, jobs))) * 1000
        wall = time.perf_counter() - start
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)

    from importlib.metadata import version

    result = {
        "what": "gsnet serve (PyTriton + tritonserver 2.51), ONNX Runtime CPU backend, one segmentation request = one image",
        "date": datetime.date.today().isoformat(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "card": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                 "onnxruntime": version("onnxruntime-gpu") if _has("onnxruntime-gpu") else version("onnxruntime")},
        "model": {"digest": json.loads((args.onnx / "manifest.json").read_text())["model_digest"],
                  "image_graph_mb": round((args.onnx / "image_graph.onnx").stat().st_size / 1e6, 1), "note": args.note},
        "instances": args.instances, "clients": args.clients, "requests": args.requests, "image": [h, w],
        "errors": 0, "mismatches": 0,
        "latency_ms": {"p50": float(np.percentile(latencies, 50)), "p90": float(np.percentile(latencies, 90)),
                       "p99": float(np.percentile(latencies, 99))},
        "requests_per_s": args.requests / wall,
    }  # fmt: skip
    stem = args.name or f"serve_load_{result['date']}"
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / f"{stem}.json", result)
    lat = result["latency_ms"]
    write_text_atomic(
        args.out / f"{stem}.md",
        f"# gsnet serve under load ({result['date']})\n\n"
        f"Command: `{result['command']}`\n\nCard: {result['card']}\n\nModel: {result['model']}\n\n"
        f"| instances | clients | requests | image | p50 ms | p99 ms | req/s | errors |\n|---|---|---|---|---|---|---|---|\n"
        f"| {args.instances} | {args.clients} | {args.requests} | {h}x{w} | {lat['p50']:.0f} | {lat['p99']:.0f} | "
        f"{result['requests_per_s']:.2f} | 0 |\n",
    )
    print(json.dumps(result, indent=2))
    return 0


def _has(dist: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(dist)
    except PackageNotFoundError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
