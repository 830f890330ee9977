"""`aot-export build DIR --target T --precision P`: an engine directory (engine.plan + engine.json) from an export.

Which ONNX feeds the builder follows from the precision: fp32 → the export's graph; fp16 → an fp16 copy made by
`engines.precision.export_fp16` (kept in the engine directory, `onnx/`), or, with `typing="weak"` (TensorRT 10 on
JetPack 6), the fp32 graph with precision flags and fp32 layer constraints; int8 / fp8 → a calibrated Q/DQ
export (`aot-export calibrate`).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import onnx

from aot_export.artifacts import atomic_dir, check_destination, sha256_file
from aot_export.errors import InputError
from aot_export.manifest import Manifest, failed_gates, read_manifest, refuse_failed_gates
from aot_export.progress import Stages

from .loaders import (BuildSettings, build_engine, builder_config, constrain_fp32, inspect_engine, network_report,
                      parse_onnx, save_timing_cache)
from .flavours import FLAVOURS, TensorRTUnavailable, cuda_major, load_tensorrt
from .precision import export_fp16, fp32_nodes
from .sidecar import FP16_EXPORT, LAYER_REPORT, PLAN, SIDECAR, EngineSidecar
from .targets import PRECISIONS, Target, get_target

FP8_MIN_CAPABILITY = 8.9


def settings_for(target: Target, precision: str, typing: str = "strong", optimization_level: int = 3,
                 workspace_bytes: int | None = None, timing_cache: str | None = None, dla: bool = False,
                 compute_capabilities: tuple[str, ...] = (), float_part: str = "fp32") -> BuildSettings:
    """Validated settings: a precision or DLA the target cannot run is refused here, before any build."""
    target.refuse(precision, dla)
    if typing == "weak" and not FLAVOURS[target.flavour].weak_typing:
        raise InputError(f"target {target.name} builds with {target.flavour}, which is strongly typed only; "
                         "use --typing strong")
    if workspace_bytes is not None and workspace_bytes > target.workspace_bytes:
        raise InputError(f"workspace {workspace_bytes >> 20} MiB exceeds {target.name}'s cap of "
                         f"{target.workspace_bytes >> 20} MiB; lower --workspace-mib")
    unknown = set(compute_capabilities) - set(target.compute_capabilities)
    if unknown:
        raise InputError(f"target {target.name} builds for SM {', '.join(target.compute_capabilities)}, not "
                         f"{', '.join(sorted(unknown))}")
    capabilities = tuple(compute_capabilities) or target.compute_capabilities
    if precision == "fp8":
        # FP8 tensor cores start at SM 8.9: an fp8 engine for several architectures covers only those.
        too_old = [cc for cc in compute_capabilities if float(cc) < FP8_MIN_CAPABILITY]
        if too_old:
            raise InputError(f"fp8 needs SM {FP8_MIN_CAPABILITY} or newer, not {', '.join(too_old)}; drop those "
                             "--compute-capability values")
        capabilities = tuple(cc for cc in capabilities if float(cc) >= FP8_MIN_CAPABILITY)
    return BuildSettings(target=target.name, precision=precision, typing=typing,
                         optimization_level=optimization_level,
                         workspace_bytes=workspace_bytes or target.workspace_bytes, timing_cache=timing_cache,
                         dla_core=0 if dla else None, compute_capabilities=capabilities, float_part=float_part)


def source_precision(settings: BuildSettings) -> str:
    """The precision of the export the build reads: fp16 engines come from fp32 exports."""
    return "fp32" if settings.precision == "fp16" else settings.precision


def check_source(manifest: Manifest, settings: BuildSettings, export_dir: Path) -> None:
    want = source_precision(settings)
    if manifest.precision == "fp16" and settings.precision == "fp16" and settings.typing == "strong":
        return
    if manifest.precision not in PRECISIONS:
        raise InputError(f"{export_dir} is an {manifest.precision} export, which only ONNX Runtime runs; build the "
                         "engine from the fp32 export it was made from")
    if manifest.precision != want:
        fix = ("run `aot-export calibrate` first" if want in ("int8", "fp8")
               else f"build {manifest.precision} from it, or pass the fp32 export")
        raise InputError(f"{export_dir} is a {manifest.precision} export; a {settings.precision} engine needs a "
                         f"{want} export: {fix}")


def converts_to_fp16(settings: BuildSettings, export_precision: str) -> bool:
    """Whether a strongly typed build feeds an fp16 copy of the export's graph (`engines.precision.export_fp16`):
    an fp16 engine from an fp32 export, or an int8 / fp8 engine whose float part is fp16."""
    return settings.typing == "strong" and (settings.precision == "fp16" and export_precision == "fp32"
                                            or settings.float_part == "fp16")


@dataclass(frozen=True)
class BuildResult:
    directory: Path
    sidecar: EngineSidecar
    plan_bytes: int
    seconds: dict[str, float]
    layer_info: bool


def build_engine_dir(export_dir: str | os.PathLike, settings: BuildSettings, out_dir: str | os.PathLike,
                     progress: bool = True, force: bool = False, allow_failed: bool = False, *,
                     verify_hashes: bool = True) -> BuildResult:
    """`force` replaces an existing engine directory at `out_dir` (anything else there is refused);
    `allow_failed` builds from an export whose calibration failed its gates (refused otherwise);
    `verify_hashes`: the export's sha256 checked against its manifest (sizes always)."""
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    target = get_target(settings.target)
    manifest = read_manifest(export_dir, verify_hashes=verify_hashes)
    check_source(manifest, settings, export_dir)
    warning = refuse_failed_gates(export_dir, failed_gates(manifest.extra), allow_failed)
    if warning:
        print(warning, file=sys.stderr)
    # the plan holds the weights once more; fp16 engines also keep an fp16 copy of the graph
    check_destination(out_dir, "engine", force, 2 * sum(manifest.sizes.values()), sources={"export": export_dir})
    try:
        load_tensorrt(target.flavour)
    except TensorRTUnavailable as exc:
        raise InputError(f"target {target.name} builds with {target.flavour}, which is not installed here; build "
                         f"on the device (--print-trtexec gives the command) or choose --target rtx") from exc
    stages = Stages(["prepare ONNX", "parse", "configure", "build", "serialize"], progress)
    with atomic_dir(out_dir, "engine", force) as staging:
        with stages.step():
            graph_dir, graph_manifest = export_dir, manifest
            if converts_to_fp16(settings, manifest.precision):
                graph_dir = export_fp16(export_dir, staging / FP16_EXPORT, verify_hashes=verify_hashes)
                graph_manifest = read_manifest(graph_dir, verify_hashes=verify_hashes)
            graph = graph_dir / graph_manifest.graph
        with stages.step():
            parsed = parse_onnx(graph, target.flavour, settings.typing)
            constrained = 0
            if settings.typing == "weak":
                constrained = constrain_fp32(parsed, set(fp32_nodes(onnx.load(str(graph),
                                                                              load_external_data=False))))
        with stages.step():
            config = builder_config(parsed, settings)
        with stages.step():
            engine = build_engine(parsed, config)
        with stages.step():
            (staging / PLAN).write_bytes(engine.plan)
            if settings.timing_cache:
                save_timing_cache(config, settings.timing_cache)
            layer_info = inspect_engine(parsed, engine.plan)
            if layer_info is not None:
                (staging / LAYER_REPORT).write_text(layer_info)
            sidecar = EngineSidecar(
                flavour=parsed.flavour.name, tensorrt_version=engine.version, cuda=cuda_major(parsed.flavour),
                target=target.name, compute_capabilities=list(settings.compute_capabilities),
                precision=settings.precision, builder=settings.to_dict(), onnx_sha256=sha256_file(graph),
                plan_sha256=sha256_file(staging / PLAN), manifest=manifest.to_dict(),
                build_seconds=engine.build_seconds, plan_bytes=len(engine.plan),
                network={**network_report(parsed), "fp32_constrained_layers": constrained,
                         "onnx": str(graph.relative_to(graph_dir.parent)) if graph_dir != export_dir else
                         manifest.graph})
            (staging / SIDECAR).write_text(json.dumps(sidecar.to_dict(), indent=2, sort_keys=True) + "\n")
    stages.close()
    return BuildResult(out_dir, sidecar, len(engine.plan), stages.seconds, layer_info is not None)


def trtexec_command(export_dir: str | os.PathLike, settings: BuildSettings, plan: str = PLAN) -> str:
    """The equivalent command line for building on the device itself (trtexec, or tensorrt_rtx)."""
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir, verify_hashes=False)
    check_source(manifest, settings, export_dir)
    target = get_target(settings.target)
    flavour = FLAVOURS[target.flavour]
    graph = export_dir / manifest.graph
    args = [flavour.cli, f"--onnx={graph}", f"--saveEngine={plan}",
            f"--memPoolSize=workspace:{settings.workspace_bytes >> 20}M",
            f"--builderOptimizationLevel={settings.optimization_level}", "--profilingVerbosity=detailed",
            "--skipInference"]
    if settings.typing == "strong" and flavour.strongly_typed_flag:
        args.append("--stronglyTyped")
    converted = converts_to_fp16(settings, manifest.precision)
    if converted:
        args[1] = f"--onnx={export_dir.parent / (export_dir.name + '-fp16') / manifest.graph}"
    if settings.typing == "weak":
        nodes = fp32_nodes(onnx.load(str(graph), load_external_data=False))
        args += [f"--{settings.precision}", *(["--fp16"] if settings.float_part == "fp16" else []),
                 "--precisionConstraints=obey",
                 "--layerPrecisions=" + ",".join(f"{n}:fp32" for n in nodes),
                 "--layerOutputTypes=" + ",".join(f"{n}:fp32" for n in nodes)]
    if settings.timing_cache:
        args.append(f"--timingCacheFile={settings.timing_cache}")
    if settings.dla_core is not None:
        args += [f"--useDLACore={settings.dla_core}", "--allowGPUFallback"]
    command = " ".join(shlex.quote(a) for a in args)
    if converted:
        command = (f"# first: python -c \"from engines.precision import export_fp16; "
                   f"export_fp16('{export_dir}', '{export_dir}-fp16')\"\n" + command)
    return command
