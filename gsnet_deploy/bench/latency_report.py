"""The latency report: its dataclass, efficiency against the matmul floor, markdown, and the files written."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gsnet_deploy.bench.host import host_label
from gsnet_deploy.bench.latency_options import TILED_BATCH, TILED_CLASSES, LatencyOptions
from gsnet_deploy.bench.timers import floor_ms
from gsnet_deploy.contracts.atomic import AtomicFiles
from gsnet_deploy.contracts.model_size import ModelSize


@dataclass
class LatencyReport:
    """Everything one run measured (serialized as the JSON file)."""

    date: str
    command: str
    model: str
    weights: str
    host: dict[str, Any]
    classes: list[int]
    protocol: str
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    executed_gmacs_per_image: dict[str, float] = field(default_factory=dict)
    matmul_fp16_tflops: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        """The report as indented JSON."""
        return json.dumps(asdict(self), indent=2, default=str)


def add_efficiency(report: LatencyReport) -> None:
    """Floor (executed FLOPs at the measured fp16 matmul rate) and fraction of it, for every CUDA variant."""
    if report.matmul_fp16_tflops is None:
        return
    for variant in report.variants.values():
        if variant.get("device") != "cuda" or "paper" not in variant:
            continue
        for key, entry in variant["paper"].items():
            gmacs = report.executed_gmacs_per_image.get(key)
            if gmacs is None:
                continue
            floor = floor_ms(gmacs, report.matmul_fp16_tflops)
            entry["floor_ms"] = floor
            entry["fraction_of_floor"] = floor / entry["graph"]["median_ms"]


def _fmt(value: float | None, digits: int = 1) -> str:
    """A number with thousands separators, or an em dash."""
    return "—" if value is None else f"{value:,.{digits}f}"


def format_markdown(report: LatencyReport) -> str:
    """The report as markdown: host, per-variant latency table, stages, tiled throughput, unavailable variants."""
    host = report.host
    device = host.get("gpu", f"{host['cpu']} ({host['cores']} cores, {host['torch_threads']} torch threads)")
    versions = ", ".join(f"{k} {v}" for k, v in host["versions"].items())
    lines = [
        f"# Latency per backend and precision: {device}",
        "",
        f"- Date: {report.date}. Command: `{report.command}`.",
        f"- Model: {report.model}, {report.weights}. Protocol: {report.protocol}.",
        f"- Host: {device}" + (f", driver {host['driver']}" if "driver" in host else "") + f"; {versions}.",
        f"- 1-minute load average at start / end: {host.get('load_average_1m_at_start')} / {host.get('load_average_1m_at_end')}.",
    ]
    if report.matmul_fp16_tflops is not None:
        lines.append(f"- Measured fp16 dense matmul rate in this run: {report.matmul_fp16_tflops:,.0f} TFLOP/s (8192^3).")
    if report.executed_gmacs_per_image:
        gm = ", ".join(f"{k}: {v:,.1f}" for k, v in report.executed_gmacs_per_image.items())
        lines.append(f"- Executed GMACs per image (5 views, fvcore, text cached): {gm}.")
    lines += [
        "",
        "Per image = `paper_views` + image graph (5 views) + `merge_paper_logits`, host wall clock. "
        "Graph = the image graph alone (CUDA events on device tensors for torch on CUDA, else host wall clock). "
        "Median and p90 over the timed iterations, warm-up excluded.",
        "",
        "| variant | N | per image median ms | p90 ms | graph median ms | graph p90 ms | floor ms | of floor | "
        "peak host MiB (+delta) | peak device MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in report.variants.items():
        if "error" in v:
            lines.append(f"| {name} | | error: {v['error']} | | | | | | | |")
            continue
        mem = v["host_memory"]
        host_mem = f"{_fmt(mem['peak_mib'], 0)} (+{_fmt(mem['delta_mib'], 0)})"
        dev_mem = _fmt(v.get("device_memory_peak_mib"), 0)
        for key, e in v["paper"].items():
            frac = e.get("fraction_of_floor")
            lines.append(
                f"| {name} | {key[2:]} | {_fmt(e['image']['median_ms'])} | {_fmt(e['image']['p90_ms'])} | "
                f"{_fmt(e['graph']['median_ms'])} | {_fmt(e['graph']['p90_ms'])} | {_fmt(e.get('floor_ms'), 2)} | "
                f"{'—' if frac is None else f'{100 * frac:.0f}%'} | {host_mem} | {dev_mem} |"
            )
    lines += [
        "",
        "Time per stage (medians, ms): text encoder once per vocabulary; per image preprocessing, image graph, merge.",
        "",
        "| variant | N | text encoder (once) | preprocess | image graph | merge |",
        "|---|---|---|---|---|---|",
    ]
    for name, v in report.variants.items():
        for key, e in v.get("paper", {}).items():
            s = e["stages_median_ms"]
            lines.append(f"| {name} | {key[2:]} | {_fmt(e['text_encoder_once_ms'])} | {_fmt(s['preprocess'])} | "
                         f"{_fmt(s['image_graph'])} | {_fmt(s['merge'])} |")  # fmt: skip
    folders = [(name, key, e["folder"]) for name, v in report.variants.items() for key, e in v.get("paper", {}).items()
               if "folder" in e]  # fmt: skip
    if folders:
        lines += ["", "A folder of images through `segment_files` (decode, resize, graphs, mask + overlay written "
                  "atomically, pipelined), same run: per image = folder wall clock / images (text encoder excluded); "
                  "graphs = time inside the protocol's graphs; outside = host time the pipeline did not hide.", "",
                  "| variant | N | images | numpy protocol ms/image | its graph ms | outside | "
                  "device protocol ms/image | its graphs ms | outside |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, key, f in folders:
            a, b = f["numpy"], f["device"]
            dev = (f"{_fmt(b['per_image_ms'])} | {_fmt(b['graph_ms'])} | {100 * b['outside_share']:.0f}%"
                   if b["protocol"] == "device" else "not offered by this backend | — | —")  # fmt: skip
            lines.append(f"| {name} | {key[2:]} | {a['images']} | {_fmt(a['per_image_ms'])} | {_fmt(a['graph_ms'])} | "
                         f"{100 * a['outside_share']:.0f}% | {dev} |")  # fmt: skip
    batched = [(name, key, f["device"], f["batched"]) for name, key, f in folders if f.get("batched")]
    if batched:
        lines += ["", "Same-size images sharing one device call (`gsnet segment --batch-images K`: the views of K images in "
                  "one encoder and one head call), the device protocol's folder run per K, same run; K = 1 is the row above.",
                  "", "| variant | N | images | K | ms/image | graphs ms | images/s | images/s vs K = 1 |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, key, one, runs in batched:
            for k, r in sorted(((1, one), *((int(k), r) for k, r in runs.items())), key=lambda kr: kr[0]):
                rate = 1e3 / r["per_image_ms"]
                lines.append(f"| {name} | {key[2:]} | {r['images']} | {k} | {_fmt(r['per_image_ms'])} | {_fmt(r['graph_ms'])} | "
                             f"{_fmt(rate, 2)} | {one['per_image_ms'] / r['per_image_ms']:.2f}x |")  # fmt: skip
    tiled = [(name, v["tiled"]) for name, v in report.variants.items() if "tiled" in v]
    if tiled:
        lines += ["", f"Tiled mode: one batch of {TILED_BATCH} views, N={TILED_CLASSES}.", "",
                  "| variant | median ms per batch | p90 ms | views/s |", "|---|---|---|---|"]  # fmt: skip
        lines += [f"| {n} | {_fmt(t['median_ms'])} | {_fmt(t['p90_ms'])} | {_fmt(t['views_per_s'], 2)} |" for n, t in tiled]
    if report.unavailable:
        lines += ["", "Not run on this host:", ""]
        lines += [f"- {name}: {reason}." for name, reason in report.unavailable.items()]
    if report.notes:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in report.notes]
    return "\n".join(lines) + "\n"


def output_stem(report: LatencyReport, options: LatencyOptions) -> str:
    """``latency_<host>_<date>`` plus ``_<size>`` for a non-paper model."""
    label = options.label or host_label(report.host)
    stem = f"latency_{label}_{report.date}"
    return stem if options.size is ModelSize.PAPER else f"{stem}_{options.size.value}"


def write_report(report: LatencyReport, options: LatencyOptions) -> dict[str, Path]:
    """Write the JSON, the markdown and (with matplotlib) the PNG chart; return their paths."""
    stem = output_stem(report, options)
    paths = {"json": options.out_dir / f"{stem}.json", "md": options.out_dir / f"{stem}.md"}
    png: bytes | None = None
    if options.chart:
        from gsnet_deploy.bench.chart import chart_png

        png = chart_png(report)
        if png is None:
            report.notes.append("chart skipped: matplotlib is not installed (pip install -e '.[dev]')")
        else:
            paths["png"] = options.out_dir / f"{stem}.png"
    options.out_dir.mkdir(parents=True, exist_ok=True)
    with AtomicFiles() as files:  # the three files of one run appear together
        if png is not None:
            files.part(paths["png"]).write_bytes(png)
        files.part(paths["json"]).write_text(report.to_json(), encoding="utf-8")
        files.part(paths["md"]).write_text(format_markdown(report), encoding="utf-8")
    return paths
