"""`engine.json`: what an engine plan was built from and for; a runtime refuses a plan that does not fit.

Refusals name the field that differs: the engine against its export (`onnx_sha256`, `aot_hash`, `config_hash`) and
against this machine (`flavour`, `tensorrt_version`, `compute_capability`).
"""

from __future__ import annotations

import ctypes
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from aot_export.artifacts import atomic_file, sha256_file
from aot_export.errors import InputError
from aot_export.manifest import MANIFEST, Manifest, listing_findings, read_manifest, read_manifest_file

PLAN = "engine.plan"
SIDECAR = "engine.json"
# Beside the plan, written by `aot-export build`: the layer report (no reader opens it) and, for an fp16 engine, the
# fp16 export it was built from (an export with its own manifest, held to it when the engine is read).
LAYER_REPORT = "layers.json"
FP16_EXPORT = "onnx"
SIDECAR_SCHEMA = 1
# cuDeviceGetAttribute attributes (cuda.h)
CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75
CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76


class EngineMismatch(InputError):
    """An engine that does not belong to this export or cannot run on this machine."""

    def __init__(self, field_name: str, engine_value: Any, actual: Any, fix: str):
        self.field = field_name
        super().__init__(f"engine {field_name} is {engine_value!r} but {actual}; {fix}")


@dataclass(frozen=True)
class EngineSidecar:
    flavour: str
    tensorrt_version: str
    cuda: str
    target: str
    compute_capabilities: list[str]
    precision: str
    builder: dict[str, Any]
    onnx_sha256: str
    plan_sha256: str
    manifest: dict[str, Any]
    build_seconds: float
    network: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SIDECAR_SCHEMA
    plan_bytes: int | None = None          # checked on every load; the sha256 unless hashes are skipped
    extra: dict[str, Any] = field(default_factory=dict)    # verdicts recorded later (`aot-export validate`)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EngineSidecar":
        if data.get("schema_version") != SIDECAR_SCHEMA:
            raise InputError(f"engine.json schema_version {data.get('schema_version')!r} is not {SIDECAR_SCHEMA}; "
                             "rebuild the engine")
        return cls(**data)


def read_sidecar(engine_dir: str | os.PathLike, *, verify_hashes: bool = True) -> EngineSidecar:
    """`engine.json`, refused unless the directory holds the plan and nothing else it does not vouch for
    (`listing_findings`: its report, an fp16 engine's export, itself held to its manifest), and the plan has its
    recorded size and (with `verify_hashes`) sha256."""
    engine_dir = Path(engine_dir)
    for name in (PLAN, SIDECAR):
        if not (engine_dir / name).is_file():
            raise InputError(f"{engine_dir}: no {name}; this is not an engine directory (run `aot-export build`)")
    data = read_manifest_file(engine_dir, SIDECAR, "rebuild the engine")
    try:
        sidecar = EngineSidecar.from_dict(data)
    except TypeError as exc:
        raise InputError(f"{engine_dir / SIDECAR}: unreadable ({exc}); rebuild the engine") from exc
    findings = listing_findings(engine_dir, {PLAN: sidecar.plan_sha256}, SIDECAR, (LAYER_REPORT, FP16_EXPORT))
    if findings:
        raise InputError(f"{engine_dir}: {findings[0]}; the engine directory was changed after the build: rebuild "
                         "it or restore it")
    if (engine_dir / FP16_EXPORT).exists():
        read_manifest(engine_dir / FP16_EXPORT, verify_hashes=verify_hashes)
    size = (engine_dir / PLAN).stat().st_size
    if sidecar.plan_bytes is not None and size != sidecar.plan_bytes:
        raise EngineMismatch("plan_bytes", sidecar.plan_bytes, f"engine.plan is {size} bytes",
                             "the plan was changed after the build: rebuild it")
    if verify_hashes and sha256_file(engine_dir / PLAN) != sidecar.plan_sha256:
        raise EngineMismatch("plan_sha256", sidecar.plan_sha256[:12], "engine.plan hashes differently",
                             "the plan was changed after the build: rebuild it")
    return sidecar


def record_in_sidecar(engine_dir: str | os.PathLike, key: str, value: Any) -> EngineSidecar:
    """`extra[key] = value` in an engine's sidecar, rewritten atomically (the plan and its sha256 untouched)."""
    engine_dir = Path(engine_dir)
    sidecar = read_sidecar(engine_dir, verify_hashes=False)
    updated = EngineSidecar.from_dict({**sidecar.to_dict(), "extra": {**sidecar.extra, key: value}})
    with atomic_file(engine_dir / SIDECAR) as staging:
        staging.write_text(json.dumps(updated.to_dict(), indent=2, sort_keys=True) + "\n")
    return updated


def check_against_export(sidecar: EngineSidecar, manifest: Manifest) -> None:
    """The engine was built from this export: the sidecar's copy of the export's manifest records the same graph
    (`onnx_sha256`: for an fp16 build the engine's own graph is derived, so the export's graph hash is compared),
    the same AOT config (`aot_hash`) and the same model config (`config_hash`)."""
    recorded = sidecar.manifest.get("files", {}).get(manifest.graph)
    graph_hash = manifest.files[manifest.graph]
    if recorded != graph_hash:
        raise EngineMismatch("onnx_sha256", (recorded or "none")[:12], f"the export's graph is {graph_hash[:12]}",
                             "rebuild the engine from this export")
    if sidecar.manifest.get("aot_hash") != manifest.aot.hash:
        raise EngineMismatch("aot_hash", sidecar.manifest.get("aot_hash"), f"the export's is {manifest.aot.hash}",
                             "rebuild the engine from this export")
    config_hash = sidecar.manifest.get("model", {}).get("config_hash")
    if config_hash != manifest.model["config_hash"]:
        raise EngineMismatch("config_hash", config_hash, f"the export's model is {manifest.model['config_hash']}",
                             "rebuild the engine from this export")


def find_export(engine_dir: str | os.PathLike, sidecar: EngineSidecar) -> Path | None:
    """The export an engine was built from, where `aot-export build` puts engines by default
    (EXPORT-TARGET-PRECISION beside EXPORT); None when there is no such export directory."""
    engine_dir = Path(engine_dir).resolve()
    suffix = f"-{sidecar.target}-{sidecar.precision}"
    if not engine_dir.name.endswith(suffix):
        return None
    export_dir = engine_dir.with_name(engine_dir.name[:-len(suffix)])
    return export_dir if (export_dir / MANIFEST).is_file() else None


@dataclass(frozen=True)
class Machine:
    """What the engine must match here: importable flavours with versions, the GPU's compute capability."""

    versions: dict[str, str]
    compute_capability: str | None

    @classmethod
    def detect(cls) -> "Machine":
        import importlib

        from .flavours import FLAVOURS

        versions = {}
        for name, flavour in FLAVOURS.items():
            try:
                versions[name] = importlib.import_module(flavour.module).__version__
            except ImportError:
                continue
        return cls(versions, gpu_compute_capability())


def gpu_compute_capability() -> str | None:
    """SM version ("8.7") of CUDA device 0, read from the driver itself (no torch, no CUDA toolkit: a Jetson's
    libcuda is enough); None where there is no driver or no device."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    count, device, major, minor = (ctypes.c_int() for _ in range(4))
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return None
    if cuda.cuDeviceGet(ctypes.byref(device), 0) != 0:
        return None
    if (cuda.cuDeviceGetAttribute(ctypes.byref(major), CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device)
            or cuda.cuDeviceGetAttribute(ctypes.byref(minor), CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device)):
        return None
    return f"{major.value}.{minor.value}"


def check_against_machine(sidecar: EngineSidecar, machine: Machine) -> None:
    if sidecar.flavour not in machine.versions:
        raise EngineMismatch("flavour", sidecar.flavour, "it is not installed here",
                             f"install {sidecar.flavour} {sidecar.tensorrt_version} or rebuild for what is installed")
    if machine.versions[sidecar.flavour] != sidecar.tensorrt_version:
        raise EngineMismatch("tensorrt_version", sidecar.tensorrt_version,
                             f"this machine has {sidecar.flavour} {machine.versions[sidecar.flavour]}",
                             "rebuild the engine with the installed version")
    if machine.compute_capability is None:
        raise EngineMismatch("compute_capability", "/".join(sidecar.compute_capabilities),
                             "this machine has no CUDA GPU", "run it on the target device")
    if machine.compute_capability not in sidecar.compute_capabilities:
        raise EngineMismatch("compute_capability", "/".join(sidecar.compute_capabilities),
                             f"this GPU is SM {machine.compute_capability}", "rebuild for this GPU's target")


def load_engine(engine_dir: str | os.PathLike, export_dir: str | os.PathLike | None = None,
                machine: Machine | None = None,
                deserialize: Callable[[EngineSidecar, bytes], Any] | None = None, *,
                verify_hashes: bool = True) -> tuple[EngineSidecar, Any]:
    """Verify the engine against its export (if given) and this machine, then deserialize it; `verify_hashes`:
    the plan's and the export's sha256 too (sizes always)."""
    engine_dir = Path(engine_dir)
    sidecar = read_sidecar(engine_dir, verify_hashes=verify_hashes)
    if export_dir is not None:
        check_against_export(sidecar, read_manifest(export_dir, verify_hashes=verify_hashes))
    check_against_machine(sidecar, machine or Machine.detect())
    plan = (engine_dir / PLAN).read_bytes()
    return sidecar, (deserialize or deserialize_plan)(sidecar, plan)


def deserialize_plan(sidecar: EngineSidecar, plan: bytes) -> Any:
    from .flavours import load_tensorrt

    trt, _ = load_tensorrt(sidecar.flavour)
    engine = trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine(plan)
    if engine is None:
        raise RuntimeError(f"{sidecar.flavour} could not deserialize the plan on this machine")
    return engine
