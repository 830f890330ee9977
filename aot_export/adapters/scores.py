"""The attention each token receives (AOT_SPEC §0: softmax attention summed over queries, averaged over heads), as
the exported graphs compute it from a layer's q and k, and as the references read it from Hugging Face's own
attention weights; one definition for every family."""

from __future__ import annotations

import torch
from torch import Tensor


def attention_weights(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """[..., heads, L, d] q and k → softmax attention [..., heads, L, L] in fp32."""
    return torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1, dtype=torch.float32)


def received_from_weights(weights: Tensor) -> Tensor:
    """[B, heads, L, L] softmax attention → [B, L]: summed over queries, averaged over heads."""
    return weights.sum(-2).mean(1)


def attention_received(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """[B, heads, L, d] q and k → [B, L]."""
    return received_from_weights(attention_weights(q, k, scale))
