"""The vectorised reducer against the loop-by-loop float64 implementation in naive_aot.py."""

import numpy as np
import pytest
from conftest import random_inputs
from naive_aot import naive_aot

from aot_export import AOTConfig, AOTReducer

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
def test_matches_naive(name, seed):
    cfg = AOTConfig(**SHAPES[name])
    features, shallow, deep = random_inputs(cfg, hidden=24, seed=seed)
    tokens, index = AOTReducer(cfg)(features, shallow, deep)
    want_tokens, want_index = naive_aot(cfg, features.double().numpy(), shallow.double().numpy(),
                                        deep.double().numpy())
    assert tokens.shape == (cfg.output_tokens, 24) and index.shape == (cfg.output_tokens, 3)
    np.testing.assert_array_equal(index.numpy(), want_index)
    np.testing.assert_allclose(tokens.double().numpy(), want_tokens, atol=2e-5, rtol=0)


def test_matches_naive_at_full_grid():
    """The SigLIP-so400m grid (27×27, 729 tokens) with the default budgets, on two clips."""
    cfg = AOTConfig(frames=8)
    features, shallow, deep = random_inputs(cfg, hidden=16, seed=3)
    tokens, index = AOTReducer(cfg)(features, shallow, deep)
    want_tokens, want_index = naive_aot(cfg, features.double().numpy(), shallow.double().numpy(),
                                        deep.double().numpy())
    np.testing.assert_array_equal(index.numpy(), want_index)
    np.testing.assert_allclose(tokens.double().numpy(), want_tokens, atol=2e-5, rtol=0)
