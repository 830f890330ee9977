"""What differs between the TensorRT packages, as data: the builder code itself has one path."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Flavour:
    name: str                 # distribution-neutral name written into engine sidecars
    module: str               # import name
    network_flags: tuple[str, ...]   # NetworkDefinitionCreationFlag members set on every network
    builds_without_gpu: bool  # ahead-of-time build on a machine without a GPU


FLAVOURS = {
    # Datacenter and Jetson TensorRT 10.x: a strongly typed network keeps the fp32 AOT block fp32.
    "tensorrt": Flavour("tensorrt", "tensorrt", ("STRONGLY_TYPED",), False),
    # TensorRT-RTX networks are strongly typed already; it has no other creation flag.
    "tensorrt_rtx": Flavour("tensorrt_rtx", "tensorrt_rtx", (), True),
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
