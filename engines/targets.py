"""Deployment targets: which TensorRT builds for them, what they can compute, how much memory a build may take."""

from __future__ import annotations

from dataclasses import dataclass

from aot_export.errors import InputError

PRECISIONS = ("fp32", "fp16", "int8", "fp8")
GiB = 1 << 30


@dataclass(frozen=True)
class Target:
    name: str
    flavour: str                          # key of engines.flavours.FLAVOURS
    compute_capabilities: tuple[str, ...]
    precisions: tuple[str, ...]
    workspace_bytes: int                  # builder workspace cap: fits beside the model in device memory
    dla_cores: int = 0
    note: str = ""

    def refuse(self, precision: str, dla: bool = False) -> None:
        """Raise InputError, saying why, for what this target cannot run."""
        if precision not in PRECISIONS:
            raise InputError(f"precision {precision!r} is unknown; choose from {', '.join(PRECISIONS)}")
        if precision not in self.precisions:
            why = ("FP8 needs compute capability 8.9 or newer" if precision == "fp8"
                   else f"it supports {', '.join(self.precisions)}")
            raise InputError(f"target {self.name} (SM {', '.join(self.compute_capabilities)}) cannot run {precision}:"
                             f" {why}; choose another --precision")
        if dla and not self.dla_cores:
            raise InputError(f"target {self.name} has no DLA cores; drop --dla")
        if dla and precision not in ("fp16", "int8"):
            raise InputError(f"DLA runs fp16 or int8, not {precision}; choose --precision fp16 or int8")


TARGETS = {t.name: t for t in [
    Target("orin-agx", "tensorrt", ("8.7",), ("fp32", "fp16", "int8"), 4 * GiB, dla_cores=2,
           note="Jetson AGX Orin 32/64 GB, JetPack 6 (TensorRT 10)"),
    Target("orin-nx", "tensorrt", ("8.7",), ("fp32", "fp16", "int8"), 2 * GiB, dla_cores=2,
           note="Jetson Orin NX 8/16 GB"),
    Target("orin-nano", "tensorrt", ("8.7",), ("fp32", "fp16", "int8"), 1 * GiB,
           note="Jetson Orin Nano 4/8 GB: no DLA"),
    Target("a100", "tensorrt", ("8.0",), ("fp32", "fp16", "int8"), 8 * GiB),
    Target("l4", "tensorrt", ("8.9",), ("fp32", "fp16", "int8", "fp8"), 4 * GiB),
    Target("h100", "tensorrt", ("9.0",), ("fp32", "fp16", "int8", "fp8"), 8 * GiB),
    Target("rtx", "tensorrt_rtx", ("8.0", "8.6", "8.9", "12.0"), ("fp32", "fp16", "int8", "fp8"), 4 * GiB,
           note="TensorRT-RTX ahead-of-time build (no GPU needed): Ampere, Ada, Blackwell RTX; fp8 runs on SM 8.9+"),
]}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise InputError(f"target {name!r} is unknown; choose from {', '.join(TARGETS)}")
    return TARGETS[name]
