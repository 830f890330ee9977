"""Engine building as small stages, each one job (Polygraphy-loader style):
load TensorRT -> parse ONNX -> builder config -> build -> serialize.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from aot_export.artifacts import atomic_file

from .flavours import Flavour, load_tensorrt


@dataclass
class ParsedNetwork:
    """Builder, network and parser together: the network is only valid while its builder and parser live."""
    trt: ModuleType
    flavour: Flavour
    builder: Any
    network: Any
    parser: Any
    logger: Any = field(repr=False)

    @property
    def num_layers(self) -> int:
        return self.network.num_layers


class ONNXParseError(RuntimeError):
    pass


def parse_onnx(onnx_path: str | os.PathLike, flavour: str | None = None) -> ParsedNetwork:
    trt, chosen = load_tensorrt(flavour)
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    flags = 0
    for name in chosen.network_flags:
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves external weight files relative to the model.
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(parser.get_error(i).desc() for i in range(parser.num_errors))
        raise ONNXParseError(f"{chosen.name} could not parse {onnx_path}: {errors}")
    return ParsedNetwork(trt, chosen, builder, network, parser, logger)


def builder_config(parsed: ParsedNetwork, workspace_bytes: int | None = None) -> Any:
    config = parsed.builder.create_builder_config()
    if workspace_bytes is not None:
        config.set_memory_pool_limit(parsed.trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    return config


@dataclass(frozen=True)
class BuiltEngine:
    plan: bytes
    flavour: str
    version: str
    build_seconds: float


def build_engine(parsed: ParsedNetwork, config: Any) -> BuiltEngine:
    start = time.perf_counter()
    serialized = parsed.builder.build_serialized_network(parsed.network, config)
    if serialized is None:
        raise RuntimeError(f"{parsed.flavour.name} failed to build the network ({parsed.num_layers} layers)")
    return BuiltEngine(bytes(serialized), parsed.flavour.name, parsed.trt.__version__,
                       time.perf_counter() - start)


def save_plan(engine: BuiltEngine, path: str | os.PathLike) -> Path:
    with atomic_file(path) as staging:
        staging.write_bytes(engine.plan)
    return Path(path)
