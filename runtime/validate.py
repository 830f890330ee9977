"""`aot-export validate DIR --video PATH`: does the exported graph compute what the PyTorch reference computes?

The same decoded, preprocessed frames go through the exported graph (ONNX Runtime: CUDA when available, else CPU,
via Polygraphy's runner) and through the reference: the Hugging Face model with its own eager attention, the
projector and `AOTReducer` in PyTorch. Tolerances are checked by Polygraphy's comparator (max abs on `tokens`,
exact `index`), token cosine is gated on top.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from aot_export.adapters import ModelAdapter, load_model
from aot_export.config import AOTConfig
from aot_export.errors import InputError
from aot_export.fidelity import compare_tokens
from aot_export.manifest import Manifest, read_manifest
from aot_export.preprocess import preprocess_frames
from aot_export.progress import Stages
from aot_export.report import format_table

from aot_export.video import decode_frames


@dataclass(frozen=True)
class Gates:
    """Lower bounds on `aot_export.fidelity.compare_tokens` figures, and Polygraphy's absolute tolerance on
    `tokens` as a share of the reference's largest |value| (token scale differs by model; None: not gated)."""

    floors: dict[str, float]
    max_abs: float | None = None


# By the precision the graph computes in. fp32 must reproduce the reference to rounding, position by position;
# reduced precision may flip near-tied cells, so it is held to the cells it shares with the reference.
GATES = {
    "fp32": Gates({"cosine_min": 0.99999, "index_agreement": 1.0}, max_abs=1e-3),
    "fp16": Gates({"matched_cosine_min": 0.999, "anchor_agreement": 0.95}),
    "int8": Gates({"matched_cosine_min": 0.995, "anchor_agreement": 0.98}),
    "fp8": Gates({"matched_cosine_min": 0.995, "anchor_agreement": 0.98}),
}


@dataclass
class ValidationReport:
    directory: str
    video: str
    provider: str
    precision: str
    gates: Gates
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    # Both runs' outputs, for whoever continues from them (the LLM chain); not part of the report.
    outputs: dict[str, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)

    @property
    def checks(self) -> dict[str, bool]:
        checks = {name: self.metrics[name] >= floor for name, floor in self.gates.floors.items()}
        if self.gates.max_abs is not None:
            checks["max_abs"] = bool(self.metrics["polygraphy_tokens_pass"])
        return checks

    @property
    def passed(self) -> bool:
        return all(self.checks.values())

    def to_dict(self) -> dict:
        return {"directory": self.directory, "video": self.video, "provider": self.provider,
                "precision": self.precision, "gates": {**self.gates.floors, "max_abs": self.gates.max_abs},
                "metrics": self.metrics, "checks": self.checks, "passed": self.passed, "seconds": self.seconds}

    def table(self) -> str:

        m, checks = self.metrics, self.checks
        gate = {**{k: f">= {v:g}" for k, v in self.gates.floors.items()},
                **({"max_abs": f"<= {self.gates.max_abs:g} × max|ref| = {m['max_abs_tolerance']:.3g}"}
                   if self.gates.max_abs is not None else {})}
        rows = [(name, f"{m[name]:.8f}" if "cosine" in name else f"{m[name]:.6g}", gate.get(name, ""),
                 ("ok" if checks[name] else "FAIL") if name in checks else "")
                for name in ("cosine_min", "cosine_mean", "max_abs", "index_agreement", "cell_agreement",
                             "anchor_agreement",
                             "matched_cosine_min", "matched_cosine_mean", "tokens")]
        head = f"{self.video} through {self.directory} ({self.precision}, ONNX Runtime {self.provider})"
        return head + "\n" + format_table(rows, ("metric", "value", "gate", "")) + \
            f"\n\n{'PASS' if self.passed else 'FAIL'}"


def compare_outputs(cfg: AOTConfig, reference: dict[str, np.ndarray], actual: dict[str, np.ndarray],
                    gates: Gates) -> dict[str, float]:
    """`aot_export.fidelity.compare_tokens`, plus Polygraphy's verdict on the absolute tolerance of `tokens`
    and the exactness of `index`."""
    from polygraphy.comparator import IterationResult, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    if reference["tokens"].shape != actual["tokens"].shape or reference["index"].shape != actual["index"].shape:
        raise InputError(f"output shapes {actual['tokens'].shape} differ from the reference's "
                         f"{reference['tokens'].shape}; the export does not belong to this model/config: re-export")
    metrics = compare_tokens(cfg, reference["tokens"], reference["index"], actual["tokens"], actual["index"])
    scale = float(np.abs(reference["tokens"]).max())
    atol = gates.max_abs * scale if gates.max_abs is not None else float("inf")
    compare = SimpleCompareFunc(atol={"tokens": atol, "index": 0}, rtol={"tokens": 0.0, "index": 0.0},
                                check_error_stat="max")
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL), np.errstate(divide="ignore", invalid="ignore"):
        verdict = compare(IterationResult(reference, runner_name="reference"),
                          IterationResult(actual, runner_name="export"))
    return {**metrics, "mean_abs": float(verdict["tokens"].mean_absdiff), "max_abs_tolerance": atol,
            "polygraphy_tokens_pass": float(bool(verdict["tokens"])),
            "polygraphy_index_pass": float(bool(verdict["index"]))}


def onnxruntime_providers(device: str = "auto") -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda" and "CUDAExecutionProvider" not in available:
        raise InputError("--device cuda: ONNX Runtime has no CUDA provider here; install onnxruntime-gpu or use "
                         "--device cpu")
    return (["CUDAExecutionProvider", "CPUExecutionProvider"] if "CUDAExecutionProvider" in available
            else ["CPUExecutionProvider"])


def run_onnxruntime(graph: Path, feeds: dict[str, np.ndarray], providers: list[str]) -> dict[str, np.ndarray]:
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.logger import G_LOGGER

    with G_LOGGER.verbosity(G_LOGGER.ERROR), OnnxrtRunner(SessionFromOnnx(str(graph), providers=providers)) as runner:
        return dict(runner.infer(feeds))


def reference_model(manifest: Manifest, model: str | ModelAdapter | None) -> ModelAdapter:
    """The model the export came from (or `model`), refused if its config is not the one exported."""
    adapter = model if isinstance(model, ModelAdapter) else load_model(model or manifest.model["model_id"])
    if adapter.info.config_hash != manifest.model["config_hash"]:
        raise InputError(f"model {adapter.info.model_id} (config {adapter.info.config_hash}) is not the one "
                         f"exported (config {manifest.model['config_hash']}); pass --model with the exported "
                         "checkpoint")
    return adapter


def validate_export(directory: str | os.PathLike, video: str | os.PathLike, model: str | ModelAdapter | None = None,
                    device: str = "auto", progress: bool = True) -> ValidationReport:
    directory = Path(directory)
    manifest = read_manifest(directory)
    stages = Stages(["decode + preprocess", "exported graph", "reference", "compare"], progress)
    with stages.step():
        frames = decode_frames(video, manifest.video_frames)
        pixels = preprocess_frames(frames, manifest.preprocessing)
    with stages.step():
        providers = onnxruntime_providers(device)
        actual = run_onnxruntime(directory / manifest.graph, {manifest.inputs[0].name: pixels}, providers)
    with stages.step():
        adapter = reference_model(manifest, model)
        tokens, index = adapter.reference(manifest.aot, torch.from_numpy(pixels))
        reference = {"tokens": tokens.numpy(), "index": index.numpy()}
    gates = GATES[manifest.precision]
    with stages.step():
        metrics = compare_outputs(manifest.aot, reference, actual, gates)
    stages.close()
    return ValidationReport(str(directory), Path(video).name, providers[0].replace("ExecutionProvider", ""),
                            manifest.precision, gates, metrics, stages.seconds,
                            {"reference": reference, "export": actual})
