"""Token-reduction baselines and AOT ablations at AOT's exact token budget, for the reduction-quality study
(bench/quality.py). Benchmark code: none of this is exported.

Every method is `method(cfg, features [T, N, H], score_shallow [T, N], score_deep [T, N]) -> tokens [n, H]` with
`n == cfg.output_tokens` exactly (equal budgets), `features` the projected tokens on the G×G grid as the reducer
reads them (`adapter.encode`). The unreduced set the LLM would see is `full_tokens`: every frame pooled as the VLM
pools it (T·P tokens). Methods that select work on that pooled grid, as AOT's output does. Per-frame methods split
the budget over frames as evenly as whole tokens allow (`frame_budgets`). Ties: lower index wins, as in the reducer.

Baselines:
- `uniform_pool`: coarser average pooling to the budget: each frame's G×G grid cut into `c_t` near-square regions of
  near-equal area (rows of bands, each band split into columns), every region averaged.
- `random_select`: `n` pooled tokens uniformly at random (seeded).
- `attention_topk`: per frame the pooled tokens with the largest pooled deep score (VisionZip's dominant tokens
  alone, no merging).
- `visionzip`: VisionZip: 54/64 of each frame's budget as dominant tokens (largest pooled deep score); the rest are
  contextual: evenly spaced targets among the remaining tokens, every other remaining token assigned to its most
  similar target (cosine), each contextual token the mean of its target and the tokens assigned to it. (VisionZip's
  code adds the target to the mean of its group; averaging keeps the token on the scale of the others, which the
  projected features here need; VisionZip also measures similarity on the last layer's keys, which the method
  signature does not carry: features are used.)
- `dycoke`: DyCoke-style temporal pruning: a pooled token's novelty is 1 − cos to the same position in the previous
  frame (the first frame counts as fully novel, as a reference frame); the `n` most novel tokens are kept.
- `tome`: ToMe bipartite soft matching over the whole video's pooled tokens (frame-major raster order, alternate
  tokens to the two sides), merging the most similar pairs with size-weighted averages, round after round, down to
  exactly `n` (across frames and positions: the most favourable setting for ToMe).

AOT and its ablations (AOT_SPEC §6), through the reducer's own trace entry point with its study options
(`AOTReducer.trace(..., anchors=, transport_cfg=, inter_frame=)`); every ablation keeps V anchors, A cells,
K distinct tokens:
- `aot`: `AOTReducer(cfg)`.
- `aot_no_local`: all V anchors by the deep score (no windowed shallow-score anchors).
- `aot_no_global`: all V anchors local: V // W² per window by the shallow score, the remainder by the shallow score
  among the rest (no deep-score anchors).
- `aot_no_intra_ot`: the intra-frame transport with alpha = 0 and lam = 0: anchors keep their own values.
- `aot_no_inter_ot`: no inter-frame transport: per clip the keyframe's A cells, then the clip's remaining budget
  (A + (L−1)·K) taken evenly spaced from the later frames' kept cells, nothing merged.
- `aot_random_anchors`: V anchors per frame uniformly at random (seeded).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
from torch import Tensor

from aot_export import AOTConfig, AOTReducer
from aot_export.reducer import AnchorMasks, anchor_masks, cosine, pool_grid, top_k_mask, window_table

Method = Callable[[AOTConfig, Tensor, Tensor, Tensor], Tensor]

VISIONZIP_DOMINANT = 54 / 64          # VisionZip's dominant:contextual split (54 + 10 tokens for LLaVA-1.5 at 64)


# ---- helpers ------------------------------------------------------------------------------------------------------
def frame_budgets(total: int, frames: int) -> Tensor:
    """[frames] whole-token budgets summing to `total`, differing by at most one, spread evenly."""
    edges = torch.arange(frames + 1) * total // frames
    return edges[1:] - edges[:-1]


def pooled_tokens(cfg: AOTConfig, features: Tensor) -> Tensor:
    """[T, P, H]: each frame pooled as the VLM pools it (what the LLM would see without reduction)."""
    return pool_grid(cfg, features.float())


def full_tokens(cfg: AOTConfig, features: Tensor) -> Tensor:
    """[T·P, H]: the unreduced visual tokens, frame-major raster order."""
    return pooled_tokens(cfg, features).reshape(-1, features.shape[-1])


def pooled_scores(cfg: AOTConfig, scores: Tensor) -> Tensor:
    """[T, P]: a per-token score pooled like the tokens."""
    return pool_grid(cfg, scores.float().unsqueeze(-1))[..., 0]


def ranks(scores: Tensor) -> Tensor:
    """Rank of every entry along the last dim, 0 = largest; ties to the lower index (stable sort)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return torch.empty_like(order).scatter_(-1, order, torch.arange(scores.shape[-1]).expand_as(order))


def per_frame_top(scores: Tensor, budgets: Tensor) -> Tensor:
    """[T, P] bool: frame t keeps its `budgets[t]` best entries."""
    return ranks(scores) < budgets.unsqueeze(-1)


def region_matrix(grid: int, regions: int) -> Tensor:
    """[regions, grid²]: averaging weights of `regions` near-square, near-equal regions tiling the grid: round(√c)
    bands of rows, band i split into as many column ranges as its share of the regions."""
    bands = min(grid, max(1, round(math.sqrt(regions))))
    per_band = frame_budgets(regions, bands).tolist()
    if max(per_band) > grid:
        raise ValueError(f"{regions} regions do not fit a {grid}×{grid} grid")
    matrix = torch.zeros(regions, grid, grid)
    region = 0
    for band, count in enumerate(per_band):
        r0, r1 = band * grid // bands, (band + 1) * grid // bands
        for column in range(count):
            c0, c1 = column * grid // count, (column + 1) * grid // count
            matrix[region, r0:r1, c0:c1] = 1.0 / ((r1 - r0) * (c1 - c0))
            region += 1
    return matrix.reshape(regions, grid * grid)


# ---- baselines ----------------------------------------------------------------------------------------------------
def uniform_pool(cfg: AOTConfig, features: Tensor, score_shallow: Tensor, score_deep: Tensor) -> Tensor:
    budgets = frame_budgets(cfg.output_tokens, cfg.frames).tolist()
    matrices = {c: region_matrix(cfg.grid, c) for c in set(budgets)}
    return torch.cat([matrices[c] @ frame.float() for c, frame in zip(budgets, features)])


def random_select(cfg: AOTConfig, features: Tensor, score_shallow: Tensor, score_deep: Tensor,
                  seed: int = 0) -> Tensor:
    tokens = full_tokens(cfg, features)
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(tokens.shape[0], generator=generator)[: cfg.output_tokens].sort().values
    return tokens[chosen]


def attention_topk(cfg: AOTConfig, features: Tensor, score_shallow: Tensor, score_deep: Tensor) -> Tensor:
    keep = per_frame_top(pooled_scores(cfg, score_deep), frame_budgets(cfg.output_tokens, cfg.frames))
    return pooled_tokens(cfg, features)[keep]


def visionzip(cfg: AOTConfig, features: Tensor, score_shallow: Tensor, score_deep: Tensor,
              dominant_share: float = VISIONZIP_DOMINANT) -> Tensor:
    tokens, scores = pooled_tokens(cfg, features), pooled_scores(cfg, score_deep)
    budgets = frame_budgets(cfg.output_tokens, cfg.frames)
    dominant_counts = torch.clamp((budgets.double() * dominant_share).round().long(), max=budgets)
    dominant = per_frame_top(scores, dominant_counts)
    out = []
    # Frames differ in their counts by one token, so each frame is its own small problem.
    for frame, mask, contextual in zip(tokens, dominant, (budgets - dominant_counts).tolist()):
        out.append(frame[mask])
        if contextual == 0:
            continue
        rest = frame[~mask]                                                    # raster order
        step = max(1, rest.shape[0] // contextual)
        targets = torch.arange(0, rest.shape[0], step)[:contextual]
        is_target = torch.zeros(rest.shape[0], dtype=torch.bool).index_fill_(0, targets, True)
        others = rest[~is_target]
        assign = torch.zeros(others.shape[0], contextual)
        if others.shape[0]:
            nearest = cosine(others[None], rest[targets][None])[0].argmax(-1)
            assign[torch.arange(others.shape[0]), nearest] = 1.0
        out.append((rest[targets] + assign.T @ others) / (1.0 + assign.sum(0)).unsqueeze(-1))
    return torch.cat(out)


def dycoke(cfg: AOTConfig, features: Tensor, score_shallow: Tensor, score_deep: Tensor) -> Tensor:
    tokens = pooled_tokens(cfg, features)
    similarity = torch.nn.functional.cosine_similarity(tokens[1:], tokens[:-1], dim=-1)        # [T-1, P]
    novelty = torch.cat([torch.full_like(tokens[:1, :, 0], 2.0), 1.0 - similarity])            # [T, P]
    novelty = torch.round(novelty * 1e6)        # an unchanged token's cosine is 1 only up to rounding: make ties exact
    keep = ranks(novelty.reshape(-1)) < cfg.output_tokens
    return tokens.reshape(-1, tokens.shape[-1])[keep]


def tome_merge(tokens: Tensor, budget: int) -> Tensor:
    """ToMe bipartite soft matching of `tokens` [M, H] down to `budget` tokens: alternate tokens form the two
    sides; each round merges the `r` best-matched (cosine) tokens of side A into their partners in B, weighted by
    how many original tokens each carries; survivors stay in their original order."""
    x = tokens.float()
    size = torch.ones(x.shape[0])
    position = torch.arange(x.shape[0])
    while x.shape[0] > budget:
        a, b = x[0::2], x[1::2]
        merge = min(a.shape[0], x.shape[0] - budget)
        best, match = cosine(a[None], b[None])[0].max(-1)
        order = torch.sort(best, descending=True, stable=True).indices
        merged, kept = order[:merge], order[merge:]
        size_a, size_b = size[0::2], size[1::2]
        total = size_b.index_add(0, match[merged], size_a[merged])
        b = (b * size_b[:, None]).index_add(0, match[merged], a[merged] * size_a[merged, None]) / total[:, None]
        x = torch.cat([a[kept], b])
        size = torch.cat([size_a[kept], total])
        position = torch.cat([position[0::2][kept], position[1::2]])
        order = position.argsort()
        x, size, position = x[order], size[order], position[order]
    return x


def tome(cfg: AOTConfig, features: Tensor, score_shallow: Tensor, score_deep: Tensor) -> Tensor:
    return tome_merge(full_tokens(cfg, features), cfg.output_tokens)


# ---- AOT and ablations ----------------------------------------------------------------------------------------------
def aot(cfg: AOTConfig, features: Tensor, score_shallow: Tensor, score_deep: Tensor) -> Tensor:
    return AOTReducer(cfg)(features, score_shallow, score_deep)[0].float()


def aot_no_local(cfg: AOTConfig, features: Tensor, score_shallow: Tensor, score_deep: Tensor) -> Tensor:
    deep = top_k_mask(cfg.anchors, score_deep.float())
    anchors = AnchorMasks(torch.zeros_like(deep), deep)
    return AOTReducer(cfg).trace(features, score_shallow, score_deep, anchors=anchors).tokens


def local_only_anchors(cfg: AOTConfig, score_shallow: Tensor) -> AnchorMasks:
    """V anchors by the shallow score alone, all local: V // W² per window, the remainder among the rest (the
    reducer's selection with the shallow score in place of the deep one)."""
    shallow = score_shallow.float()
    per_window = cfg.anchors // cfg.windows ** 2
    windowed, rest = anchor_masks(cfg, window_table(cfg.grid, cfg.windows), shallow, shallow,
                                  global_anchors=cfg.anchors - cfg.windows ** 2 * per_window,
                                  local_per_window=per_window)
    return AnchorMasks(windowed | rest, torch.zeros_like(rest))


def aot_no_global(cfg: AOTConfig, features: Tensor, score_shallow: Tensor, score_deep: Tensor) -> Tensor:
    anchors = local_only_anchors(cfg, score_shallow)
    return AOTReducer(cfg).trace(features, score_shallow, score_deep, anchors=anchors).tokens


def aot_no_intra_ot(cfg: AOTConfig, features: Tensor, score_shallow: Tensor, score_deep: Tensor) -> Tensor:
    frozen = dataclasses.replace(cfg, alpha=0.0, lam=0.0)
    return AOTReducer(cfg).trace(features, score_shallow, score_deep, transport_cfg=frozen).tokens


def uniform_keep_positions(cfg: AOTConfig) -> Tensor:
    """Positions among a clip's later frames' (L−1)·A kept cells that fill the clip's budget after the keyframe:
    A + (L−1)·K of them, evenly spaced."""
    available = (cfg.clip_len - 1) * cfg.pooled_anchors
    wanted = cfg.tokens_per_clip - cfg.pooled_anchors
    if wanted > available:
        raise ValueError(f"aot_no_inter_ot: the clip budget needs {wanted} later-frame tokens but the later frames "
                         f"keep only {available}")
    return torch.arange(wanted) * available // wanted


def aot_no_inter_ot(cfg: AOTConfig, features: Tensor, score_shallow: Tensor, score_deep: Tensor) -> Tensor:
    trace = AOTReducer(cfg).trace(features, score_shallow, score_deep, inter_frame=False)
    if not cfg.inter_frame:
        return trace.tokens
    hidden = features.shape[-1]
    clips = trace.retained.reshape(cfg.clips, cfg.clip_len, cfg.pooled_anchors, hidden)
    later = clips[:, 1:].reshape(cfg.clips, -1, hidden)[:, uniform_keep_positions(cfg)]
    return torch.cat([clips[:, 0], later], dim=1).reshape(-1, hidden)


def aot_random_anchors(cfg: AOTConfig, features: Tensor, score_shallow: Tensor, score_deep: Tensor,
                       seed: int = 0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    chosen = top_k_mask(cfg.anchors, torch.rand(score_deep.shape, generator=generator))
    anchors = AnchorMasks(torch.zeros_like(chosen), chosen)          # neither role: drawn as global
    return AOTReducer(cfg).trace(features, score_shallow, score_deep, anchors=anchors).tokens


BASELINES: dict[str, Method] = {
    "uniform_pool": uniform_pool,
    "random": random_select,
    "attention_topk": attention_topk,
    "visionzip": visionzip,
    "dycoke": dycoke,
    "tome": tome,
}
ABLATIONS: dict[str, Method] = {
    "aot": aot,
    "aot_no_local": aot_no_local,
    "aot_no_global": aot_no_global,
    "aot_no_intra_ot": aot_no_intra_ot,
    "aot_no_inter_ot": aot_no_inter_ot,
    "aot_random_anchors": aot_random_anchors,
}
METHODS: dict[str, Method] = {**ABLATIONS, **BASELINES}
