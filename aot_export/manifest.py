"""`manifest.json`: everything needed to feed, check and trust an export directory."""

from __future__ import annotations

import dataclasses
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
    sizes: dict[str, int] = field(default_factory=dict)   # file name → bytes, measured when the manifest is written

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "model": self.model, "aot": self.aot.to_dict(),
                "aot_hash": self.aot.hash, "output_tokens": self.aot.output_tokens, "retention": self.aot.retention,
                "preprocessing": self.preprocessing.to_dict(),
                "inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs],
                "opset": self.opset, "precision": self.precision, "files": self.files, "sizes": self.sizes,
                "versions": self.versions, "extra": self.extra}

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
                   extra=data.get("extra", {}), sizes=data.get("sizes", {}))

    def write(self, directory: str | os.PathLike) -> Path:
        """Write `manifest.json` into `directory`, recording the size of every file it names as found there."""
        directory = Path(directory)
        sized = dataclasses.replace(self, sizes={name: (directory / name).stat().st_size for name in self.files})
        path = directory / MANIFEST
        with atomic_file(path) as staging:
            staging.write_text(json.dumps(sized.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @property
    def video_frames(self) -> int:
        """Decoded frames the graph takes (AOT's frames times the model's temporal patch)."""
        return self.inputs[0].shape[0]

    @property
    def calibration_passed(self) -> bool | None:
        """The verdict `aot-export calibrate` recorded on its held-out video; None for an uncalibrated export."""
        holdout = self.extra.get("calibration", {}).get("holdout", {})
        return holdout.get("passed") if isinstance(holdout, dict) else None

    @property
    def graph(self) -> str:
        return next(name for name in self.files if name.endswith(".onnx"))


def hash_files(directory: Path, names: list[str]) -> dict[str, str]:
    return {name: sha256_file(directory / name) for name in names if (directory / name).is_file()}


def read_json_object(path: Path, fix: str) -> dict[str, Any]:
    """A JSON file that must hold one object (a manifest, a sidecar): anything else is one line naming it."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc}); {fix}") from exc
    if not isinstance(data, dict):
        raise InputError(f"{path}: holds a JSON {type(data).__name__}, not an object; {fix}")
    return data


def file_findings(directory: Path, files: dict[str, str], sizes: dict[str, int], hashes: bool) -> list[str]:
    """What differs between `directory` and the files its manifest records: missing files, sizes (always),
    sha256 (with `hashes`). Empty when everything matches."""
    findings = []
    for name, digest in files.items():
        path = directory / name
        if not path.is_file():
            findings.append(f"{name} named by the manifest is missing")
        elif name in sizes and path.stat().st_size != sizes[name]:
            findings.append(f"{name} is {path.stat().st_size} bytes, the manifest says {sizes[name]}")
        elif hashes and sha256_file(path) != digest:
            findings.append(f"{name} does not match the manifest (sha256 differs)")
    return findings


def consistency_findings(manifest: Manifest, data: dict[str, Any]) -> list[str]:
    """Fields that must follow from the AOT config but do not (a manifest edited by hand)."""
    cfg, findings = manifest.aot, []
    derived = {"aot_hash": cfg.hash, "output_tokens": cfg.output_tokens}
    for key, value in derived.items():
        if key in data and data[key] != value:
            findings.append(f"manifest {key} is {data[key]!r} but its aot config gives {value!r}")
    if "retention" in data and not (isinstance(data["retention"], (int, float))
                                    and abs(data["retention"] - cfg.retention) < 1e-9):
        findings.append(f"manifest retention is {data['retention']!r} but its aot config gives {cfg.retention!r}")
    # A tower with a temporal patch (Qwen2.5-VL: 2) takes that many video frames per AOT frame.
    video_frames = cfg.frames * int(manifest.model.get("temporal_patch", 1))
    for spec in manifest.inputs:
        if not spec.shape or spec.shape[0] != video_frames:
            findings.append(f"input {spec.name} shape {list(spec.shape)} does not start with the config's "
                            f"{video_frames} video frames")
    for spec in manifest.outputs:
        if not spec.shape or spec.shape[0] != cfg.output_tokens:
            findings.append(f"output {spec.name} shape {list(spec.shape)} does not start with the config's "
                            f"{cfg.output_tokens} tokens")
    return findings


def load_manifest(directory: str | os.PathLike) -> tuple[Manifest, dict[str, Any]]:
    """The manifest of an export directory and its raw JSON, or one line saying why there is none."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise InputError(f"{directory}: no such export directory; run `aot-export export ... --out {directory}`")
    if not path.is_file():
        raise InputError(f"{directory}: no {MANIFEST}; this is not an export directory (run `aot-export export`)")
    data = read_json_object(path, "re-export")
    try:
        return Manifest.from_dict(data), data
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"{path}: unreadable manifest ({exc.__class__.__name__}: {exc}); re-export") from exc


def read_manifest(directory: str | os.PathLike, *, verify_hashes: bool = True) -> Manifest:
    """Load an export directory's manifest, refusing one that contradicts itself or its files: sizes always,
    sha256 unless `verify_hashes` is False (the CLI's --skip-hash)."""
    directory = Path(directory)
    manifest, data = load_manifest(directory)
    findings = consistency_findings(manifest, data) + file_findings(directory, manifest.files, manifest.sizes,
                                                                    verify_hashes)
    if findings:
        raise InputError(f"{directory}: {findings[0]}; the export was changed after it was written: re-export or "
                         "restore it (`aot-export check` lists every difference)")
    return manifest


def refuse_failed_calibration(manifest: Manifest, where: str | os.PathLike, allow_failed: bool) -> str | None:
    """An export whose calibration failed its gates is refused downstream unless `allow_failed`; then the
    warning to print is returned."""
    if manifest.calibration_passed is not False:
        return None
    holdout = manifest.extra["calibration"]["holdout"]
    message = (f"{where} is an {manifest.precision} export whose calibration FAILED its fidelity gates on "
               f"{holdout.get('name', 'its held-out video')}")
    if not allow_failed:
        raise InputError(f"{message}; recalibrate (more clips, another precision) or pass --allow-failed to use it "
                         "anyway")
    return f"warning: {message}; used anyway (--allow-failed)"
