"""ONNX Runtime against PyTorch on this CPU: one image under the paper protocol (5 views), N classes.

Both backends run the same image graph on the same 5 views in one process, alternating run by
run so that both see the same machine state; text embeddings are computed once and excluded.
The model is the full-size GSNet with demo weights (``--tiny`` for a quick check); the ONNX
folder is exported into a temporary directory unless ``--onnx DIR`` gives one of the same weights.

    python benchmarks/onnx_vs_torch.py --runs 5 --out benchmarks/results/onnx_vs_torch_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from gsnet_deploy.contracts.atomic import write_json_atomic


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=5, help="N, number of classes (default 5, Potsdam)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per backend")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per backend first")
    parser.add_argument("--tiny", action="store_true", help="the tiny config instead of the paper's model")
    parser.add_argument("--onnx", type=Path, default=None, help="an existing ONNX folder of the same demo weights")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads for both (default: library default)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()

    import onnxruntime as ort
    import torch

    from gsnet_deploy import __version__
    from gsnet_deploy.export.onnx import export_onnx
    from gsnet_deploy.model import build_gsnet, paper_cfg, tiny_cfg
    from gsnet_deploy.model.torch_backend import TorchBackend
    from gsnet_deploy.runtime.onnxruntime_backend import OnnxRuntimeBackend
    from gsnet_deploy.runtime.protocol import paper_views

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = build_gsnet(tiny_cfg() if args.tiny else paper_cfg())
    print(f"model: {'tiny' if args.tiny else 'paper'} config, demo weights {model.digest}")

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(512, 768, 3), dtype=np.uint8)
    views = paper_views(image).views  # [5, 3, 384, 384]
    embeds = rng.standard_normal((args.classes, 512)).astype(np.float32)
    embeds /= np.linalg.norm(embeds, axis=1, keepdims=True)
    feeds = {"images": views, "text_embeds": embeds}

    with tempfile.TemporaryDirectory(prefix="gsnet_bench_") as tmp:
        onnx_dir = args.onnx
        if onnx_dir is None:
            start = time.perf_counter()
            onnx_dir = export_onnx(model, Path(tmp) / "onnx").out_dir
            print(f"exported ONNX in {time.perf_counter() - start:.1f} s")
        ort_backend = OnnxRuntimeBackend(onnx_dir, providers=["CPUExecutionProvider"])
        if ort_backend.model_digest != model.digest:
            raise SystemExit(f"--onnx {onnx_dir} holds weights {ort_backend.model_digest}, not {model.digest}")
        times: dict[str, list[float]] = {"torch": [], "onnxruntime": []}
        with TorchBackend(model, device="cpu") as tb, ort_backend as ob:
            if args.threads is not None:
                print("note: --threads applies to torch only; ONNX Runtime uses its default intra-op pool")
            runners = {"torch": tb.image, "onnxruntime": ob.image}
            outputs = {name: runner.run(feeds)["logits"] for name, runner in runners.items()}
            for _ in range(args.warmup - 1):
                for runner in runners.values():
                    runner.run(feeds)
            for _ in range(args.runs):
                for name, runner in runners.items():
                    start = time.perf_counter()
                    runner.run(feeds)
                    times[name].append((time.perf_counter() - start) * 1e3)
            providers = list(ob.providers)
    max_abs = float(np.abs(outputs["torch"] - outputs["onnxruntime"]).max())

    def p90(values: list[float]) -> float:
        return float(np.percentile(values, 90))

    medians = {name: statistics.median(v) for name, v in times.items()}
    ratio = medians["torch"] / medians["onnxruntime"]
    result = {
        "benchmark": "onnx_vs_torch",
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", *sys.argv]),
        "model": "tiny" if args.tiny else "paper",
        "model_digest": model.digest,
        "protocol": "paper-sliding-window, 5 views in one batch",
        "classes": args.classes,
        "warmup": args.warmup,
        "runs": args.runs,
        "ms": {name: {"median": medians[name], "p90": p90(v), "all": v} for name, v in times.items()},
        "speedup_onnxruntime_over_torch": ratio,
        "max_abs_logit_diff": max_abs,
        "device": {"cpu": _cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "onnxruntime_providers": providers,
        "versions": {
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
            "numpy": np.__version__,
            "gsnet-deploy": __version__,
            "python": platform.python_version(),
        },
    }
    print(f"device: {result['device']['cpu']} ({os.cpu_count()} cores), torch threads {torch.get_num_threads()}")
    print(f"versions: torch {torch.__version__}, onnxruntime {ort.__version__} ({', '.join(providers)})")
    print(f"one image, 5 views, N={args.classes}; warmup {args.warmup}, {args.runs} runs each, alternating")
    for name, v in times.items():
        print(f"  {name:12s} median {medians[name]:9.1f} ms   p90 {p90(v):9.1f} ms")
    print(f"  torch / onnxruntime = {ratio:.2f}x   (max |logit diff| {max_abs:.2e})")
    if args.out is not None:
        write_json_atomic(args.out, result)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
