"""Evaluation on the GSNet paper's four benchmarks (Table 2): datasets, detectron2-style metrics, loop.

Torch-free: predictors are plain callables, so every backend plugs in.
"""
