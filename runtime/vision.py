"""The artifact a command names, resolved once, and the vision runner for it.

`resolve_artifact(path)`: an engine directory (its sidecar's copy of the export's manifest; the export it was
built from when given or found beside it), an export directory (its manifest) or a model (built-in name or
checkpoint directory). `model_adapter` loads the model behind any of them, refused if its config is not the one
exported. `run`, `validate` and `visualize` all take what this resolves. Both verify what they load against its
manifest or sidecar: sizes always, sha256 unless `verify_hashes=False` (the CLI's --skip-hash).

Vision backends are runners (`aot_export.runners` interface, Polygraphy-style activate / infer / deactivate),
chosen from `RUNNERS` by backend name; the default backend follows the artifact (engine → tensorrt, export →
onnxruntime, model → torch).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aot_export import AOTConfig
from aot_export.adapters import ModelAdapter, load_model
from aot_export.errors import InputError
from aot_export.manifest import MANIFEST, Manifest, failed_gates, read_manifest
from aot_export.reference_runner import TorchReferenceRunner
from aot_export.runners import OnnxRuntimeRunner, VisionRunner
from engines.runner import TensorRTRunner
from engines.sidecar import SIDECAR, check_against_export, find_export, read_sidecar

RUNNERS: dict[str, type[VisionRunner]] = {"torch": TorchReferenceRunner, "onnxruntime": OnnxRuntimeRunner,
                                          "tensorrt": TensorRTRunner}
BACKENDS = tuple(RUNNERS)
DEFAULT_BACKEND = {"engine": "tensorrt", "export": "onnxruntime", "model": "torch"}


@dataclass(frozen=True)
class Artifact:
    path: str
    kind: str                         # "engine", "export" or "model"
    manifest: Manifest | None         # the export's (for an engine: the copy in its sidecar); None for a model
    export_dir: Path | None           # the export itself, or the one an engine is checked against (None: not known)
    failures: tuple[str, ...] = ()    # the gates its recorded verdicts failed (an engine: its export's and its own)


def artifact_kind(path: str | os.PathLike) -> str:
    """'engine', 'export' or 'model' (a built-in name or a checkpoint directory)."""
    directory = Path(path)
    if (directory / SIDECAR).is_file():
        return "engine"
    if (directory / MANIFEST).is_file():
        return "export"
    return "model"


def resolve_artifact(path: str | os.PathLike, export: str | os.PathLike | None = None, *,
                     verify_hashes: bool = True) -> Artifact:
    """What `--model`/DIR names. For an engine, `export` (or the export found beside it, see
    `engines.sidecar.find_export`) is the export it is checked against before it runs."""
    path = str(path)
    kind = artifact_kind(path)
    if export is not None and kind != "engine":
        raise InputError(f"--export names the export an engine was built from; {path} is not an engine directory")
    if kind == "engine":
        sidecar = read_sidecar(path, verify_hashes=verify_hashes)
        export_dir = Path(export) if export is not None else find_export(path, sidecar)
        failures = (*failed_gates(sidecar.manifest.get("extra")), *failed_gates(sidecar.extra))
        return Artifact(path, kind, Manifest.from_dict(sidecar.manifest), export_dir, failures)
    if kind == "export":
        manifest = read_manifest(path, verify_hashes=verify_hashes)
        return Artifact(path, kind, manifest, Path(path), tuple(failed_gates(manifest.extra)))
    return Artifact(path, kind, None, None)


def model_adapter(artifact: Artifact, model: str | ModelAdapter | None = None) -> ModelAdapter:
    """The model behind the artifact (or `model`, overriding where the manifest says), refused if its config is
    not the one exported."""
    if artifact.manifest is None:
        return model if isinstance(model, ModelAdapter) else load_model(model or artifact.path)
    manifest = artifact.manifest
    adapter = model if isinstance(model, ModelAdapter) else load_model(model or manifest.model["model_id"])
    if adapter.info.config_hash != manifest.model["config_hash"]:
        raise InputError(f"model {adapter.info.model_id} (config {adapter.info.config_hash}) is not the one "
                         f"exported (config {manifest.model['config_hash']}); pass --model with the exported "
                         "checkpoint")
    return adapter


def open_runner(artifact: Artifact, backend: str | None = None, device: str = "auto",
                adapter: ModelAdapter | None = None, *, verify_hashes: bool = True, **options: Any) -> VisionRunner:
    """The (inactive) vision runner of `backend` for the artifact; `options` go to the ONNX Runtime runner's
    session options (intra_op_threads, allow_spinning)."""
    backend = backend or DEFAULT_BACKEND[artifact.kind]
    if backend not in RUNNERS:
        raise InputError(f"backend {backend!r} is unknown; choose from {', '.join(BACKENDS)}")
    if backend == "tensorrt":
        if artifact.kind != "engine":
            raise InputError(f"{artifact.path} is not an engine directory; build one with `aot-export build`, or "
                             "choose --backend onnxruntime/torch")
        return TensorRTRunner(artifact.path, artifact.export_dir, verify_hashes=verify_hashes)
    if backend == "onnxruntime":
        if artifact.kind != "export":
            raise InputError(f"{artifact.path} is not an export directory; export one with `aot-export export`, or "
                             "choose --backend torch")
        return OnnxRuntimeRunner.from_export(artifact.path, device, artifact.manifest, verify_hashes=verify_hashes,
                                             **options)
    if adapter is None:
        raise InputError("the torch backend needs the model; pass --model with a model or an export directory")
    if artifact.kind == "engine" and artifact.export_dir is not None:
        check_against_export(read_sidecar(artifact.path, verify_hashes=verify_hashes),
                             read_manifest(artifact.export_dir, verify_hashes=verify_hashes))
    cfg = artifact.manifest.aot if artifact.manifest is not None else AOTConfig(grid=adapter.info.grid)
    return TorchReferenceRunner(adapter, cfg)
