"""How far the static, exportable AOT is from the authors' dynamic rules, on real video, and why.

For each shared video (32 frames, H = 896), each config (the `AOTConfig()` budgets and
`AOTConfig.from_retention(32, r)` for r = 0.10, 0.15, 0.25) and each static solver (`sinkhorn="fixed"`: 10
log-domain iterations; `"reference"`: the authors' stopping unrolled to 100): `AOTReducer` against
`aot_export.reference.reference_aot` (the authors' rules, float64), compared with `aot_export.reference.agreement`.

Printed per row: token counts, token-set Jaccard (tokens matched by role, frame, row, col), mean per-frame cell
Jaccard (static top-A vs the reference's >= 0.5 cells) and the share of frames whose cells differ, anchor Jaccard,
matched cosine min per role (keyframe / kept distinct / updated anchor), and the reference's Sinkhorn iterations
per call (one intra-frame call per video; inter-frame calls mean / max).

Causes, one at a time: against references that keep only some of the authors' rules and take the static
reducer's for the rest (`aot_export.reference.Rules`). The reference solver is compared with references that
stop the authors' way and keep only the cell rule (>= 0.5), only the distinct-token rule (strict quantile), both,
or only the global-anchor count; both solvers with the all-static reference that stops the authors' way
("stopping only": what the stopping alone costs the fixed solver; for the reference solver its own rule), and the
fixed solver with the all-static reference that runs its fixed iterations ("none"). Against its own rule a solver
must agree exactly, up to fp32 rounding.

    python bench/agreement.py
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

from aot_export import AOTConfig, AOTReducer
from aot_export.fidelity import ROLE_NAMES
from aot_export.reference import Rules, agreement, reference_aot

sys.path.insert(0, str(Path(__file__).parent))
from common import shared_videos, video_inputs  # noqa: E402

FRAMES = 32
HIDDEN = 896
RETENTIONS = (0.10, 0.15, 0.25)
SOLVERS = ("fixed", "reference")


def configs() -> dict[str, AOTConfig]:
    named = {"default": AOTConfig()}
    named.update({f"r={r:.2f}": AOTConfig.from_retention(FRAMES, r) for r in RETENTIONS})
    return named


STATIC = Rules(global_count=False, early_stop=False, cell_threshold=False, distinct_quantile=False)
# name -> (the rules of that reference, which solvers are compared with it)
VARIANTS = {
    "authors": (Rules(), SOLVERS),
    "stopping only": (dataclasses.replace(STATIC, early_stop=True), SOLVERS),
    "cells only": (dataclasses.replace(STATIC, early_stop=True, cell_threshold=True), ("reference",)),
    "distinct only": (dataclasses.replace(STATIC, early_stop=True, distinct_quantile=True), ("reference",)),
    "cells + distinct": (dataclasses.replace(STATIC, early_stop=True, cell_threshold=True, distinct_quantile=True),
                         ("reference",)),
    "global count only": (dataclasses.replace(STATIC, early_stop=True, global_count=True), ("reference",)),
    "none (fixed stopping)": (STATIC, ("fixed",)),
}


@torch.inference_mode()
def measure(cfg: AOTConfig, inputs) -> dict[str, dict[str, dict[str, float]]]:
    """solver -> reference variant -> agreement figures."""
    out: dict[str, dict[str, dict[str, float]]] = {solver: {} for solver in SOLVERS}
    static = {}
    for solver in SOLVERS:
        scfg = dataclasses.replace(cfg, sinkhorn=solver)
        reducer = AOTReducer(scfg)
        static[solver] = (scfg, *reducer(*inputs), *reducer.select(*inputs[1:]))
    for name, (rules, solvers) in VARIANTS.items():
        ref = reference_aot(cfg, *inputs, rules=rules)
        for solver in solvers:
            scfg, tokens, index, anchor_mask, cells = static[solver]
            out[solver][name] = agreement(scfg, tokens, index, anchor_mask, cells, ref)
    return out


def describe(cfg: AOTConfig) -> str:
    return f"V={cfg.anchors} A={cfg.pooled_anchors} K={cfg.keep} retention={cfg.retention:.4f}"


def roles(m: dict[str, float]) -> str:
    return " / ".join(f"{m[f'matched_cosine_min_{r}']:.5f}" for r in ROLE_NAMES)


def main() -> None:
    named = configs()
    for name, cfg in named.items():
        print(f"{name:>8}: {describe(cfg)}")
    rows = []
    for video in shared_videos():
        inputs = video_inputs(video, FRAMES, hidden=HIDDEN)
        for name, cfg in named.items():
            for solver, against in measure(cfg, inputs).items():
                rows.append({"video": video.stem, "config": name, "solver": solver, **cfg.to_dict(),
                             "against": against})
                m = against["authors"]
                print(f"{video.stem:>13} {name:>8} {solver:>9}: tokens {int(m['static_tokens'])}/"
                      f"{int(m['reference_tokens'])}, token-set Jaccard {m['token_set_jaccard']:.4f}, cell Jaccard "
                      f"{m['cell_jaccard_mean']:.4f} ({100 * m['cell_rule_differs']:.1f}% of frames differ), "
                      f"anchor Jaccard {m['anchor_jaccard']:.4f}, matched cos min k/d/a {roles(m)}, ref iterations "
                      f"intra {int(m['intra_iterations'])}, inter {m['inter_iterations_mean']:.2f}/"
                      f"{int(m['inter_iterations_max'])}", flush=True)
    print("causes: token-set Jaccard, matched cos min keyframe / distinct / anchor, max relative error, against "
          "references with only some of the authors' rules")
    for row in rows:
        for ref_name, m in row["against"].items():
            print(f"{row['video']:>13} {row['config']:>8} {row['solver']:>9} {ref_name:>22}: "
                  f"{m['token_set_jaccard']:.4f}  {roles(m)}  {m['matched_relative_error_max']:.2e}")
    print(json.dumps({"frames": FRAMES, "hidden": HIDDEN, "rows": rows}))


if __name__ == "__main__":
    main()
