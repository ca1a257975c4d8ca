"""The TensorRT code type-checks against ``tensorrt-stubs`` (TensorRT itself is not installable here).

The stubs as published do not parse under mypy (parameters named ``in``, one required argument after
defaulted ones), so the test copies them, patches those two spots, and checks our modules against
the copy. Errors inside the stubs are ignored; errors in our code fail the test.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
MODULES = [
    "gsnet_deploy/export/trt.py",
    "gsnet_deploy/export/build.py",
    "gsnet_deploy/export/version_policy.py",
    "gsnet_deploy/export/dla.py",
    "gsnet_deploy/export/profiles.py",
    "gsnet_deploy/export/derived_models.py",
    "gsnet_deploy/export/plugin_discovery.py",
    "gsnet_deploy/contracts/engine_manifest.py",
    "gsnet_deploy/contracts/precision.py",
    "gsnet_deploy/runtime/tensorrt_backend.py",
]


def _stub_dirs() -> tuple[Path, Path] | None:
    spec = importlib.util.find_spec("tensorrt_stubs")
    if spec is None or spec.origin is None:
        return None
    site = Path(spec.origin).parents[1]
    trt, bindings = site / "tensorrt", site / "tensorrt_bindings"
    return (trt, bindings) if (trt / "__init__.pyi").is_file() and bindings.is_dir() else None


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy not installed")
def test_tensorrt_modules_typecheck(tmp_path: Path) -> None:
    dirs = _stub_dirs()
    if dirs is None:
        pytest.skip("tensorrt-stubs not installed (pip install --no-deps tensorrt-stubs)")
    for d in dirs:
        shutil.copytree(d, tmp_path / d.name)
    pyi = tmp_path / "tensorrt_bindings" / "tensorrt.pyi"
    text = pyi.read_text()
    text = re.sub(r"([(,] *)in: ", r"\1in_: ", text)
    text = text.replace("channel_axis: int) -> IScaleLayer", "channel_axis: int = ...) -> IScaleLayer")
    pyi.write_text(text)
    ini = tmp_path / "mypy.ini"
    ini.write_text(
        "[mypy]\nignore_missing_imports = True\nfollow_imports = silent\n"
        "[mypy-tensorrt.*,tensorrt_bindings.*]\nignore_errors = True\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ini), "--cache-dir", str(tmp_path / "cache"), *MODULES],
        cwd=ROOT,
        env={"MYPYPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
