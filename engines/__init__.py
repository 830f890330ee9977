"""TensorRT engine building for Jetson Orin and datacenter GPUs (`tensorrt`) and TensorRT-RTX."""

from .loaders import BuiltEngine, ParsedNetwork, build_engine, builder_config, parse_onnx, save_plan
from .flavours import FLAVOURS, Flavour, TensorRTUnavailable, load_tensorrt

__all__ = ["FLAVOURS", "BuiltEngine", "Flavour", "ParsedNetwork", "TensorRTUnavailable", "build_engine",
           "builder_config", "load_tensorrt", "parse_onnx", "save_plan"]
