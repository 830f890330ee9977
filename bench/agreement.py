"""How far the static, exportable AOT is from the reference's dynamic rules, on real video.

For each shared video (32 frames, H = 896) and each config (the `AOTConfig()` default and
`AOTConfig.from_retention(32, r)` for r = 0.10, 0.15, 0.25): `AOTReducer` against
`aot_export.reference.reference_aot` (early-stopping Sinkhorn, >= 0.5 cell rule, quantile keep rule, float64),
compared with `aot_export.reference.agreement`. Prints token counts, the Jaccard index of the token sets
(matched by role, frame, row, col), the cosine of matched tokens, the anchor Jaccard, the share of frames whose
static top-A cells differ from the >= 0.5 cells and the mean per-frame Jaccard index of those cell sets, the
reference's Sinkhorn iterations, and the minimum matched cosine per token role (keyframe, kept, updated anchor).

    python bench/agreement.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from aot_export import AOTConfig, AOTReducer
from aot_export.fidelity import ROLE_NAMES
from aot_export.reference import ReferenceOutput, agreement, reference_aot

sys.path.insert(0, str(Path(__file__).parent))
from common import shared_videos, video_inputs  # noqa: E402

FRAMES = 32
HIDDEN = 896
RETENTIONS = (0.10, 0.15, 0.25)


def configs() -> dict[str, AOTConfig]:
    named = {"default": AOTConfig()}
    named.update({f"r={r:.2f}": AOTConfig.from_retention(FRAMES, r) for r in RETENTIONS})
    return named


def cell_jaccard_mean(cells: torch.Tensor, ref: ReferenceOutput) -> float:
    """Mean over frames of |static cells ∩ reference cells| / |union|: how far apart the two rules' cells are."""
    scores = []
    for static, reference in zip(cells.tolist(), ref.retained):
        a, b = set(static), set(reference.tolist())
        scores.append(len(a & b) / max(len(a | b), 1))
    return sum(scores) / len(scores)


@torch.inference_mode()
def compare(cfg: AOTConfig, features: torch.Tensor, shallow: torch.Tensor, deep: torch.Tensor) -> dict[str, float]:
    reducer = AOTReducer(cfg)
    tokens, index = reducer(features, shallow, deep)
    anchor_mask, cells = reducer.select(shallow, deep)
    ref = reference_aot(cfg, features, shallow, deep)
    return {**agreement(cfg, tokens, index, anchor_mask, cells, ref),
            "cell_jaccard_mean": cell_jaccard_mean(cells, ref)}


def describe(cfg: AOTConfig) -> str:
    return (f"V={cfg.anchors} A={cfg.pooled_anchors} K={cfg.keep} iters={cfg.sinkhorn_iters} "
            f"retention={cfg.retention:.4f}")


def main() -> None:
    named = configs()
    for name, cfg in named.items():
        print(f"{name:>8}: {describe(cfg)}")
    header = (f"{'video':>13} {'config':>8} {'static':>6} {'ref':>6} {'ref cells/fr':>12} {'tok jacc':>8} "
              f"{'cos mean':>9} {'cos min':>9} {'anch jacc':>9} {'cells differ':>12} {'cell jacc':>9} "
              f"{'ref intra it mean/max':>21} {'ref inter it mean/max':>21}")
    print(header)
    rows = []
    for video in shared_videos():
        features, shallow, deep = video_inputs(video, FRAMES, hidden=HIDDEN)
        for name, cfg in named.items():
            m = compare(cfg, features, shallow, deep)
            rows.append({"video": video.stem, "config": name, **cfg.to_dict(), **m})
            print(f"{video.stem:>13} {name:>8} {int(m['static_tokens']):>6} {int(m['reference_tokens']):>6} "
                  f"{m['reference_cells_mean']:>12.2f} {m['token_set_jaccard']:>8.4f} "
                  f"{m['matched_cosine_mean']:>9.5f} {m['matched_cosine_min']:>9.5f} {m['anchor_jaccard']:>9.4f} "
                  f"{100 * m['cell_rule_differs']:>11.1f}% {m['cell_jaccard_mean']:>9.4f} "
                  f"{m['intra_iterations_mean']:>15.2f}/{int(m['intra_iterations_max']):<5} "
                  f"{m['inter_iterations_mean']:>15.2f}/{int(m['inter_iterations_max']):<5}")
    print("matched cosine min per role (keyframe / kept distinct / updated anchor):")
    for row in rows:
        print(f"{row['video']:>13} {row['config']:>8} "
              + " ".join(f"{row[f'matched_cosine_min_{r}']:>9.5f}" for r in ROLE_NAMES))
    print(json.dumps({"frames": FRAMES, "hidden": HIDDEN, "rows": rows}))


if __name__ == "__main__":
    main()
