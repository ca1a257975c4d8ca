"""Calibration data and INT8 quantization (explicit Q/DQ) of the image graph."""
