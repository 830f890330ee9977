"""bench/baselines.py: every method meets AOT's budget exactly, is deterministic, and computes what it says."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from aot_export import AOTConfig, AOTReducer
from aot_export.reducer import pool_grid
from conftest import random_inputs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import baselines as B  # noqa: E402
import quality as Q  # noqa: E402

HIDDEN = 32
# The baselines differ from AOT in what they select, not in the Sinkhorn solver: the fixed one keeps these fast.
CONFIGS = [AOTConfig.from_retention(4, 0.10, sinkhorn="fixed"), AOTConfig.from_retention(4, 0.25, sinkhorn="fixed"),
           AOTConfig(frames=4, sinkhorn="fixed"),
           AOTConfig(frames=2, clip_len=1, pooled_anchors=20, keep=0, sinkhorn="fixed")]


@pytest.fixture(scope="module")
def inputs():
    return {cfg: random_inputs(cfg, HIDDEN, seed=3) for cfg in CONFIGS}


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"T{c.frames}L{c.clip_len}A{c.pooled_anchors}K{c.keep}")
def test_every_method_meets_the_budget_exactly_and_is_deterministic(inputs, cfg):
    features, shallow, deep = inputs[cfg]
    for name, method in B.METHODS.items():
        first = method(cfg, features, shallow, deep)
        assert first.shape == (cfg.output_tokens, HIDDEN), name
        assert torch.isfinite(first).all(), name
        if cfg is CONFIGS[0]:
            assert torch.equal(first, method(cfg, features, shallow, deep)), f"{name} is not deterministic"


def test_frame_budgets():
    for total, frames in ((624, 32), (7, 3), (32, 32), (5, 8)):
        budgets = B.frame_budgets(total, frames)
        assert budgets.sum() == total and len(budgets) == frames and budgets.max() - budgets.min() <= 1


@pytest.mark.parametrize("regions", [1, 2, 7, 9, 19, 20, 81, 100, 196, 729])
def test_region_matrix_tiles_the_grid(regions):
    m = B.region_matrix(27, regions)
    assert m.shape == (regions, 729)
    assert torch.allclose(m.sum(1), torch.ones(regions))                          # each region is an average
    assert ((m > 0).sum(0) == 1).all()                                            # each token in exactly one region
    areas = (m > 0).sum(1).float()
    assert areas.max() / areas.min() <= (4.0 if regions > 1 else 1.0)


@pytest.mark.parametrize("per_frame,kernel", [(81, 3), (9, 9), (729, 1)])
def test_uniform_pool_is_average_pooling(per_frame, kernel):
    cfg = AOTConfig(frames=2, clip_len=1, pooled_anchors=min(per_frame, 196), keep=0)
    features, shallow, deep = random_inputs(cfg, HIDDEN)
    if per_frame > 196:                       # more regions than pooled cells: call the region map directly
        tokens = torch.cat([B.region_matrix(27, per_frame) @ f for f in features])
    else:
        tokens = B.uniform_pool(cfg, features, shallow, deep)
    grid = features.transpose(1, 2).reshape(2, HIDDEN, 27, 27)
    expected = F.avg_pool2d(grid, kernel).flatten(2).transpose(1, 2).reshape(-1, HIDDEN)
    assert torch.allclose(tokens, expected, atol=1e-6)


def test_attention_topk_keeps_each_frames_best_pooled_cells(inputs):
    cfg = CONFIGS[0]
    features, shallow, deep = inputs[cfg]
    tokens = B.attention_topk(cfg, features, shallow, deep)
    pooled = pool_grid(cfg, features)
    scores = pool_grid(cfg, deep.unsqueeze(-1))[..., 0]
    expected = []
    for frame, score, budget in zip(pooled, scores, B.frame_budgets(cfg.output_tokens, cfg.frames).tolist()):
        expected.append(frame[score.argsort(descending=True)[:budget].sort().values])
    assert torch.equal(tokens, torch.cat(expected))


def test_random_select_is_a_seeded_subset(inputs):
    cfg = CONFIGS[0]
    features, shallow, deep = inputs[cfg]
    full = B.full_tokens(cfg, features)
    tokens = B.random_select(cfg, features, shallow, deep)
    assert all((full == row).all(-1).any() for row in tokens)
    assert not torch.equal(tokens, B.random_select(cfg, features, shallow, deep, seed=1))


def test_visionzip_keeps_the_dominant_tokens_and_merges_the_rest():
    cfg = AOTConfig(frames=1, clip_len=1, pooled_anchors=64, keep=0)
    features, shallow, deep = random_inputs(cfg, HIDDEN)
    tokens = B.visionzip(cfg, features, shallow, deep)
    pooled = pool_grid(cfg, features)[0]
    dominant = pool_grid(cfg, deep.unsqueeze(-1))[0, :, 0].argsort(descending=True)[:54].sort().values
    assert torch.equal(tokens[:54], pooled[dominant])
    # Contextual tokens: evenly spaced targets among the other 142 tokens (every 14th), each averaged with the
    # tokens most similar to it — computed here token by token.
    rest_idx = [i for i in range(196) if i not in set(dominant.tolist())]
    targets = rest_idx[::len(rest_idx) // 10][:10]
    groups = {t: [t] for t in targets}
    for i in rest_idx:
        if i not in groups:
            sims = [float(F.cosine_similarity(pooled[i], pooled[t], dim=0)) for t in targets]
            groups[targets[max(range(10), key=lambda j: sims[j])]].append(i)
    expected = torch.stack([pooled[groups[t]].mean(0) for t in targets])
    assert tokens.shape[0] == 64 and torch.allclose(tokens[54:], expected, atol=1e-5)


def test_dycoke_keeps_the_reference_frame_and_what_changed():
    cfg = AOTConfig(frames=4, clip_len=4, pooled_anchors=100, keep=30, sinkhorn="fixed")        # 290 tokens
    features, shallow, deep = random_inputs(cfg, HIDDEN)
    features = features[:1].expand(4, -1, -1).clone()
    moved = torch.arange(100, 140)                                               # one region changes in frame 2
    features[2, moved] += 5.0 * torch.randn(len(moved), HIDDEN)
    features[3] = features[2]                                                    # ...and stays changed
    tokens = B.dycoke(cfg, features, shallow, deep)
    pooled = pool_grid(cfg, features)
    changed = (pooled[2] - pooled[1]).norm(dim=-1) > 1e-4
    assert 0 < changed.sum() < cfg.output_tokens - cfg.cells_per_frame
    assert torch.equal(tokens[: cfg.cells_per_frame], pooled[0])                 # the first frame is the reference
    assert all((tokens == row).all(-1).any() for row in pooled[2][changed])
    # frame 3 repeats frame 2: none of its changed cells is novel, so the rest of the budget is frame 1's ties
    # (lower index first), not frame 3's copies.
    assert torch.equal(tokens[cfg.cells_per_frame: cfg.output_tokens - int(changed.sum())],
                       pooled[1][: cfg.output_tokens - cfg.cells_per_frame - int(changed.sum())])


def test_tome_merges_identical_pairs_first():
    g = torch.Generator().manual_seed(0)
    unique = torch.randn(10, HIDDEN, generator=g)
    doubled = unique.repeat_interleave(2, dim=0)                                   # a, a, b, b, ...
    assert torch.allclose(B.tome_merge(doubled, 10), unique, atol=1e-6)
    # Merging conserves mass: with sizes, the mean of the merged tokens is the mean of the originals.
    tokens = torch.randn(40, HIDDEN, generator=g)
    assert B.tome_merge(tokens, 17).shape == (17, HIDDEN)
    assert torch.equal(B.tome_merge(tokens, 40), tokens)


def test_aot_is_the_reducer_and_ablations_change_what_they_say(inputs):
    cfg = CONFIGS[2]
    features, shallow, deep = inputs[cfg]
    tokens, _ = AOTReducer(cfg)(features, shallow, deep)
    assert torch.equal(B.aot(cfg, features, shallow, deep), tokens)
    for name in ("aot_no_local", "aot_no_global", "aot_no_intra_ot", "aot_no_inter_ot", "aot_random_anchors"):
        assert not torch.allclose(B.METHODS[name](cfg, features, shallow, deep), tokens), name

    # No intra-frame OT: the kept cells are the plain pooled tokens.
    frozen = AOTReducer(cfg).trace(features, shallow, deep,
                                   transport_cfg=AOTConfig(**{**cfg.to_dict(), "alpha": 0.0, "lam": 0.0}))
    pooled = pool_grid(cfg, features)
    assert torch.allclose(frozen.retained, pooled.gather(1, frozen.cells.unsqueeze(-1).expand(-1, -1, HIDDEN)),
                          atol=1e-6)
    # Anchor sets: no-local = top-V by deep score; no-global = V by the shallow score, windowed; both V per frame.
    masks = B.local_only_anchors(cfg, shallow)
    local_only = masks.local
    assert not masks.global_.any() and (local_only.sum(1) == cfg.anchors).all()
    per_window = cfg.anchors // cfg.windows ** 2
    window_counts = local_only.view(cfg.frames, 3, 9, 3, 9).sum((2, 4))
    assert (window_counts >= per_window).all()
    # No inter-frame OT: each clip starts with the same keyframe tokens as AOT's, nothing is merged.
    no_inter = B.aot_no_inter_ot(cfg, features, shallow, deep).view(cfg.clips, cfg.tokens_per_clip, HIDDEN)
    aot_clips = tokens.view(cfg.clips, cfg.tokens_per_clip, HIDDEN)
    assert torch.equal(no_inter[:, : cfg.pooled_anchors], aot_clips[:, : cfg.pooled_anchors])
    retained = AOTReducer(cfg).trace(features, shallow, deep, inter_frame=False).retained
    later = retained.view(cfg.clips, cfg.clip_len, cfg.pooled_anchors, HIDDEN)[:, 1:].reshape(cfg.clips, -1, HIDDEN)
    assert all((later[c] == row).all(-1).any() for c in range(cfg.clips) for row in no_inter[c, cfg.pooled_anchors:])


# ---- bench/quality.py's figures ---------------------------------------------------------------------------------

def test_readout_is_the_llms_first_layer():
    """The text-position computation equals Hugging Face's whole forward (hidden state after layer 0) on the
    prompt `runtime.prompt.assemble` builds for the same visual tokens."""
    from aot_export.adapters import load_model
    from runtime.prompt import assemble

    adapter = load_model("tiny-llava-ov")
    readout = Q.layer_readout(adapter)
    visual = 0.3 * torch.randn(150, 64, generator=torch.Generator().manual_seed(1))
    prefix, suffix = readout.prompts[1]
    x = assemble(adapter, Q.QUESTIONS[1], visual).embeds
    assert torch.equal(readout._sequence(visual, prefix, suffix), x)
    with torch.no_grad():
        hidden = readout.language_model(inputs_embeds=x, output_hidden_states=True).hidden_states[1]
    expected = hidden[0, -suffix.shape[0]:] - x[0, -suffix.shape[0]:]
    assert torch.allclose(readout.update(visual, prefix, suffix), expected, atol=1e-6)
    assert Q.relative_error(readout(visual), readout(visual)) == 0.0
    assert 0.0 < readout.attention_entropy(visual) <= 1.0 + 1e-9


def test_mass_weighted_distance_is_the_optimal_transport_with_voronoi_masses():
    from aot_export.reducer import log_sinkhorn

    g = torch.Generator().manual_seed(0)
    full = torch.randn(300, 16, generator=g)
    reduced = full[torch.randperm(300, generator=g)[:25]] + 0.3 * torch.randn(25, 16, generator=g)
    exact = Q.mass_weighted_distance(full, reduced, chunk=64)
    cost = Q.transport_cost(full, reduced)
    assert exact == pytest.approx(float(cost.min(-1).values.mean()), rel=1e-12)
    mass = Q.voronoi_mass(full, reduced)
    assert float(mass.sum()) == pytest.approx(1.0)
    log_mu = torch.full((1, 300), -torch.log(torch.tensor(300.0)).item(), dtype=torch.float64)
    plan = log_sinkhorn(cost.unsqueeze(0), log_mu, mass.clamp_min(1e-300).log().unsqueeze(0), eps=2e-3, iters=300)
    assert float((plan[0] * cost).sum()) == pytest.approx(exact, rel=2e-2)
    assert Q.mass_weighted_distance(full, full) == pytest.approx(0.0, abs=1e-12)
