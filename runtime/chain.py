"""Validation of the whole chain: the deployed pipeline (exported vision graph + quantized LLM) against the PyTorch
reference (the Hugging Face model with its own attention, `AOTReducer`, the fp32 LLM) on the same frames and
prompt, with the same reduction.

Figures: the vision figures of `validate_export`; the first generated token's logits — KL(reference ‖ deployed)
and top-1 agreement; teacher-forced top-1 agreement over the reference's N greedy tokens (each step sees the same
prefix); and the free-running greedy match (the share of the reference's N tokens the deployed chain reproduces
before it first diverges).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from aot_export.manifest import read_manifest
from aot_export.report import format_table

from .llm import TransformersDecoder, load_llm
from .positions import assemble_for
from .validate import ValidationReport, reference_model, validate_export

DEFAULT_PROMPT = "What is happening in this video?"


@dataclass(frozen=True)
class ChainGates:
    max_first_token_kl: float
    min_first_token_top1: float
    min_teacher_forced_top1: float


# By the deployed LLM's precision: fp32 reproduces the reference; quantized weights move the logits a little.
CHAIN_GATES = {
    "fp32": ChainGates(1e-6, 1.0, 1.0),
    "int8": ChainGates(0.05, 1.0, 0.9),
    "int4": ChainGates(0.1, 1.0, 0.8),
}


def softmax64(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max()
    weights = np.exp(shifted)
    return weights / weights.sum()


def kl_divergence(reference_logits: np.ndarray, logits: np.ndarray) -> float:
    p, q = softmax64(reference_logits), softmax64(logits)
    return float(np.sum(p * (np.log(np.maximum(p, 1e-300)) - np.log(np.maximum(q, 1e-300)))))


@dataclass
class ChainReport:
    vision: ValidationReport
    llm: str
    precision: str
    gates: ChainGates
    metrics: dict[str, float] = field(default_factory=dict)
    reference_text: str = ""
    deployed_text: str = ""

    @property
    def checks(self) -> dict[str, bool]:
        m, g = self.metrics, self.gates
        return {"first_token_kl": m["first_token_kl"] <= g.max_first_token_kl,
                "first_token_top1": m["first_token_top1"] >= g.min_first_token_top1,
                "teacher_forced_top1": m["teacher_forced_top1"] >= g.min_teacher_forced_top1}

    @property
    def passed(self) -> bool:
        return self.vision.passed and all(self.checks.values())

    def to_dict(self) -> dict:
        return {"vision": self.vision.to_dict(), "llm": self.llm, "precision": self.precision,
                "gates": self.gates.__dict__, "metrics": self.metrics, "checks": self.checks, "passed": self.passed,
                "reference_text": self.reference_text, "deployed_text": self.deployed_text}

    def table(self) -> str:

        m, g, c = self.metrics, self.gates, self.checks
        rows = [("first-token KL(ref‖deployed)", f"{m['first_token_kl']:.3g}", f"<= {g.max_first_token_kl:g}",
                 _ok(c["first_token_kl"])),
                ("first-token top-1 agreement", f"{m['first_token_top1']:.0%}", f">= {g.min_first_token_top1:.0%}",
                 _ok(c["first_token_top1"])),
                (f"teacher-forced top-1 over {int(m['tokens'])}", f"{m['teacher_forced_top1']:.0%}",
                 f">= {g.min_teacher_forced_top1:.0%}", _ok(c["teacher_forced_top1"])),
                ("free-running greedy match", f"{m['greedy_match']:.0%}", "", "")]
        return (self.vision.table() + f"\n\nLLM: {self.llm} against the fp32 reference LLM\n"
                + format_table(rows, ("metric", "value", "gate", "")) + f"\n\n{'PASS' if self.passed else 'FAIL'}")


def _ok(value: bool) -> str:
    return "ok" if value else "FAIL"


def llm_precision(name: str) -> str:
    return {"transformers-fp32": "fp32", "transformers-int8": "int8"}.get(name, name.replace("onnx-", ""))


def validate_chain(directory: str | os.PathLike, video: str | os.PathLike, llm: str, prompt: str = DEFAULT_PROMPT,
                   tokens: int = 16, model: str | None = None, device: str = "auto",
                   progress: bool = True) -> ChainReport:
    directory = Path(directory)
    manifest = read_manifest(directory)
    adapter = reference_model(manifest, model)
    vision = validate_export(directory, video, model=adapter, device=device, progress=progress)
    # Each side's prompt from its own tokens and index (3-D positions where the family has them).
    (reference_inputs, reference_kwargs), (deployed_inputs, deployed_kwargs) = (
        assemble_for(adapter, prompt, *(torch.from_numpy(np.asarray(vision.outputs[side][name]))
                                        for name in ("tokens", "index")))
        for side in ("reference", "export"))
    reference = TransformersDecoder(adapter).generate(reference_inputs.embeds, tokens, **reference_kwargs)
    backend = load_llm(llm, adapter)
    forced = backend.generate(deployed_inputs.embeds, len(reference.tokens), forced=reference.tokens,
                              **deployed_kwargs)
    free = backend.generate(deployed_inputs.embeds, len(reference.tokens), **deployed_kwargs)
    agree = [int(np.argmax(d)) == t for d, t in zip(forced.step_logits, reference.tokens)]
    diverged = next((i for i, (a, b) in enumerate(zip(free.tokens, reference.tokens)) if a != b), len(free.tokens))
    metrics = {"first_token_kl": kl_divergence(reference.step_logits[0], forced.step_logits[0]),
               "first_token_top1": float(agree[0]), "teacher_forced_top1": float(np.mean(agree)),
               "greedy_match": diverged / len(reference.tokens), "tokens": float(len(reference.tokens))}
    precision = llm_precision(backend.name)
    return ChainReport(vision, backend.name, precision, CHAIN_GATES[precision], metrics,
                       adapter.tokenizer.decode(reference.tokens), adapter.tokenizer.decode(free.tokens))
