"""What every model adapter gives the exporter, the validator and the runtime."""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..config import AOTConfig
from ..errors import InputError
from ..preprocess import Preprocessing
from ..prompt_assembly import VideoLayout


@dataclass(frozen=True)
class ModelInfo:
    """Identity of the model an export came from, written into the manifest."""

    model_id: str            # "tiny-llava-ov" or the checkpoint directory
    model_type: str          # Hugging Face `model_type`, the adapter table's key
    config_hash: str         # sha256 of the model's config JSON (weights are not hashed: the ONNX hash covers them)
    grid: int                # tokens per side of one frame
    image_size: int
    hidden: int              # width of the reduced tokens (the LLM's hidden size)
    temporal_patch: int = 1  # video frames the tower folds into one grid (Qwen2.5-VL: 2); AOT's "frame" is one grid

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ModelAdapter(ABC):
    """One VLM family: the contract the exporter, the validator, the runtime and the benchmarks rely on, and all
    they may use of an adapter (tests/test_adapter_contract.py checks that every `adapter.<name>` in aot_export/,
    runtime/ and bench/ is declared here). A new family implements every abstract member; `example_frames` and
    `check_fits` work from `info` as they are.

    Shapes: T frames of S×S pixels (S = `info.image_size`), G×G = N tokens per frame (G = `info.grid`), P pooled
    cells per frame, H = `info.hidden` (the LLM's width), L text positions, V the LLM's vocabulary.
    """

    model_type: ClassVar[str]
    """The Hugging Face `model_type` this adapter is chosen by (the key in `aot_export.adapters.ADAPTERS`)."""

    # ---- identity and input ----------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def from_checkpoint(cls, directory: Path) -> "ModelAdapter":
        """Load a local Hugging Face checkpoint directory (never downloads); a bad one raises `InputError`."""

    @property
    @abstractmethod
    def info(self) -> ModelInfo:
        """Identity of the model (written into manifests) and its token grid, input size and LLM width."""

    @property
    @abstractmethod
    def preprocessing(self) -> Preprocessing:
        """How decoded RGB frames become the tower's input [T, 3, S, S] (size, resampling, mean, std)."""

    # ---- vision side (export, validation, studies) --------------------------------------------------------------
    @abstractmethod
    def vision_aot(self, cfg: AOTConfig) -> nn.Module:
        """The exported module: frames [T, 3, S, S] float32 → tokens [cfg.output_tokens, H], index
        [cfg.output_tokens, 3] int32 (frame, row, col on the pooled grid), through tower, projector and
        `AOTReducer(cfg)`; its top-level submodules are named as `aot_export.onnx_scopes` expects."""

    @abstractmethod
    def encode(self, cfg: AOTConfig, frames: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """What the reducer reads, without reducing: projected features [T, N, H], score_shallow and score_deep
        [T, N] (attention each token receives, AOT_SPEC §0), as `vision_aot(cfg)` computes them (for studies and
        pictures of the reduction: `AOTReducer(cfg).trace(*adapter.encode(cfg, frames))`)."""

    @abstractmethod
    def reference(self, cfg: AOTConfig, frames: Tensor) -> tuple[Tensor, Tensor]:
        """The PyTorch reference of `vision_aot(cfg)(frames)`: (tokens, index) as it returns them, with the scores
        taken from the library's own attention (eager, weights returned by Hugging Face) rather than the exported
        score computation."""

    def example_frames(self, frames: int, seed: int = 0) -> Tensor:
        """`frames` video frames [frames, 3, S, S] of seeded random pixels (tracing, smoke tests; graph inputs
        are video frames)."""
        g = torch.Generator().manual_seed(seed)
        size = self.info.image_size
        return torch.randn(frames, 3, size, size, generator=g)

    def aot_fields(self) -> dict[str, Any]:
        """The AOTConfig fields this model fixes: its grid and how the VLM pools it (LLaVA-OneVision: 2×2
        bilinear; a tower whose merger already reduces 2×2 patches: no pooling)."""
        return {"grid": self.info.grid}

    def aot_frames(self, video_frames: int) -> int:
        """AOT frames (grids) for `video_frames` decoded frames; refuses a count the temporal patch does not divide."""
        patch = self.info.temporal_patch
        if video_frames < 1 or video_frames % patch:
            raise InputError(f"{video_frames} frames: {self.info.model_id} encodes {patch} frames per temporal "
                             f"patch; pass a frame count that is a positive multiple of {patch}")
        return video_frames // patch

    def check_fits(self, cfg: AOTConfig) -> None:
        """A config must be solved for this model's grid (and pooling); raises `InputError` naming what to use."""
        if cfg.grid != self.info.grid:
            raise InputError(f"the AOT config has grid={cfg.grid} but {self.info.model_id} gives a "
                             f"{self.info.grid}×{self.info.grid} grid per frame; solve the config with "
                             f"grid={self.info.grid}")
        for name, value in self.aot_fields().items():
            if getattr(cfg, name) != value:
                raise InputError(f"the AOT config has {name}={getattr(cfg, name)!r} but {self.info.model_id} "
                                 f"needs {name}={value!r}; solve the config with it")

    @abstractmethod
    def full_video_features(self, frames: Tensor) -> Tensor:
        """[T·P + 1, H]: every visual token the LLM receives for `frames` [T, 3, S, S] without AOT (the
        library's own video path), the video's closing vector (`image_newline`) last."""

    # ---- language side (runtime) ----------------------------------------------------------------------------------
    @property
    @abstractmethod
    def tokenizer(self) -> Any:
        """The checkpoint's tokenizer (a transformers tokenizer carrying its chat template, `eos_token_id`,
        `decode`), or None when the checkpoint has none (the runtime then refuses prompts with `InputError`)."""

    @property
    @abstractmethod
    def video_token_id(self) -> int:
        """The id of the chat template's video placeholder: the runtime replaces it with the visual tokens and
        `image_newline`."""

    @property
    @abstractmethod
    def image_newline(self) -> Tensor | None:
        """[H]: the vector the LLM receives after a video's visual tokens (LLaVA-OneVision), or None for a family
        that wraps the video in text tokens instead and places it by 3-D positions (aot_export/prompt_assembly.py)."""

    @property
    @abstractmethod
    def context_length(self) -> int:
        """The LLM's context window in tokens (prompts longer than this are refused)."""

    position_axes: ClassVar[int] = 1
    """Axes of the LLM's rotary positions: 1 (the decoder derives them), or 3 (t, h, w) for a family whose prompt
    places visual tokens by `video_layout`; a class fact, so that a decoder can be checked before weights load."""

    @property
    def video_layout(self) -> VideoLayout | None:
        """The prompt layout of a family with 3-D positions (aot_export/prompt_assembly.py); None (LLaVA-OneVision):
        visual tokens go in one run at the placeholder, closed by `image_newline`, with 1-D positions."""
        return None

    @abstractmethod
    def embed_tokens(self, ids: Tensor) -> Tensor:
        """Token ids [B, L] int64 → the LLM's input embeddings [B, L, H]."""

    @abstractmethod
    def decoder(self) -> tuple[nn.Module, nn.Module]:
        """(the LLM's decoder stack, its lm_head): the stack is called as `stack(inputs_embeds=[B, L, H],
        cache=..., use_cache=True, position_ids=...)` and returns `.last_hidden_state` [B, L, H]; the lm_head maps
        [B, H] to logits [B, V]."""

    genai_builder: ClassVar[bool] = True
    """Whether onnxruntime-genai's model builder takes this family's text model (the checkpoint
    `save_language_model` writes); where it does not, `aot-export quantize-llm` exports `decoder()` itself with
    torch.onnx (runtime/decoder_export.py)."""

    def release_weights(self) -> None:
        """Empty every parameter and buffer of the modules the adapter holds, for a command that needs no weights
        past a point (a 3B model's 15 GB of fp32 would otherwise sit beside the copy a builder process or an ONNX
        graph holds); afterwards the adapter still answers `info`, `context_length` and the like, but computes
        nothing."""
        modules = [value for value in vars(self).values() if isinstance(value, nn.Module)]
        for tensor in [t for module in modules for t in (*module.parameters(), *module.buffers())]:
            tensor.data = torch.empty(0, dtype=tensor.dtype)

    @abstractmethod
    def save_language_model(self, directory: Path) -> Path:
        """Write the LLM alone as a Hugging Face causal-LM checkpoint (config, safetensors, tokenizer when there is
        one) into `directory`, the input of onnxruntime-genai's model builder; returns `directory`."""
