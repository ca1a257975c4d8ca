"""Shared fixtures: the tiny GSNet (demo weights) and small synthetic images."""

from __future__ import annotations

import os
import shutil

# Triton reads TRITON_INTERPRET when it decorates its own library functions, at its first import, and
# other packages (ModelOpt) import triton early: set it before any test module is collected. A host with
# an NVIDIA driver runs the compiled kernels instead.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest


@pytest.fixture(scope="session")
def tiny_gsnet():
    """GSNet with the tiny config and seeded demo weights (eval mode)."""
    from gsnet_deploy.model import build_gsnet, tiny_cfg

    return build_gsnet(tiny_cfg())


@pytest.fixture
def rng() -> np.random.Generator:
    """A fresh random generator per test (seeded from the OS: values differ run to run)."""
    return np.random.default_rng()
