"""PNG chart of a latency report: median ms per image per variant and class count, p90 as whiskers.

matplotlib is optional (the ``dev`` extra); without it ``chart_png`` returns None and the caller notes it.
"""

from __future__ import annotations

import importlib.util
import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gsnet_deploy.bench.latency_report import LatencyReport


def chart_png(report: LatencyReport) -> bytes | None:
    """Grouped bars (one group per variant, one bar per N) on a log axis as PNG bytes; None without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        return None
    import matplotlib

    matplotlib.use("Agg")  # NOTE: no display on servers and Jetsons
    import matplotlib.pyplot as plt

    names = [name for name, v in report.variants.items() if "paper" in v]
    keys = [f"N={n}" for n in report.classes]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(names) + 2), 4.5), dpi=110)
    width = 0.8 / max(1, len(keys))
    for j, key in enumerate(keys):
        xs, medians, errs = [], [], []
        for i, name in enumerate(names):
            entry = report.variants[name]["paper"].get(key)
            if entry is None:
                continue
            xs.append(i + (j - (len(keys) - 1) / 2) * width)
            medians.append(entry["image"]["median_ms"])
            errs.append(entry["image"]["p90_ms"] - entry["image"]["median_ms"])
        ax.bar(xs, medians, width, yerr=[[0.0] * len(errs), errs], capsize=3, label=key)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms per image (5 views): median, whisker p90", fontsize=8)
    device = report.host.get("gpu", f"{report.host['cpu']}, {report.host['cores']} cores")
    ax.set_title(f"GSNet ({report.model}) latency on {device}, {report.date}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
