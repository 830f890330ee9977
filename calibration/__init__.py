"""Calibration data from real video and INT8/FP8 explicit quantization of exported graphs (Q/DQ ONNX)."""
