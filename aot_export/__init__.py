"""aot-export: AOT visual-token reduction for video LLMs, exported to static ONNX / TensorRT graphs."""

from .config import AOTConfig

__all__ = ["AOTConfig", "AOTReducer"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The reducer needs torch; the rest of the package (manifests, fidelity, video, report) must import without it
    # so that engines, calibration and the device runtime stay light.
    if name == "AOTReducer":
        from .reducer import AOTReducer

        return AOTReducer
    raise AttributeError(f"module 'aot_export' has no attribute {name!r}")
