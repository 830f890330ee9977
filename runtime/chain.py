"""Validation of the whole chain: the deployed pipeline (exported vision graph + quantized LLM) against the PyTorch
reference (the Hugging Face model with its own attention, `AOTReducer`, the fp32 LLM) on the same frames and
prompt, with the same reduction.

Figures: the vision figures of `validate_export`; the first generated token's logits — KL(reference ‖ deployed)
and top-1 agreement; teacher-forced top-1 agreement over the reference's N greedy tokens (each step sees the same
prefix), counted only where the reference's choice is decidable (`top1_agreement`); and the free-running greedy
match (the share of the reference's N tokens the deployed chain reproduces before it first diverges). Gates:
`aot_export.fidelity.CHAIN_GATES` by the LLM's precision.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from aot_export.fidelity import CHAIN_GATES, Gates, gate_checks
from aot_export.report import format_table

from .llm import TransformersDecoder, load_llm
from .prompt import assemble
from .validate import ValidationReport, validate_export
from .vision import model_adapter, resolve_artifact

DEFAULT_PROMPT = "What is happening in this video?"


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
    gates: Gates
    metrics: dict[str, float] = field(default_factory=dict)
    reference_text: str = ""
    deployed_text: str = ""

    @property
    def checks(self) -> dict[str, bool]:
        return gate_checks(self.metrics, self.gates)

    @property
    def passed(self) -> bool:
        return self.vision.passed and all(self.checks.values())

    def to_dict(self) -> dict:
        return {"vision": self.vision.to_dict(), "llm": self.llm, "precision": self.precision,
                "gates": self.gates.to_dict(), "metrics": self.metrics, "checks": self.checks, "passed": self.passed,
                "reference_text": self.reference_text, "deployed_text": self.deployed_text}

    def table(self) -> str:

        m, g, c = self.metrics, self.gates, self.checks
        n = int(m["tokens"])
        rows = [("first-token KL(ref‖deployed)", f"{m['first_token_kl']:.3g}", g.describe("first_token_kl"),
                 _ok(c["first_token_kl"])),
                ("first-token top-1 (decidable: "
                 f"{'yes' if m['first_token_decidable'] else 'no'})", f"{m['first_token_top1']:.0%}",
                 g.describe("first_token_top1"), _ok(c["first_token_top1"])),
                (f"teacher-forced top-1 over {n} ({int(m['decidable_positions'])} decidable)",
                 f"{m['teacher_forced_top1']:.0%}", g.describe("teacher_forced_top1"), _ok(c["teacher_forced_top1"])),
                ("teacher-forced top-1, every position", f"{m['teacher_forced_top1_all']:.0%}", "", ""),
                ("decidable margin (2 × median max|Δlogit|)", f"{m['decidable_margin']:.3g}", "", ""),
                ("free-running greedy match", f"{m['greedy_match']:.0%}", "", "")]
        return (self.vision.table() + f"\n\nLLM: {self.llm} against the fp32 reference LLM\n"
                + format_table(rows, ("metric", "value", "gate", "")) + f"\n\n{'PASS' if self.passed else 'FAIL'}")


def _ok(value: bool) -> str:
    return "ok" if value else "FAIL"


def top1_agreement(reference_logits: list[np.ndarray], logits: list[np.ndarray]) -> dict[str, float]:
    """Teacher-forced top-1 agreement that counts a disagreement only where the reference's choice is decidable.

    Per position i: the deployed error e_i = max |logit_deployed - logit_reference| over the vocabulary, and the
    reference's margin m_i = top-1 logit - runner-up logit. Errors of size e move the gap between two logits by at
    most 2e, so the chain's typical error ē = median_i e_i can flip a top-1 only where m_i <= 2ē. Position i is
    decidable when m_i > 2ē; a disagreement there is counted (it took an error larger than the chain's typical
    one), elsewhere it is not (the reference's two best tokens are within the deployed noise, as with the random
    tiny model). ē is the median, not e_i itself: with e_i the rule could never count a disagreement (m_i > 2e_i
    implies the same top-1). `teacher_forced_top1` / `first_token_top1`: the share of positions not contradicted
    (agreeing, or undecidable); `teacher_forced_top1_all`: agreement at every position, for the record."""
    reference, deployed = np.stack(reference_logits).astype(np.float64), np.stack(logits).astype(np.float64)
    errors = np.abs(deployed - reference).max(-1)
    top2 = np.sort(reference, axis=-1)[:, -2:]
    margin_bound = 2.0 * float(np.median(errors))
    decidable = (top2[:, 1] - top2[:, 0]) > margin_bound
    agree = deployed.argmax(-1) == reference.argmax(-1)
    counted = decidable & ~agree
    return {"first_token_top1": float(not counted[0]), "first_token_decidable": float(decidable[0]),
            "teacher_forced_top1": float(1.0 - counted.mean()), "teacher_forced_top1_all": float(agree.mean()),
            "decidable_positions": float(decidable.sum()), "decidable_margin": margin_bound,
            "max_logit_error": float(errors.max())}


def llm_precision(name: str) -> str:
    return {"transformers-fp32": "fp32", "transformers-int8": "int8"}.get(name, name.replace("onnx-", ""))


def validate_chain(directory: str | os.PathLike, video: str | os.PathLike, llm: str, prompt: str = DEFAULT_PROMPT,
                   tokens: int = 16, model: str | None = None, device: str = "auto",
                   progress: bool = True, backend: str | None = None,
                   export: str | os.PathLike | None = None, *, verify_hashes: bool = True) -> ChainReport:
    artifact = resolve_artifact(directory, export, verify_hashes=verify_hashes)
    adapter = model_adapter(artifact, model)
    vision = validate_export(directory, video, model=adapter, device=device, progress=progress, backend=backend,
                             export=export, verify_hashes=verify_hashes)
    # Each side's prompt from its own tokens and index (3-D positions where the family has them).
    reference_inputs, deployed_inputs = (
        assemble(adapter, prompt, *(torch.from_numpy(np.asarray(vision.outputs[side][name]))
                                    for name in ("tokens", "index")), artifact.manifest.aot.frames)
        for side in ("reference", "export"))
    reference = TransformersDecoder(adapter).generate(reference_inputs.embeds, tokens,
                                                      **reference_inputs.generate_kwargs)
    deployed_llm = load_llm(llm, adapter, verify_hashes=verify_hashes)
    forced = deployed_llm.generate(deployed_inputs.embeds, len(reference.tokens), forced=reference.tokens,
                                   **deployed_inputs.generate_kwargs)
    free = deployed_llm.generate(deployed_inputs.embeds, len(reference.tokens), **deployed_inputs.generate_kwargs)
    diverged = next((i for i, (a, b) in enumerate(zip(free.tokens, reference.tokens)) if a != b), len(free.tokens))
    metrics = {"first_token_kl": kl_divergence(reference.step_logits[0], forced.step_logits[0]),
               **top1_agreement(reference.step_logits, forced.step_logits),
               "greedy_match": diverged / len(reference.tokens), "tokens": float(len(reference.tokens))}
    precision = llm_precision(deployed_llm.name)
    return ChainReport(vision, deployed_llm.name, precision, CHAIN_GATES[precision], metrics,
                       adapter.tokenizer.decode(reference.tokens), adapter.tokenizer.decode(free.tokens))
