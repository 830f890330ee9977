"""Real-video features without a pretrained encoder: pixel patches of real frames, randomly projected.

A seeded Gaussian projection keeps the cosine geometry of the patches (Johnson–Lindenstrauss), so similarity,
redundancy and motion in these features are the footage's. The two scores are image statistics standing in for
attention received: local contrast (shallow) and distinctiveness within the frame (deep). They are not a vision
encoder's features; with a real checkpoint, use its tower (the model adapter) instead.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def patchify(frames: np.ndarray, grid: int, patch: int) -> Tensor:
    """[T, S, S, 3] uint8 -> [T, grid², patch²·3] in [-1, 1] (SigLIP normalisation), row-major grid; pixels past
    grid·patch are dropped as a stride-`patch` convolution drops them."""
    x = torch.from_numpy(frames[:, : grid * patch, : grid * patch]).float() / 127.5 - 1.0
    t = x.shape[0]
    x = x.reshape(t, grid, patch, grid, patch, 3).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(t, grid * grid, patch * patch * 3)


def patch_features(frames: np.ndarray, grid: int, patch: int, hidden: int,
                   seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """features [T, grid², hidden], score_shallow [T, grid²], score_deep [T, grid²] from real frames."""
    patches = patchify(frames, grid, patch)
    generator = torch.Generator().manual_seed(seed)
    projection = torch.randn(patches.shape[-1], hidden, generator=generator) / patches.shape[-1] ** 0.5
    features = patches @ projection
    contrast = patches.std(dim=-1)
    unit = torch.nn.functional.normalize(patches - patches.mean(dim=1, keepdim=True), dim=-1)
    distinctiveness = 1.0 - (unit @ unit.transpose(1, 2)).mean(dim=-1)
    return features, contrast, distinctiveness
