"""Torch-free inference runtime: backends, tiling, raster I/O, vocabulary cache."""
