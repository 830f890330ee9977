"""AOT token reduction with static shapes (AOT_SPEC §1–§4), exportable to one ONNX graph.

Every function works on a batch of frames (or clips) at once; the only Python loops are over the `clip_len - 1`
frames inside a clip, because each frame merges into the anchors the previous one left behind, and over the
Sinkhorn iterations: a fixed count, unrolled, or a fixed maximum with convergence frozen by a flag, one ONNX Scan.
Every count comes from the config, so every shape is known when the graph is traced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import AOTConfig

# A log-marginal that carries no mass: exp(-1e4) is exactly 0 in fp32, and unlike -inf it keeps every
# arithmetic path (max-subtraction inside logsumexp, TensorRT reductions) free of inf - inf.
NO_MASS = -1.0e4


# ---- selection ----------------------------------------------------------------------------------------------
def top_k_mask(k: int, *keys: Tensor) -> Tensor:
    """Bool mask of the `k` best entries along the last dim: largest first key, ties to the next key, then to the
    lower index. Exact on every backend: only the k-th value is taken from TopK, never its tie order."""
    if k == 0:
        return torch.zeros_like(keys[0], dtype=torch.bool)
    lowest = torch.finfo(keys[0].dtype).min
    candidates = torch.ones_like(keys[0], dtype=torch.bool)
    chosen = torch.zeros_like(candidates)
    need = torch.full_like(keys[0][..., :1], k, dtype=torch.long)
    for key in keys:
        masked = torch.where(candidates, key, torch.full_like(key, lowest))
        ranked = torch.topk(masked, k, dim=-1).values
        threshold = ranked.gather(-1, (need - 1).clamp(min=0))
        better = candidates & (masked > threshold)
        chosen = chosen | better
        need = need - better.sum(-1, keepdim=True)
        candidates = candidates & (masked == threshold)
    first_ties = candidates & (torch.cumsum(candidates.to(torch.int32), dim=-1) <= need)
    return chosen | first_ties


def mask_indices(mask: Tensor, k: int) -> Tensor:
    """Ascending indices of the `k` set entries of each row of `mask`: the key `n - i` is distinct per entry."""
    n = mask.shape[-1]
    descending = torch.arange(n, 0, -1, device=mask.device, dtype=torch.float32)
    return torch.topk(mask.float() * descending, k, dim=-1).indices


def top_k_raster(k: int, *keys: Tensor) -> Tensor:
    """Indices of the `k` best entries (see `top_k_mask`), in ascending (raster) order."""
    return mask_indices(top_k_mask(k, *keys), k)


def window_table(grid: int, windows: int) -> Tensor:
    """[windows², largest window] token indices of each window; uneven windows are padded with N, the index of
    the lowest-scoring pad column that `select_anchors` appends."""
    rows = [[r for r in range(grid) if r * windows // grid == w] for w in range(windows)]
    members = [[r * grid + c for r in rows[wr] for c in rows[wc]] for wr in range(windows) for wc in range(windows)]
    width = max(len(m) for m in members)
    return torch.tensor([m + [grid * grid] * (width - len(m)) for m in members], dtype=torch.long)


class AnchorMasks(NamedTuple):
    """Which tokens are anchors, by role: `local` [T, N] bool (windowed, shallow score) and `global_` [T, N] bool
    (deep score among the rest); disjoint. Only their union drives the reduction; the roles are for pictures."""

    local: Tensor
    global_: Tensor

    @property
    def union(self) -> Tensor:
        return self.local | self.global_


def anchor_masks(cfg: AOTConfig, table: Tensor, score_shallow: Tensor, score_deep: Tensor,
                 global_anchors: int | None = None, local_per_window: int | None = None) -> AnchorMasks:
    """`local_per_window` (default `cfg.local_per_window`) local anchors in every window by the shallow score, then
    `global_anchors` (default `cfg.global_anchors`) more among the rest by the deep score (AOT_SPEC §1)."""
    frames, n = score_shallow.shape
    per_window = cfg.local_per_window if local_per_window is None else local_per_window
    lowest = torch.finfo(score_deep.dtype).min
    padded = torch.cat([score_shallow, score_shallow.new_full((frames, 1), lowest)], dim=1)
    window_scores = padded.index_select(1, table.flatten()).view(frames, *table.shape)  # [T, W², w]
    # Window members are listed in raster order, so a lower position is a lower token index.
    local_pos = top_k_raster(per_window, window_scores)                                   # [T, W², k_loc]
    local_idx = table.expand(frames, -1, -1).gather(2, local_pos).flatten(1)
    local = torch.zeros(frames, n, dtype=torch.bool, device=score_deep.device).scatter(1, local_idx, True)
    remaining = torch.where(local, torch.full_like(score_deep, lowest), score_deep)
    count = cfg.global_anchors if global_anchors is None else global_anchors
    return AnchorMasks(local, top_k_mask(count, remaining))


def select_anchors(cfg: AOTConfig, table: Tensor, score_shallow: Tensor, score_deep: Tensor,
                   global_anchors: int | None = None) -> Tensor:
    """[T, N] bool: every anchor of `anchor_masks`, whatever its role."""
    return anchor_masks(cfg, table, score_shallow, score_deep, global_anchors).union


# ---- optimal transport ----------------------------------------------------------------------------------------
def log_sinkhorn(cost: Tensor, log_mu: Tensor, log_nu: Tensor, eps: float, iters: int) -> Tensor:
    """Entropic OT plan for `cost` [B, M, V] with marginals exp(log_mu) [B, M], exp(log_nu) [B, V].

    The plain iterations r <- mu / (K c), c <- nu / (K^T r) from r = c = 1, carried out on log r and log c.
    """
    log_kernel = -cost / eps
    log_r = torch.zeros_like(log_mu)
    log_c = torch.zeros_like(log_nu)
    for _ in range(iters):
        log_r = log_mu - torch.logsumexp(log_kernel + log_c.unsqueeze(1), dim=2)
        log_c = log_nu - torch.logsumexp(log_kernel + log_r.unsqueeze(2), dim=1)
    return torch.exp(log_r.unsqueeze(2) + log_kernel + log_c.unsqueeze(1))


def cosine(x: Tensor, y: Tensor) -> Tensor:
    """[B, M, V] cosine similarity of rows of x [B, M, H] and y [B, V, H] (norms clamped at 1e-12 as
    F.normalize does); divides the small product rather than normalising the wide inputs."""
    x_norm = x.norm(dim=-1).clamp_min(1e-12).unsqueeze(-1)
    y_norm = y.norm(dim=-1).clamp_min(1e-12).unsqueeze(-2)
    return (x @ y.transpose(1, 2)) / (x_norm * y_norm)


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """x [B, N, H] at index [B, K] -> [B, K, H]."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def grid_positions(grid: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """[N, 2] (col, row) / (G - 1) of every token of a row-major G×G grid."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.stack([cols, rows], dim=-1).flatten(0, 1).to(dtype) / max(grid - 1, 1)


class Sinkhorn(Protocol):
    """(cost [B, M, V], log_mu [B, M], log_nu [B, V], *, joint) -> transport plan [B, M, V].

    `joint=True`: the B problems are one call of the authors' `Sinkhorn_v1` (the intra-frame stage: all frames of
    the video), so an early-stopping solver stops them together; `joint=False`: B separate calls (the inter-frame
    steps, one per clip). Rows whose log_mu is `NO_MASS` are not sources."""

    def __call__(self, cost: Tensor, log_mu: Tensor, log_nu: Tensor, *, joint: bool) -> Tensor: ...


def fixed_sinkhorn(cfg: AOTConfig) -> Sinkhorn:
    """`cfg.sinkhorn_iters` log-domain iterations at `cfg.eps`, whatever the batch (`sinkhorn="fixed"`)."""
    def solve(cost: Tensor, log_mu: Tensor, log_nu: Tensor, *, joint: bool) -> Tensor:
        return log_sinkhorn(cost, log_mu, log_nu, cfg.eps, cfg.sinkhorn_iters)
    return solve


SCALING_LAYOUTS = ("rows", "columns")


def kernel_products(kernel: Tensor, layout: str) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """(c ↦ K c, r ↦ Kᵀ r) for a kernel [B, M, V] and scalings c [B, V], r [B, M].

    Two ways of computing the same products, because the two backends want opposite ones. "rows" multiplies row
    vectors by the matrix: on CPU PyTorch ~8× faster than a batched matrix–column product ([32, 729, 126], torch
    2.13). "columns" multiplies the matrix by a column: TensorRT's fused region then reads the kernel as it is,
    while a row times the matrix made it keep one relaid copy of the kernel per product — 11.8 MB per iteration,
    a 2.3 GB workspace at 100 unrolled iterations for 32 frames, more than `check` grants (62.7 MB with "columns")."""
    kernel_t = kernel.transpose(1, 2).contiguous()                              # [B, V, M]
    if layout == "columns":
        return ((lambda c: (kernel @ c.unsqueeze(-1)).squeeze(-1)),
                (lambda r: (kernel_t @ r.unsqueeze(-1)).squeeze(-1)))
    return (lambda c: (c.unsqueeze(1) @ kernel_t).squeeze(1)), (lambda r: (r.unsqueeze(1) @ kernel).squeeze(1))


State = tuple[Tensor, ...]


def repeat(step: Callable[[State], State], state: State, count: int) -> State:
    """`state = step(state)`, `count` times. While exporting, one ONNX Scan over a constant of length `count`, so
    that the exporter traces `step` once and TensorRT builds it once (an ILoop with a fixed trip count): unrolled,
    the reference solver's 4 × 100 iterations were 5/6 of the demo graph's 6,036 TensorRT layers and most of its
    export and build time (docs/benchmarks.md, "Export and build time")."""
    if not torch.compiler.is_exporting() or count == 0:
        for _ in range(count):
            state = step(state)
        return state
    from torch._higher_order_ops.scan import scan

    # Each iteration also passes its slice of the scanned zeros through: a Scan without per-iteration outputs has
    # an empty `scan_output_directions`, whose type ONNX Runtime's quantization tools cannot infer.
    final, _ = scan(lambda carried, x: (step(carried), x.clone()), state, torch.zeros(count))
    return final


def stopping_sinkhorn(cost: Tensor, log_mu: Tensor, log_nu: Tensor, eps: float, tol: float, max_iters: int,
                      joint: bool, layout: str | None = None) -> Tensor:
    """The authors' `Sinkhorn_v1` in a static graph: `max_iters` plain-domain iterations from r = c = 1 (a fixed
    count, `repeat`); after the first iteration whose mean change of r over the source rows is below `tol`, r and c
    are frozen by a `running` flag (one for the whole batch when `joint`, else one per problem) instead of leaving
    the loop. `layout` (see `kernel_products`) defaults to "columns" while exporting, "rows" otherwise.

    Plain domain, not log: an iteration is two batched matrix–vector products instead of two logsumexp passes
    over [B, M, V] — the 100 iterations of the intra-frame call ([32, 729, 126]) took 50 ms against 923 ms
    in the log domain (and 91 ms for the fixed solver's 10 log-domain iterations), at the same fidelity to the
    float64 rule (max relative error 8e-6 either way; docs/benchmarks.md, "Sinkhorn") — and nothing underflows:
    AOTConfig bounds max cost / eps by 60 for this solver (the defaults give 27.1: the kernel stays above 1.7e-12)."""
    kernel = torch.exp(-cost / eps)                                              # [B, M, V]
    k_c, kt_r = kernel_products(kernel, layout or ("columns" if torch.compiler.is_exporting() else "rows"))
    mu, nu = log_mu.exp(), log_nu.exp()                                          # [B, M], [B, V]
    sources = (log_mu > NO_MASS / 2).to(cost.dtype)
    dims = (0, 1) if joint else (1,)
    # The authors' r has only the M source rows. Rows without mass start at 0, where every iteration leaves them,
    # so |r - r_prev| summed over all rows is their sum over the source rows; and mean < tol is sum < tol · M.
    threshold = tol * sources.sum(dims, keepdim=True)                            # [1, 1] or [B, 1]

    def iteration(state: State) -> State:
        r, c, running = state
        new_r = mu / k_c(c)
        new_c = nu / kt_r(new_r)
        converged = torch.linalg.vector_norm(new_r - r, ord=1, dim=dims, keepdim=True) < threshold
        return torch.where(running, new_r, r), torch.where(running, new_c, c), running & ~converged

    r, c, _ = repeat(iteration, (sources, torch.ones_like(nu), torch.ones_like(threshold, dtype=torch.bool)),
                     max_iters)
    return r.unsqueeze(-1) * kernel * c.unsqueeze(1)


def reference_sinkhorn(cfg: AOTConfig) -> Sinkhorn:
    """The authors' stopping rule (`sinkhorn="reference"`), `cfg.sinkhorn_max_iters` iterations."""
    def solve(cost: Tensor, log_mu: Tensor, log_nu: Tensor, *, joint: bool) -> Tensor:
        return stopping_sinkhorn(cost, log_mu, log_nu, cfg.eps, cfg.sinkhorn_tol, cfg.sinkhorn_max_iters, joint)
    return solve


def config_sinkhorn(cfg: AOTConfig) -> Sinkhorn:
    """The solver `cfg.sinkhorn` names."""
    return {"fixed": fixed_sinkhorn, "reference": reference_sinkhorn}[cfg.sinkhorn](cfg)


@dataclass(frozen=True)
class Transport:
    """The intra-frame transport as a linear map of a frame's tokens: updated anchor j is
    `self_weight[j] · y_j + Σ_i weights[i, j] · x_i` (anchors [T, V] self weights, [T, N, V] token weights)."""

    anchor_idx: Tensor
    self_weight: Tensor
    weights: Tensor

    def updated_anchors(self, features: Tensor) -> Tensor:
        """[T, V, H]; the reducer itself never forms them (see `pool_retained`)."""
        return (self.self_weight.unsqueeze(-1) * gather_rows(features, self.anchor_idx)
                + self.weights.transpose(1, 2) @ features)


def intra_frame_transport(cfg: AOTConfig, features: Tensor, anchor_idx: Tensor, positions: Tensor,
                          sinkhorn: Sinkhorn | None = None) -> Transport:
    """Fold every frame's pruned tokens into its anchors (AOT_SPEC §2), as a linear map of the tokens."""
    n_anchors = anchor_idx.shape[1]
    anchors = gather_rows(features, anchor_idx)                                                    # [T, V, H]
    pruned = torch.ones_like(features[..., 0], dtype=torch.bool).scatter(1, anchor_idx, False)     # [T, N]
    similarity = cosine(features, anchors)                                                         # [T, N, V]
    anchor_pos = positions[anchor_idx]                                                             # [T, V, 2]
    distance = (positions[None, :, None, :] - anchor_pos[:, None, :, :]).pow(2).sum(-1).sqrt()     # [T, N, V]
    cost = (1.0 - similarity) + cfg.beta * distance
    # Anchors are not sources: their rows carry no mass, which is the M×V problem written on all N rows.
    log_mu = torch.where(pruned, torch.full_like(cost[..., 0], -math.log(cfg.tokens_per_frame - n_anchors)),
                         torch.full_like(cost[..., 0], NO_MASS))
    log_nu = torch.full_like(cost[:, 0, :], -math.log(n_anchors))
    plan = (sinkhorn or config_sinkhorn(cfg))(cost, log_mu, log_nu, joint=True)                   # [T, N, V]
    absorbed = plan.sum(1)                                                                         # [T, V]
    # y~ = (y + lam·Πᵀx) / (1 + lam·m) = self_weight · y + weightsᵀ · x
    self_weight = 1.0 / (1.0 + cfg.lam * absorbed)
    weights = cfg.lam * plan * self_weight.unsqueeze(1)
    if cfg.alpha > 0:
        nearest = similarity.argmax(-1, keepdim=True)                                              # [T, N, 1]
        members = ((nearest == torch.arange(n_anchors, device=features.device)) & pruned.unsqueeze(-1)).float()
        hard_weight = 1.0 / (1.0 + members.sum(1))                                                 # [T, V]
        self_weight = (1.0 - cfg.alpha) * self_weight + cfg.alpha * hard_weight
        weights = (1.0 - cfg.alpha) * weights + cfg.alpha * members * hard_weight.unsqueeze(1)
    return Transport(anchor_idx, self_weight, weights)


# ---- pooling ----------------------------------------------------------------------------------------------------
def pool_grid(cfg: AOTConfig, values: Tensor) -> Tensor:
    """[T, N, C] on the G×G grid -> [T, P, C] on the pooled grid, exactly as the VLM pools its video features."""
    frames, _, channels = values.shape
    image = values.transpose(1, 2).reshape(frames, channels, cfg.grid, cfg.grid)
    if cfg.pool_mode == "bilinear":
        pooled = F.interpolate(image, size=(cfg.pooled_grid, cfg.pooled_grid), mode="bilinear", align_corners=False)
    else:
        pooled = F.avg_pool2d(image, kernel_size=cfg.pool, stride=cfg.pool)
    return pooled.flatten(2).transpose(1, 2)


def pooling_matrix(cfg: AOTConfig, dtype: torch.dtype = torch.float32) -> Tensor:
    """[P, N]: pooling is linear, so pooling the one-hot grids gives its weights, exactly as `pool_grid` uses them."""
    identity = torch.eye(cfg.tokens_per_frame, dtype=dtype).unsqueeze(0)
    return pool_grid(cfg, identity)[0].contiguous()


def mask_quantum(cfg: AOTConfig) -> float:
    """Every pooled 0/1 mask value is an exact multiple of 1/quantum: bilinear weights with align_corners=False
    are multiples of 1/(2·Gp) per axis, average pooling of 1/pool per axis. Rounding to it makes ties exact."""
    return 4.0 * cfg.pooled_grid ** 2 if cfg.pool_mode == "bilinear" else float(cfg.pool ** 2)


def retained_cells(cfg: AOTConfig, pooled_mask: Tensor, pooled_deep: Tensor) -> Tensor:
    """[T, A] cells kept per frame, raster order: the largest pooled anchor mask, then the largest pooled deep
    score (AOT_SPEC §3, static variant)."""
    quantised = torch.round(pooled_mask * mask_quantum(cfg))
    return top_k_raster(cfg.pooled_anchors, quantised, pooled_deep)


def pool_retained(features: Tensor, transport: Transport, pool_rows: Tensor) -> Tensor:
    """The retained cells [T, A, H] of the pooled grid in which anchors carry their updated values.

    Pooling and the transport are both linear in the tokens, so they compose into one [T, A, N] map applied to the
    wide features once: pool_rows · X + anchor_rows · (updated − anchors), with updated − anchors =
    (self_weight − 1) · one_hot(anchor_idx) · X + weightsᵀ · X. `pool_rows` are the kept rows of the pooling
    matrix; anchor_rows their columns at the anchors."""
    anchor_idx = transport.anchor_idx
    tokens = features.shape[1]
    anchor_rows = pool_rows.gather(2, anchor_idx.unsqueeze(1).expand(-1, pool_rows.shape[1], -1))   # [T, A, V]
    one_hot = (anchor_idx.unsqueeze(-1) == torch.arange(tokens, device=features.device)).to(features.dtype)
    moved = (transport.self_weight - 1.0).unsqueeze(-1) * one_hot + transport.weights.transpose(1, 2)  # [T, V, N]
    return (pool_rows + anchor_rows @ moved) @ features


# ---- inter-frame ------------------------------------------------------------------------------------------------
def temporal_scale(cfg: AOTConfig, offset: int) -> float:
    return 1.0 - math.exp(-offset ** 2 / (2.0 * cfg.sigma_t ** 2))


def merge_into_anchors(cfg: AOTConfig, anchors: Tensor, sources: Tensor, weights: Tensor) -> Tensor:
    """a_m <- (a_m + lam·Σ_i w_im x_i) / (1 + lam·Σ_i w_im) for weights [C, S, A] of sources [C, S, H]."""
    return (anchors + cfg.lam * weights.transpose(1, 2) @ sources) / (1.0 + cfg.lam * weights.sum(1).unsqueeze(-1))


def inter_frame_cost(cfg: AOTConfig, sources: Tensor, anchors: Tensor, offset: int) -> Tensor:
    """Cosine cost shifted to start at 0 and scaled by how far the frame is from its keyframe."""
    limit = 1.0 - 1e-6
    dissimilarity = 1.0 - cosine(sources, anchors).clamp(-limit, limit)
    return (dissimilarity - dissimilarity.amin(dim=(1, 2), keepdim=True)) * temporal_scale(cfg, offset)


@dataclass(frozen=True)
class InterFrame:
    """What the inter-frame stage decided in every clip (AOT_SPEC §4); dim 1 is the step ℓ = 1 … L−1, frame ℓ of
    the clip merging into the anchors the step before left. C clips, A cells per frame, K distinct per frame."""

    assignment: Tensor       # [C, L-1, A, A] row-normalised plan P: source cell i of frame ℓ → anchor m
    merge_weights: Tensor    # [C, L-1, A, A] P with the distinct cells' rows zeroed: what step ℓ merges
    kept: Tensor             # [C, L-1, K] positions (among frame ℓ's A cells) kept as distinct, ascending
    anchors: Tensor          # [C, A, H] the anchors after the last step


def inter_frame_transport(cfg: AOTConfig, tokens: Tensor, sinkhorn: Sinkhorn | None = None) -> InterFrame:
    """Per clip [C, L, A, H]: merge frames 2…L into the keyframe anchors, keep each frame's `keep` most distinct
    tokens (AOT_SPEC §4)."""
    clips, _, cells, _ = tokens.shape
    anchors = tokens[:, 0]
    assignments, merge_weights, kept = [], [], []
    for offset in range(1, cfg.clip_len):
        sources = tokens[:, offset]
        cost = inter_frame_cost(cfg, sources, anchors, offset)
        uniform = torch.full_like(cost[:, :, 0], -math.log(cfg.pooled_anchors))
        plan = (sinkhorn or config_sinkhorn(cfg))(cost, uniform, uniform, joint=False)
        assignment = plan / plan.sum(-1, keepdim=True)                                         # rows sum to 1
        confidence = assignment.amax(-1)                                                       # [C, A]
        merged = torch.ones_like(confidence)
        if cfg.keep:
            distinct = top_k_raster(cfg.keep, -confidence)                                     # [C, K]
            merged = merged.scatter(1, distinct, 0.0)
        else:
            distinct = torch.zeros_like(confidence[:, :0], dtype=torch.long)
        weights = assignment * merged.unsqueeze(-1)
        anchors = merge_into_anchors(cfg, anchors, sources, weights)
        assignments.append(assignment)
        merge_weights.append(weights)
        kept.append(distinct)
    if cfg.clip_len == 1:
        no_steps = tokens.new_zeros(clips, 0, cells, cells)
        return InterFrame(no_steps, no_steps, tokens.new_zeros(clips, 0, cfg.keep, dtype=torch.long), anchors)
    return InterFrame(torch.stack(assignments, 1), torch.stack(merge_weights, 1), torch.stack(kept, 1), anchors)


# ---- the module ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReductionTrace:
    """Every decision of one reduction, as the reducer itself takes them (`AOTReducer.trace`); `tokens` and `index`
    are what `AOTReducer` returns. T frames, N tokens, V anchors, A cells, H width; all values fp32 except `tokens`
    (the input dtype)."""

    cfg: AOTConfig
    anchors: AnchorMasks       # local [T, N], global_ [T, N] bool
    transport: Transport       # the intra-frame transport: anchor_idx [T, V], self_weight [T, V], weights [T, N, V]
    cells: Tensor              # [T, A] pooled cells kept per frame, raster order
    retained: Tensor           # [T, A, H] their tokens, anchors carrying their transported values
    inter: InterFrame | None   # None when the inter-frame stage did not run (clip_len 1, or `inter_frame=False`)
    tokens: Tensor             # [n, H] the output tokens
    index: Tensor              # [n, 3] int32 (frame, row, col) of each on the pooled grid

    @property
    def anchor_idx(self) -> Tensor:
        """[T, V] the anchors' token indices, ascending."""
        return self.transport.anchor_idx

    @property
    def keyframes(self) -> Tensor:
        """[T] bool: the frames whose cells are emitted as they are (every frame without the inter-frame stage)."""
        frames = torch.arange(self.cfg.frames, device=self.cells.device)
        if self.inter is None:
            return torch.ones_like(frames, dtype=torch.bool)
        return frames % self.cfg.clip_len == 0

    @property
    def distinct(self) -> Tensor:
        """[T, A] bool: the cells a later frame of a clip keeps as distinct tokens (none in keyframes)."""
        if self.inter is None:
            return torch.zeros_like(self.cells, dtype=torch.bool)
        clips, steps, _ = self.inter.kept.shape
        later = torch.zeros(clips, steps, self.cells.shape[1], dtype=torch.bool, device=self.cells.device)
        later = later.scatter(2, self.inter.kept, True)
        keyframe = torch.zeros_like(later[:, :1])
        return torch.cat([keyframe, later], dim=1).flatten(0, 1)


class AOTReducer(nn.Module):
    """`tokens, index = AOTReducer(cfg)(features [T,N,H], score_shallow [T,N], score_deep [T,N])`.

    tokens [cfg.output_tokens, H] in the input dtype (all arithmetic in fp32); index [cfg.output_tokens, 3] int32
    (frame, row, col) on the pooled grid. Per clip: keyframe cells, kept cells of frames 2…L, updated anchors.
    `trace` returns every decision on the way; `forward` is its tokens and index.
    """

    def __init__(self, cfg: AOTConfig, sinkhorn: Sinkhorn | None = None):
        super().__init__()
        self.cfg = cfg
        # Another solver (e.g. the float64 reference's) is for measurement only; exports use `cfg.sinkhorn`'s.
        self.sinkhorn = sinkhorn or config_sinkhorn(cfg)
        self.register_buffer("windows", window_table(cfg.grid, cfg.windows), persistent=False)
        self.register_buffer("positions", grid_positions(cfg.grid), persistent=False)
        self.register_buffer("pooling", pooling_matrix(cfg), persistent=False)

    def forward(self, features: Tensor, score_shallow: Tensor, score_deep: Tensor) -> tuple[Tensor, Tensor]:
        trace = self.trace(features, score_shallow, score_deep)
        return trace.tokens, trace.index

    def trace(self, features: Tensor, score_shallow: Tensor, score_deep: Tensor, *,
              anchors: AnchorMasks | None = None, transport_cfg: AOTConfig | None = None,
              inter_frame: bool = True) -> ReductionTrace:
        """The reduction of `features` [T, N, H] by the scores [T, N], every decision kept.

        The options are for studies (the defaults are the reduction): `anchors` replaces the anchor selection
        (the same count in every frame); `transport_cfg` is the config of the intra-frame transport only (e.g.
        alpha=0, lam=0: anchors keep their values; the solver stays this reducer's); `inter_frame=False` stops
        after the kept cells (`tokens` is then every kept cell, T·A of them, frame-major)."""
        cfg = self.cfg
        out_dtype = features.dtype
        features, score_shallow, score_deep = features.float(), score_shallow.float(), score_deep.float()
        hidden = features.shape[-1]

        if anchors is None:
            anchors = anchor_masks(cfg, self.windows, score_shallow, score_deep)
            count = cfg.anchors
        else:
            count = same_count(anchors.union)
        anchor_mask = anchors.union                                                            # [T, N]
        cells = self.pooled_cells(anchor_mask, score_deep)                                   # [T, A]
        anchor_idx = mask_indices(anchor_mask, count)                                          # [T, V]
        transport = intra_frame_transport(transport_cfg or cfg, features, anchor_idx, self.positions, self.sinkhorn)
        retained = pool_retained(features, transport, self.pooling[cells])                     # [T, A, H]
        frame_ids = torch.arange(cfg.frames, device=cells.device).unsqueeze(-1).expand_as(cells)

        if not (cfg.inter_frame and inter_frame):
            return ReductionTrace(cfg, anchors, transport, cells, retained, None,
                                  retained.reshape(-1, hidden).to(out_dtype),
                                  self._index(frame_ids.reshape(-1), cells.reshape(-1)))

        shape = (cfg.clips, cfg.clip_len, cfg.pooled_anchors)
        clip_tokens = retained.reshape(*shape, hidden)
        clip_cells = cells.reshape(shape)
        clip_frames = frame_ids.reshape(shape)
        inter = inter_frame_transport(cfg, clip_tokens, self.sinkhorn)
        later_tokens = clip_tokens[:, 1:].flatten(1, 2)                                        # [C, (L-1)A, H]
        offsets = (torch.arange(cfg.clip_len - 1, device=cells.device) * cfg.pooled_anchors).view(1, -1, 1)
        kept_flat = (inter.kept + offsets).flatten(1)                                          # [C, (L-1)K]
        kept_tokens = gather_rows(later_tokens, kept_flat)
        kept_cells = clip_cells[:, 1:].flatten(1).gather(1, kept_flat)
        kept_frames = clip_frames[:, 1:].flatten(1).gather(1, kept_flat)

        tokens = torch.cat([clip_tokens[:, 0], kept_tokens, inter.anchors], dim=1)
        out_cells = torch.cat([clip_cells[:, 0], kept_cells, clip_cells[:, 0]], dim=1)
        out_frames = torch.cat([clip_frames[:, 0], kept_frames, clip_frames[:, 0]], dim=1)
        return ReductionTrace(cfg, anchors, transport, cells, retained, inter,
                              tokens.reshape(-1, hidden).to(out_dtype),
                              self._index(out_frames.reshape(-1), out_cells.reshape(-1)))

    def select(self, score_shallow: Tensor, score_deep: Tensor) -> tuple[Tensor, Tensor]:
        """Which tokens become anchors [T, N] and which pooled cells are kept [T, A]: the scores decide both."""
        anchor_mask = select_anchors(self.cfg, self.windows, score_shallow.float(), score_deep.float())
        return anchor_mask, self.pooled_cells(anchor_mask, score_deep.float())

    def pooled_cells(self, anchor_mask: Tensor, score_deep: Tensor) -> Tensor:
        """[T, A] kept cells of anchors [T, N] (see `retained_cells`), on this reducer's pooling."""
        pooled_mask = anchor_mask.float() @ self.pooling.T                                     # [T, P]
        pooled_deep = score_deep @ self.pooling.T
        return retained_cells(self.cfg, pooled_mask, pooled_deep)

    def _index(self, frames: Tensor, cells: Tensor) -> Tensor:
        grid = self.cfg.pooled_grid
        return torch.stack([frames, cells // grid, cells % grid], dim=-1).to(torch.int32)


def same_count(mask: Tensor) -> int:
    """The number of set entries per row of `mask` [T, N], which must be the same in every row."""
    counts = mask.sum(1)
    if not bool((counts == counts[0]).all()):
        raise ValueError(f"anchors must set the same number in every frame, not {sorted(set(counts.tolist()))}")
    return int(counts[0])
