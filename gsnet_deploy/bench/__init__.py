"""Benchmarks that the CLI runs (``gsnet bench``); ``benchmarks/`` holds thin scripts calling them."""
