"""The dynamic AOT the authors ran (their released code, TyroneLi/AOT `LLaVA-NeXT/llava/model/llava_arch.py`;
AOT_SPEC §1–§4, reference-code column), to measure how far the static, exportable reducer drifts from it.
Never exported: its token counts depend on the data.

The authors' rules, each one where it differs from `AOTReducer`:
- global anchors: `V - floor(V·(1 - global_ratio))` of them, so a frame may hold a few more or fewer than V;
- intra-frame Sinkhorn: one call for all T frames (`Sinkhorn_v1` on the whole video), plain domain from r = c = 1,
  and all frames stop **together** after the first iteration at which `mean |r - r_prev|` over every frame's
  source rows (the [T, M] tensor; anchors are not sources) is below `tol`, at most `max_iters` iterations;
- inter-frame Sinkhorn: one call per (clip, later frame), each stopped by the same rule over its own A rows;
- pooled cells kept where the pooled anchor mask is >= 0.5 (a data-dependent count per frame);
- distinct tokens: confidence **strictly** below `torch.quantile(confidence, keep / pooled_anchors)` (linear
  interpolation), so where `keep_ratio·(n - 1)` lands on an element, that element is merged.
Everything is float64 — features, scores, grid positions, pooling weights, kernels — so the drift measured is the
rules', not rounding.

`Rules` switches single rules to the static reducer's, so that a static-vs-reference difference can be split into
its causes (bench/agreement.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import fidelity
from .config import AOTConfig
from .reducer import (grid_positions, inter_frame_cost, intra_frame_transport, mask_indices, merge_into_anchors,
                      pooling_matrix, retained_cells, select_anchors, top_k_raster, window_table)

SINKHORN_TOL = 1e-2
SINKHORN_MAX_ITERS = 100


def early_stopping_sinkhorn(cost: Tensor, mu: Tensor, nu: Tensor, eps: float, tol: float = SINKHORN_TOL,
                            max_iters: int = SINKHORN_MAX_ITERS, joint: bool = False) -> tuple[Tensor, Tensor]:
    """The authors' `Sinkhorn_v1` on a batch [B, M, V] of problems with marginals mu [B, M], nu [B, V]: plain
    iterations from r = c = 1, stopped after the first iteration whose mean change of r over the source rows
    (mu > 0) is below `tol`. `joint`: one call on all B problems, one mean over all of them, all stop together;
    otherwise B separate calls, each stopped on its own. Returns the plan and the iterations each problem ran [B]."""
    kernel = torch.exp(-cost / eps)
    r, c = torch.ones_like(mu), torch.ones_like(nu)
    sources = mu > 0
    iterations = torch.zeros(cost.shape[0], dtype=torch.long)
    running = torch.ones(cost.shape[0], dtype=torch.bool)
    for _ in range(max_iters):
        new_r = mu / (kernel @ c.unsqueeze(-1)).squeeze(-1)
        new_c = nu / (kernel.transpose(1, 2) @ new_r.unsqueeze(-1)).squeeze(-1)
        change = (new_r - r).abs()
        if joint:
            converged = (change[sources].mean() < tol).expand(cost.shape[0])
        else:
            converged = torch.stack([row[mask].mean() for row, mask in zip(change, sources)]) < tol
        r = torch.where(running.unsqueeze(-1), new_r, r)
        c = torch.where(running.unsqueeze(-1), new_c, c)
        iterations += running.long()
        running &= ~converged
        if not running.any():
            break
    return r.unsqueeze(-1) * kernel * c.unsqueeze(-2), iterations


class EarlyStoppingSinkhorn:
    """`early_stopping_sinkhorn` behind the reducer's `Sinkhorn` interface; records each call's iterations."""

    def __init__(self, eps: float, tol: float = SINKHORN_TOL, max_iters: int = SINKHORN_MAX_ITERS):
        self.eps, self.tol, self.max_iters = eps, tol, max_iters
        self.iterations: list[Tensor] = []

    def __call__(self, cost: Tensor, log_mu: Tensor, log_nu: Tensor, *, joint: bool) -> Tensor:
        plan, iterations = early_stopping_sinkhorn(cost, log_mu.exp(), log_nu.exp(), self.eps, self.tol,
                                                   self.max_iters, joint)
        self.iterations.append(iterations)
        return plan


def distinct_by_quantile(confidence: Tensor, keep_ratio: float) -> Tensor:
    """The authors' distinct tokens [n] bool: confidence strictly below its `keep_ratio` quantile."""
    return confidence < torch.quantile(confidence, keep_ratio)


def distinct_by_count(confidence: Tensor, keep: int) -> Tensor:
    """The static reducer's distinct tokens [n] bool: the `keep` least confident, ties to the lower index."""
    keep = min(keep, confidence.shape[0])
    chosen = top_k_raster(keep, -confidence.unsqueeze(0))[0]
    return torch.zeros_like(confidence, dtype=torch.bool).scatter(0, chosen, True)


@dataclass(frozen=True)
class Rules:
    """Which of the authors' rules the reference applies; each one set False applies the static reducer's rule in
    its place (still float64), to attribute a static-vs-reference difference to its causes."""

    global_count: bool = True          # V - floor(V/2) global anchors; else exactly V anchors
    early_stop: bool = True            # the authors' stopping; else cfg.sinkhorn_iters iterations ("fixed")
    cell_threshold: bool = True        # pooled anchor mask >= 0.5; else the top-A cells
    distinct_quantile: bool = True     # strict quantile; else the `keep` least confident tokens


@dataclass
class ReferenceOutput:
    tokens: Tensor                     # [n, H] float64, n data-dependent
    index: Tensor                      # [n, 3] (frame, row, col), same layout per clip as AOTReducer
    role: Tensor                       # [n] 0 keyframe token, 1 kept distinct token, 2 updated anchor
    anchor_mask: Tensor                # [T, N] intra-frame anchors
    retained: list[Tensor]             # per frame: kept pooled cells (raster order)
    intra_iterations: int              # Sinkhorn iterations of the one intra-frame call (all frames)
    inter_iterations: list[int] = field(default_factory=list)   # per inter-frame call


def reference_aot(cfg: AOTConfig, features: Tensor, score_shallow: Tensor, score_deep: Tensor,
                  tol: float = SINKHORN_TOL, max_iters: int = SINKHORN_MAX_ITERS,
                  rules: Rules = Rules()) -> ReferenceOutput:
    features, score_shallow, score_deep = features.double(), score_shallow.double(), score_deep.double()
    n_global = (cfg.anchors - math.floor(cfg.anchors * (1.0 - cfg.global_ratio)) if rules.global_count
                else cfg.global_anchors)
    anchor_mask = select_anchors(cfg, window_table(cfg.grid, cfg.windows), score_shallow, score_deep, n_global)
    anchor_idx = mask_indices(anchor_mask, cfg.windows ** 2 * cfg.local_per_window + n_global)

    solver = (EarlyStoppingSinkhorn(cfg.eps, tol, max_iters) if rules.early_stop
              else EarlyStoppingSinkhorn(cfg.eps, tol=0.0, max_iters=cfg.sinkhorn_iters))
    updated = intra_frame_transport(cfg, features, anchor_idx, grid_positions(cfg.grid, torch.float64),
                                    solver).updated_anchors(features)
    intra_iterations = int(solver.iterations.pop()[0])
    grid = features.scatter(1, anchor_idx.unsqueeze(-1).expand_as(updated), updated)
    pooling = pooling_matrix(cfg, torch.float64)
    pooled = pooling @ grid                                                          # [T, P, H]
    pooled_mask = anchor_mask.double() @ pooling.T
    if rules.cell_threshold:
        retained = [torch.nonzero(frame_mask >= 0.5).squeeze(-1) for frame_mask in pooled_mask]
    else:
        retained = list(retained_cells(cfg, pooled_mask, score_deep @ pooling.T))

    gp = cfg.pooled_grid
    keep_ratio = cfg.keep / cfg.pooled_anchors
    tokens, index, role, inter_iterations = [], [], [], []

    def emit(values: Tensor, frame: int, cells: Tensor, kind: int) -> None:
        tokens.append(values)
        index.append(torch.stack([torch.full_like(cells, frame), cells // gp, cells % gp], dim=-1))
        role.append(torch.full_like(cells, kind))

    for key in range(0, cfg.frames, cfg.clip_len):
        key_cells = retained[key]
        emit(pooled[key, key_cells], key, key_cells, 0)
        if not cfg.inter_frame:
            continue
        anchors = pooled[key, key_cells].unsqueeze(0)
        for offset in range(1, cfg.clip_len):
            frame = key + offset
            cells = retained[frame]
            sources = pooled[frame, cells].unsqueeze(0)
            if len(cells) == 0 or anchors.shape[1] == 0:
                continue
            cost = inter_frame_cost(cfg, sources, anchors, offset)
            plan = solver(cost, torch.full_like(cost[:, :, 0], -math.log(cost.shape[1])),
                          torch.full_like(cost[:, 0, :], -math.log(cost.shape[2])), joint=False)
            inter_iterations.append(int(solver.iterations.pop()[0]))
            assignment = plan / plan.sum(-1, keepdim=True)
            confidence = assignment.amax(-1)[0]
            distinct = (distinct_by_quantile(confidence, keep_ratio) if rules.distinct_quantile
                        else distinct_by_count(confidence, cfg.keep))
            emit(sources[0, distinct], frame, cells[distinct], 1)
            anchors = merge_into_anchors(cfg, anchors, sources, assignment * (~distinct).double()[None, :, None])
        emit(anchors[0], key, key_cells, 2)

    return ReferenceOutput(torch.cat(tokens), torch.cat(index), torch.cat(role), anchor_mask, retained,
                           intra_iterations, inter_iterations)


def output_roles(cfg: AOTConfig) -> Tensor:
    """[cfg.output_tokens] role of every token `AOTReducer` emits: 0 keyframe, 1 kept distinct, 2 updated anchor."""
    return torch.from_numpy(fidelity.output_roles(cfg))


def agreement(cfg: AOTConfig, tokens: Tensor, index: Tensor, anchor_mask: Tensor, cells: Tensor,
              ref: ReferenceOutput) -> dict[str, float]:
    """How far a static run (`AOTReducer` output, and `AOTReducer.select`'s anchor mask and cells) is from the
    reference on the same input.

    Tokens are matched by (role, frame, row, col); `token_set_jaccard` is |static ∩ ref| / |static ∪ ref| of
    those keys; cosines and relative errors ‖static − ref‖ / ‖ref‖ are over matched tokens, cosines also per
    role: a keyframe or distinct token differs only by the intra-frame Sinkhorn, an updated anchor also by which
    tokens were merged into it. `cell_rule_differs` is the
    share of frames whose static top-A cells differ from the reference's cells, `cell_jaccard_mean` the mean over
    frames of the Jaccard index of the two cell sets.
    """
    def keys(roles: Tensor, idx: Tensor) -> dict[tuple[int, ...], int]:
        rows = torch.cat([roles.unsqueeze(-1), idx.long()], dim=-1).tolist()
        return {tuple(row): i for i, row in enumerate(rows)}

    static_keys, ref_keys = keys(output_roles(cfg), index), keys(ref.role, ref.index)
    matched = sorted(set(static_keys) & set(ref_keys))
    union = len(set(static_keys) | set(ref_keys))
    static_rows = tokens[[static_keys[k] for k in matched]].double()
    ref_rows = ref.tokens[[ref_keys[k] for k in matched]]
    cos = torch.nn.functional.cosine_similarity(static_rows, ref_rows, dim=-1)
    relative = (static_rows - ref_rows).norm(dim=-1) / ref_rows.norm(dim=-1).clamp_min(1e-30)
    matched_roles = torch.tensor([k[0] for k in matched], dtype=torch.long)
    by_role = {f"matched_cosine_min_{name}": float(cos[matched_roles == role].min())
               if (matched_roles == role).any() else float("nan")
               for role, name in enumerate(fidelity.ROLE_NAMES)}
    cell_sets = [(set(static.tolist()), set(reference.tolist())) for static, reference in zip(cells, ref.retained)]
    anchors_static, anchors_ref = anchor_mask.bool(), ref.anchor_mask.bool()
    return {
        "static_tokens": float(len(static_keys)),
        "reference_tokens": float(len(ref_keys)),
        "token_set_jaccard": len(matched) / union,
        "matched_cosine_mean": float(cos.mean()) if matched else float("nan"),
        "matched_cosine_min": float(cos.min()) if matched else float("nan"),
        "matched_relative_error_max": float(relative.max()) if matched else float("nan"),
        **by_role,
        "anchor_jaccard": float((anchors_static & anchors_ref).sum() / (anchors_static | anchors_ref).sum()),
        "cell_rule_differs": sum(a != b for a, b in cell_sets) / len(cell_sets),
        "cell_jaccard_mean": sum(len(a & b) / max(len(a | b), 1) for a, b in cell_sets) / len(cell_sets),
        "reference_cells_mean": sum(len(c) for c in ref.retained) / len(ref.retained),
        "intra_iterations": float(ref.intra_iterations),
        "inter_iterations_mean": (sum(ref.inter_iterations) / len(ref.inter_iterations)
                                  if ref.inter_iterations else 0.0),
        "inter_iterations_max": float(max(ref.inter_iterations, default=0)),
    }
