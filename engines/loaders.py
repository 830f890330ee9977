"""Engine building as small stages, each one job (Polygraphy-loader style):

    load TensorRT → parse ONNX (network flags) → [fp32 layer constraints] → builder config → build → serialize

Every stage takes what the previous one returned; `tensorrt` and `tensorrt_rtx` go through the same stages,
their differences read from `engines.flavours.Flavour`.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from aot_export.artifacts import atomic_file
from aot_export.errors import CheckFailed, InputError

from .flavours import Flavour, load_tensorrt

TYPINGS = ("strong", "weak")
FLOAT_PARTS = ("fp32", "fp16")


@dataclass(frozen=True)
class BuildSettings:
    """Everything a build depends on besides the ONNX; written into the engine sidecar."""

    target: str
    precision: str
    typing: str = "strong"                 # "weak": TensorRT 10 precision flags + fp32 constraints (JetPack 6)
    optimization_level: int = 3
    workspace_bytes: int | None = None
    timing_cache: str | None = None
    dla_core: int | None = None            # DLA core with GPU fallback (Jetson AGX/NX)
    compute_capabilities: tuple[str, ...] = ()   # TensorRT-RTX ahead-of-time targets
    # int8 / fp8: the precision of the layers a Q/DQ export leaves float ("fp16": the graph's float part converted
    # to fp16 for strong typing, FP16 enabled beside INT8 / FP8 for weak typing; the fp32 islands stay fp32)
    float_part: str = "fp32"

    def __post_init__(self) -> None:
        if self.typing not in TYPINGS:
            raise InputError(f"typing {self.typing!r} is unknown; choose from {', '.join(TYPINGS)}")
        if self.float_part not in FLOAT_PARTS:
            raise InputError(f"float part {self.float_part!r} is unknown; choose from {', '.join(FLOAT_PARTS)}")
        if self.float_part != "fp32" and self.precision not in ("int8", "fp8"):
            raise InputError(f"--float-part {self.float_part} applies to int8 and fp8 engines (a calibrated export's "
                             f"float layers); a {self.precision} engine is {self.precision} throughout: drop it")
        if not 0 <= self.optimization_level <= 5:
            raise InputError(f"optimization level {self.optimization_level} is out of range; choose 0..5")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "compute_capabilities": list(self.compute_capabilities)}


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

    def layers(self) -> list[Any]:
        return [self.network.get_layer(i) for i in range(self.network.num_layers)]


class ONNXParseError(RuntimeError):
    pass


class BuildFailed(CheckFailed):
    """TensorRT parsed the network but would not build it; the message carries TensorRT's reason."""


def network_flags(trt: ModuleType, flavour: Flavour, typing: str) -> int:
    """Strong typing where the flavour needs asking for it; weak typing only where the flavour still has it."""
    if typing == "weak" and not flavour.weak_typing:
        raise InputError(f"{flavour.name} builds strongly typed networks only; use --typing strong")
    name = flavour.strongly_typed_flag
    if typing == "strong" and name and hasattr(trt.NetworkDefinitionCreationFlag, name):
        return 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    return 0


def parse_onnx(onnx_path: str | os.PathLike, flavour: str | None = None, typing: str = "strong") -> ParsedNetwork:
    trt, chosen = load_tensorrt(flavour)
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt, chosen, typing))
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves external weight files relative to the model.
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(parser.get_error(i).desc() for i in range(parser.num_errors))
        raise ONNXParseError(f"{chosen.name} could not parse {onnx_path}: {errors}")
    return ParsedNetwork(trt, chosen, builder, network, parser, logger)


def fp32_layers(parsed: ParsedNetwork, fp32_nodes: set[str]) -> list[Any]:
    """Layers the ONNX parser made from `fp32_nodes`: named after their node, with a suffix when one node
    became several layers."""
    def node_of(layer_name: str) -> str | None:
        if layer_name in fp32_nodes:
            return layer_name
        head = layer_name.rsplit("_", 1)[0]
        return head if head in fp32_nodes else None

    return [layer for layer in parsed.layers() if node_of(layer.name)]


def constrain_fp32(parsed: ParsedNetwork, fp32_nodes: set[str]) -> int:
    """Weak typing: pin the given nodes' layers and their outputs to fp32; returns how many layers."""
    trt = parsed.trt
    layers = fp32_layers(parsed, fp32_nodes)
    for layer in layers:
        layer.precision = trt.float32
        for i in range(layer.num_outputs):
            if layer.get_output(i).dtype in (trt.float32, trt.float16):
                layer.set_output_type(i, trt.float32)
    return len(layers)


def builder_config(parsed: ParsedNetwork, settings: BuildSettings | None = None,
                   workspace_bytes: int | None = None) -> Any:
    trt, flavour = parsed.trt, parsed.flavour
    config = parsed.builder.create_builder_config()
    workspace = workspace_bytes if settings is None else (settings.workspace_bytes or workspace_bytes)
    if workspace is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    if settings is None:
        return config
    config.builder_optimization_level = settings.optimization_level
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if settings.typing == "weak":
        for precision in {settings.precision, settings.float_part} - {"fp32"}:
            flag = flavour.precision_flags.get(precision)
            if flag:
                config.set_flag(getattr(trt.BuilderFlag, flag))
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    if settings.dla_core is not None:
        if not flavour.dla:
            raise InputError(f"{flavour.name} has no DLA support; drop --dla")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = settings.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    if flavour.compute_capability_api and settings.compute_capabilities:
        config.num_compute_capabilities = len(settings.compute_capabilities)
        for i, capability in enumerate(settings.compute_capabilities):
            config.set_compute_capability(getattr(trt.ComputeCapability, "SM" + capability.replace(".", "")), i)
    if settings.timing_cache and hasattr(config, "create_timing_cache"):
        path = Path(settings.timing_cache)
        data = path.read_bytes() if path.is_file() else b""
        cache = config.create_timing_cache(data)
        if data and not is_timing_cache(config, data, cache):
            raise InputError(f"--timing-cache {path} is not a TensorRT timing cache; it was left untouched: pass a "
                             "new path or a cache an earlier build wrote")
        config.set_timing_cache(cache, ignore_mismatch=False)
    return config


def is_timing_cache(config: Any, data: bytes, cache: Any) -> bool:
    """TensorRT turns bytes it cannot read into an empty cache without a word: `data` is a timing cache when it
    is one already serialized (TensorRT-RTX's caches are always empty) or when it loaded as a non-empty one."""
    loaded = bytes(cache.serialize())
    return loaded == data or loaded != bytes(config.create_timing_cache(b"").serialize())


def save_timing_cache(config: Any, path: str | os.PathLike) -> Path | None:
    cache = config.get_timing_cache() if hasattr(config, "get_timing_cache") else None
    if cache is None:
        return None
    with atomic_file(path) as staging:
        staging.write_bytes(bytes(cache.serialize()))
    return Path(path)


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
        raise BuildFailed(f"{parsed.flavour.name} failed to build the network ({parsed.num_layers} layers); its "
                          "error is logged above")
    return BuiltEngine(bytes(serialized), parsed.flavour.name, parsed.trt.__version__,
                       time.perf_counter() - start)


def save_plan(engine: BuiltEngine, path: str | os.PathLike) -> Path:
    with atomic_file(path) as staging:
        staging.write_bytes(engine.plan)
    return Path(path)


def network_report(parsed: ParsedNetwork) -> dict[str, Any]:
    """Layer counts by type and by the dtype of their first output, from the parsed network (no GPU needed)."""
    by_type: dict[str, int] = {}
    by_dtype: dict[str, int] = {}
    for layer in parsed.layers():
        kind = str(layer.type).split(".")[-1]
        by_type[kind] = by_type.get(kind, 0) + 1
        dtype = str(layer.get_output(0).dtype).split(".")[-1] if layer.num_outputs else "none"
        by_dtype[dtype] = by_dtype.get(dtype, 0) + 1
    return {"layers": parsed.num_layers, "by_type": dict(sorted(by_type.items(), key=lambda kv: -kv[1])),
            "output_dtypes": by_dtype}


def inspect_engine(parsed: ParsedNetwork, plan: bytes) -> str | None:
    """The engine inspector's per-layer JSON, where the plan can be deserialized here (it needs a GPU)."""
    from .sidecar import gpu_compute_capability

    if gpu_compute_capability() is None:
        return None
    trt = parsed.trt
    runtime = trt.Runtime(parsed.logger)
    try:
        engine = runtime.deserialize_cuda_engine(plan)
    except (RuntimeError, TypeError):
        return None
    if engine is None:
        return None
    return engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
