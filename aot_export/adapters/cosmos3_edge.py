"""Hugging Face `Cosmos3EdgeForConditionalGeneration`: SigLIP2-style tower → 2×2 patch merger → AOT on the merged grid.

Hugging Face's tower packs every frame into one sequence, splits attention by `cu_seqlens.tolist()` and resizes its
learned position grid per `grid_thw` row at run time. At a fixed resolution `StaticCosmosTower` runs the encoder
layers' own submodules on a batch of frames (one attention sequence per frame, as Hugging Face's segments are) and
holds the resized position table, computed once by Hugging Face's own resize, as a constant.

Scores: every layer attends over the whole frame; like SigLIP in LLaVA-OneVision the shallow layer is 5 and the deep
one −2 of the tower (the features are the last layer's, after the post-layernorm), per patch, summed into each
merged token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AOTConfig
from ..errors import InputError
from ..preprocess import Preprocessing
from .base import VideoLayout
from .merged_grid import (CHAT_TEMPLATE, SPECIAL_TOKENS, MergedGridAdapter, MergedGridVisionAOT, StaticGrid,
                          builtin_placeholder_ids, merged_scores, patchify)
from .scores import attention_received, received_from_weights

SHALLOW_LAYER = 5
DEEP_LAYER = -2
# Fixed input of an export: 512 px gives a 16×16 merged grid per frame.
DEFAULT_SIZE = 512
# The Cosmos3-Edge processor's normalisation (ImageNet standard: 0.5 / 0.5) and resampling.
COSMOS_PREPROCESSING = Preprocessing(size=DEFAULT_SIZE, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def tiny_config() -> Any:
    """The real architecture at tiny width: an 8-layer tower with patch 16 and a 16×16 learned position grid, a
    2-layer relu² LLM with 3-D rotary sections."""
    from transformers import Cosmos3EdgeConfig

    ids = builtin_placeholder_ids()
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4, patch_size=16,
                  num_patches=256, spatial_merge_size=2)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=8192, eos_token_id=2,
                pad_token_id=0, bos_token_id=None,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 2, 2]})
    return Cosmos3EdgeConfig(vision_config=vision, text_config=text, projector_hidden_size=128, **ids)


def cosmos3_edge_config() -> Any:
    """Cosmos3-Edge's architecture as transformers 5.24 defines it (27-layer 1152-wide tower, 28-layer LLM), with the
    placeholder ids of the tiny tokenizer the built-in carries (`builtin_placeholder_ids`), not the defaults 18–21."""
    from transformers import Cosmos3EdgeConfig

    return Cosmos3EdgeConfig(**builtin_placeholder_ids())


class StaticCosmosTower(nn.Module):
    """Cosmos3-Edge's vision encoder at one resolution: [T, P, D] with one attention sequence per frame."""

    def __init__(self, visual: nn.Module, grid: StaticGrid):
        super().__init__()
        embeddings = visual.embeddings
        self.patch_embedding = embeddings.patch_embedding
        self.layers = visual.encoder.layers
        self.grid = grid
        self.heads = visual.config.num_attention_heads
        table = embeddings.position_embedding.weight.reshape(embeddings.position_embedding_size,
                                                             embeddings.position_embedding_size, -1)
        with torch.no_grad():
            positions = embeddings.resize_positional_embeddings(table, grid.grid_thw(1), grid.merge)   # [P, D]
        self.register_buffer("positions", positions, persistent=False)

    def qkv(self, index: int, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Layer `index`'s q, k, v [T, heads, P, d] from its own layer_norm1 and projections."""
        layer = self.layers[index]
        x = layer.layer_norm1(hidden)
        attention = layer.self_attn
        return tuple(proj(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)
                     for proj in (attention.q_proj, attention.k_proj, attention.v_proj))

    def layer(self, index: int, hidden: Tensor) -> Tensor:
        layer = self.layers[index]
        q, k, v = self.qkv(index, hidden)
        out = F.scaled_dot_product_attention(q, k, v, scale=layer.self_attn.scale).transpose(1, 2).flatten(-2)
        hidden = hidden + layer.self_attn.out_proj(out)
        return hidden + layer.mlp(layer.layer_norm2(hidden))

    def received(self, index: int, hidden: Tensor) -> Tensor:
        """[T, P] attention each patch receives in layer `index` (its input is `hidden`)."""
        q, k, _ = self.qkv(index, hidden)
        return attention_received(q, k, self.layers[index].self_attn.scale)

    def forward(self, frames: Tensor) -> list[Tensor]:
        hidden = self.patch_embedding(patchify(frames, self.grid, channels_last=True)) + self.positions
        states = [hidden]
        for index in range(len(self.layers)):
            hidden = self.layer(index, hidden)
            states.append(hidden)
        return states


class PostNormProjector(nn.Module):
    """The tower's post-layernorm, then Cosmos3-Edge's patch merger: [T, P, D] → merged tokens [T·G², H]."""

    def __init__(self, post_layernorm: nn.Module, merger: nn.Module):
        super().__init__()
        self.post_layernorm, self.merger = post_layernorm, merger

    def forward(self, hidden: Tensor) -> Tensor:
        return self.merger(self.post_layernorm(hidden))


class Cosmos3EdgeAdapter(MergedGridAdapter):
    model_type = "cosmos3_edge"
    family = "Cosmos3-Edge"
    hf_model = "Cosmos3EdgeForConditionalGeneration"
    hf_config = "Cosmos3EdgeConfig"
    default_preprocessing = COSMOS_PREPROCESSING
    special_tokens = SPECIAL_TOKENS
    chat_template = CHAT_TEMPLATE
    channels_last = True            # a linear patch embedding

    def __init__(self, model_id: str, model: nn.Module, preprocessing: Preprocessing, tokenizer: Any = None):
        vision = model.config.vision_config
        layers = vision.num_hidden_layers
        self.score_layers = (SHALLOW_LAYER, layers + DEEP_LAYER)
        if not 0 <= SHALLOW_LAYER < layers + DEEP_LAYER:
            raise InputError(f"{model_id}: a tower of {layers} layers has no shallow layer {SHALLOW_LAYER} below "
                             f"deep layer {layers + DEEP_LAYER}; AOT needs at least {SHALLOW_LAYER + 3} layers")
        super().__init__(model_id, model, StaticGrid(size=preprocessing.size, patch=vision.patch_size,
                                                     merge=vision.spatial_merge_size, temporal=1),
                         preprocessing, tokenizer)

    @staticmethod
    def size_factor(vision: Any) -> int:
        return vision.patch_size * vision.spatial_merge_size

    # ---- graphs -----------------------------------------------------------------------------------------------
    def vision_aot(self, cfg: AOTConfig) -> MergedGridVisionAOT:
        self.check_fits(cfg)
        visual = self.model.model.visual
        return MergedGridVisionAOT(StaticCosmosTower(visual, self.grid),
                                   PostNormProjector(visual.post_layernorm, self.model.model.projector),
                                   self.score_layers, self.grid, cfg).eval()

    @torch.inference_mode()
    def reference_encode(self, frames: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Features and scores as the reference computes them: Hugging Face's packed tower and projector on the
        processor's patches; scores from the hidden states it records, through Hugging Face's eager attention per
        frame."""
        from transformers.models.cosmos3_edge.modeling_cosmos3_edge import eager_attention_forward

        pixels, grid_thw = self.pixel_values(frames)
        visual = self.model.model.visual
        out = visual(pixels, grid_thw=grid_thw, output_hidden_states=True, return_dict=True)
        steps = int(grid_thw[0, 0])
        features = self.model.model.projector(out.last_hidden_state).reshape(steps, self.grid.grid ** 2, -1)
        scores = []
        for layer in self.score_layers:
            hidden = out.hidden_states[layer].reshape(steps, self.grid.patches, -1)
            attention = visual.encoder.layers[layer].self_attn
            x = visual.encoder.layers[layer].layer_norm1(hidden)
            q, k = (proj(x).unflatten(-1, (attention.num_heads, -1)).transpose(1, 2)
                    for proj in (attention.q_proj, attention.k_proj))
            _, weights = eager_attention_forward(attention, q, k, k, None, attention.scale)
            scores.append(merged_scores(received_from_weights(weights), self.grid))
        return features, scores[0], scores[1]

    @property
    def video_layout(self) -> VideoLayout:
        """One timestamped <|vision_start|> … <|vision_end|> block per frame, as its processor writes them (frames
        at 0, 1, 2 … s unless the runtime knows their times); each frame is its own grid."""
        config = self.model.config
        return VideoLayout(config.vision_start_token_id, config.vision_end_token_id, per_frame=True,
                           frame_stamp="<{:.1f} seconds>")

    # onnxruntime-genai's model builder (0.18) has no Cosmos3-Edge text model (relu² MLP, 3-D rotary sections):
    # `aot-export quantize-llm` exports `decoder()` with torch.onnx instead (runtime/decoder_export.py).
    genai_builder = False

    def save_language_model(self, directory: Path) -> Path:
        """No checkpoint for onnxruntime-genai's builder: it does not take this text model (`genai_builder`)."""
        raise InputError(f"{self.info.model_id}: onnxruntime-genai's model builder does not support the Cosmos3-Edge "
                         "text model; `aot-export quantize-llm` exports it with torch.onnx instead")


TINY_PREPROCESSING = Preprocessing(size=256, mean=COSMOS_PREPROCESSING.mean, std=COSMOS_PREPROCESSING.std)

BUILTIN = {
    "tiny-cosmos3-edge": lambda: Cosmos3EdgeAdapter.build("tiny-cosmos3-edge", tiny_config(), TINY_PREPROCESSING),
    "cosmos3-edge-random": lambda: Cosmos3EdgeAdapter.build("cosmos3-edge-random", cosmos3_edge_config(),
                                                            COSMOS_PREPROCESSING),
}
