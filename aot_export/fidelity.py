"""How close one AOT output is to another: the figures every validation gate reads.

Two outputs of the same config have the same layout per clip (keyframe cells, distinct tokens, updated anchors).
Position-wise figures say whether a run reproduced the other exactly (fp32). Reduced precision may pick a
different cell where two scores nearly tie, which shifts the raster order after it; so tokens are also matched by
what they are — (role, frame, row, col) — and compared only where both runs chose the same cell.
"""

from __future__ import annotations

import numpy as np

from .config import AOTConfig


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
