"""Hugging Face `LlavaOnevisionForConditionalGeneration`: SigLIP tower → projector → AOT (video path).

Scores (AOT_SPEC §0): attention received at a shallow layer (5) and a deep one (−2 of the tower as the LLM
sees it), computed from those two layers' q·k so that every layer keeps the fused (sdpa) attention.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import AOTConfig
from ..errors import InputError
from ..preprocess import Preprocessing
from ..prompt_assembly import refuse_ids_past_table
from ..reducer import AOTReducer
from .base import ModelAdapter, ModelInfo, config_hash
from .scores import attention_received, received_from_weights

SHALLOW_LAYER = 5
DEEP_LAYER = -2
# Reference attention maps are materialised per chunk of frames; this bounds their memory.
REFERENCE_ATTENTION_BYTES = 1 << 30


def tiny_config() -> "LlavaOnevisionConfig":
    """The real architecture at tiny width: a 27×27 SigLIP grid at 384 px, 8 layers, a 2-layer Qwen2."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                                image_size=384, patch_size=14, vision_use_head=False)
    text = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=512, max_position_embeddings=8192,
                       tie_word_embeddings=True, eos_token_id=2, pad_token_id=0, bos_token_id=None)
    return LlavaOnevisionConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), vision_feature_layer=-1,
                                vision_feature_select_strategy="full", **placeholder_ids(tiny_tokenizer()))


# The chat template the published LLaVA-OneVision (Qwen2) checkpoints carry.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")
TOKENIZER_CORPUS = Path(__file__).with_name("tiny_corpus.txt")


def tiny_tokenizer(vocab_size: int = 500, special_tokens: tuple[str, ...] = SPECIAL_TOKENS,
                   chat_template: str = CHAT_TEMPLATE) -> "PreTrainedTokenizerFast":
    """A byte-level BPE with a model's special tokens and chat template (default: Qwen2's and LLaVA-OneVision's),
    trained here on a fixed text: deterministic, nothing downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(TOKENIZER_CORPUS.read_text().splitlines(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=list(special_tokens))
    fast.chat_template = chat_template
    return fast


def onevision_05b_config() -> "LlavaOnevisionConfig":
    """LLaVA-OneVision-0.5B's architecture (SigLIP-so400m without its last layer, Qwen2-0.5B)."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                                num_attention_heads=16, image_size=384, patch_size=14, vision_use_head=False)
    text = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=152000, max_position_embeddings=32768,
                       tie_word_embeddings=True, eos_token_id=2, pad_token_id=0, bos_token_id=None)
    # The built-in carries the tiny tokenizer (no download), so its placeholder ids are that tokenizer's, not the
    # published checkpoint's 151646/151647 (which the tiny vocabulary does not have).
    return LlavaOnevisionConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), vision_feature_layer=-1,
                                vision_feature_select_strategy="full", **placeholder_ids(tiny_tokenizer()))


PLACEHOLDERS = {"image_token_index": "<image>", "video_token_index": "<video>"}


def placeholder_ids(tokenizer: Any, placeholders: dict[str, str] = PLACEHOLDERS) -> dict[str, int]:
    """The config fields that name the chat template's placeholders (`placeholders`: field → token), as this
    tokenizer spells them."""
    return {field: tokenizer.convert_tokens_to_ids(token) for field, token in placeholders.items()}


def check_placeholders(model_id: str, config: Any, tokenizer: Any,
                       placeholders: dict[str, str] = PLACEHOLDERS) -> None:
    """The tokenizer and the config must agree on the placeholder ids (`placeholders`: config field → token), or
    every prompt renders 0 video placeholders, and the ids must be rows of the LLM's embedding table; checked
    before the weights load (seconds to minutes), naming the real cause."""
    if tokenizer is None:
        return
    for field, token in placeholders.items():
        in_tokenizer, in_config = tokenizer.convert_tokens_to_ids(token), getattr(config, field)
        if in_tokenizer != in_config:
            raise InputError(f"{model_id}: the tokenizer's {token} is id {in_tokenizer} but the config's {field} is "
                             f"{in_config}; the tokenizer and config.json come from different checkpoints: put the "
                             "checkpoint's own tokenizer files beside its config.json")
    refuse_ids_past_table({f"the placeholder {token}": getattr(config, field) for field, token in placeholders.items()},
                          config.get_text_config().vocab_size, model_id)


# Processor settings of the published LLaVA-OneVision checkpoints (SigLIP normalisation).
ONEVISION_PREPROCESSING = Preprocessing(size=384, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def layer_attention_received(layer: nn.Module, hidden: Tensor) -> Tensor:
    """[T, N]: the softmax attention each token receives in a SigLIP encoder layer, summed over queries and
    averaged over heads, from the layer's own q and k (its input is the previous layer's hidden state)."""
    attention = layer.self_attn
    x = layer.layer_norm1(hidden)
    frames, tokens, _ = x.shape
    heads = (frames, tokens, attention.num_heads, attention.head_dim)
    q = attention.q_proj(x).view(heads).transpose(1, 2)
    k = attention.k_proj(x).view(heads).transpose(1, 2)
    return attention_received(q, k, attention.scale)


class AttentionReceived(nn.Module):
    """`layer_attention_received` of one encoder layer, as a module so that its nodes carry the `scores` name scope
    in the exported graph (precision tools keep them fp32). Shares the layer's weights."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, hidden: Tensor) -> Tensor:
        return layer_attention_received(self.layer, hidden)


def select_features(hidden_states: tuple[Tensor, ...], feature_layer: int | list[int]) -> Tensor:
    """The tower output the projector sees (LLaVA-OneVision's `vision_feature_layer`, strategy "full")."""
    if isinstance(feature_layer, int):
        return hidden_states[feature_layer]
    return torch.cat([hidden_states[i] for i in feature_layer], dim=-1)


class VisionAOT(nn.Module):
    """frames [T, 3, S, S] → SigLIP → projector → AOT → tokens [n, H], index [n, 3]."""

    def __init__(self, tower: nn.Module, projector: nn.Module, feature_layer: int | list[int],
                 score_layers: tuple[int, int], cfg: AOTConfig):
        super().__init__()
        self.tower, self.projector = tower, projector
        self.feature_layer, self.score_layers = feature_layer, score_layers
        self.scores = nn.ModuleList([AttentionReceived(tower.encoder.layers[i]) for i in score_layers])
        self.reducer = AOTReducer(cfg)

    def encode(self, frames: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """frames → projected features [T, N, H], shallow and deep scores [T, N]: what the reducer reads."""
        hidden = self.tower(frames, output_hidden_states=True).hidden_states
        features = self.projector(select_features(hidden, self.feature_layer))
        score_shallow, score_deep = (score(hidden[i]) for score, i in zip(self.scores, self.score_layers))
        return features, score_shallow, score_deep

    def forward(self, frames: Tensor) -> tuple[Tensor, Tensor]:
        return self.reducer(*self.encode(frames))


class LlavaOnevisionAdapter(ModelAdapter):
    model_type = "llava_onevision"

    def __init__(self, model_id: str, model: nn.Module, preprocessing: Preprocessing, tokenizer: Any = None):
        config = model.config
        vision = config.vision_config
        if config.vision_feature_select_strategy != "full":
            raise InputError(f"{model_id}: vision_feature_select_strategy="
                             f"{config.vision_feature_select_strategy!r} drops a token from a grid without [CLS]; "
                             "only 'full' (LLaVA-OneVision's) is supported")
        self.model = model.eval()
        self._preprocessing = preprocessing
        self.feature_layer = config.vision_feature_layer
        self.score_layers = self._score_layers(model_id, vision.num_hidden_layers, self.feature_layer)
        self._info = ModelInfo(model_id=model_id, model_type=self.model_type,
                               config_hash=config_hash(config.to_dict()), grid=vision.image_size // vision.patch_size,
                               image_size=vision.image_size, hidden=config.text_config.hidden_size)
        self._eager_tower: nn.Module | None = None
        self._tokenizer = tokenizer

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def preprocessing(self) -> Preprocessing:
        return self._preprocessing

    @staticmethod
    def _score_layers(model_id: str, layers: int, feature_layer: int | list[int]) -> tuple[int, int]:
        deepest = max(feature_layer) if isinstance(feature_layer, list) else feature_layer
        seen = deepest if deepest >= 0 else layers + 1 + deepest           # layers the LLM's features pass
        shallow, deep = SHALLOW_LAYER, seen + DEEP_LAYER
        if not 0 <= shallow < deep < layers:
            raise InputError(f"{model_id}: a tower of {layers} layers (features after {seen}) has no shallow layer "
                             f"{SHALLOW_LAYER} below deep layer {deep}; AOT needs at least {SHALLOW_LAYER + 3}")
        return shallow, deep

    # ---- loading ----------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, model_id: str, config: Any, preprocessing: Preprocessing, seed: int = 0) -> "LlavaOnevisionAdapter":
        """The architecture from `config` with seeded random weights (no checkpoint, no download)."""
        from transformers import LlavaOnevisionForConditionalGeneration

        tokenizer = tiny_tokenizer()
        check_placeholders(model_id, config, tokenizer)
        config._attn_implementation = "sdpa"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlavaOnevisionForConditionalGeneration(config)
        return cls(model_id, model, preprocessing, tokenizer)

    @classmethod
    def from_checkpoint(cls, directory: Path) -> "LlavaOnevisionAdapter":
        from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

        config = json.loads((directory / "config.json").read_text())
        vision = config.get("vision_config", {})
        preprocessing = Preprocessing.from_checkpoint(directory, default_size=vision.get("image_size", 384))
        tokenizer = checkpoint_tokenizer(directory)
        check_placeholders(str(directory), LlavaOnevisionConfig.from_dict(config), tokenizer)
        try:
            model = LlavaOnevisionForConditionalGeneration.from_pretrained(
                directory, dtype=torch.float32, attn_implementation="sdpa", local_files_only=True)
        except (OSError, ValueError) as exc:
            raise InputError(f"{directory}: cannot load the checkpoint ({' '.join(str(exc).split())[:200]}); "
                             "pass a complete LLaVA-OneVision checkpoint directory") from exc
        return cls(str(directory), model, preprocessing, tokenizer)

    # ---- graphs -----------------------------------------------------------------------------------------------
    def vision_aot(self, cfg: AOTConfig) -> VisionAOT:
        self.check_fits(cfg)
        return VisionAOT(self.model.model.vision_tower, self.model.model.multi_modal_projector, self.feature_layer,
                         self.score_layers, cfg).eval()

    def encode(self, cfg: AOTConfig, frames: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        with torch.inference_mode():
            return self.vision_aot(cfg).encode(frames)

    @torch.inference_mode()
    def reference(self, cfg: AOTConfig, frames: Tensor) -> tuple[Tensor, Tensor]:
        self.check_fits(cfg)
        tower = self._eager()
        n = cfg.tokens_per_frame
        per_frame = tower.config.num_hidden_layers * tower.config.num_attention_heads * n * n * 4
        chunk = max(1, REFERENCE_ATTENTION_BYTES // per_frame)
        features, shallow, deep = [], [], []
        for start in range(0, frames.shape[0], chunk):
            out = tower(frames[start:start + chunk], output_hidden_states=True, output_attentions=True)
            features.append(self.model.model.multi_modal_projector(select_features(out.hidden_states,
                                                                                   self.feature_layer)))
            shallow.append(received_from_weights(out.attentions[self.score_layers[0]]))
            deep.append(received_from_weights(out.attentions[self.score_layers[1]]))
        return AOTReducer(cfg)(torch.cat(features), torch.cat(shallow), torch.cat(deep))

    # ---- language side (runtime) -----------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def context_length(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    @property
    def video_token_id(self) -> int:
        return self.model.config.video_token_index

    @property
    def image_newline(self) -> Tensor:
        """LLaVA-OneVision appends this learned token after a video's visual tokens."""
        return self.model.model.image_newline

    def embed_tokens(self, ids: Tensor) -> Tensor:
        return self.model.model.language_model.embed_tokens(ids)

    def decoder(self) -> tuple[nn.Module, nn.Module]:
        """(the LLM's decoder stack taking inputs_embeds, its lm_head)."""
        return self.model.model.language_model, self.model.lm_head

    @torch.inference_mode()
    def full_video_features(self, frames: Tensor) -> Tensor:
        """Every pooled visual token of every frame plus the newline, [T·P + 1, H]: Hugging Face's own video
        path, what the LLM receives without AOT."""
        config = self.model.config
        out = self.model.model.get_video_features(frames.unsqueeze(0), vision_feature_layer=config.vision_feature_layer,
                                                  vision_feature_select_strategy=config.vision_feature_select_strategy)
        return out.pooler_output[0]

    def save_language_model(self, directory: Path) -> Path:
        """The LLM alone as a Hugging Face Qwen2-family checkpoint (config, safetensors, tokenizer), the input of
        onnxruntime-genai's model builder."""
        from transformers import AutoModelForCausalLM

        text_config = copy.deepcopy(self.model.config.text_config)
        with torch.device("meta"):
            causal = AutoModelForCausalLM.from_config(text_config)
        state = {f"model.{k}": v for k, v in self.model.model.language_model.state_dict().items()}
        state["lm_head.weight"] = self.model.lm_head.weight
        causal.load_state_dict(state, assign=True, strict=True)
        causal.save_pretrained(directory)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)
        return directory

    def _eager(self) -> nn.Module:
        """A copy of the tower with Hugging Face's eager attention, which returns its attention weights."""
        if self._eager_tower is None:
            self._eager_tower = copy.deepcopy(self.model.model.vision_tower)
            self._eager_tower.set_attn_implementation("eager")
        return self._eager_tower


def checkpoint_tokenizer(directory: Path) -> Any:
    """The checkpoint's tokenizer, with the chat template from its processor files when the tokenizer has none."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError):
        return None
    if tokenizer.chat_template is None:
        if (directory / "chat_template.json").is_file():
            tokenizer.chat_template = json.loads((directory / "chat_template.json").read_text())["chat_template"]
        elif (directory / "chat_template.jinja").is_file():
            tokenizer.chat_template = (directory / "chat_template.jinja").read_text()
    return tokenizer


BUILTIN = {
    "tiny-llava-ov": lambda: LlavaOnevisionAdapter.build("tiny-llava-ov", tiny_config(), ONEVISION_PREPROCESSING),
    "llava-ov-0.5b-random": lambda: LlavaOnevisionAdapter.build("llava-ov-0.5b-random", onevision_05b_config(),
                                                                ONEVISION_PREPROCESSING),
}
