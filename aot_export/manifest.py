"""`manifest.json`: everything needed to feed, check and trust an export directory."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .artifacts import atomic_file, sha256_file
from .config import AOTConfig
from .errors import InputError
from .preprocess import Preprocessing

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
GRAPH = "vision_aot.onnx"
WEIGHTS = GRAPH + ".data"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TensorSpec":
        return cls(data["name"], tuple(data["shape"]), data["dtype"])


@dataclass(frozen=True)
class Manifest:
    model: dict[str, Any]                      # ModelInfo.to_dict()
    aot: AOTConfig
    preprocessing: Preprocessing
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opset: int
    files: dict[str, str]                      # file name → sha256
    versions: dict[str, str]
    precision: str = "fp32"
    extra: dict[str, Any] = field(default_factory=dict)   # e.g. calibration provenance
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "model": self.model, "aot": self.aot.to_dict(),
                "aot_hash": self.aot.hash, "output_tokens": self.aot.output_tokens, "retention": self.aot.retention,
                "preprocessing": self.preprocessing.to_dict(),
                "inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs],
                "opset": self.opset, "precision": self.precision, "files": self.files, "versions": self.versions,
                "extra": self.extra}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Manifest":
        if data.get("schema_version") != SCHEMA_VERSION:
            raise InputError(f"manifest schema_version {data.get('schema_version')!r} is not {SCHEMA_VERSION}; "
                             "re-export with this version of aot-export")
        return cls(model=data["model"], aot=AOTConfig.from_dict(data["aot"]),
                   preprocessing=Preprocessing.from_dict(data["preprocessing"]),
                   inputs=tuple(map(TensorSpec.from_dict, data["inputs"])),
                   outputs=tuple(map(TensorSpec.from_dict, data["outputs"])), opset=data["opset"],
                   files=data["files"], versions=data["versions"], precision=data.get("precision", "fp32"),
                   extra=data.get("extra", {}))

    def write(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / MANIFEST
        with atomic_file(path) as staging:
            staging.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @property
    def video_frames(self) -> int:
        """Decoded frames the graph takes (AOT's frames times the model's temporal patch)."""
        return self.inputs[0].shape[0]

    @property
    def graph(self) -> str:
        return next(name for name in self.files if name.endswith(".onnx"))


def hash_files(directory: Path, names: list[str]) -> dict[str, str]:
    return {name: sha256_file(directory / name) for name in names if (directory / name).is_file()}


def read_manifest(directory: str | os.PathLike, verify: bool = True) -> Manifest:
    """Load an export directory's manifest; with `verify`, refuse one whose files' sha256 do not match."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise InputError(f"{directory}: no such export directory; run `aot-export export ... --out {directory}`")
    if not path.is_file():
        raise InputError(f"{directory}: no {MANIFEST}; this is not an export directory (run `aot-export export`)")
    try:
        manifest = Manifest.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: unreadable manifest ({exc.__class__.__name__}: {exc}); re-export") from exc
    if verify:
        for name, digest in manifest.files.items():
            if not (directory / name).is_file():
                raise InputError(f"{directory}: {name} named by the manifest is missing; re-export")
            if sha256_file(directory / name) != digest:
                raise InputError(f"{directory}: {name} does not match the manifest (sha256 differs); the file was "
                                 "changed after export: re-export or restore it")
    return manifest
