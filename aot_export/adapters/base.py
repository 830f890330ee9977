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
    """One VLM family: how to load it, its preprocessing, and frames → (tokens, index) as a static module."""

    model_type: ClassVar[str]

    info: ModelInfo
    preprocessing: Preprocessing

    @classmethod
    @abstractmethod
    def from_checkpoint(cls, directory: Path) -> "ModelAdapter":
        """Load a local Hugging Face checkpoint directory (never downloads)."""

    @abstractmethod
    def vision_aot(self, cfg: AOTConfig) -> nn.Module:
        """The exported module: frames [T, 3, S, S] → tokens [n, H], index [n, 3]."""

    def encode(self, cfg: AOTConfig, frames: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """What the reducer reads, without reducing: features [T, N, H], score_shallow, score_deep [T, N]
        (for studies and pictures of the reduction)."""
        with torch.inference_mode():
            return self.vision_aot(cfg).encode(frames)

    @abstractmethod
    def reference(self, cfg: AOTConfig, frames: Tensor) -> tuple[Tensor, Tensor]:
        """The PyTorch reference on the same frames, through the library's own attention (eager, weights
        returned by Hugging Face) rather than the exported score computation."""

    def example_frames(self, frames: int, seed: int = 0) -> Tensor:
        """`frames` video frames [frames, 3, S, S] of random pixels (graph inputs are video frames)."""
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
        """A config must be solved for this model's grid (and pooling)."""
        if cfg.grid != self.info.grid:
            raise InputError(f"the AOT config has grid={cfg.grid} but {self.info.model_id} gives a "
                             f"{self.info.grid}×{self.info.grid} grid per frame; solve the config with "
                             f"grid={self.info.grid}")
        for name, value in self.aot_fields().items():
            if getattr(cfg, name) != value:
                raise InputError(f"the AOT config has {name}={getattr(cfg, name)!r} but {self.info.model_id} "
                                 f"needs {name}={value!r}; solve the config with it")
