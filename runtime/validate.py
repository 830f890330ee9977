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
from aot_export.errors import InputError
from aot_export.manifest import Manifest, read_manifest
from aot_export.preprocess import preprocess_frames
from aot_export.progress import Stages

from .video import decode_frames


@dataclass(frozen=True)
class Gates:
    cosine_min: float
    index_agreement: float
    max_abs: float            # Polygraphy's absolute tolerance on tokens (rtol 0)


# By the precision the graph computes in; fp32 must reproduce the reference to rounding.
GATES = {
    "fp32": Gates(cosine_min=0.99999, index_agreement=1.0, max_abs=1e-4),
    "fp16": Gates(cosine_min=0.999, index_agreement=0.99, max_abs=float("inf")),
    "int8": Gates(cosine_min=0.995, index_agreement=0.98, max_abs=float("inf")),
    "fp8": Gates(cosine_min=0.995, index_agreement=0.98, max_abs=float("inf")),
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

    @property
    def checks(self) -> dict[str, bool]:
        m, g = self.metrics, self.gates
        return {"cosine_min": m["cosine_min"] >= g.cosine_min,
                "index_agreement": m["index_agreement"] >= g.index_agreement,
                "max_abs": bool(m["polygraphy_tokens_pass"]) or g.max_abs == float("inf")}

    @property
    def passed(self) -> bool:
        return all(self.checks.values())

    def to_dict(self) -> dict:
        return {"directory": self.directory, "video": self.video, "provider": self.provider,
                "precision": self.precision, "gates": self.gates.__dict__, "metrics": self.metrics,
                "checks": self.checks, "passed": self.passed, "seconds": self.seconds}

    def table(self) -> str:
        from aot_export.cli import format_table

        m, g, checks = self.metrics, self.gates, self.checks
        rows = [("token cosine min", f"{m['cosine_min']:.8f}", f">= {g.cosine_min}", _verdict(checks["cosine_min"])),
                ("token cosine mean", f"{m['cosine_mean']:.8f}", "", ""),
                ("max abs error", m["max_abs"], f"<= {g.max_abs:g}" if g.max_abs != float("inf") else "",
                 _verdict(checks["max_abs"])),
                ("index agreement", m["index_agreement"], f">= {g.index_agreement:.0%}",
                 _verdict(checks["index_agreement"])),
                ("tokens", int(m["tokens"]), "", "")]
        head = f"{self.video} through {self.directory} ({self.precision}, ONNX Runtime {self.provider})"
        return head + "\n" + format_table(rows, ("metric", "value", "gate", "")) + \
            f"\n\n{'PASS' if self.passed else 'FAIL'}"


def _verdict(ok: bool) -> str:
    return "ok" if ok else "FAIL"


def compare_outputs(reference: dict[str, np.ndarray], actual: dict[str, np.ndarray], gates: Gates) -> dict[str, float]:
    """Token cosine (min, mean), max abs error, index agreement, and Polygraphy's tolerance verdict."""
    from polygraphy.comparator import IterationResult, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    ref_tokens, tokens = reference["tokens"].astype(np.float64), actual["tokens"].astype(np.float64)
    if ref_tokens.shape != tokens.shape or reference["index"].shape != actual["index"].shape:
        raise InputError(f"output shapes differ from the reference: tokens {tokens.shape} vs {ref_tokens.shape}; "
                         "the export does not belong to this model/config: re-export")
    norms = np.linalg.norm(ref_tokens, axis=-1) * np.linalg.norm(tokens, axis=-1)
    cosine = (ref_tokens * tokens).sum(-1) / np.maximum(norms, 1e-30)
    compare = SimpleCompareFunc(atol={"tokens": gates.max_abs if np.isfinite(gates.max_abs) else 1e30, "index": 0},
                                rtol={"tokens": 0.0, "index": 0.0}, check_error_stat="max")
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL), np.errstate(divide="ignore", invalid="ignore"):
        verdict = compare(IterationResult(reference, runner_name="reference"),
                          IterationResult(actual, runner_name="export"))
    return {"cosine_min": float(cosine.min()), "cosine_mean": float(cosine.mean()),
            "max_abs": float(verdict["tokens"].max_absdiff), "mean_abs": float(verdict["tokens"].mean_absdiff),
            "index_agreement": float((reference["index"] == actual["index"]).all(-1).mean()),
            "polygraphy_tokens_pass": float(bool(verdict["tokens"])),
            "polygraphy_index_pass": float(bool(verdict["index"])), "tokens": float(tokens.shape[0])}


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
        frames = decode_frames(video, manifest.aot.frames)
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
        metrics = compare_outputs(reference, actual, gates)
    stages.close()
    return ValidationReport(str(directory), Path(video).name, providers[0].replace("ExecutionProvider", ""),
                            manifest.precision, gates, metrics, stages.seconds)
