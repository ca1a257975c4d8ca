"""Model sizes: the paper's architecture, or a tiny one with the same interfaces for smoke runs.

Torch-free so that the CLI, the backend factory and the benchmarks can name a size without
importing the model; ``model.cfg_for`` turns it into a ``GSNetCfg``. The value appears in options
(``--model-size``) and in output file names (``latency_<host>_<date>_tiny.json``).
"""

from __future__ import annotations

import enum


class ModelSize(enum.Enum):
    """Architecture used with demo weights (``tiny`` is for quick smoke runs and tests)."""

    PAPER = "paper"
    TINY = "tiny"
