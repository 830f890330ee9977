"""What differs between the TensorRT packages, as data: the builder code itself has one path."""

from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Flavour:
    name: str                              # written into engine sidecars
    module: str                            # import name
    cli: str                               # the command-line builder shipped with it
    strongly_typed_flag: str | None        # NetworkDefinitionCreationFlag that asks for strong typing, if any
    weak_typing: bool                      # can honour precision flags + per-layer fp32 constraints (JetPack 6)
    precision_flags: dict[str, str]        # BuilderFlag enabling a precision in weakly typed mode
    dla: bool                              # Deep Learning Accelerator cores (Jetson)
    compute_capability_api: bool           # builds for a list of compute capabilities (ahead of time, no GPU)
    builds_without_gpu: bool


FLAVOURS = {
    # Datacenter / Jetson TensorRT 10.x and 11.x. 10.x builds weakly typed networks unless STRONGLY_TYPED is set;
    # 11.x drops weak typing (the flag may be absent: networks are strongly typed already).
    "tensorrt": Flavour("tensorrt", "tensorrt", "trtexec", "STRONGLY_TYPED", True,
                        {"fp16": "FP16", "int8": "INT8", "fp8": "FP8"}, True, False, False),
    # TensorRT-RTX: strongly typed only, no DLA, builds on a CPU for the compute capabilities it is given.
    "tensorrt_rtx": Flavour("tensorrt_rtx", "tensorrt_rtx", "tensorrt_rtx", None, False, {}, False, True, True),
}


class TensorRTUnavailable(RuntimeError):
    pass


def load_tensorrt(name: str | None = None) -> tuple[ModuleType, Flavour]:
    """The named flavour, or the first importable one (`tensorrt` before `tensorrt_rtx`)."""
    names = [name] if name else list(FLAVOURS)
    for candidate in names:
        if candidate not in FLAVOURS:
            raise ValueError(f"unknown TensorRT flavour {candidate!r}; choose from {sorted(FLAVOURS)}")
        try:
            return importlib.import_module(FLAVOURS[candidate].module), FLAVOURS[candidate]
        except ImportError:
            continue
    raise TensorRTUnavailable(f"none of {names} is importable; install tensorrt-rtx-cu12 (CPU-side builds) or "
                              "TensorRT (JetPack / datacenter)")


def cuda_major(flavour: Flavour) -> str:
    """The CUDA major version a pip-installed TensorRT was built for ('12' for tensorrt-rtx-cu12), or 'system'
    for a TensorRT that came with JetPack / a system package."""
    distributions = importlib.metadata.packages_distributions().get(flavour.module, [])
    for dist in distributions:
        for part in dist.replace("-", "_").split("_"):
            if part.startswith("cu") and part[2:].isdigit():
                return part[2:]
    return "system"
