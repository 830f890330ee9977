"""Naive, independent reference implementation of AOT token reduction.

Pure numpy float64 with explicit Python loops (clarity over speed). Meant only for
small shapes in tests, as an oracle for the vectorised implementation.
Follows /work/shared/AOT_SPEC.md sections 1-4 with the conventions fixed in the
test brief (plain-domain Sinkhorn, exact-V anchors, static A-cell selection). The Sinkhorn
runs cfg.sinkhorn_iters iterations, or, for cfg.sinkhorn == "reference", stops by the
authors' rule: all frames' intra-frame problems as one call stopped together, each
inter-frame step on its own.

Importing this module has no side effects.
"""

import math

import numpy as np


# --------------------------------------------------------------------------- helpers

def _normalize(v):
    v = np.asarray(v, dtype=np.float64)
    n = math.sqrt(float(np.dot(v, v)))
    return v / max(n, 1e-12)


def _cos_matrix(xs, ys):
    """cos[i, j] = normalize(xs[i]) . normalize(ys[j]), element by element."""
    out = np.zeros((len(xs), len(ys)), dtype=np.float64)
    xn = [_normalize(x) for x in xs]
    yn = [_normalize(y) for y in ys]
    for i in range(len(xs)):
        for j in range(len(ys)):
            out[i, j] = float(np.dot(xn[i], yn[j]))
    return out


def _sinkhorn_plain_joint(Cs, eps, iters, tol=None):
    """Plain-domain Sinkhorn from r = c = 1 with uniform marginals on several problems solved as one call;
    returns their plans and the iterations run.

    tol None: exactly `iters` iterations. Otherwise the authors' rule (Sinkhorn_v1): after each iteration, the
    mean of |r - r_prev| over every row of every problem; the first time it is below `tol`, all problems stop
    (that iteration's update kept), at most `iters` iterations."""
    Ks, rs, cs = [], [], []
    for C in Cs:
        n_rows, n_cols = C.shape
        Kmat = np.zeros((n_rows, n_cols), dtype=np.float64)
        for i in range(n_rows):
            for j in range(n_cols):
                Kmat[i, j] = math.exp(-C[i, j] / eps)
        Ks.append(Kmat)
        rs.append([1.0] * n_rows)
        cs.append([1.0] * n_cols)
    ran = 0
    for _ in range(iters):
        ran += 1
        total_change, total_rows = 0.0, 0
        for p, Kmat in enumerate(Ks):
            n_rows, n_cols = Kmat.shape
            mu = 1.0 / n_rows
            nu = 1.0 / n_cols
            new_r = []
            for i in range(n_rows):
                s = 0.0
                for j in range(n_cols):
                    s += Kmat[i, j] * cs[p][j]
                new_r.append(mu / s)
            for i in range(n_rows):
                total_change += abs(new_r[i] - rs[p][i])
            total_rows += n_rows
            rs[p] = new_r
            new_c = []
            for j in range(n_cols):
                s = 0.0
                for i in range(n_rows):
                    s += Kmat[i, j] * rs[p][i]
                new_c.append(nu / s)
            cs[p] = new_c
        if tol is not None and total_change / total_rows < tol:
            break
    plans = []
    for p, Kmat in enumerate(Ks):
        n_rows, n_cols = Kmat.shape
        Pi = np.zeros((n_rows, n_cols), dtype=np.float64)
        for i in range(n_rows):
            for j in range(n_cols):
                Pi[i, j] = rs[p][i] * Kmat[i, j] * cs[p][j]
        plans.append(Pi)
    return plans, ran


def _sinkhorn_settings(cfg):
    """(iterations, tol) of the solver cfg names: "fixed" runs sinkhorn_iters; "reference" the authors' rule."""
    if str(getattr(cfg, "sinkhorn", "fixed")) == "reference":
        return int(cfg.sinkhorn_max_iters), float(cfg.sinkhorn_tol)
    return int(cfg.sinkhorn_iters), None


# --------------------------------------------------------------------------- stage 1

def _select_anchors(cfg, s_shallow, s_deep):
    """Returns the sorted list of anchor token indices for one frame."""
    G = int(cfg.grid)
    W = int(cfg.windows)
    V = int(cfg.anchors)
    N = G * G
    k_loc = int(math.floor(V * (1.0 - float(cfg.global_ratio)))) // (W * W)

    chosen = set()
    # local anchors, window by window
    windows = {}
    for t in range(N):
        r, c = divmod(t, G)
        key = (r * W // G, c * W // G)
        windows.setdefault(key, []).append(t)
    for wr in range(W):
        for wc in range(W):
            members = windows.get((wr, wc), [])
            ranked = sorted(members, key=lambda t: (-float(s_shallow[t]), t))
            for t in ranked[:k_loc]:
                chosen.add(t)
    # global anchors among the rest
    n_glob = V - W * W * k_loc
    rest = [t for t in range(N) if t not in chosen]
    ranked = sorted(rest, key=lambda t: (-float(s_deep[t]), t))
    for t in ranked[:n_glob]:
        chosen.add(t)
    if len(chosen) != V:
        raise ValueError(f"selected {len(chosen)} anchors, expected V={V}")
    return sorted(chosen)


# --------------------------------------------------------------------------- stage 2

def _intra_frame_cost(cfg, feats, anchors):
    """feats [N, H] float64, anchors sorted token ids. Returns (C [M, V], pruned ids, cos [M, V])."""
    G = int(cfg.grid)
    N = G * G
    beta = float(cfg.beta)

    anchor_set = set(anchors)
    pruned = [t for t in range(N) if t not in anchor_set]
    M = len(pruned)
    V = len(anchors)

    xs = [feats[t] for t in pruned]
    ys = [feats[t] for t in anchors]
    cos = _cos_matrix(xs, ys)

    def pos(t):
        r, c = divmod(t, G)
        return (c / (G - 1), r / (G - 1))

    C = np.zeros((M, V), dtype=np.float64)
    for i in range(M):
        pi = pos(pruned[i])
        for j in range(V):
            pj = pos(anchors[j])
            dist = math.sqrt((pi[0] - pj[0]) ** 2 + (pi[1] - pj[1]) ** 2)
            C[i, j] = (1.0 - cos[i, j]) + beta * dist
    return C, pruned, cos


def _intra_frame_update(cfg, feats, anchors, pruned, cos, Pi):
    """Anchors moved by the plan Pi [M, V] (and the hard-merge blend). Returns the updated grid [N, H]."""
    lam = float(cfg.lam)
    alpha = float(cfg.alpha)
    M = len(pruned)
    V = len(anchors)
    xs = [feats[t] for t in pruned]
    ys = [feats[t] for t in anchors]
    out = feats.copy()

    new_anchor = []
    for j in range(V):
        m_j = 0.0
        acc = np.zeros_like(ys[j])
        for i in range(M):
            m_j += Pi[i, j]
            acc = acc + Pi[i, j] * xs[i]
        y_tilde = (ys[j] + lam * acc) / (1.0 + lam * m_j)
        new_anchor.append(y_tilde)

    if alpha > 0:
        nearest = []
        for i in range(M):
            best_j = 0
            for j in range(1, V):
                if cos[i, j] > cos[i, best_j]:  # strict: lower j wins ties
                    best_j = j
            nearest.append(best_j)
        for j in range(V):
            s = ys[j].copy()
            cnt = 0
            for i in range(M):
                if nearest[i] == j:
                    s = s + xs[i]
                    cnt += 1
            h_j = s / (1.0 + cnt)
            new_anchor[j] = (1.0 - alpha) * new_anchor[j] + alpha * h_j

    for j in range(V):
        out[anchors[j]] = new_anchor[j]
    return out


# --------------------------------------------------------------------------- stage 3

def _pool_grid(cfg, grid):
    """grid [G, G, ...] -> pooled [Gp, Gp, ...], Gp."""
    G = int(cfg.grid)
    p = int(cfg.pool)
    mode = str(cfg.pool_mode)
    grid = np.asarray(grid, dtype=np.float64)
    tail = grid.shape[2:]
    if mode == "bilinear":
        Gp = -(-G // p)  # ceil
        scale = G / Gp

        def taps(d):
            src = (d + 0.5) * scale - 0.5
            if src < 0:
                src = 0.0
            i0 = int(math.floor(src))
            i1 = min(i0 + 1, G - 1)
            w = src - i0
            return i0, i1, w

        # rows first
        tmp = np.zeros((Gp, G) + tail, dtype=np.float64)
        for dr in range(Gp):
            i0, i1, w = taps(dr)
            for c in range(G):
                tmp[dr, c] = (1.0 - w) * grid[i0, c] + w * grid[i1, c]
        out = np.zeros((Gp, Gp) + tail, dtype=np.float64)
        for dc in range(Gp):
            j0, j1, w = taps(dc)
            for dr in range(Gp):
                out[dr, dc] = (1.0 - w) * tmp[dr, j0] + w * tmp[dr, j1]
        return out, Gp
    elif mode == "average":
        Gp = G // p
        out = np.zeros((Gp, Gp) + tail, dtype=np.float64)
        for dr in range(Gp):
            for dc in range(Gp):
                s = np.zeros(tail, dtype=np.float64)
                for a in range(p):
                    for b in range(p):
                        s = s + grid[dr * p + a, dc * p + b]
                out[dr, dc] = s / (p * p)
        return out, Gp
    else:
        raise ValueError(f"unknown pool_mode {mode!r}")


def _pool_and_keep(cfg, grid_feats, anchor_mask, deep):
    """Returns (kept cell ids in raster order, pooled features [Gp*Gp, H], Gp)."""
    G = int(cfg.grid)
    A = int(cfg.pooled_anchors)
    H = grid_feats.shape[-1]
    pf, Gp = _pool_grid(cfg, grid_feats.reshape(G, G, H))
    pm, _ = _pool_grid(cfg, anchor_mask.reshape(G, G))
    pd, _ = _pool_grid(cfg, deep.reshape(G, G))
    if str(cfg.pool_mode) == "bilinear":
        Q = 4 * Gp * Gp
    else:
        Q = int(cfg.pool) ** 2
    n_cells = Gp * Gp
    if A > n_cells:
        raise ValueError(f"A={A} > pooled cells {n_cells}")
    mask_q = []
    deep_flat = []
    for cell in range(n_cells):
        r, c = divmod(cell, Gp)
        mask_q.append(int(round(float(pm[r, c]) * Q)))
        deep_flat.append(float(pd[r, c]))
    ranked = sorted(range(n_cells), key=lambda k: (-mask_q[k], -deep_flat[k], k))
    kept = sorted(ranked[:A])
    return kept, pf.reshape(n_cells, H), Gp


# --------------------------------------------------------------------------- stage 4

def _inter_clip(cfg, clip_tokens, clip_cells, frame0, Gp):
    """clip_tokens: list over L frames of [A, H]; clip_cells: list of kept cell lists."""
    L = len(clip_tokens)
    A = int(cfg.pooled_anchors)
    K = int(cfg.keep)
    eps = float(cfg.eps)
    lam = float(cfg.lam)
    sigma = float(cfg.sigma_t)
    iters, tol = _sinkhorn_settings(cfg)
    clipv = 1.0 - 1e-6

    toks = []
    idx = []

    key_cells = clip_cells[0]
    for i in range(A):
        toks.append(clip_tokens[0][i].copy())
        r, c = divmod(key_cells[i], Gp)
        idx.append((frame0, r, c))

    anchors = [clip_tokens[0][m].copy() for m in range(A)]

    for l in range(1, L):
        xs = [clip_tokens[l][i] for i in range(A)]
        cos = _cos_matrix(xs, anchors)
        Csim = np.zeros((A, A), dtype=np.float64)
        for i in range(A):
            for m in range(A):
                v = cos[i, m]
                if v > clipv:
                    v = clipv
                if v < -clipv:
                    v = -clipv
                Csim[i, m] = 1.0 - v
        cmin = min(Csim[i, m] for i in range(A) for m in range(A))
        factor = 1.0 - math.exp(-(l ** 2) / (2.0 * sigma ** 2))
        C = np.zeros((A, A), dtype=np.float64)
        for i in range(A):
            for m in range(A):
                C[i, m] = (Csim[i, m] - cmin) * factor
        (Pi,), _ = _sinkhorn_plain_joint([C], eps, iters, tol)   # each (clip, frame) step is its own call
        P = np.zeros((A, A), dtype=np.float64)
        q = []
        for i in range(A):
            rs = 0.0
            for m in range(A):
                rs += Pi[i, m]
            for m in range(A):
                P[i, m] = Pi[i, m] / rs
            q.append(max(P[i, m] for m in range(A)))

        ranked = sorted(range(A), key=lambda i: (q[i], i))
        distinct = sorted(ranked[:K])
        distinct_set = set(distinct)
        merged = [i for i in range(A) if i not in distinct_set]

        for i in distinct:
            toks.append(xs[i].copy())
            r, c = divmod(clip_cells[l][i], Gp)
            idx.append((frame0 + l, r, c))

        new_anchors = []
        for m in range(A):
            acc = np.zeros_like(anchors[m])
            w = 0.0
            for i in merged:
                acc = acc + P[i, m] * xs[i]
                w += P[i, m]
            new_anchors.append((anchors[m] + lam * acc) / (1.0 + lam * w))
        anchors = new_anchors

    for m in range(A):
        toks.append(anchors[m])
        r, c = divmod(key_cells[m], Gp)
        idx.append((frame0, r, c))
    return toks, idx


# --------------------------------------------------------------------------- entry

def naive_aot(cfg, features, score_shallow, score_deep):
    """Naive AOT reference.

    cfg: object with frames, clip_len, grid, windows, pool, pool_mode, anchors,
         pooled_anchors, keep, sinkhorn_iters, eps, beta, alpha, lam, sigma_t, global_ratio.
    features [T, G*G, H]; score_shallow, score_deep [T, G*G].
    Returns (tokens [n, H] float64, index [n, 3] int64 of (frame, pooled row, pooled col)).
    """
    features = np.asarray(features, dtype=np.float64)
    score_shallow = np.asarray(score_shallow, dtype=np.float64)
    score_deep = np.asarray(score_deep, dtype=np.float64)
    T = int(cfg.frames)
    L = int(cfg.clip_len)
    G = int(cfg.grid)
    N = G * G
    if features.ndim != 3 or features.shape[0] != T or features.shape[1] != N:
        raise ValueError(f"features shape {features.shape} != [T={T}, N={N}, H]")
    if score_shallow.shape != (T, N) or score_deep.shape != (T, N):
        raise ValueError("score shapes must be [T, G*G]")
    H = features.shape[2]

    # The intra-frame transport of all frames is one Sinkhorn call (the authors' rule stops them together).
    frame_anchors = [_select_anchors(cfg, score_shallow[t], score_deep[t]) for t in range(T)]
    costs = [_intra_frame_cost(cfg, features[t], frame_anchors[t]) for t in range(T)]
    iters, tol = _sinkhorn_settings(cfg)
    plans, _ = _sinkhorn_plain_joint([C for C, _, _ in costs], float(cfg.eps), iters, tol)

    per_frame_tokens = []
    per_frame_cells = []
    Gp = None
    for t in range(T):
        anchors = frame_anchors[t]
        _, pruned, cos = costs[t]
        grid = _intra_frame_update(cfg, features[t], anchors, pruned, cos, plans[t])
        mask = np.zeros(N, dtype=np.float64)
        for a in anchors:
            mask[a] = 1.0
        kept, pooled, Gp = _pool_and_keep(cfg, grid, mask, score_deep[t])
        per_frame_cells.append(kept)
        per_frame_tokens.append(np.stack([pooled[k] for k in kept]) if kept
                                else np.zeros((0, H)))

    toks = []
    idx = []
    if L == 1:
        for t in range(T):
            for i, cell in enumerate(per_frame_cells[t]):
                toks.append(per_frame_tokens[t][i].copy())
                r, c = divmod(cell, Gp)
                idx.append((t, r, c))
    else:
        if L < 1 or T % L != 0:
            raise ValueError(f"frames T={T} not divisible into clips of L={L}")
        for s in range(0, T, L):
            ct, ci = _inter_clip(cfg, per_frame_tokens[s:s + L],
                                 per_frame_cells[s:s + L], s, Gp)
            toks.extend(ct)
            idx.extend(ci)

    tokens = np.stack(toks).astype(np.float64) if toks else np.zeros((0, H))
    index = np.array(idx, dtype=np.int64).reshape(-1, 3)
    return tokens, index
