"""The paper-faithful dynamic reference: its Sinkhorn, its data-dependent rules, and (heavy) how far the static
reducer drifts from it on real footage."""

import math

import pytest
import torch
from conftest import random_inputs

from aot_export import AOTConfig, AOTReducer
from aot_export.reducer import log_sinkhorn
from aot_export.reference import agreement, early_stopping_sinkhorn, output_roles, reference_aot


def problem(seed, batch=3, m=20, v=7):
    g = torch.Generator().manual_seed(seed)
    cost = torch.rand(batch, m, v, generator=g, dtype=torch.float64) * 2
    return cost, torch.full((batch, m), 1.0 / m, dtype=torch.float64), torch.full((batch, v), 1.0 / v,
                                                                                  dtype=torch.float64)


@pytest.mark.parametrize("iters", [1, 3, 10])
def test_plain_and_log_domain_agree_for_equal_iterations(iters):
    cost, mu, nu = problem(0)
    plain, ran = early_stopping_sinkhorn(cost, mu, nu, eps=0.1, tol=0.0, max_iters=iters)
    assert (ran == iters).all()
    logged = log_sinkhorn(cost, mu.log(), nu.log(), eps=0.1, iters=iters)
    torch.testing.assert_close(plain, logged, rtol=1e-9, atol=1e-12)


def test_converged_plan_has_both_marginals():
    cost, mu, nu = problem(1)
    plan, ran = early_stopping_sinkhorn(cost, mu, nu, eps=0.1, tol=1e-12, max_iters=5000)
    assert (ran < 5000).all()
    torch.testing.assert_close(plan.sum(1), nu, rtol=0, atol=1e-12)
    torch.testing.assert_close(plan.sum(2), mu, rtol=0, atol=1e-9)


def test_stops_per_problem():
    cost, mu, nu = problem(2)
    cost[1] = 0.0          # a constant cost is solved by the first iteration
    _, ran = early_stopping_sinkhorn(cost, mu, nu, eps=0.1)
    assert ran[1] <= 2 and ran.max() >= ran[1]


def test_reference_rules():
    cfg = AOTConfig(frames=8, clip_len=4, grid=9, windows=3, anchors=19, pooled_anchors=8, keep=2)
    ref = reference_aot(cfg, *random_inputs(cfg, hidden=16, seed=4))
    # V - floor(V/2) global anchors: 9 + 10 = 19 here, but the local share floor(19/2)//9 = 1 per window
    assert (ref.anchor_mask.sum(1) == cfg.windows ** 2 * cfg.local_per_window
            + cfg.anchors - math.floor(cfg.anchors / 2)).all()
    assert ref.tokens.dtype == torch.float64 and torch.isfinite(ref.tokens).all()
    roles = ref.role.tolist()
    assert roles.count(0) == sum(len(ref.retained[f]) for f in range(0, cfg.frames, cfg.clip_len))
    assert roles.count(2) == roles.count(0)
    assert ref.index[:, 0].max() < cfg.frames


def test_agreement_report_on_random_tokens():
    """Same anchors (V even: both rules give V/2 global), same cells where the rules agree; tokens that are not
    merged into anchors differ only by the Sinkhorn stopping rule (the OT moves anchors by about 1/V)."""
    cfg = AOTConfig(frames=4, clip_len=2, grid=9, windows=3, anchors=18, pooled_anchors=8, keep=2)
    reducer = AOTReducer(cfg)
    inputs = random_inputs(cfg, hidden=16, seed=5)
    tokens, index = reducer(*inputs)
    mask, cells = reducer.select(*inputs[1:])
    report = agreement(cfg, tokens, index, mask, cells, reference_aot(cfg, *inputs))
    assert report["static_tokens"] == cfg.output_tokens == len(output_roles(cfg))
    assert report["anchor_jaccard"] == 1.0
    assert 0.0 < report["token_set_jaccard"] <= 1.0
    assert report["matched_cosine_min_keyframe"] > 0.99
    assert report["matched_cosine_min_distinct"] > 0.99


@pytest.mark.heavy
def test_static_tracks_reference_on_real_footage(shared_videos):
    from runtime.patch_features import patch_features
    from aot_export.video import decode_frames

    cfg = AOTConfig()
    reducer = AOTReducer(cfg)
    for video in shared_videos:
        inputs = patch_features(decode_frames(video, cfg.frames, size=384), cfg.grid, 14, 896)
        with torch.inference_mode():
            tokens, index = reducer(*inputs)
            mask, cells = reducer.select(*inputs[1:])
            report = agreement(cfg, tokens, index, mask, cells, reference_aot(cfg, *inputs))
        # Anchors: the same rule. Cells: top-A vs >= 0.5 differ in most frames by a cell or two, so the token
        # sets overlap by ~0.9 and an updated anchor, which absorbs whatever its clip merged, may differ a lot;
        # every token that was not merged must match up to the Sinkhorn stopping rule (which stops some of
        # bikes' frames after 2 iterations: intra-frame anchors then differ by up to 1 - 0.9968 in cosine,
        # docs/benchmarks.md "Sinkhorn iterations").
        assert report["anchor_jaccard"] == 1.0, (video.name, report)
        assert report["token_set_jaccard"] >= 0.8, (video.name, report)
        assert report["matched_cosine_min_keyframe"] >= 0.995, (video.name, report)
        assert report["matched_cosine_min_distinct"] >= 0.995, (video.name, report)
