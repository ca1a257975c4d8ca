"""INT8 calibration of the paper-size image graph in bounded memory (issue 13: it was OOM-killed at 24 GB)."""

from __future__ import annotations

import fcntl
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY_LOCK = Path("/tmp/gsnet-heavy.lock")
# FIXME(issue 13): the goal is 8 GiB for both passes. Measured 2026-11-29 on 2 cores / 24 GiB: the streaming
# pass 7.3-9.3 GiB, ModelOpt's placement pass about 10 GiB. These bounds keep today's level (the OOM kill at
# 24 GB they replace cannot come back unseen) until the placement pass is replaced.
LIMIT_GIB = 10.5
PLACEMENT_LIMIT_GIB = 12.0


@pytest.mark.slow
def test_paper_calibration_peak_rss_is_bounded(paper_onnx_dir: Path) -> None:
    """Bug caught: calibration that holds every calibrated tensor of a whole feed (ModelOpt's own pass) or every view."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "calib_memory.py"), "--child", "calib", "--onnx", str(paper_onnx_dir)]
    cmd += ["--views", "2", "--classes", "40", "--method", "max"]
    with HEAVY_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    if done.returncode != 0 and "InsufficientMemoryError" in done.stderr:
        pytest.skip(done.stderr.strip().splitlines()[-1])
    assert done.returncode == 0, done.stderr[-2000:]
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["self_peak_rss_gib"] <= LIMIT_GIB, row  # the streaming pass: the process's own ru_maxrss
    # NOTE: ModelOpt's placement pass (a child process) peaked near 10 GiB on the paper graph (2026-11-29):
    # above the 8 GiB goal, far below the 24 GB OOM kill it replaces; this bound keeps it there.
    assert row["child_peak_rss_gib"] <= PLACEMENT_LIMIT_GIB, row
