"""Print the fidelity table (max abs difference per stage, ours vs the official fixture) for the README.

    flock /tmp/gsnet-heavy.lock .venv/bin/python tools/golden/fidelity.py [--fixture tests/data/golden_gsnet.npz]
        [--save-ours /tmp/ours.npz | --ours /tmp/ours.npz]

Runs our model exactly as ``tests/model/test_golden.py`` does (its ``ours`` fixture), or reads a
result saved earlier with ``--save-ours``, and compares every stage with the fixture.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    """Compare and print a markdown table."""
    parser = argparse.ArgumentParser(description="fidelity of our GSNet against the official fixture")
    parser.add_argument("--fixture", type=Path, default=ROOT / "tests" / "data" / "golden_gsnet.npz")
    parser.add_argument("--ours", type=Path, help="our stages saved earlier (skip running the model)")
    parser.add_argument("--save-ours", type=Path, help="save our stages here")
    args = parser.parse_args()
    with np.load(args.fixture) as data:
        golden = {k: data[k] for k in data.files}
    if args.ours:
        with np.load(args.ours) as data:
            ours = {k: data[k] for k in data.files}
    else:
        sys.path.insert(0, str(ROOT / "tests" / "model"))
        import test_golden

        ours = test_golden.ours._get_wrapped_function()(golden)
        if args.save_ours:
            np.savez(args.save_ours, **ours)
    sys.path.insert(0, str(ROOT / "tests" / "model"))
    from test_golden import ATOL, STAGES

    print("| stage | shape compared | max abs diff | max abs value |\n|---|---|---|---|")
    worst = 0.0
    for stage in ["tokens", *STAGES]:
        a, b = ours[stage].astype(np.float64), golden[stage].astype(np.float64)
        diff = float(np.abs(a - b).max()) if a.shape == b.shape else float("inf")
        scale = max(1.0, float(np.abs(b).max()))  # the test's rule: 1e-5 absolute below 1, relative above
        worst = max(worst, diff / scale) if stage != "tokens" else worst
        print(f"| {stage} | {list(b.shape)} | {diff:.2e} | {np.abs(b).max():.3g} |")
    print(f"\nworst stage, relative to max(1, its scale): {worst:.2e} (test tolerance {ATOL:g})")
    return 0 if worst <= ATOL else 1


if __name__ == "__main__":
    sys.exit(main())
