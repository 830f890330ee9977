"""Structural invariants of AOTReducer that hold for any input: shapes, output layout, what each stage may and
may not touch, window quotas, tie-breaking, determinism, numerical robustness (AOT_SPEC §1–§4), and that the
trace's recorded decisions are the ones the output is made of."""

import dataclasses

import pytest
import torch
from conftest import random_inputs

from aot_export import AOTConfig, AOTReducer
from aot_export.reducer import AnchorMasks, anchor_masks, select_anchors

# name: (config, hidden width)
CONFIGS = {
    "g9-bilinear": (AOTConfig(frames=8, clip_len=4, grid=9, windows=3, anchors=18, pooled_anchors=8, keep=2), 16),
    "g10-average": (AOTConfig(frames=6, clip_len=3, grid=10, windows=2, pool_mode="average", anchors=20,
                              pooled_anchors=10, keep=3), 24),
    "g11-uneven": (AOTConfig(frames=4, clip_len=2, grid=11, windows=3, anchors=30, pooled_anchors=12, keep=4), 32),
    "g12-one-clip": (AOTConfig(frames=8, clip_len=8, grid=12, windows=4, anchors=40, pooled_anchors=16, keep=5),
                     20),
    "g12-no-keep": (AOTConfig(frames=4, clip_len=2, grid=12, windows=3, anchors=24, pooled_anchors=9, keep=0), 16),
    "g27-default": (AOTConfig(frames=4), 16),
}

_CACHE = {}


def run(cfg, features, shallow, deep):
    return AOTReducer(cfg)(features, shallow, deep)


def reduced(name, seed=0):
    """(cfg, hidden, inputs, outputs) for a named config, computed once per session."""
    key = (name, seed)
    if key not in _CACHE:
        cfg, hidden = CONFIGS[name]
        inputs = random_inputs(cfg, hidden, seed=seed)
        _CACHE[key] = (cfg, hidden, inputs, run(cfg, *inputs))
    return _CACHE[key]


def raster(index, cfg):
    return index[:, 1].long() * cfg.pooled_grid + index[:, 2].long()


# ---- shapes and ranges -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CONFIGS)
def test_shapes_and_ranges(name):
    cfg, hidden, _, (tokens, index) = reduced(name)
    assert tokens.shape == (cfg.output_tokens, hidden)
    assert tokens.dtype == torch.float32
    assert index.shape == (cfg.output_tokens, 3)
    assert index.dtype == torch.int32
    assert index[:, 0].min() >= 0 and index[:, 0].max() < cfg.frames
    assert index[:, 1:].min() >= 0 and index[:, 1:].max() < cfg.pooled_grid
    assert torch.isfinite(tokens).all()


# ---- output layout ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CONFIGS)
def test_clip_layout(name):
    cfg, _, _, (_, index) = reduced(name)
    a, k, length = cfg.pooled_anchors, cfg.keep, cfg.clip_len
    per_clip = cfg.tokens_per_clip
    assert per_clip == 2 * a + (length - 1) * k
    cells = raster(index, cfg)
    for clip in range(cfg.clips):
        rows = index[clip * per_clip:(clip + 1) * per_clip]
        clip_cells = cells[clip * per_clip:(clip + 1) * per_clip]
        key_frame = clip * length
        head, tail = rows[:a], rows[per_clip - a:]
        assert (head[:, 0] == key_frame).all()
        # Updated anchors carry the keyframe's frame number and cells.
        assert torch.equal(tail, head)
        # Kept tokens: K of each later frame, in temporal order.
        middle = rows[a:a + (length - 1) * k, 0]
        want = torch.arange(key_frame + 1, key_frame + length, dtype=torch.int32).repeat_interleave(k)
        assert torch.equal(middle, want)
        # Raster order, strictly increasing (so no duplicates) inside every frame block.
        blocks = [clip_cells[:a]] + [clip_cells[a + j * k:a + (j + 1) * k] for j in range(length - 1)]
        for block in blocks:
            assert (block[1:] > block[:-1]).all(), block


@pytest.mark.parametrize("name", ["g9-bilinear", "g27-default"])
def test_single_frame_clip_layout(name):
    cfg, hidden, inputs, _ = reduced(name)
    flat = dataclasses.replace(cfg, clip_len=1)
    tokens, index = run(flat, *inputs)
    assert tokens.shape == (cfg.frames * cfg.pooled_anchors, hidden)
    frames = index[:, 0].view(cfg.frames, cfg.pooled_anchors)
    assert torch.equal(frames, torch.arange(cfg.frames, dtype=torch.int32).unsqueeze(1).expand_as(frames))
    cells = raster(index, flat).view(cfg.frames, cfg.pooled_anchors)
    assert (cells[:, 1:] > cells[:, :-1]).all()


# ---- the inter-frame stage touches only what it should ------------------------------------------------------------
@pytest.mark.parametrize("name", CONFIGS)
def test_inter_frame_keeps_keyframe_and_distinct_tokens(name):
    cfg, _, inputs, (tokens, index) = reduced(name)
    flat_tokens, flat_index = run(dataclasses.replace(cfg, clip_len=1), *inputs)
    a, k, per_clip = cfg.pooled_anchors, cfg.keep, cfg.tokens_per_clip
    by_frame_tokens = flat_tokens.view(cfg.frames, a, -1)
    by_frame_cells = raster(flat_index, cfg).view(cfg.frames, a)
    cells = raster(index, cfg)
    for clip in range(cfg.clips):
        start, key_frame = clip * per_clip, clip * cfg.clip_len
        # Keyframe tokens, as they were after the intra-frame stage.
        assert torch.equal(index[start:start + a], flat_index[key_frame * a:(key_frame + 1) * a])
        assert torch.equal(tokens[start:start + a], by_frame_tokens[key_frame])
        # Kept tokens of the later frames: that frame's own retained token at that cell, unchanged.
        for row in range(start + a, start + a + (cfg.clip_len - 1) * k):
            frame = int(index[row, 0])
            hit = (by_frame_cells[frame] == cells[row]).nonzero()
            assert hit.numel() == 1, f"row {row}: cell {int(cells[row])} is not retained in frame {frame}"
            assert torch.equal(tokens[row], by_frame_tokens[frame, int(hit)])
        # The anchors themselves did move (something was merged into them).
        anchors = tokens[start + per_clip - a:start + per_clip]
        assert not torch.allclose(anchors, by_frame_tokens[key_frame], atol=1e-6, rtol=0)


# ---- the trace is what the output is made of ------------------------------------------------------------------------
@pytest.mark.parametrize("name", CONFIGS)
def test_trace_records_the_decisions_behind_the_output(name):
    cfg, hidden, inputs, (tokens, index) = reduced(name)
    trace = AOTReducer(cfg).trace(*inputs)
    assert torch.equal(trace.tokens, tokens) and torch.equal(trace.index, index)
    clips, length, a, k = cfg.clips, cfg.clip_len, cfg.pooled_anchors, cfg.keep
    anchors = trace.anchors.union
    assert not (trace.anchors.local & trace.anchors.global_).any()
    assert trace.anchor_idx.shape == (cfg.frames, cfg.anchors) and (trace.anchor_idx.diff(dim=1) > 0).all()
    assert torch.equal(torch.zeros_like(anchors).scatter(1, trace.anchor_idx, True), anchors)
    inter = trace.inter
    assert inter.assignment.shape == inter.merge_weights.shape == (clips, length - 1, a, a)
    assert inter.kept.shape == (clips, length - 1, k) and inter.anchors.shape == (clips, a, hidden)
    assert torch.allclose(inter.assignment.sum(-1), torch.ones(clips, length - 1, a), atol=1e-5)
    # Each step keeps its K least confident cells and merges the others with their assignment rows.
    kept = torch.zeros(clips, length - 1, a, dtype=torch.bool).scatter(2, inter.kept, True)
    assert (kept.sum(-1) == k).all() and torch.equal(trace.distinct.view(clips, length, a)[:, 1:], kept)
    assert not trace.distinct.view(clips, length, a)[:, 0].any()
    confidence = inter.assignment.amax(-1)
    if k:
        most_confident_kept = confidence.masked_fill(~kept, -1.0).amax(-1)
        least_confident_merged = confidence.masked_fill(kept, 2.0).amin(-1)
        assert (most_confident_kept <= least_confident_merged).all()
    assert torch.equal(inter.merge_weights, inter.assignment * ~kept.unsqueeze(-1))
    # Per clip: the keyframe's retained cells, the kept cells' retained tokens, the updated anchors.
    out = tokens.view(clips, cfg.tokens_per_clip, hidden)
    retained = trace.retained.view(clips, length, a, hidden)
    assert torch.equal(out[:, :a], retained[:, 0])
    later = retained[:, 1:].gather(2, inter.kept.unsqueeze(-1).expand(-1, -1, -1, hidden)).flatten(1, 2)
    assert torch.equal(out[:, a:a + (length - 1) * k], later)
    assert torch.equal(out[:, a + (length - 1) * k:], inter.anchors)
    cells = trace.cells.view(clips, length, a)
    assert torch.equal(raster(index, cfg).view(clips, -1)[:, :a], cells[:, 0])


@pytest.mark.parametrize("name", ["g9-bilinear", "g12-no-keep", "g27-default"])
def test_trace_options(name):
    cfg, _, inputs, (tokens, index) = reduced(name)
    module = AOTReducer(cfg)
    # The default selection passed back in is the reduction; a count that differs between frames is refused.
    same = module.trace(*inputs, anchors=anchor_masks(cfg, module.windows, *inputs[1:]))
    assert torch.equal(same.tokens, tokens) and torch.equal(same.index, index)
    local, global_ = anchor_masks(cfg, module.windows, *inputs[1:])
    uneven = global_.clone()
    uneven[0, torch.nonzero(global_[0])[0]] = False
    with pytest.raises(ValueError, match="same number"):
        module.trace(*inputs, anchors=AnchorMasks(local, uneven))
    # Without the inter-frame stage: every frame's kept cells, as the same reduction in clips of one frame.
    flat_tokens, flat_index = run(dataclasses.replace(cfg, clip_len=1), *inputs)
    flat = module.trace(*inputs, inter_frame=False)
    assert flat.inter is None and flat.keyframes.all() and not flat.distinct.any()
    assert torch.equal(flat.tokens, flat_tokens) and torch.equal(flat.index, flat_index)
    # A transport with lam = alpha = 0 leaves the anchors as they are: the kept cells are plainly pooled.
    frozen = module.trace(*inputs, transport_cfg=dataclasses.replace(cfg, alpha=0.0, lam=0.0))
    assert torch.equal(frozen.cells, flat.cells)
    pooled = module.pooling[frozen.cells] @ inputs[0]
    assert torch.allclose(frozen.retained, pooled, atol=1e-6)
    assert not torch.allclose(flat.retained, pooled, atol=1e-6)


# ---- window quotas ----------------------------------------------------------------------------------------------------
def window_members(module):
    n = module.cfg.tokens_per_frame
    return [[int(i) for i in row if int(i) < n] for row in module.windows]


@pytest.mark.parametrize("name", CONFIGS)
def test_window_quotas(name):
    cfg, _, (_, shallow, deep), _ = reduced(name)
    module = AOTReducer(cfg)
    members = window_members(module)
    assert len(members) == cfg.windows ** 2
    assert sorted(i for m in members for i in m) == list(range(cfg.tokens_per_frame))  # a partition
    mask = select_anchors(cfg, module.windows, shallow, deep)
    roles = anchor_masks(cfg, module.windows, shallow, deep)
    assert mask.shape == (cfg.frames, cfg.tokens_per_frame) and mask.dtype == torch.bool
    assert (mask.sum(1) == cfg.anchors).all()
    for frame in range(cfg.frames):
        local = set()
        for m in members:
            assert int(mask[frame, m].sum()) >= cfg.local_per_window
            # The window's own top-k by the shallow score (ties to the lower index) are anchors.
            top = sorted(m, key=lambda i: (-float(shallow[frame, i]), i))[:cfg.local_per_window]
            assert mask[frame, top].all()
            local.update(top)
        # The rest are the best by the deep score among the tokens not chosen locally.
        rest = sorted((i for i in range(cfg.tokens_per_frame) if i not in local),
                      key=lambda i: (-float(deep[frame, i]), i))[:cfg.global_anchors]
        want = torch.zeros(cfg.tokens_per_frame, dtype=torch.bool)
        want[sorted(local | set(rest))] = True
        assert torch.equal(mask[frame], want)
        # The roles: the windows' picks are the local anchors, the rest the global ones.
        want_local = torch.zeros(cfg.tokens_per_frame, dtype=torch.bool)
        want_local[sorted(local)] = True
        assert torch.equal(roles.local[frame], want_local) and torch.equal(roles.global_[frame], want & ~want_local)


@pytest.mark.parametrize("name", ["g9-bilinear", "g11-uneven", "g27-default"])
def test_planted_local_anchors(name):
    """Plant the shallow-score winners of every window where the deep score is lowest: only the local stage can
    pick them, and only the planted ones reach the local quota."""
    cfg, _, (_, shallow, deep), _ = reduced(name)
    module = AOTReducer(cfg)
    members = window_members(module)
    shallow, deep = shallow.clone(), deep.clone()
    g = torch.Generator().manual_seed(7)
    planted = []
    for m in members:
        pick = [m[int(j)] for j in torch.randperm(len(m), generator=g)[:cfg.local_per_window]]
        planted += pick
    shallow[:, planted] = 5.0
    deep[:, planted] = -5.0
    mask = select_anchors(cfg, module.windows, shallow, deep)
    assert mask[:, planted].all()
    # Deep-score winners are chosen globally: make one window's tokens the best by the deep score.
    crowded = members[-1]
    deep2 = deep.clone()
    deep2[:, crowded] = 2.0 + torch.arange(len(crowded), dtype=torch.float32) / len(crowded)
    deep2[:, planted] = -5.0
    mask2 = select_anchors(cfg, module.windows, shallow, deep2)
    assert mask2[:, planted].all()
    assert (mask2.sum(1) == cfg.anchors).all()
    free = [i for i in crowded if i not in planted]
    best = sorted(free, key=lambda i: -float(deep2[0, i]))[:cfg.global_anchors]
    assert mask2[:, best].all()


@pytest.mark.parametrize("name", ["g9-bilinear", "g11-uneven", "g12-one-clip", "g27-default"])
def test_constant_scores_pick_lowest_indices(name):
    cfg, _, (features, shallow, deep), _ = reduced(name)
    module = AOTReducer(cfg)
    members = window_members(module)
    shallow, deep = shallow.clone(), deep.clone()
    shallow[1] = 0.25
    deep[1] = 0.75
    mask = select_anchors(cfg, module.windows, shallow, deep)[1]
    local = set()
    for m in members:
        first = m[:cfg.local_per_window]  # window members in raster order
        assert mask[first].all(), f"window {m[:3]}...: first tokens not chosen"
        local.update(first)
    rest = [i for i in range(cfg.tokens_per_frame) if i not in local][:cfg.global_anchors]
    want = torch.zeros(cfg.tokens_per_frame, dtype=torch.bool)
    want[sorted(local | set(rest))] = True
    assert torch.equal(mask, want)
    tokens, _ = run(cfg, features, shallow, deep)
    assert torch.isfinite(tokens).all()


# ---- determinism ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["g10-average", "g27-default"])
def test_deterministic(name):
    cfg, _, inputs, (tokens, index) = reduced(name)
    module = AOTReducer(cfg)
    first = module(*inputs)
    second = module(*inputs)
    for t, i in (first, second):
        assert torch.equal(t, tokens) and torch.equal(i, index)


def test_depends_on_inputs():
    """Guard for the determinism test: a different seed gives different tokens."""
    cfg, _, _, (tokens, _) = reduced("g9-bilinear")
    _, _, _, (other, _) = reduced("g9-bilinear", seed=1)
    assert not torch.equal(tokens, other)


# ---- degenerate inputs -----------------------------------------------------------------------------------------------
ROBUST = ["g9-bilinear", "g10-average", "g11-uneven", "g27-default"]


@pytest.mark.parametrize("name", ROBUST)
@pytest.mark.parametrize("value", [0.0, 0.5])
def test_constant_features(name, value):
    cfg, hidden, (_, shallow, deep), _ = reduced(name)
    features = torch.full((cfg.frames, cfg.tokens_per_frame, hidden), value)
    tokens, _ = run(cfg, features, shallow, deep)
    assert torch.isfinite(tokens).all()
    # Every step averages tokens (weights summing to one) or pools them: a constant stays that constant.
    torch.testing.assert_close(tokens, torch.full_like(tokens, value), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ROBUST)
def test_duplicated_tokens(name):
    cfg, hidden, (_, shallow, deep), _ = reduced(name)
    vector = torch.randn(hidden, generator=torch.Generator().manual_seed(5))
    features = vector.expand(cfg.frames, cfg.tokens_per_frame, hidden).contiguous()
    tokens, index = run(cfg, features, shallow, deep)
    assert torch.isfinite(tokens).all()
    torch.testing.assert_close(tokens, vector.expand_as(tokens), atol=1e-5, rtol=1e-5)
    assert index.shape == (cfg.output_tokens, 3)


@pytest.mark.parametrize("name", ROBUST)
def test_constant_scores(name):
    cfg, _, (features, shallow, _), _ = reduced(name)
    tokens, index = run(cfg, features, torch.full_like(shallow, 0.3), torch.full_like(shallow, 0.3))
    assert torch.isfinite(tokens).all()
    assert tokens.shape[0] == cfg.output_tokens
    # Every frame keeps the same cells when nothing tells the frames apart.
    head = index[:cfg.pooled_anchors, 1:]
    for clip in range(cfg.clips):
        start = clip * cfg.tokens_per_clip
        assert torch.equal(index[start:start + cfg.pooled_anchors, 1:], head)


@pytest.mark.parametrize("name", ROBUST)
def test_huge_features(name):
    """Cosine costs ignore scale and every update is linear: 1e4 × the input gives 1e4 × the output."""
    cfg, _, (features, shallow, deep), (tokens, index) = reduced(name)
    big_tokens, big_index = run(cfg, features * 1e4, shallow, deep)
    assert torch.isfinite(big_tokens).all()
    assert torch.equal(big_index, index)
    torch.testing.assert_close(big_tokens / 1e4, tokens, atol=1e-4, rtol=1e-4)


# ---- low precision ------------------------------------------------------------------------------------------------------
def _supported(dtype):
    try:
        cfg, hidden = CONFIGS["g9-bilinear"]
        run(cfg, *random_inputs(cfg, hidden, dtype=dtype))
        return True
    except (RuntimeError, TypeError):
        return False


@pytest.mark.parametrize("dtype, rtol", [(torch.float16, 0.0), (torch.bfloat16, 4e-3)])
@pytest.mark.parametrize("name", ["g9-bilinear", "g11-uneven", "g27-default"])
def test_low_precision_input(name, dtype, rtol):
    if dtype is torch.bfloat16 and not _supported(dtype):
        pytest.skip("bf16 not supported here")
    cfg, hidden, _, _ = reduced(name)
    features, shallow, deep = random_inputs(cfg, hidden, seed=0, dtype=dtype)
    assert features.dtype == dtype
    low_tokens, low_index = run(cfg, features, shallow, deep)
    ref_tokens, ref_index = run(cfg, features.float(), shallow, deep)
    assert low_tokens.dtype == dtype
    assert low_index.dtype == torch.int32
    assert torch.isfinite(low_tokens).all()
    assert torch.equal(low_index, ref_index)
    torch.testing.assert_close(low_tokens.float(), ref_tokens, atol=1e-2, rtol=rtol)


# ---- paper settings ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["g9-bilinear", "g12-one-clip", "g27-default"])
@pytest.mark.parametrize("change", [dict(alpha=0.0, beta=0.0), dict(alpha=0.0), dict(beta=0.0)],
                         ids=["paper", "alpha0", "beta0"])
def test_paper_settings_differ(name, change):
    cfg, hidden, inputs, (tokens, _) = reduced(name)
    paper = dataclasses.replace(cfg, **change)
    paper_tokens, paper_index = run(paper, *inputs)
    assert paper_tokens.shape == tokens.shape and paper_index.shape == (paper.output_tokens, 3)
    assert torch.isfinite(paper_tokens).all()
    assert (paper_tokens - tokens).abs().max() > 1e-4


def test_no_global_anchors():
    """global_ratio 0: every anchor is local; the empty top-k of the global stage selects nothing."""
    cfg = AOTConfig(frames=4, clip_len=2, grid=9, windows=3, anchors=18, pooled_anchors=8, keep=2, global_ratio=0.0)
    assert cfg.global_anchors == 0
    _, shallow, deep = random_inputs(cfg, 8, seed=9)
    mask = select_anchors(cfg, AOTReducer(cfg).windows, shallow, deep)
    assert (mask.sum(1) == cfg.anchors).all()
    tokens, index = AOTReducer(cfg)(*random_inputs(cfg, 8, seed=9))
    assert tokens.shape == (cfg.output_tokens, 8) and torch.isfinite(tokens).all()
