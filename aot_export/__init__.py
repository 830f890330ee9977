"""aot-export: AOT visual-token reduction for video LLMs, exported to static ONNX / TensorRT graphs."""

from .config import AOTConfig
from .reducer import AOTReducer

__all__ = ["AOTConfig", "AOTReducer"]
__version__ = "0.1.0"
