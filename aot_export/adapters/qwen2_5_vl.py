"""Hugging Face `Qwen2_5_VLForConditionalGeneration`: windowed ViT → 2×2 patch merger → AOT on the merged grid.

Hugging Face's tower packs every frame into one sequence and derives its window order, attention segments and
rotary ids from a `grid_thw` tensor at run time (`lengths.tolist()`), which torch.export cannot trace. At a fixed
resolution they are constants: `StaticQwenTower` calls the Hugging Face blocks' own submodules (norms, qkv, proj, mlp)
on a batch of temporal steps for the full-attention blocks and a batch of equal windows for the others, with rotary
tables computed once by Hugging Face's own rotary module. Attention inside one window or one step does not depend on
token order, so this equals the packed forward up to rounding.

Scores: attention received in the first and the last full-attention block (`fullatt_block_indexes`), per patch, summed
into each merged token.
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

# Fixed input of an export: 448 px gives a 16×16 merged grid (4×4 windows of 112 px) per temporal patch.
DEFAULT_SIZE = 448
# Qwen2-VL's processor normalisation (OpenAI CLIP) and resampling.
QWEN_PREPROCESSING = Preprocessing(size=DEFAULT_SIZE, mean=(0.48145466, 0.4578275, 0.40821073),
                                   std=(0.26862954, 0.26130258, 0.27577711))


def tiny_config() -> Any:
    """The real architecture at tiny width: 8 blocks (full attention in 3 and 7), 112 px windows, a 2-layer LLM."""
    from transformers import Qwen2_5_VLConfig

    ids = builtin_placeholder_ids()
    # At Hugging Face's initializer_range 0.02 this narrow tower attends almost uniformly (received scores spread by
    # 0.5 %), so 1e-6 rounding between two correct forwards reorders near-tied anchors (bigbuckbunny: index agreement
    # 0.82); 0.05 gives random-weight attention a spread that rounding cannot reorder.
    vision = dict(depth=8, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[3, 7],
                  initializer_range=0.05)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=512, max_position_embeddings=8192, eos_token_id=2, pad_token_id=0,
                bos_token_id=None, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                                    "mrope_section": [2, 3, 3]})
    return Qwen2_5_VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=True, **ids)


def qwen2_5_vl_3b_config() -> Any:
    """Qwen2.5-VL-3B's architecture (32-block 1280-wide ViT, 36-layer 2048-wide LLM), with the placeholder ids of the
    tiny tokenizer the built-in carries (`builtin_placeholder_ids`), not the published checkpoint's."""
    from transformers import Qwen2_5_VLConfig

    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
    text = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                num_key_value_heads=2, vocab_size=151936, max_position_embeddings=128000,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
    return Qwen2_5_VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=True,
                            **builtin_placeholder_ids())


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Hugging Face's vision rotary embedding (`apply_rotary_pos_emb_vision`) on [..., L, d] with tables [L, d]."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import rotate_half

    return x * cos + rotate_half(x) * sin


class StaticQwenTower(nn.Module):
    """Qwen2.5-VL's vision blocks at one resolution and frame count, every index a constant.

    Tokens stay in the processor's block-major order [steps, P, D]. Full-attention blocks attend within a temporal
    step; window blocks within `window`×`window` merge blocks, gathered by a reshape because the fixed size tiles
    into whole windows."""

    def __init__(self, visual: nn.Module, grid: StaticGrid):
        super().__init__()
        from transformers.vision_utils import get_vision_position_ids

        config = visual.config
        self.patch_embed, self.blocks = visual.patch_embed, visual.blocks
        self.grid = grid
        self.full_attention = frozenset(config.fullatt_block_indexes)
        self.window = config.window_size // config.spatial_merge_size // config.patch_size    # merge blocks per side
        self.heads, self.head_dim = config.num_heads, config.hidden_size // config.num_heads
        positions = get_vision_position_ids(grid.grid_thw(1), grid.merge)                    # [P, 2] (row, col)
        with torch.no_grad():
            cos, sin = visual.rotary_pos_emb(torch.empty(0), positions)                       # [P, d]
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @property
    def windows_per_side(self) -> int:
        return self.grid.grid // self.window

    def to_windows(self, x: Tensor) -> Tensor:
        """[B, P, C] → [B, W², window²·merge², C], windows raster, merge blocks raster inside each."""
        n, w, m2 = self.windows_per_side, self.window, self.grid.merge ** 2
        x = x.reshape(x.shape[0], n, w, n, w, m2, x.shape[-1]).transpose(2, 3)
        return x.reshape(x.shape[0], n * n, w * w * m2, x.shape[-1])

    def from_windows(self, x: Tensor) -> Tensor:
        n, w, m2 = self.windows_per_side, self.window, self.grid.merge ** 2
        x = x.reshape(x.shape[0], n, n, w, w, m2, x.shape[-1]).transpose(2, 3)
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def qkv(self, index: int, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Block `index`'s rotated q, k and v, [steps, heads, P, d] for a full-attention block and
        [steps, windows, heads, window tokens, d] for a window block, from the block's own norm1 and qkv."""
        block = self.blocks[index]
        x = block.norm1(hidden)
        cos, sin = self.cos, self.sin
        if index not in self.full_attention:
            x, cos, sin = self.to_windows(x), self.to_windows(cos[None])[0], self.to_windows(sin[None])[0]
        q, k, v = block.attn.qkv(x).unflatten(-1, (3, self.heads, self.head_dim)).movedim(-3, 0).unbind(0)
        q, k, v = (t.transpose(-2, -3) for t in (q, k, v))                                   # [..., heads, L, d]
        cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)
        return rotate(q, cos, sin), rotate(k, cos, sin), v

    def block(self, index: int, hidden: Tensor) -> Tensor:
        block = self.blocks[index]
        q, k, v = self.qkv(index, hidden)
        batch = q.shape[:-3]                      # (steps,) or (steps, windows); the exporter's sdpa takes 4-D only
        out = F.scaled_dot_product_attention(*(t.flatten(0, len(batch) - 1) for t in (q, k, v)),
                                             scale=block.attn.scaling)
        out = out.unflatten(0, batch).transpose(-2, -3).flatten(-2)                        # [..., L, D]
        if index not in self.full_attention:
            out = self.from_windows(out)
        hidden = hidden + block.attn.proj(out)
        return hidden + block.mlp(block.norm2(hidden))

    def received(self, index: int, hidden: Tensor) -> Tensor:
        """[steps, P] attention each patch receives in full-attention block `index` (its input is `hidden`)."""
        q, k, _ = self.qkv(index, hidden)
        return attention_received(q, k, self.blocks[index].attn.scaling)

    def forward(self, frames: Tensor) -> list[Tensor]:
        patches = patchify(frames, self.grid, channels_last=False)
        steps = patches.shape[0]
        hidden = self.patch_embed(patches.flatten(0, 1)).reshape(steps, self.grid.patches, -1)
        states = [hidden]
        for index in range(len(self.blocks)):
            hidden = self.block(index, hidden)
            states.append(hidden)
        return states


class MergerProjector(nn.Module):
    """Qwen2.5-VL's patch merger on [steps, P, D] in block-major order → merged tokens [steps·G², H]."""

    def __init__(self, merger: nn.Module):
        super().__init__()
        self.merger = merger

    def forward(self, hidden: Tensor) -> Tensor:
        return self.merger(hidden.flatten(0, 1))


class Qwen2_5_VLAdapter(MergedGridAdapter):
    model_type = "qwen2_5_vl"
    family = "Qwen2.5-VL"
    hf_model = "Qwen2_5_VLForConditionalGeneration"
    hf_config = "Qwen2_5_VLConfig"
    default_preprocessing = QWEN_PREPROCESSING
    special_tokens = SPECIAL_TOKENS
    chat_template = CHAT_TEMPLATE
    channels_last = False           # a Conv3d patch embedding

    def __init__(self, model_id: str, model: nn.Module, preprocessing: Preprocessing, tokenizer: Any = None):
        vision = model.config.vision_config
        self.score_layers = self._score_layers(model_id, vision.fullatt_block_indexes, vision.depth)
        super().__init__(model_id, model, StaticGrid(size=preprocessing.size, patch=vision.patch_size,
                                                     merge=vision.spatial_merge_size,
                                                     temporal=vision.temporal_patch_size),
                         preprocessing, tokenizer)

    @staticmethod
    def _score_layers(model_id: str, full_attention: list[int], depth: int) -> tuple[int, int]:
        full = sorted(i for i in full_attention if 0 <= i < depth)
        if len(full) < 2:
            raise InputError(f"{model_id}: fullatt_block_indexes={list(full_attention)} names fewer than two "
                             f"full-attention blocks of {depth}; AOT takes its shallow and deep scores from two")
        return full[0], full[-1]

    @staticmethod
    def size_factor(vision: Any) -> int:
        """Frames must tile into whole attention windows (and so into whole merge blocks)."""
        return vision.window_size

    # ---- graphs -----------------------------------------------------------------------------------------------
    def vision_aot(self, cfg: AOTConfig) -> MergedGridVisionAOT:
        self.check_fits(cfg)
        visual = self.model.model.visual
        return MergedGridVisionAOT(StaticQwenTower(visual, self.grid), MergerProjector(visual.merger),
                                   self.score_layers, self.grid, cfg).eval()

    @torch.inference_mode()
    def reference_encode(self, frames: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Features and scores as the reference computes them: Hugging Face's packed tower on the processor's
        patches; scores from the hidden states it records, through Hugging Face's eager attention per temporal
        step."""
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (apply_rotary_pos_emb_vision,
                                                                         eager_attention_forward)
        from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

        visual = self.model.model.visual
        pixels, grid_thw = self.pixel_values(frames)
        out = visual(pixels, grid_thw=grid_thw, output_hidden_states=True)
        steps = int(grid_thw[0, 0])
        features = out.pooler_output.reshape(steps, self.grid.grid ** 2, -1)
        # Recorded hidden states are in window order; put them back in the processor's order.
        window_index, _ = get_vision_window_index(grid_thw, visual.spatial_merge_size, visual.window_size,
                                                  visual.patch_size)
        unit = self.grid.merge ** 2
        restore = torch.argsort(window_index)
        cos, sin = visual.rotary_pos_emb(pixels, get_vision_position_ids(grid_thw, visual.spatial_merge_size))
        scores = []
        for layer in self.score_layers:
            hidden = out.hidden_states[layer]                          # block `layer`'s input (0: the embedding)
            hidden = hidden.reshape(-1, unit, hidden.shape[-1])[restore].reshape(hidden.shape)
            block = visual.blocks[layer]
            seq = hidden.shape[0]
            q, k, _ = block.attn.qkv(block.norm1(hidden)).reshape(seq, 3, block.attn.num_heads, -1).permute(
                1, 0, 2, 3).unbind(0)
            q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
            q, k = (t.reshape(steps, -1, *t.shape[1:]).transpose(1, 2) for t in (q, k))     # [steps, heads, P, d]
            _, weights = eager_attention_forward(block.attn, q, k, k, None, block.attn.scaling)
            scores.append(merged_scores(received_from_weights(weights), self.grid))
        return features, scores[0], scores[1]

    @property
    def video_layout(self) -> VideoLayout:
        """One <|vision_start|> … <|vision_end|> block for the video; a temporal patch spans one second when the
        processor gives no frame rate (Hugging Face's default), so t advances `tokens_per_second` per grid."""
        config = self.model.config
        return VideoLayout(config.vision_start_token_id, config.vision_end_token_id,
                           time_interval=float(config.vision_config.tokens_per_second))

    def save_language_model(self, directory: Path) -> Path:
        """The checkpoint as Hugging Face saves it (config, safetensors, tokenizer): onnxruntime-genai's model builder
        takes `Qwen2_5_VLForConditionalGeneration` and builds its text model alone, with a 3-D `position_ids`
        input (a plain Qwen2 export would lose the 3-D rotary sections)."""
        self.model.save_pretrained(directory)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)
        return directory


TINY_PREPROCESSING = Preprocessing(size=224, mean=QWEN_PREPROCESSING.mean, std=QWEN_PREPROCESSING.std)

BUILTIN = {
    "tiny-qwen2.5-vl": lambda: Qwen2_5_VLAdapter.build("tiny-qwen2.5-vl", tiny_config(), TINY_PREPROCESSING),
    "qwen2.5-vl-3b-random": lambda: Qwen2_5_VLAdapter.build("qwen2.5-vl-3b-random", qwen2_5_vl_3b_config(),
                                                            QWEN_PREPROCESSING),
}
