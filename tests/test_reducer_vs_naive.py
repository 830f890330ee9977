"""The vectorised reducer against the loop-by-loop float64 implementation in naive_aot.py."""

import numpy as np
import pytest
import torch
from conftest import random_inputs
from naive_aot import naive_aot

from aot_export import AOTConfig, AOTReducer
from aot_export.reducer import stopping_sinkhorn

SHAPES = {
    "bilinear-odd-grid": dict(frames=8, clip_len=4, grid=9, windows=3, anchors=18, pooled_anchors=8, keep=2),
    "average-pool": dict(frames=8, clip_len=2, grid=10, windows=2, pool_mode="average", anchors=20,
                         pooled_anchors=10, keep=3),
    "uneven-windows": dict(frames=6, clip_len=3, grid=7, windows=3, anchors=27, pooled_anchors=6, keep=1),
    "paper-alpha-beta": dict(frames=4, clip_len=4, grid=12, windows=3, anchors=30, pooled_anchors=12, keep=4,
                             alpha=0.0, beta=0.0),
    "no-keep": dict(frames=4, clip_len=2, grid=8, windows=2, anchors=16, pooled_anchors=5, keep=0),
    "single-frame-clips": dict(frames=3, clip_len=1, grid=9, windows=3, anchors=20, pooled_anchors=7, keep=0),
    "many-iters-pool3": dict(frames=4, clip_len=2, grid=12, windows=3, pool=3, anchors=24, pooled_anchors=6,
                             keep=2, sinkhorn_iters=20, eps=0.05, lam=2.0),
}


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("sinkhorn", ["fixed", "reference"])
def test_matches_naive(name, seed, sinkhorn):
    """For "reference" the naive loops stop as the authors' code does (all frames' intra-frame problems together,
    each inter-frame step on its own), independently of the reducer's unrolled `running` flags."""
    cfg = AOTConfig(**SHAPES[name], sinkhorn=sinkhorn)
    features, shallow, deep = random_inputs(cfg, hidden=24, seed=seed)
    tokens, index = AOTReducer(cfg)(features, shallow, deep)
    want_tokens, want_index = naive_aot(cfg, features.double().numpy(), shallow.double().numpy(),
                                        deep.double().numpy())
    assert tokens.shape == (cfg.output_tokens, 24) and index.shape == (cfg.output_tokens, 3)
    np.testing.assert_array_equal(index.numpy(), want_index)
    np.testing.assert_allclose(tokens.double().numpy(), want_tokens, atol=2e-5, rtol=0)


@pytest.mark.parametrize("sinkhorn", ["fixed", "reference"])
def test_matches_naive_at_full_grid(sinkhorn):
    """The SigLIP-so400m grid (27×27, 729 tokens) with the default budgets, on two clips."""
    cfg = AOTConfig(frames=8, sinkhorn=sinkhorn)
    features, shallow, deep = random_inputs(cfg, hidden=16, seed=3)
    tokens, index = AOTReducer(cfg)(features, shallow, deep)
    want_tokens, want_index = naive_aot(cfg, features.double().numpy(), shallow.double().numpy(),
                                        deep.double().numpy())
    np.testing.assert_array_equal(index.numpy(), want_index)
    np.testing.assert_allclose(tokens.double().numpy(), want_tokens, atol=2e-5, rtol=0)


def uneven_inputs(cfg, hidden, seed):
    """Every other frame smooth (neighbouring tokens nearly parallel), the rest random: smooth frames need about
    twice the Sinkhorn iterations of random ones, so stopping them together differs from stopping each alone."""
    features, shallow, deep = random_inputs(cfg, hidden, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    ramp = torch.arange(cfg.grid).float() / cfg.grid
    smooth = torch.stack([torch.sin(3.1 * k * ramp[:, None] + (k + 1) * ramp[None, :]) for k in range(hidden)], -1)
    for t in range(0, cfg.frames, 2):
        features[t] = smooth.reshape(-1, hidden) + 0.05 * torch.randn(cfg.tokens_per_frame, hidden, generator=g)
    return features, shallow, deep


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("clip_len", [1, 4])
def test_intra_frame_stop_is_batch_wide(seed, clip_len):
    """lam = 10, alpha = 0 lets the transport move anchors far enough to see the stopping rule: the naive loops
    (one mean over all frames' rows) match the reducer, and stopping each frame on its own would not."""
    cfg = AOTConfig(frames=8, clip_len=clip_len, grid=9, windows=3, anchors=18, pooled_anchors=8,
                    keep=2 if clip_len > 1 else 0, alpha=0.0, lam=10.0, sinkhorn="reference")
    inputs = uneven_inputs(cfg, 24, seed)
    want_tokens, want_index = naive_aot(cfg, *(x.double().numpy() for x in inputs))
    tokens, index = AOTReducer(cfg)(*inputs)
    np.testing.assert_array_equal(index.numpy(), want_index)
    np.testing.assert_allclose(tokens.double().numpy(), want_tokens, atol=2e-5, rtol=0)

    def per_frame(cost, log_mu, log_nu, *, joint):
        return stopping_sinkhorn(cost, log_mu, log_nu, cfg.eps, cfg.sinkhorn_tol, cfg.sinkhorn_max_iters, False)

    per_frame_tokens, _ = AOTReducer(cfg, per_frame)(*inputs)
    assert np.abs(per_frame_tokens.double().numpy() - want_tokens).max() > 5e-5
