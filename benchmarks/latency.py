"""Latency per backend and precision on this host (same code as ``gsnet bench latency``).

Usage: python benchmarks/latency.py [--onnx DIR] [--engine DIR...] [--classes 6 40] [--iters 3] [--model-size tiny]
"""

import sys

from gsnet_deploy.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "latency", *sys.argv[1:]]))
