"""Peak memory and wall time of INT8 calibration and FP16 AutoCast on an exported image graph, by view count.

Each measurement runs in a fresh child process that reports its own peak RSS (``VmHWM`` of
``/proc/self/status``; ``ru_maxrss`` elsewhere) and wall time, so one step's peak cannot leak into
the next. Views: the example images' paper views (tiles + global), repeated with flips and 90-degree
turns to reach the asked count (memory and time do not depend on pixel content).

    flock /tmp/gsnet-heavy.lock .venv/bin/python benchmarks/calib_memory.py --onnx /tmp/paper_onnx \\
        --views 8 32 64 --steps calib autocast --out benchmarks/results/calib_memory_2026-11-29

``--export-time-log FILE`` adds an ``export`` row from the output of
``/usr/bin/time -v gsnet export onnx --out DIR``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GIB = 1 << 30


def bench_views(count: int) -> np.ndarray:
    """``count`` float32 views [count, 3, 384, 384] from the example images, varied by flips and turns."""
    import warnings

    from gsnet_deploy.calib.views import CalibrationDataWarning, calibration_views

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationDataWarning)
        base = calibration_views(None, max_images=4)  # [20, 3, 384, 384]
    out = []
    for i in range(count):
        view, turn = base[i % len(base)], (i // len(base)) % 4
        out.append(np.rot90(view, k=turn, axes=(1, 2)))
    return np.ascontiguousarray(np.stack(out), dtype=np.float32)


def _own_peak_kib() -> int:
    """This process's peak RSS in KiB: ``VmHWM`` of its own address space where Linux has it.

    ``ru_maxrss`` survives ``exec``: a child started by a process holding 9 GiB (pytest right after a
    paper-size export) reports at least 9 GiB whatever it does itself; ``VmHWM`` starts afresh with
    the new program.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_gib() -> float:
    """Peak RSS of this process or of any child it waited for (none today)."""
    peak = max(_own_peak_kib(), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return round(peak * 1024 / GIB, 2)


def child(step: str, onnx_dir: Path, checkpoints: list[int], classes: int, method: str, log: Path | None) -> list[dict]:
    """Run one step over ``max(checkpoints)`` views in this process; a row per checkpoint.

    Each row holds this process's peak RSS and the elapsed time when that many views were done (setup
    included: text embeddings, layer listing, session), so one run shows whether memory grows with the view count. Rows are
    appended to ``log`` (JSON lines) as they come, so a run that is stopped keeps what it measured.
    """
    from gsnet_deploy.calib import stats
    from gsnet_deploy.calib.quantize import CalibMethod, quantize_image_graph, reference_text_embeds
    from gsnet_deploy.calib.views import calibration_tokens
    from gsnet_deploy.contracts import io_names

    embeds = reference_text_embeds(onnx_dir, calibration_tokens(classes))
    total = max(checkpoints)
    data = bench_views(total)
    rows: list[dict] = []
    start = time.perf_counter()

    def record(done: int, final: bool = False) -> None:
        if done in checkpoints or final:
            row = {"step": step, "views": done, "classes": classes, "method": method if step == "calib" else None}
            own = _own_peak_kib() * 1024 / GIB  # the whole step runs here
            kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / GIB  # any child process (none today)
            row.update({"wall_s": round(time.perf_counter() - start, 1), "peak_rss_gib": _peak_gib(), "final": final})
            row.update({"self_peak_rss_gib": round(own, 2), "child_peak_rss_gib": round(kids, 2)})
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            if log is not None:
                with log.open("a") as f:
                    f.write(json.dumps(row) + "\n")

    with tempfile.TemporaryDirectory(prefix="calib_memory.") as tmp:
        if step == "calib":

            def recording(original):  # the streaming pass's progress callback also records a row
                def collect(*args, progress=None, **kwargs):
                    def both(done: int) -> None:
                        record(done)
                        if progress is not None:
                            progress(done)

                    return original(*args, progress=both, **kwargs)

                return collect

            stats.collect_histograms = recording(stats.collect_histograms)  # type: ignore[assignment]
            stats.collect_amax = recording(stats.collect_amax)  # type: ignore[assignment]
            quantize_image_graph(onnx_dir, Path(tmp), data, text_embeds=embeds, method=CalibMethod(method), progress=False)
        elif step == "autocast":
            from gsnet_deploy.export.fp16 import make_fp16_onnx

            original_ranges = stats.tensor_ranges
            stats.tensor_ranges = lambda model, feeds, progress=None: original_ranges(model, feeds, progress=record)  # type: ignore[assignment]
            feeds = [{io_names.IMAGES: data[i : i + 1], io_names.TEXT_EMBEDS: embeds} for i in range(total)]
            make_fp16_onnx(onnx_dir / io_names.IMAGE_GRAPH_FILE, Path(tmp) / "image_graph.fp16.onnx", reference_feeds=feeds)
        else:
            raise SystemExit(f"unknown step {step}")
    record(total, final=True)
    return rows


def export_row(log: Path) -> dict:
    """The ``export`` row from a ``/usr/bin/time -v`` log."""
    text = log.read_text()
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1)) * 1024  # type: ignore[union-attr]
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text).group(1)  # type: ignore[union-attr]
    parts = [float(p) for p in wall.split(":")]
    seconds = sum(p * 60**i for i, p in enumerate(reversed(parts)))
    return {
        "step": "export",
        "views": None,
        "classes": None,
        "method": None,
        "wall_s": round(seconds, 1),
        "peak_rss_gib": round(rss / GIB, 2),
    }


def machine_card() -> dict:
    """CPU, cores, memory and library versions of this host."""
    import modelopt
    import onnxruntime

    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")), "?"
    )
    mem = next(
        (int(ln.split()[1]) * 1024 for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")), 0
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem / GIB, 1),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "modelopt": modelopt.__version__,
        "note": (
            "shared with up to 4 other helpers' jobs at the time (their tests and builds); "
            "heavy jobs serialized by flock /tmp/gsnet-heavy.lock"
        ),
    }


def to_markdown(payload: dict) -> str:
    """The result as a Markdown table with the command and the machine card."""
    lines = [
        f"# Calibration memory, {payload['date']}",
        "",
        f"Command: `{payload['command']}`",
        "",
        "Each step is one child process over the largest view count; the rows at fewer views are its peak RSS",
        "and elapsed time when that many views were done (setup included); the last row of a step is the whole",
        "step (Q/DQ models written / model converted). `export` is `gsnet export onnx` under `/usr/bin/time -v`.",
        "",
        "| step | views | classes | method | peak RSS (GiB) | wall (s) |",
        "|---|---|---|---|---|---|",
    ]
    for row in payload["rows"]:
        cells = [row.get(k) for k in ("step", "views", "classes", "method", "peak_rss_gib", "wall_s")]
        if "error" in row:
            cells[4] = f"error: {row['error']}"
        lines.append("| " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
    lines += ["", "Machine: " + ", ".join(f"{k}: {v}" for k, v in payload["machine"].items()), ""]
    lines += [f"- {note}" for note in payload.get("notes", [])]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, required=True)
    parser.add_argument("--views", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--classes", type=int, default=40)
    parser.add_argument("--method", choices=["max", "entropy"], default="max")
    parser.add_argument("--steps", nargs="+", choices=["calib", "autocast"], default=["calib", "autocast"])
    parser.add_argument("--export-time-log", type=Path)
    parser.add_argument("--note", action="append", default=[])
    parser.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    parser.add_argument("--autocast-views", type=int, nargs="+", help="checkpoints of the AutoCast run (default: --views)")
    parser.add_argument("--child", choices=["calib", "autocast"], help=argparse.SUPPRESS)
    parser.add_argument("--rows-log", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        rows = child(args.child, args.onnx, args.views, args.classes, args.method, args.rows_log)
        print(json.dumps(rows[-1]))
        return 0
    rows = [export_row(args.export_time_log)] if args.export_time_log else []
    for step in args.steps:
        views = args.autocast_views if step == "autocast" and args.autocast_views else args.views
        cmd = [sys.executable, __file__, "--child", step, "--onnx", str(args.onnx), "--views", *map(str, views)]
        cmd += ["--classes", str(args.classes), "--method", args.method]
        log = Path(tempfile.mkstemp(prefix="calib_memory_rows.", suffix=".jsonl")[1])
        cmd += ["--rows-log", str(log)]
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
        got = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        rows.extend(r for r in got if r["final"] or r["views"] != max(views))  # the last row: the whole step
        if done.returncode != 0:
            rows.append({"step": step, "views": max(views), "error": f"child exited with {done.returncode}"})
        log.unlink()
        if args.out:  # write as we go: a long run that is stopped keeps what it measured
            write(args, rows)
    if args.out:
        write(args, rows)
    return 0


def write(args: argparse.Namespace, rows: list[dict]) -> None:
    from gsnet_deploy.contracts.atomic import AtomicFiles

    payload = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "rows": rows,
        "machine": machine_card(),
        "notes": args.note,
    }
    with AtomicFiles() as files:
        files.part(args.out.with_suffix(".json")).write_text(json.dumps(payload, indent=2) + "\n")
        files.part(args.out.with_suffix(".md")).write_text(to_markdown(payload))


if __name__ == "__main__":
    sys.exit(main())
