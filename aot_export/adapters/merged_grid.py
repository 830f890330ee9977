"""What Qwen2.5-VL and Cosmos3-Edge share: a static patch grid, a patch merger that already turns each 2×2 block of
patches into one LLM token, and packed Hugging Face towers that do not export as they are.

At a fixed resolution and frame count every `grid_thw`-derived quantity (patch order, rotary tables, windows, attention
segments) is a constant, computed here with Python ints when the exported module is built. AOT then runs on the
merged grid with no pooling after the merger (docs/model_families.md maps AOT's stages onto it).
"""

from __future__ import annotations

import json
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..config import AOTConfig
from ..errors import InputError
from ..preprocess import PROCESSOR_FILES, RESAMPLE_NAMES, Preprocessing
from ..reducer import AOTReducer
from .base import ModelAdapter, ModelInfo, config_hash
from .llava_onevision import check_placeholders, checkpoint_tokenizer, placeholder_ids, tiny_tokenizer

# No pooling after the merger: average pooling with a 1×1 window is the identity on the merged grid.
MERGED_GRID_POOLING = {"pool": 1, "pool_mode": "average"}

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")
# Both families' chat templates, reduced to what a video question needs (Qwen2.5-VL's; Cosmos3-Edge's emits the same
# <|vision_start|><|video_pad|><|vision_end|> for a video, processing_cosmos3_edge.py): the built-ins' tiny tokenizer.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif content['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Config fields naming the tokens the chat template and the 3-D prompt layout use → the tokens as the tokenizer has them.
PLACEHOLDERS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}


def builtin_tokenizer() -> Any:
    """The tiny tokenizer every built-in of both families carries (nothing downloaded)."""
    return tiny_tokenizer(special_tokens=SPECIAL_TOKENS, chat_template=CHAT_TEMPLATE)


def builtin_placeholder_ids() -> dict[str, int]:
    """A built-in config's placeholder fields as its tiny tokenizer spells them: a built-in, tiny or full size,
    carries the tiny tokenizer, so the published checkpoints' ids (151656, 18, …) would name no token of it and every
    prompt would render 0 video placeholders."""
    return placeholder_ids(builtin_tokenizer(), PLACEHOLDERS)


@dataclass(frozen=True)
class StaticGrid:
    """The constant geometry of one export: square frames of `size` px cut into `patch` px patches, merged
    `merge`×`merge` into LLM tokens, `temporal` consecutive frames folded into one patch."""

    size: int
    patch: int
    merge: int
    temporal: int

    @property
    def patches_per_side(self) -> int:
        return self.size // self.patch

    @property
    def grid(self) -> int:
        """Merged tokens per side: AOT's G."""
        return self.patches_per_side // self.merge

    @property
    def patches(self) -> int:
        return self.patches_per_side ** 2

    def grid_thw(self, steps: int) -> Tensor:
        return torch.tensor([[steps, self.patches_per_side, self.patches_per_side]])


def patchify(frames: Tensor, grid: StaticGrid, channels_last: bool) -> Tensor:
    """[T, 3, S, S] → [T/temporal, P, 3·temporal·patch²]: the processor's flat patches, one row of patches per temporal
    step, in its block-major order (each merge block's merge² patches consecutive). Within a patch the values run
    (channel, time, row, col) for a Conv3d embedding (Qwen2.5-VL) or (row, col, channel, time) with `channels_last`
    for a linear one (Cosmos3-Edge). Three reshapes of at most 6 axes: TensorRT takes 8 at most."""
    frames_in, channels, _, _ = frames.shape
    g, m, p, t = grid.patches_per_side, grid.merge, grid.patch, grid.temporal
    x = frames.reshape(frames_in, channels, g, p, g, p).permute(0, 2, 4, 1, 3, 5)       # [T, gh, gw, C, p, p]
    x = x.reshape(frames_in, g // m, m, g // m, m, channels * p * p).permute(0, 1, 3, 2, 4, 5)   # block-major
    x = x.reshape(frames_in // t, t, grid.patches, channels, p * p)
    x = x.permute(0, 2, 4, 3, 1) if channels_last else x.permute(0, 2, 3, 1, 4)
    return x.reshape(frames_in // t, grid.patches, channels * t * p * p)


def merged_scores(received: Tensor, grid: StaticGrid) -> Tensor:
    """[T, P] attention received per patch → [T, G²] per merged token: the sum over its merge² patches (patches
    are block-major, so a merged token's patches are consecutive)."""
    return received.reshape(received.shape[0], -1, grid.merge ** 2).sum(-1)


class ScoreLayer(nn.Module):
    """Attention received in one tower layer, computed by the tower's own `received` for layer `index`; a module
    so that its nodes carry the `scores` name scope (precision tools keep them fp32). Shares the tower's weights."""

    def __init__(self, tower: nn.Module, index: int):
        super().__init__()
        self.tower, self.index = tower, index

    def forward(self, hidden: Tensor) -> Tensor:
        return self.tower.received(self.index, hidden)


class MergedGridVisionAOT(nn.Module):
    """frames [T·temporal, 3, S, S] → static tower → patch merger (projector) → AOT → tokens [n, H], index [n, 3].

    `tower(frames)` returns the hidden states before every layer and after the last one ([steps, P, D] each);
    `tower.received(i, hidden_i)` the attention each patch receives in layer i; `projector` maps the last hidden
    state [steps, P, D] to merged tokens [steps·G², H]."""

    def __init__(self, tower: nn.Module, projector: nn.Module, score_layers: tuple[int, int], grid: StaticGrid,
                 cfg: AOTConfig):
        super().__init__()
        self.tower, self.projector, self.grid = tower, projector, grid
        self.score_layers = score_layers
        self.scores = nn.ModuleList([ScoreLayer(tower, i) for i in score_layers])
        self.reducer = AOTReducer(cfg)

    def encode(self, frames: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        hidden = self.tower(frames)
        steps = hidden[-1].shape[0]
        features = self.projector(hidden[-1]).reshape(steps, self.grid.grid ** 2, -1)
        score_shallow, score_deep = (merged_scores(score(hidden[i]), self.grid)
                                     for score, i in zip(self.scores, self.score_layers))
        return features, score_shallow, score_deep

    def forward(self, frames: Tensor) -> tuple[Tensor, Tensor]:
        return self.reducer(*self.encode(frames))


def static_preprocessing(directory: Path | None, model_id: str, size: int, factor: int,
                         defaults: Preprocessing) -> Preprocessing:
    """The fixed-size preprocessing of an export: the processor's rescale, normalisation and resampling, frames
    resized to `size`×`size` (a square `height`/`width` in the processor config overrides `size`). Refuses a size
    the static grid cannot take (not a multiple of `factor`) or that the processor's pixel bounds exclude."""
    config: dict[str, Any] = {}
    if directory is not None:
        for name in PROCESSOR_FILES:
            if (directory / name).is_file():
                config = json.loads((directory / name).read_text())
                break
    bounds = config.get("size") or {}
    if bounds.get("height") is not None:
        if bounds.get("width") != bounds["height"]:
            raise InputError(f"{model_id}: the processor asks for a non-square size {bounds}; only square frames "
                             "are supported: set size.height = size.width in its preprocessor config")
        size = int(bounds["height"])
    if size % factor:
        raise InputError(f"{model_id}: a {size}×{size} px frame does not fit the static grid (the size must be a "
                         f"multiple of {factor} px); set size.height/width in the processor config to a multiple "
                         f"of {factor}, e.g. {max(factor, size // factor * factor)}")
    low = config.get("min_pixels", bounds.get("shortest_edge") if bounds.get("height") is None else None)
    high = config.get("max_pixels", bounds.get("longest_edge") if bounds.get("height") is None else None)
    if (low is not None and size * size < low) or (high is not None and size * size > high):
        raise InputError(f"{model_id}: a {size}×{size} px frame is outside the processor's pixel range "
                         f"[{low}, {high}], so the model never saw frames of that size; set size.height/width in "
                         "the processor config to a square inside that range")
    resample = config.get("resample")
    return Preprocessing(size=size, mean=tuple(config.get("image_mean", defaults.mean)),
                         std=tuple(config.get("image_std", defaults.std)),
                         rescale_factor=float(config.get("rescale_factor", defaults.rescale_factor)),
                         resample=RESAMPLE_NAMES[int(resample)] if resample is not None else defaults.resample)


def load_pretrained(model_class: Any, directory: Path, family: str) -> nn.Module:
    try:
        return model_class.from_pretrained(directory, dtype=torch.float32, attn_implementation="sdpa",
                                           local_files_only=True)
    except (OSError, ValueError) as exc:
        raise InputError(f"{directory}: cannot load the checkpoint ({' '.join(str(exc).split())[:200]}); "
                         f"pass a complete {family} checkpoint directory") from exc


def build_random(model_class: Any, config: Any, seed: int) -> nn.Module:
    """The architecture from `config` with seeded random weights (no checkpoint, no download)."""
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class(config).eval()


class MergedGridAdapter(ModelAdapter):
    """What the Qwen2.5-VL and Cosmos3-Edge adapters share: identity from the model's config and the static grid,
    the processor's patches, the reference as Hugging Face's packed tower (`reference_encode`) followed by
    `AOTReducer`, and the language side of a `…ForConditionalGeneration` whose video is wrapped in
    <|vision_start|> … <|vision_end|> rather than closed by a learned vector (so `image_newline` is None and the
    runtime places visual tokens by 3-D positions, aot_export/prompt_assembly.py)."""

    position_axes = 3                            # (t, h, w): the prompt places visual tokens by `video_layout`
    channels_last: ClassVar[bool]
    """How the processor flattens a patch: (channel, time, row, col) for a Conv3d embedding, or channel-last for
    a linear one (see `patchify`)."""
    family: ClassVar[str]                        # the name users know, for messages ("Qwen2.5-VL")
    hf_model: ClassVar[str]                      # transformers' `…ForConditionalGeneration` class name
    hf_config: ClassVar[str]                     # transformers' config class name
    default_preprocessing: ClassVar[Preprocessing]   # the processor's, at the family's default export size
    special_tokens: ClassVar[tuple[str, ...]]    # of the built-in tiny tokenizer
    chat_template: ClassVar[str]

    @staticmethod
    @abstractmethod
    def size_factor(vision: Any) -> int:
        """Pixels a frame's side must be a multiple of, for the static grid (whole windows or merge blocks)."""

    # ---- loading ----------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, model_id: str, config: Any, preprocessing: Preprocessing, seed: int = 0) -> "MergedGridAdapter":
        """The architecture from `config` with seeded random weights and a tiny tokenizer (nothing downloaded)."""
        import transformers

        static_preprocessing(None, model_id, preprocessing.size, cls.size_factor(config.vision_config), preprocessing)
        tokenizer = tiny_tokenizer(special_tokens=cls.special_tokens, chat_template=cls.chat_template)
        check_placeholders(model_id, config, tokenizer, PLACEHOLDERS)
        return cls(model_id, build_random(getattr(transformers, cls.hf_model), config, seed), preprocessing, tokenizer)

    @classmethod
    def from_checkpoint(cls, directory: Path) -> "MergedGridAdapter":
        import transformers

        config = getattr(transformers, cls.hf_config)(**json.loads((directory / "config.json").read_text()))
        preprocessing = static_preprocessing(directory, str(directory), cls.default_preprocessing.size,
                                             cls.size_factor(config.vision_config), cls.default_preprocessing)
        tokenizer = checkpoint_tokenizer(directory)
        check_placeholders(str(directory), config, tokenizer, PLACEHOLDERS)
        model = load_pretrained(getattr(transformers, cls.hf_model), directory, cls.family)
        return cls(str(directory), model, preprocessing, tokenizer)

    def __init__(self, model_id: str, model: nn.Module, grid: StaticGrid, preprocessing: Preprocessing,
                 tokenizer: Any = None):
        self.model, self.grid = model.eval(), grid
        self._preprocessing, self._tokenizer = preprocessing, tokenizer
        self._info = ModelInfo(model_id=model_id, model_type=self.model_type,
                               config_hash=config_hash(model.config.to_dict()), grid=grid.grid,
                               image_size=preprocessing.size, hidden=model.config.text_config.hidden_size,
                               temporal_patch=grid.temporal)

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def preprocessing(self) -> Preprocessing:
        return self._preprocessing

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    # ---- graphs -----------------------------------------------------------------------------------------------
    def aot_fields(self) -> dict[str, Any]:
        return {"grid": self.info.grid, **MERGED_GRID_POOLING}

    def encode(self, cfg: AOTConfig, frames: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        with torch.inference_mode():
            return self.vision_aot(cfg).encode(frames)

    def pixel_values(self, frames: Tensor) -> tuple[Tensor, Tensor]:
        """Preprocessed frames [T, 3, S, S] → (`pixel_values_videos`, `video_grid_thw`) as the processor gives them."""
        patches = patchify(frames, self.grid, channels_last=self.channels_last)
        return patches.flatten(0, 1), self.grid.grid_thw(patches.shape[0])

    @torch.inference_mode()
    def reference(self, cfg: AOTConfig, frames: Tensor) -> tuple[Tensor, Tensor]:
        self.check_fits(cfg)
        return AOTReducer(cfg)(*self.reference_encode(frames))

    @abstractmethod
    def reference_encode(self, frames: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Features [T, G², H] and shallow / deep scores [T, G²] as the reference computes them: Hugging Face's
        packed tower on the processor's patches, scores through Hugging Face's eager attention."""

    # ---- language side (runtime) -----------------------------------------------------------------------------------
    @property
    def context_length(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    @property
    def video_token_id(self) -> int:
        return self.model.config.video_token_id

    @property
    def image_newline(self) -> None:
        return None

    def embed_tokens(self, ids: Tensor) -> Tensor:
        return self.model.model.language_model.embed_tokens(ids)

    def decoder(self) -> tuple[nn.Module, nn.Module]:
        """(the LLM's decoder stack taking inputs_embeds and 3-D position ids, its lm_head)."""
        return self.model.model.language_model, self.model.lm_head

    @torch.inference_mode()
    def full_video_features(self, frames: Tensor) -> Tensor:
        """Every merged token of every grid (temporal patch or frame), [T/temporal·G², H]: Hugging Face's own
        video path."""
        pixels, grid_thw = self.pixel_values(frames)
        return torch.cat(self.model.model.get_video_features(pixels, grid_thw).pooler_output)
