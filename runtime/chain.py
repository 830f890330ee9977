"""Validation of the whole chain: the deployed pipeline (exported vision graph + quantized LLM) against the PyTorch
reference (the Hugging Face model with its own attention, `AOTReducer`, the fp32 LLM) on the same frames and
prompt, with the same reduction.

Figures (`compare_generations`): the vision figures of `validate_export`; the first generated token's logits —
KL(reference ‖ deployed) and top-1 agreement; teacher-forced top-1 agreement over the reference's greedy answer
(each step sees the same prefix) at the positions the reference itself decides (`top1_agreement`); and the
free-running greedy match (the share of the reference's answer the deployed chain reproduces before it first
diverges). The answer ends at the reference's end-of-sequence token, included: nothing after it is compared
(`through_eos`). Gates: `aot_export.fidelity.CHAIN_GATES` by the LLM's precision.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from aot_export.fidelity import CHAIN_GATES, NOISE_DRAWS, Gates, gate_checks
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
        n, eos = int(m["tokens"]), " (through end-of-sequence)" if m["ends_at_eos"] else ""
        rows = [("first-token KL(ref‖deployed)", f"{m['first_token_kl']:.3g}", g.describe("first_token_kl"),
                 _ok(c["first_token_kl"])),
                (f"first-token top-1 (ref margin {m['first_token_margin']:.3g}: "
                 f"{'decidable' if m['first_token_decidable'] else 'not decidable'})", f"{m['first_token_top1']:.0%}",
                 g.describe("first_token_top1"), _ok(c["first_token_top1"])),
                (f"teacher-forced top-1 at the {int(m['decidable_positions'])} decidable of {n}{eos}",
                 f"{m['teacher_forced_top1']:.0%}", g.describe("teacher_forced_top1"), _ok(c["teacher_forced_top1"])),
                ("teacher-forced top-1, every position", f"{m['teacher_forced_top1_all']:.0%}", "", ""),
                ("decidable: ref top-1 − runner-up logit >=", f"{m['decidable_margin']:.3g} nat", "", ""),
                ("free-running greedy match", f"{m['greedy_match']:.0%}", "", "")]
        return (self.vision.table() + f"\n\nLLM: {self.llm} against the fp32 reference LLM\n"
                + format_table(rows, ("metric", "value", "gate", "")) + f"\n\n{'PASS' if self.passed else 'FAIL'}")


def _ok(value: bool) -> str:
    return "ok" if value else "FAIL"


def through_eos(tokens: list[int], eos: int | None) -> list[int]:
    """`tokens` up to and including the first `eos` (all of them where there is none): the answer ends there, and
    what a decoder would produce after it is no part of it."""
    return list(tokens[:tokens.index(eos) + 1]) if eos is not None and eos in tokens else list(tokens)


def top1_agreement(reference_logits: list[np.ndarray], logits: list[np.ndarray],
                   decidable_margin: float) -> dict[str, float]:
    """Teacher-forced top-1 agreement at the positions where the reference decides its top-1.

    Position i is decidable when the reference's own margin m_i = top-1 logit − runner-up logit (the log-odds
    between its two best tokens) is at least `decidable_margin` (per LLM precision, CHAIN_GATES, where the bound
    is argued). The bound never depends on the deployed logits: a rule that grew with the deployed error excused
    exactly the disagreements a larger error causes. `teacher_forced_top1`: agreement over the decidable positions
    (1.0 where none is: nothing contradicts; `decidable_positions` says how many held it); `first_token_top1`:
    the first position's agreement, 1.0 where it is not decidable; `teacher_forced_top1_all`: agreement at every
    position, for the record."""
    reference, deployed = np.stack(reference_logits).astype(np.float64), np.stack(logits).astype(np.float64)
    top2 = np.sort(reference, axis=-1)[:, -2:]
    margins = top2[:, 1] - top2[:, 0]
    decidable = margins >= decidable_margin
    agree = deployed.argmax(-1) == reference.argmax(-1)
    return {"first_token_top1": float(agree[0] or not decidable[0]), "first_token_decidable": float(decidable[0]),
            "first_token_margin": float(margins[0]),
            "teacher_forced_top1": float(agree[decidable].mean()) if decidable.any() else 1.0,
            "teacher_forced_top1_all": float(agree.mean()), "decidable_positions": float(decidable.sum()),
            "decidable_margin": float(decidable_margin),
            "max_logit_error": float(np.abs(deployed - reference).max())}


def greedy_match(reference_tokens: list[int], tokens: list[int], eos: int | None) -> float:
    """The share of the reference's answer (through its end-of-sequence) that a free-running decoder's answer
    (through its own) reproduces before the two first differ."""
    reference, free = through_eos(reference_tokens, eos), through_eos(tokens, eos)
    diverged = next((i for i, (a, b) in enumerate(zip(free, reference)) if a != b), min(len(free), len(reference)))
    return diverged / len(reference)


def compare_generations(reference_tokens: list[int], reference_logits: list[np.ndarray],
                        forced_logits: list[np.ndarray], free_tokens: list[int], eos: int | None,
                        decidable_margin: float) -> dict[str, float]:
    """The chain's LLM figures: `reference_tokens` / `reference_logits` the reference's greedy answer and the logits
    before each token; `forced_logits` the deployed LLM's, fed that answer (teacher forcing); `free_tokens` its
    own greedy answer. Every figure stops at the reference's end-of-sequence `eos`, included."""
    answer = through_eos(reference_tokens, eos)
    n = len(answer)
    return {"first_token_kl": kl_divergence(reference_logits[0], forced_logits[0]),
            **top1_agreement(reference_logits[:n], forced_logits[:n], decidable_margin),
            "greedy_match": greedy_match(answer, free_tokens, eos), "tokens": float(n),
            "ends_at_eos": float(eos is not None and answer[-1] == eos)}


def llm_precision(name: str) -> str:
    return {"transformers-fp32": "fp32", "transformers-int8": "int8"}.get(name, name.replace("onnx-", ""))


def validate_chain(directory: str | os.PathLike, video: str | os.PathLike, llm: str, prompt: str = DEFAULT_PROMPT,
                   tokens: int = 16, model: str | None = None, device: str = "auto",
                   progress: bool = True, backend: str | None = None,
                   export: str | os.PathLike | None = None, noise_draws: int = NOISE_DRAWS, *,
                   verify_hashes: bool = True) -> ChainReport:
    artifact = resolve_artifact(directory, export, verify_hashes=verify_hashes)
    adapter = model_adapter(artifact, model)
    vision = validate_export(directory, video, model=adapter, device=device, progress=progress, backend=backend,
                             export=export, noise_draws=noise_draws, verify_hashes=verify_hashes)
    # Each side's prompt from its own tokens and index (3-D positions where the family has them).
    reference_inputs, deployed_inputs = (
        assemble(adapter, prompt, *(torch.from_numpy(np.asarray(vision.outputs[side][name]))
                                    for name in ("tokens", "index")), artifact.manifest.aot.frames)
        for side in ("reference", "export"))
    # The answer ends at end-of-sequence, as `run` ends it (runtime.pipeline): both sides stop there.
    eos = adapter.tokenizer.eos_token_id
    reference = TransformersDecoder(adapter).generate(reference_inputs.embeds, tokens, eos=eos,
                                                      **reference_inputs.generate_kwargs)
    answer = through_eos(reference.tokens, eos)
    deployed_llm = load_llm(llm, adapter, verify_hashes=verify_hashes)
    forced = deployed_llm.generate(deployed_inputs.embeds, len(answer), forced=answer,
                                   **deployed_inputs.generate_kwargs)
    free = deployed_llm.generate(deployed_inputs.embeds, len(answer), eos=eos, **deployed_inputs.generate_kwargs)
    precision = llm_precision(deployed_llm.name)
    gates = CHAIN_GATES[precision]
    metrics = compare_generations(answer, reference.step_logits, forced.step_logits, free.tokens, eos,
                                  gates.decidable_margin)
    return ChainReport(vision, deployed_llm.name, precision, gates, metrics,
                       adapter.tokenizer.decode(answer), adapter.tokenizer.decode(through_eos(free.tokens, eos)))
