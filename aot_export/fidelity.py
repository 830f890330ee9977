"""How close one AOT output is to another: the figures every validation gate reads.

Two outputs of the same config have the same layout per clip (keyframe cells, distinct tokens, updated anchors).
Position-wise figures say whether a run reproduced the other exactly (fp32). Reduced precision may pick a
different cell where two scores nearly tie, which shifts the raster order after it; so tokens are also matched by
what they are — (role, frame, row, col) — and compared only where both runs chose the same cell. Selection (anchor
agreement) and arithmetic (the cosine of tokens whose every selection agrees, `sources_agree`) are figured and gated
apart; a reduced precision's anchor floor on a video is grounded in the fp32 selection's own noise floor there
(`NoiseFloor`).

One comparator (`compare_outputs`: shapes, `compare_tokens`, Polygraphy's verdict on `tokens` / `index`), one gate
table by precision (`VISION_GATES` for the vision output, `CHAIN_GATES` for the LLM chain by the LLM's precision)
and one function that turns figures and gates into checks (`gate_checks`); validate, calibrate and the chain all
use them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import AOTConfig
from .errors import InputError

if TYPE_CHECKING:
    from .manifest import Manifest


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


def token_keys(cfg: AOTConfig, index: np.ndarray) -> np.ndarray:
    """[n, 4] (role, frame, row, col) of every output token: what it is, whatever its position."""
    return np.column_stack([output_roles(cfg), np.asarray(index, dtype=np.int64)])


def key_ids(*keys: np.ndarray) -> list[np.ndarray]:
    """The rows of each [n, k] key array as integers, equal where the rows are equal across all of them."""
    _, inverse = np.unique(np.concatenate(keys), axis=0, return_inverse=True)
    return np.split(inverse.reshape(-1), np.cumsum([len(k) for k in keys])[:-1])


def matched_rows(ref_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """For each reference key, the row of the other run with the same key, or -1 (keys are unique in a run)."""
    where = np.full(max(int(ref_ids.max(initial=-1)), int(ids.max(initial=-1))) + 1, -1, dtype=np.int64)
    where[ids] = np.arange(len(ids))
    return where[ref_ids]


def sources_agree(cfg: AOTConfig, ref_keys: np.ndarray, group_agrees: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """[n] bool: every selection the reference token's value depends on agrees between the two runs.

    What a value depends on (aot_export/reducer.py, AOT_SPEC §2–§4): a keyframe cell and a distinct token are a
    pooled cell of their own frame, in which that frame's anchors carry the pruned tokens transported onto them —
    their frame's anchor selection. An updated anchor is its keyframe cell merged with the merged (non-distinct)
    cells of every later frame of its clip — every selection of the clip (retained cells and distinct ones). A
    selection is seen through the index: a frame agrees when each of its (role, frame) groups holds the same cells
    in both runs (`group_agrees` per group, `groups` the group of each token); a flip that leaves the pooled cells
    unchanged is invisible, and of a later frame only its distinct cells show. The intra-frame solver's joint
    stopping rule (AOT_SPEC §2) couples every frame through one iteration count; that moves the OT term, itself
    ~1 % of an anchor, and is not counted as a dependence."""
    frames = ref_keys[:, 1]
    flipped = np.unique(frames[~group_agrees[groups]])
    frame_ok = ~np.isin(frames, flipped)
    if not cfg.inter_frame:
        return frame_ok
    clip_ok = ~np.isin(frames // cfg.clip_len, flipped // cfg.clip_len)
    return np.where(ref_keys[:, 0] == ROLE_NAMES.index("anchor"), clip_ok, frame_ok)


def compare_tokens(cfg: AOTConfig, ref_tokens: np.ndarray, ref_index: np.ndarray, tokens: np.ndarray,
                   index: np.ndarray) -> dict[str, float]:
    """Position-wise cosine and max abs error, exact index agreement; selection: cell agreement (the share of
    reference (role, frame, row, col) that the other run also output) and anchor agreement (the same share per
    (role, frame), averaged over those groups with equal weight, and per role); matched cosine / abs error over
    the tokens whose key both runs output, for the record (one flipped cell changes what merges into its frame's
    anchors, so it mixes selection with arithmetic); and arithmetic: cosine over the matched tokens whose every
    selection agrees (`sources_agree`), the error of the arithmetic alone."""
    positional = cosine_rows(ref_tokens, tokens)
    ref_keys, keys = token_keys(cfg, ref_index), token_keys(cfg, index)
    ref_ids, ids = key_ids(ref_keys, keys)
    rows = matched_rows(ref_ids, ids)
    matched = rows >= 0
    cosines = np.full(len(ref_keys), np.nan)
    cosines[matched] = cosine_rows(ref_tokens[matched], tokens[rows[matched]])
    matched_abs = np.abs(ref_tokens[matched].astype(np.float64) - tokens[rows[matched]])
    if not matched.any():
        matched_abs = np.asarray([np.inf])
    # Set-based per (role, frame): one swapped cell costs 1/|set| of its group only, whatever it does to positions.
    group_keys, groups = np.unique(ref_keys[:, :2], axis=0, return_inverse=True)
    groups = groups.reshape(-1)
    overlap = np.bincount(groups, weights=matched) / np.bincount(groups)
    by_role = {f"anchor_agreement_{ROLE_NAMES[role]}": float(overlap[group_keys[:, 0] == role].mean())
               for role in np.unique(group_keys[:, 0])}
    arithmetic = cosines[matched & sources_agree(cfg, ref_keys, overlap == 1.0, groups)]
    arithmetic = arithmetic if len(arithmetic) else np.asarray([np.nan])
    matched_cosine = cosines[matched] if matched.any() else np.asarray([np.nan])
    return {"cosine_min": float(positional.min()), "cosine_mean": float(positional.mean()),
            "max_abs": float(np.abs(ref_tokens.astype(np.float64) - tokens).max()),
            "index_agreement": float((ref_index == index).all(-1).mean()),
            "cell_agreement": float(matched.mean()),
            "anchor_agreement": float(overlap.mean()), "anchor_groups": len(overlap), **by_role,
            "matched_cosine_min": float(matched_cosine.min()), "matched_cosine_mean": float(matched_cosine.mean()),
            "matched_max_abs": float(matched_abs.max()), "matched_mean_abs": float(matched_abs.mean()),
            "arithmetic_cosine_min": float(arithmetic.min()), "arithmetic_cosine_mean": float(arithmetic.mean()),
            "arithmetic_tokens": float(np.isfinite(arithmetic).sum() / len(ref_keys)),
            "tokens": float(len(ref_keys))}


@dataclass(frozen=True)
class Gates:
    """Bounds on named figures: `floors` (figure >= bound), `ceilings` (figure <= bound), and `max_abs`,
    Polygraphy's absolute tolerance on `tokens` as a share of the reference's largest |value| (token scale differs
    by model; None: not gated); `decidable_margin`, the LLM chain's only: the reference's top-1 − runner-up
    logit margin (nats) from which its top-1 is held to agreement (runtime.chain.top1_agreement)."""

    floors: dict[str, float] = field(default_factory=dict)
    ceilings: dict[str, float] = field(default_factory=dict)
    max_abs: float | None = None
    decidable_margin: float | None = None

    def to_dict(self) -> dict:
        margin = {} if self.decidable_margin is None else {"decidable_margin": self.decidable_margin}
        return {"floors": self.floors, "ceilings": self.ceilings, "max_abs": self.max_abs, **margin}

    def describe(self, name: str) -> str:
        if name in self.floors:
            return f">= {self.floors[name]:g}"
        if name in self.ceilings:
            return f"<= {self.ceilings[name]:g}"
        if name == "max_abs" and self.max_abs is not None:
            return f"<= {self.max_abs:g} × max|ref|"
        return ""


# The vision output by the precision the graph computes in. fp32 must reproduce the reference to rounding, position
# by position; reduced precision may flip near-tied cells, so its selection (anchor agreement) and its arithmetic
# (cosine of the tokens whose every selection agrees, `sources_agree`) are gated apart: a flip costs selection only.
# The anchor floor is the fixed one below, or what the fp32 graph itself keeps under sub-pixel input noise where
# that is lower (`NoiseFloor.gates`). The 8-bit precisions (Q/DQ int8 and fp8, and 8-bit weights with fp32
# activations, calibration.weight_only) share one set of figures.
EIGHT_BIT_GATES = Gates({"arithmetic_cosine_min": 0.995, "anchor_agreement": 0.98})
VISION_GATES = {
    "fp32": Gates({"cosine_min": 0.99999, "index_agreement": 1.0}, max_abs=1e-3),
    "fp16": Gates({"arithmetic_cosine_min": 0.999, "anchor_agreement": 0.95}),
    "int8": EIGHT_BIT_GATES,
    "int8-weights": EIGHT_BIT_GATES,
    "fp8": EIGHT_BIT_GATES,
}

# The LLM chain by the deployed LLM's precision: fp32 reproduces the reference; quantized weights move the logits a
# little. Top-1 figures are over the positions the reference itself decides: its top-1 − runner-up logit margin m
# (the log-odds of its two best tokens) at least `decidable_margin` — the reference's own margin, never the
# deployed error (runtime.chain.top1_agreement). The bound follows the precision's KL ceiling κ: reversing two
# tokens at log-odds m takes, when they carry all the mass, at least KL(σ(m) ‖ ½) (moving them to a tie) — 0.05 at
# m = 0.65 nat, 0.10 at m = 0.94 — so where m is above that, a reversal is more error than the precision is granted
# anywhere. Rounded down (more positions held): int8 0.6 nat (runner-up ≤ 55 % as likely), int4 0.9 (≤ 41 %).
# fp32 holds every position but a tie within logit rounding (~1e-5 relative on logits of ~10–100): 1e-3 nat.
CHAIN_GATES = {
    "fp32": Gates({"first_token_top1": 1.0, "teacher_forced_top1": 1.0}, {"first_token_kl": 1e-6},
                  decidable_margin=1e-3),
    "int8": Gates({"first_token_top1": 1.0, "teacher_forced_top1": 0.9}, {"first_token_kl": 0.05},
                  decidable_margin=0.6),
    "int4": Gates({"first_token_top1": 1.0, "teacher_forced_top1": 0.8}, {"first_token_kl": 0.1},
                  decidable_margin=0.9),
}


def tie_kl(margin: float) -> float:
    """KL(σ(m) ‖ ½): the least KL that moves two tokens at log-odds `margin`, carrying all the mass, to a tie."""
    p = 1.0 / (1.0 + np.exp(-margin))
    return float(p * np.log(2 * p) + (1 - p) * np.log(2 * (1 - p)))


# A selection cannot be asked to hold better than the fp32 graph holds its own under input noise far below what
# re-encoding a video does: the reduced-precision anchor floor on a video is the fixed one, or the median anchor
# agreement of `NOISE_DRAWS` such noise draws where that is lower. The median, not the least draw: the least of N
# falls as N grows (more measurement would weaken the gate), and one draw spreads ~5 points on the tiny model
# (docs/benchmarks.md, "The anchor gate and the fp32 noise floor"); below the median, the deployed graph moves the
# anchors more than fp32 does under half of the noise draws.
NOISE_DRAWS = 8
NOISE_STATISTIC = "median"


@dataclass(frozen=True)
class NoiseFloor:
    """How stable one video's selection is: the anchor agreement (and, for the record, arithmetic cosine min) of
    the fp32 graph or the reference with itself under seeded draws of Gaussian input noise σ = `sigma`."""

    sigma: float
    anchor_agreement: tuple[float, ...]
    arithmetic_cosine_min: tuple[float, ...] = ()

    @property
    def statistic(self) -> float:
        return float(np.median(self.anchor_agreement)) if self.anchor_agreement else float("nan")

    def gates(self, fixed: Gates) -> Gates:
        """`fixed` with its anchor floor lowered to `statistic` where that is lower (no draws: `fixed`): never
        stronger than the fixed gate, never weaker than what the noise floor shows."""
        if not self.anchor_agreement or "anchor_agreement" not in fixed.floors:
            return fixed
        floor = min(fixed.floors["anchor_agreement"], self.statistic)
        return dataclasses.replace(fixed, floors={**fixed.floors, "anchor_agreement": floor})

    def to_dict(self, fixed: Gates) -> dict:
        """What a report and a manifest record: the draws, the statistic, the fixed and the effective gate."""
        effective = self.gates(fixed).floors.get("anchor_agreement")
        return {"sigma": self.sigma, "draws": len(self.anchor_agreement),
                "anchor_agreement": list(self.anchor_agreement),
                "arithmetic_cosine_min": list(self.arithmetic_cosine_min),
                "statistic": NOISE_STATISTIC, "value": self.statistic,
                "fixed_gate": fixed.floors.get("anchor_agreement"), "effective_gate": effective}

    def describe(self, fixed: Gates) -> str:
        """One line for the tables."""
        draws = ", ".join(f"{v:.2%}" for v in sorted(self.anchor_agreement))
        effective = self.gates(fixed).floors.get("anchor_agreement")
        return (f"fp32 noise floor (σ {self.sigma:.3g}, {len(self.anchor_agreement)} draws): anchor agreement "
                f"{draws}; {NOISE_STATISTIC} {self.statistic:.2%}; anchor gate: fixed "
                f"{fixed.floors.get('anchor_agreement', float('nan')):.2%}, effective {effective:.2%}")


# The noise of `input_noise_floor`: a quarter of one 8-bit pixel step, far below what re-encoding a video does.
NOISE_STEP_FRACTION = 0.25


def input_noise_floor(runner: Any, pixels: np.ndarray, reference: dict[str, np.ndarray], manifest: Manifest,
                      draws: int = NOISE_DRAWS, seed: int = 0) -> NoiseFloor:
    """How stable the fp32 selection is on these frames: `draws` runs of `runner` (active; the fp32 export's, or
    the PyTorch reference's) on them plus seeded Gaussian noise of σ = `NOISE_STEP_FRACTION` of one 8-bit pixel
    step after normalisation, each compared with `reference` (its output on the clean frames) by `compare_outputs`.
    A reduced-precision graph cannot be expected to agree with fp32 better than fp32 agrees with itself under such
    noise (`NoiseFloor.gates`); a model whose attention scores are nearly flat (random weights) shows it here."""
    prep = manifest.preprocessing
    sigma = NOISE_STEP_FRACTION * prep.rescale_factor / max(prep.std)
    rng = np.random.default_rng(seed)
    figures = [compare_outputs(manifest.aot, reference,
                               runner.run((pixels + rng.normal(0.0, sigma, pixels.shape)).astype(np.float32)))
               for _ in range(draws)]
    return NoiseFloor(float(sigma), tuple(m["anchor_agreement"] for m in figures),
                      tuple(m["arithmetic_cosine_min"] for m in figures))


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
