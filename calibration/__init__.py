"""Calibration data from real video and INT8/FP8 explicit quantization of exported graphs (Q/DQ ONNX)."""

from .calibrate import CalibrationReport, calibrate_export
from .data import CalibrationData, VideoCalibrationReader, calibration_data, expand_videos, manifest_calibration_data
from .ort_quantize import QUANTIZATIONS

__all__ = ["QUANTIZATIONS", "CalibrationData", "CalibrationReport", "VideoCalibrationReader",
           "calibrate_export", "calibration_data", "expand_videos", "manifest_calibration_data"]
