"""`aot-export validate DIR --video PATH [--backend torch|onnxruntime|tensorrt]`: does the deployed artifact
compute what the PyTorch reference computes?

DIR is an export directory (default backend: ONNX Runtime, CUDA when available) or an engine directory (default:
TensorRT; checked against its export and this machine first). The same decoded, preprocessed frames go through the
backend's runner and through the reference runner (the Hugging Face model with its own eager attention, the
projector and `AOTReducer` in PyTorch), are compared by `aot_export.fidelity.compare_outputs` and gated by
`aot_export.fidelity.VISION_GATES` for the precision the artifact computes in; for a reduced precision the anchor
floor is lowered to what the reference keeps of its own anchors under sub-pixel input noise on this video where
that is lower (`aot_export.fidelity.input_noise_floor`, `NoiseFloor.gates`). `--backend torch` runs the
reference against itself (a determinism check of the reference, not of an export).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aot_export.adapters import ModelAdapter
from aot_export.artifacts import sha256_file
from aot_export.errors import InputError
from aot_export.manifest import MANIFEST, VALIDATION, read_manifest, record_in_manifest
from aot_export.fidelity import NOISE_DRAWS, VISION_GATES, Gates, NoiseFloor, compare_outputs, gate_checks, \
    input_noise_floor
from aot_export.preprocess import preprocess_frames
from aot_export.progress import Stages
from aot_export.reference_runner import TorchReferenceRunner
from aot_export.report import format_table
from aot_export.video import decode_frames

from engines.sidecar import SIDECAR, record_in_sidecar

from .device.bundle import BUNDLE
from .vision import Artifact, model_adapter, open_runner, resolve_artifact

ROWS = ("cosine_min", "cosine_mean", "max_abs", "index_agreement", "cell_agreement", "anchor_agreement",
        "arithmetic_cosine_min", "arithmetic_cosine_mean", "arithmetic_tokens", "matched_cosine_min",
        "matched_cosine_mean", "tokens")


@dataclass
class ValidationReport:
    directory: str
    video: str
    backend: str                       # the runner's name, e.g. onnxruntime-cpu, tensorrt_rtx, torch-reference
    precision: str
    gates: Gates
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    runner: dict[str, Any] = field(default_factory=dict)      # the runner's settings
    # Both runs' outputs, for whoever continues from them (the LLM chain); not part of the report.
    outputs: dict[str, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)
    # `gates` is what the run was held to: the precision's fixed gates (`fixed_gates`), the anchor floor lowered
    # to the noise floor measured on this video where that is lower (`noise_floor`; None: not measured).
    fixed_gates: Gates | None = None
    noise_floor: NoiseFloor | None = None

    @property
    def checks(self) -> dict[str, bool]:
        return gate_checks(self.metrics, self.gates)

    @property
    def passed(self) -> bool:
        return all(self.checks.values())

    def to_dict(self) -> dict:
        return {"directory": self.directory, "video": self.video, "backend": self.backend, "runner": self.runner,
                "precision": self.precision, "gates": self.gates.to_dict(), "metrics": self.metrics,
                "checks": self.checks, "passed": self.passed, "seconds": self.seconds, **self._floor()}

    def _floor(self) -> dict:
        fixed = self.fixed_gates or self.gates
        return {"fixed_gates": fixed.to_dict(), "noise_floor": self.noise_floor and self.noise_floor.to_dict(fixed)}

    def verdict(self, video_sha256: str) -> dict:
        """What the artifact records of this run (`aot_export.manifest.failed_gates` reads it back)."""
        return {"video": self.video, "video_sha256": video_sha256, "backend": self.backend,
                "precision": self.precision, "gates": self.gates.to_dict(), "metrics": self.metrics,
                "failed": [name for name, ok in self.checks.items() if not ok], "passed": self.passed,
                **self._floor()}

    def table(self) -> str:
        m, checks = self.metrics, self.checks
        gate = {name: self.gates.describe(name) for name in ROWS}
        if self.gates.max_abs is not None:
            gate["max_abs"] += f" = {m['max_abs_tolerance']:.3g}"
        rows = [(name, f"{m[name]:.8f}" if "cosine" in name else f"{m[name]:.6g}", gate[name],
                 ("ok" if checks[name] else "FAIL") if name in checks else "") for name in ROWS]
        head = f"{self.video} through {self.directory} ({self.precision}, {self.backend})"
        floor = f"\n{self.noise_floor.describe(self.fixed_gates or self.gates)}" if self.noise_floor else ""
        return head + "\n" + format_table(rows, ("metric", "value", "gate", "")) + floor + \
            f"\n\n{'PASS' if self.passed else 'FAIL'}"


def validate_export(directory: str | os.PathLike, video: str | os.PathLike, model: str | ModelAdapter | None = None,
                    device: str = "auto", progress: bool = True, backend: str | None = None,
                    export: str | os.PathLike | None = None, noise_draws: int = NOISE_DRAWS, *,
                    verify_hashes: bool = True) -> ValidationReport:
    """`directory` (export or engine dir; `export`: the export an engine dir is checked against) on `backend`
    against the reference model (`model`, default: the one the manifest names); `noise_draws`: runs of the
    reference under sub-pixel input noise that ground a reduced precision's anchor gate (0: the fixed gate; fp32
    has none); `verify_hashes`: the artifacts' sha256 checked on load (sizes always)."""
    artifact = resolve_artifact(directory, export, verify_hashes=verify_hashes)
    if artifact.manifest is None:
        read_manifest(directory, verify_hashes=verify_hashes)     # refuses it, saying what an export directory is
    manifest = artifact.manifest
    verdict_file = check_verdict_destination(artifact)
    adapter = model_adapter(artifact, model)
    runner = open_runner(artifact, backend, device, adapter, verify_hashes=verify_hashes)   # refusals before decoding
    precision = runner.settings.get("precision", manifest.precision)      # an engine's own precision
    fixed_gates = VISION_GATES[precision]
    draws = noise_draws if "anchor_agreement" in fixed_gates.floors else 0
    stages = Stages(["decode + preprocess", "deployed", "reference", *(["noise floor"] if draws else []), "compare"],
                    progress)
    with stages.step():
        pixels = preprocess_frames(decode_frames(video, manifest.video_frames), manifest.preprocessing)
    with stages.step(), runner:
        actual = runner.run(pixels)
    with TorchReferenceRunner(adapter, manifest.aot) as reference_runner:
        with stages.step():
            reference = reference_runner.run(pixels)
        noise = None
        if draws:
            with stages.step():
                noise = input_noise_floor(reference_runner, pixels, reference, manifest, draws)
    gates = noise.gates(fixed_gates) if noise else fixed_gates
    with stages.step():
        metrics = compare_outputs(manifest.aot, reference, actual, gates)
    stages.close()
    report = ValidationReport(str(directory), Path(video).name, runner.name, precision, gates, metrics,
                              stages.seconds, runner.settings, {"reference": reference, "export": actual},
                              fixed_gates, noise)
    # The reference run against itself (--backend torch) judges no artifact: nothing to record.
    if runner.backend != "torch":
        record = record_in_sidecar if verdict_file.name == SIDECAR else record_in_manifest
        record(verdict_file.parent, VALIDATION, report.verdict(sha256_file(video)))
    return report


def check_verdict_destination(artifact: Artifact) -> Path:
    """The file the verdict goes to (as calibrate's does: an export's manifest, an engine's sidecar), refused
    before the work where it cannot be rewritten — a verdict that cannot travel with the artifact is no gate."""
    path = Path(artifact.path) / (SIDECAR if artifact.kind == "engine" else MANIFEST)
    if (path.parent.parent / BUNDLE).is_file():
        raise InputError(f"{path.parent} is the vision part of the bundle {path.parent.parent}, which a verdict "
                         "written into it would break; validate the export or engine it was made from")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise InputError(f"{path.parent} is not writable, and validate records its verdict in {path.name} there; "
                         "validate a writable copy of it")
    return path
