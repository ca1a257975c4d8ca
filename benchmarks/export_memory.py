"""Resident memory of ``gsnet export onnx`` stage by stage: which step sets the peak.

Runs ``export.onnx.export_onnx`` in this process (demo weights, ``--model-size``) while a thread
samples ``VmRSS`` every 0.1 s, and reports the highest value seen during each stage: the PyTorch
exporter, onnxslim, saving and checking of each graph, in order. Use ``/usr/bin/time -v gsnet export
onnx`` for the whole command's peak; this says where it comes from.

Example::

    python benchmarks/export_memory.py --model-size paper --out /tmp/export_stages
"""

from __future__ import annotations

import argparse
import functools
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gsnet_deploy.contracts.model_size import ModelSize
from gsnet_deploy.export import onnx as export_module
from gsnet_deploy.model import build_gsnet, cfg_for

STAGES = {"_torch_export": "torch.onnx.export", "_simplify": "onnxslim", "save_onnx_atomic": "save", "check_graph": "check"}


def _rss_gib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 2**20
    return 0.0


class StagePeaks:
    """The highest resident memory seen while each named stage ran (sampled by a thread)."""

    def __init__(self) -> None:
        self.stage = "build model"
        self.peaks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            stage, rss = self.stage, _rss_gib()
            self.peaks[stage] = max(self.peaks.get(stage, 0.0), rss)
            time.sleep(0.1)

    def wrap(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        count = 0

        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            nonlocal count
            count += 1
            self.stage = f"{label} #{count}"
            try:
                return fn(*args, **kwargs)
            finally:
                self.stage = f"between ({label} #{count} done)"

        return inner

    def __enter__(self) -> StagePeaks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-size", choices=[m.value for m in ModelSize], default="paper")
    parser.add_argument("--out", type=Path, help="export folder (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="gsnet-export-memory-")) / "onnx"
    with StagePeaks() as peaks:
        for name, label in STAGES.items():
            setattr(export_module, name, peaks.wrap(label, getattr(export_module, name)))
        model = build_gsnet(cfg_for(ModelSize(args.model_size)))
        peaks.stage = "model built"
        start = time.perf_counter()
        export_module.export_onnx(model, out)
        seconds = time.perf_counter() - start
    if args.out is None:
        shutil.rmtree(out.parent, ignore_errors=True)
    print("| stage | peak RSS GiB |\n|---|---|")
    for stage, peak in peaks.peaks.items():
        print(f"| {stage} | {peak:.2f} |")
    print(f"\nexport_onnx: {seconds:.0f} s, highest sample {max(peaks.peaks.values()):.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
