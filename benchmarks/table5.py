"""Params, trainable params and GFLOPs beside the paper's Table 5 (same code as ``gsnet bench table5``).

Usage: python benchmarks/table5.py [--json] [--classes 5 40] [--growth 1 6 40 150]
"""

import sys

from gsnet_deploy.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "table5", *sys.argv[1:]]))
