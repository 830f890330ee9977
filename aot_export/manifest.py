"""`manifest.json`: everything needed to feed, check and trust an export directory."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

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
        return cls(model=data["model"], aot=AOTConfig.from_recorded(data["aot"]),
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


# The JSON files read here (configs, manifests, sidecars, bundle.json, llm.json, genai_config.json) are a few KB;
# one far larger is not one of them, and would cost its size in memory to read.
MAX_JSON_BYTES = 16 << 20


def read_json_object(path: Path, fix: str) -> dict[str, Any]:
    """A JSON file that must hold one object (a manifest, a sidecar): anything else is one line naming it. Only a
    regular file of at most MAX_JSON_BYTES is read: a FIFO or a device (/dev/zero) is refused without a read."""
    path = Path(path)
    # Non-blocking: opening a FIFO waits for a writer otherwise; a regular file reads the same either way.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InputError(f"{path}: not a regular file; {fix}")
    with open(fd, "rb") as handle:
        raw = handle.read(MAX_JSON_BYTES + 1)
    if len(raw) > MAX_JSON_BYTES:
        raise InputError(f"{path}: over {MAX_JSON_BYTES >> 20} MiB, far more than any JSON file it could be; {fix}")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc}); {fix}") from exc
    except RecursionError as exc:
        raise InputError(f"{path}: JSON nested deeper than {sys.getrecursionlimit()} levels; {fix}") from exc
    if not isinstance(data, dict):
        raise InputError(f"{path}: holds a JSON {JSON_TYPES[type(data)]}, not an object; {fix}")
    return data


JSON_TYPES = {dict: "object", list: "list", str: "string", int: "number", float: "number", bool: "boolean",
              type(None): "null"}


def confinement_finding(directory: Path, name: Any) -> str | None:
    """Why `name`, a file an artifact's manifest names, is not a file of `directory` (None when it is): not a plain
    relative name, an absolute path, a `..`, or a symlink on the way that leads out (resolved and compared). Decided
    from the name and the links alone, so that nothing outside is ever opened."""
    if not isinstance(name, str) or name in ("", "."):
        return f"{name!r} is not a file name"
    pure = PurePosixPath(name)
    if pure.is_absolute():
        return f"{name} is an absolute path, outside the directory"
    if ".." in pure.parts:
        return f"{name} leads out of the directory ('..')"
    if str(pure) != name:                        # "./a", "a//b", "a/" would name one file by several spellings
        return f"{name!r} is not a plain relative file name ({str(pure)!r})"
    try:
        target = (directory / name).resolve()
        inside = target.is_relative_to(directory.resolve())
    except (OSError, RuntimeError) as exc:       # a symlink loop
        return f"{name} cannot be resolved ({exc})"
    return None if inside else f"{name} is a symlink leading out of the directory (to {target})"


def _entries(directory: Path, exempt: set[str]) -> Iterator[str]:
    """Every entry below `directory` that is not a directory (files, symlinks, FIFOs, ...) as a relative POSIX
    name; a symlinked directory is an entry (never followed); `exempt` names are skipped with all below them."""
    for root, dirs, names in os.walk(directory):
        base = Path(root).relative_to(directory)
        for name in list(dirs):
            relative = (base / name).as_posix()
            if relative in exempt or (Path(root) / name).is_symlink():
                dirs.remove(name)
                if relative not in exempt:
                    yield relative
        yield from (relative for relative in ((base / name).as_posix() for name in names) if relative not in exempt)


def listing_findings(directory: Path, files: Any, manifest: str, own: tuple[str, ...] = ()) -> list[str]:
    """The one rule for what an artifact directory holds (export, engine, ONNX LLM, bundle, and each one nested in
    a bundle): its manifest (the file `manifest` in it) lists its files as a non-empty object of name → sha256;
    every name stays inside the directory (`confinement_finding`); and the entries present are exactly those
    listed, beside the manifest and `own` (what the manifest vouches for otherwise: an engine's report, a nested
    export with its own manifest). Empty when it holds. Nothing listed is opened."""
    if not isinstance(files, dict) or not files:
        held = "empty" if isinstance(files, dict) else f"a JSON {type(files).__name__}"
        return [f"{manifest} lists no files (its 'files' is {held}, not an object of file name → sha256), so "
                "none could be checked"]
    findings = [finding for finding in (confinement_finding(directory, name) for name in files) if finding]
    findings += [f"{manifest} gives {name} no sha256" for name, digest in files.items() if not isinstance(digest, str)]
    if findings:
        return findings
    findings = [f"{name} is not a regular file" for name in files
                if (directory / name).exists() and not (directory / name).is_file()]
    unlisted = set(_entries(directory, {manifest, *own})) - set(files)
    return findings + [f"{name} is not listed in {manifest}" for name in sorted(unlisted)]


def file_findings(directory: Path, files: Any, sizes: dict[str, int], hashes: bool, manifest: str,
                  own: tuple[str, ...] = ()) -> list[str]:
    """What differs between `directory` and the files its manifest (`manifest`) records: first the listing rule
    (`listing_findings`: nothing listed is read unless it holds), then missing files, sizes (always), sha256 (with
    `hashes`). Empty when everything matches."""
    findings = listing_findings(directory, files, manifest, own)
    if findings:
        return findings
    for name, digest in files.items():
        path = directory / name
        if not path.is_file():
            findings.append(f"{name} is missing ({manifest} lists it)")
        elif name in sizes and path.stat().st_size != sizes[name]:
            findings.append(f"{name} is {path.stat().st_size} bytes, the manifest says {sizes[name]}")
        elif hashes and sha256_file(path) != digest:
            findings.append(f"{name} was altered (sha256 differs from {manifest})")
    return findings


def read_manifest_file(directory: Path, name: str, fix: str) -> dict[str, Any]:
    """An artifact's own manifest, the file `name` in `directory`: refused unread if it leads out of it."""
    finding = confinement_finding(directory, name)
    if finding:
        raise InputError(f"{directory}: {finding}; {fix}")
    return read_json_object(directory / name, fix)


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
    data = read_manifest_file(directory, MANIFEST, "re-export")
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
                                                                    verify_hashes, MANIFEST)
    if findings:
        raise InputError(f"{directory}: {findings[0]}; the export was changed after it was written: re-export or "
                         "restore it (`aot-export check` lists every difference)")
    return manifest


# Where `aot-export validate` records its last verdict in an artifact (an export's manifest, an engine's sidecar).
VALIDATION = "validation"


def failed_gates(extra: Any) -> list[str]:
    """The gates an artifact's recorded verdicts failed, each as a phrase: `calibrate`'s on its held-out video
    (extra.calibration.holdout) and `validate`'s last (extra.validation). Empty when none failed or none was
    recorded."""
    extra = extra if isinstance(extra, dict) else {}
    calibration = extra.get("calibration")
    holdout = calibration.get("holdout") if isinstance(calibration, dict) else None
    validation = extra.get(VALIDATION)
    failed = []
    if isinstance(holdout, dict) and holdout.get("passed") is False:
        failed.append(f"its calibration FAILED its fidelity gates on {holdout.get('name', 'its held-out video')}")
    if isinstance(validation, dict) and validation.get("passed") is False:
        checks = ", ".join(map(str, validation.get("failed", []))) or "its gates"
        failed.append(f"validate FAILED ({checks}) on {validation.get('video', 'its video')}")
    return failed


def refuse_failed_gates(where: str | os.PathLike, failures: list[str], allow_failed: bool) -> str | None:
    """An artifact whose recorded verdicts failed (`failed_gates`) is refused downstream unless `allow_failed`;
    then the warning to print is returned."""
    if not failures:
        return None
    message = f"{where}: {'; '.join(dict.fromkeys(failures))}"
    if not allow_failed:
        raise InputError(f"{message}; use one that passes (recalibrate with more clips or another precision, or the "
                         "fp32 export) or pass --allow-failed to use it anyway")
    return f"warning: {message}; used anyway (--allow-failed)"


def record_in_manifest(directory: str | os.PathLike, key: str, value: Any) -> Manifest:
    """`extra[key] = value` in an export's manifest, rewritten atomically: its files, and so the hashes it
    records, are untouched."""
    manifest = read_manifest(directory, verify_hashes=False)
    updated = dataclasses.replace(manifest, extra={**manifest.extra, key: value})
    updated.write(directory)
    return updated
