"""How close one AOT output is to another: the figures every validation gate reads.

Two outputs of the same config have the same layout per clip (keyframe cells, distinct tokens, updated anchors).
Position-wise figures say whether a run reproduced the other exactly (fp32). Reduced precision may pick a
different cell where two scores nearly tie, which shifts the raster order after it; so tokens are also matched by
what they are — (role, frame, row, col) — and compared only where both runs chose the same cell.

One comparator (`compare_outputs`: shapes, `compare_tokens`, Polygraphy's verdict on `tokens` / `index`), one gate
table by precision (`VISION_GATES` for the vision output, `CHAIN_GATES` for the LLM chain by the LLM's precision)
and one function that turns figures and gates into checks (`gate_checks`); validate, calibrate and the chain all
use them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .config import AOTConfig
from .errors import InputError


ROLE_NAMES = ("keyframe", "distinct", "anchor")        # output_roles values 0, 1, 2


def output_roles(cfg: AOTConfig) -> np.ndarray:
    """[cfg.output_tokens] role of every output position: 0 keyframe cell, 1 distinct token, 2 updated anchor."""
    if not cfg.inter_frame:
        return np.zeros(cfg.output_tokens, dtype=np.int64)
    clip = [0] * cfg.pooled_anchors + [1] * ((cfg.clip_len - 1) * cfg.keep) + [2] * cfg.pooled_anchors
    return np.asarray(clip * cfg.clips, dtype=np.int64)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return (a * b).sum(-1) / np.maximum(norms, 1e-30)


def token_keys(cfg: AOTConfig, index: np.ndarray) -> list[tuple[int, int, int, int]]:
    return [tuple(row) for row in np.column_stack([output_roles(cfg), index.astype(np.int64)]).tolist()]


def compare_tokens(cfg: AOTConfig, ref_tokens: np.ndarray, ref_index: np.ndarray, tokens: np.ndarray,
                   index: np.ndarray) -> dict[str, float]:
    """Position-wise cosine and max abs error, exact index agreement; cell agreement (the share of reference
    (role, frame, row, col) that the other run also output), anchor agreement (the same share per (role, frame),
    averaged over those groups with equal weight, and per role) and cosine / abs error over the matched tokens."""
    positional = cosine_rows(ref_tokens, tokens)
    ref_keys, keys = token_keys(cfg, ref_index), token_keys(cfg, index)
    where = {key: i for i, key in enumerate(keys)}
    matched = [(i, where[key]) for i, key in enumerate(ref_keys) if key in where]
    if matched:
        ref_rows, rows = (np.asarray(side, dtype=np.int64) for side in zip(*matched))
        matched_cosine = cosine_rows(ref_tokens[ref_rows], tokens[rows])
        matched_abs = np.abs(ref_tokens[ref_rows].astype(np.float64) - tokens[rows])
    else:
        matched_cosine, matched_abs = np.asarray([np.nan]), np.asarray([np.inf])
    # Set-based per (role, frame): one swapped cell costs 1/|set| of its group only, whatever it does to positions.
    groups: dict[tuple[int, int], list[bool]] = {}
    for key in ref_keys:
        groups.setdefault(key[:2], []).append(key in where)
    overlap = {group: float(np.mean(kept)) for group, kept in groups.items()}
    by_role = {f"anchor_agreement_{ROLE_NAMES[role]}": float(np.mean([v for (r, _), v in overlap.items() if r == role]))
               for role in sorted({r for r, _ in overlap})}
    return {"cosine_min": float(positional.min()), "cosine_mean": float(positional.mean()),
            "max_abs": float(np.abs(ref_tokens.astype(np.float64) - tokens).max()),
            "index_agreement": float((ref_index == index).all(-1).mean()),
            "cell_agreement": len(matched) / len(ref_keys),
            "anchor_agreement": float(np.mean(list(overlap.values()))), "anchor_groups": len(overlap), **by_role,
            "matched_cosine_min": float(matched_cosine.min()), "matched_cosine_mean": float(matched_cosine.mean()),
            "matched_max_abs": float(matched_abs.max()), "matched_mean_abs": float(matched_abs.mean()),
            "tokens": float(len(ref_keys))}


@dataclass(frozen=True)
class Gates:
    """Bounds on named figures: `floors` (figure >= bound), `ceilings` (figure <= bound), and `max_abs`,
    Polygraphy's absolute tolerance on `tokens` as a share of the reference's largest |value| (token scale differs
    by model; None: not gated)."""

    floors: dict[str, float] = field(default_factory=dict)
    ceilings: dict[str, float] = field(default_factory=dict)
    max_abs: float | None = None

    def to_dict(self) -> dict:
        return {"floors": self.floors, "ceilings": self.ceilings, "max_abs": self.max_abs}

    def describe(self, name: str) -> str:
        if name in self.floors:
            return f">= {self.floors[name]:g}"
        if name in self.ceilings:
            return f"<= {self.ceilings[name]:g}"
        if name == "max_abs" and self.max_abs is not None:
            return f"<= {self.max_abs:g} × max|ref|"
        return ""


# The vision output by the precision the graph computes in. fp32 must reproduce the reference to rounding, position
# by position; reduced precision may flip near-tied cells, so it is held to the cells it shares with the reference.
# The 8-bit precisions (Q/DQ int8 and fp8, and 8-bit weights with fp32 activations, calibration.weight_only) share
# one set of figures.
EIGHT_BIT_GATES = Gates({"matched_cosine_min": 0.995, "anchor_agreement": 0.98})
VISION_GATES = {
    "fp32": Gates({"cosine_min": 0.99999, "index_agreement": 1.0}, max_abs=1e-3),
    "fp16": Gates({"matched_cosine_min": 0.999, "anchor_agreement": 0.95}),
    "int8": EIGHT_BIT_GATES,
    "int8-weights": EIGHT_BIT_GATES,
    "fp8": EIGHT_BIT_GATES,
}

# The LLM chain by the deployed LLM's precision: fp32 reproduces the reference; quantized weights move the logits a
# little. Top-1 figures count only decidable disagreements (runtime.chain.top1_agreement).
CHAIN_GATES = {
    "fp32": Gates({"first_token_top1": 1.0, "teacher_forced_top1": 1.0}, {"first_token_kl": 1e-6}),
    "int8": Gates({"first_token_top1": 1.0, "teacher_forced_top1": 0.9}, {"first_token_kl": 0.05}),
    "int4": Gates({"first_token_top1": 1.0, "teacher_forced_top1": 0.8}, {"first_token_kl": 0.1}),
}


def gate_checks(metrics: dict[str, float], gates: Gates) -> dict[str, bool]:
    """Figure name → within its gate. A figure that is NaN fails."""
    checks = {name: bool(metrics[name] >= bound) for name, bound in gates.floors.items()}
    checks.update({name: bool(metrics[name] <= bound) for name, bound in gates.ceilings.items()})
    if gates.max_abs is not None:
        checks["max_abs"] = bool(metrics["polygraphy_tokens_pass"])
    return checks


def compare_outputs(cfg: AOTConfig, reference: dict[str, np.ndarray], actual: dict[str, np.ndarray],
                    gates: Gates | None = None) -> dict[str, float]:
    """The comparator: `actual` against `reference` (each {"tokens", "index"}) — refused (InputError) when the
    shapes differ from each other or from `cfg`; the figures of `compare_tokens`; and Polygraphy's verdict on
    `tokens` within `gates.max_abs` × max|reference| (no tolerance: infinite) and on `index` exactly."""
    from polygraphy.comparator import IterationResult, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    shapes = {side: (np.shape(outputs["tokens"]), np.shape(outputs["index"]))
              for side, outputs in (("reference", reference), ("actual", actual))}
    if shapes["reference"] != shapes["actual"]:
        raise InputError(f"output shapes {shapes['actual']} differ from the reference's {shapes['reference']}; "
                         "the two do not belong to the same model/config: re-export")
    if shapes["reference"][1] != (cfg.output_tokens, 3):
        raise InputError(f"the outputs have {shapes['reference'][1][0]} tokens, the config says "
                         f"{cfg.output_tokens}; re-export")
    ref_index, index = (np.asarray(side["index"]).astype(np.int64) for side in (reference, actual))
    metrics = compare_tokens(cfg, reference["tokens"], ref_index, actual["tokens"], index)
    scale = float(np.abs(reference["tokens"]).max())
    atol = gates.max_abs * scale if gates is not None and gates.max_abs is not None else float("inf")
    compare = SimpleCompareFunc(atol={"tokens": atol, "index": 0}, rtol={"tokens": 0.0, "index": 0.0},
                                check_error_stat="max")
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL), np.errstate(divide="ignore", invalid="ignore"):
        verdict = compare(IterationResult({"tokens": reference["tokens"], "index": ref_index}, runner_name="reference"),
                          IterationResult({"tokens": actual["tokens"], "index": index}, runner_name="actual"))
    return {**metrics, "mean_abs": float(verdict["tokens"].mean_absdiff), "max_abs_tolerance": atol,
            "polygraphy_tokens_pass": float(bool(verdict["tokens"])),
            "polygraphy_index_pass": float(bool(verdict["index"]))}
