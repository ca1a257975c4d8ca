"""Shared fixtures: the tiny GSNet (demo weights) and small synthetic images."""

from __future__ import annotations

import numpy as np
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
