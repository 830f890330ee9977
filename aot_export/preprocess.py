"""Frame sampling and pixel preprocessing, exactly as the checkpoint's Hugging Face processor does them.

Written into every manifest, so that whoever feeds the exported graph (the runtime, a C++ app on a Jetson)
prepares frames the way the model was trained to see them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import InputError

# Hugging Face stores PIL's resampling filters by their integer code.
RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
PROCESSOR_FILES = ("video_preprocessor_config.json", "preprocessor_config.json")


@dataclass(frozen=True)
class Preprocessing:
    """What happens to a decoded RGB frame before the vision tower, and how frames are picked from a video."""

    size: int                                  # frames are resized to size × size
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale_factor: float = 1.0 / 255.0
    resample: str = "bicubic"
    sampling: str = "uniform"                  # index_i = i · total // frames (Hugging Face's default)

    def __post_init__(self) -> None:
        if self.resample not in RESAMPLE_NAMES.values():
            raise ValueError(f"Preprocessing.resample={self.resample!r}: must be one of {sorted(RESAMPLE_NAMES.values())}")
        if self.size < 1 or len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"Preprocessing: invalid size/mean/std {self.size}, {self.mean}, {self.std}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Preprocessing":
        return cls(**{**data, "mean": tuple(data["mean"]), "std": tuple(data["std"])})

    @classmethod
    def from_processor_config(cls, config: dict[str, Any], default_size: int) -> "Preprocessing":
        """Read a Hugging Face (video) processor config: resize to a square, rescale, normalise."""
        size = config.get("size") or {}
        side = size.get("height") or size.get("shortest_edge") or default_size
        if size.get("width", side) != side:
            raise InputError(f"processor config asks for a non-square size {size}; only square frames are supported")
        return cls(size=int(side), mean=tuple(config.get("image_mean", (0.5, 0.5, 0.5))),
                   std=tuple(config.get("image_std", (0.5, 0.5, 0.5))),
                   rescale_factor=float(config.get("rescale_factor", 1.0 / 255.0)),
                   resample=RESAMPLE_NAMES[int(config.get("resample", 3))])

    @classmethod
    def from_checkpoint(cls, directory: Path, default_size: int) -> "Preprocessing":
        for name in PROCESSOR_FILES:
            if (directory / name).is_file():
                return cls.from_processor_config(json.loads((directory / name).read_text()), default_size)
        raise InputError(f"{directory}: no {' or '.join(PROCESSOR_FILES)}; copy the checkpoint's processor files "
                         "into the directory")


def sample_indices(total: int, frames: int) -> np.ndarray:
    """`frames` indices uniformly over `total` decoded frames: i · total // frames, Hugging Face's formula.

    Hugging Face refuses a video shorter than `frames`; here the same formula repeats frames instead
    (e.g. 3 frames for 8 → 0 0 0 1 1 1 2 2), so that a short clip still fills the static graph."""
    if total < 1:
        raise InputError("the video has no frames; pass a non-empty video")
    return np.arange(frames, dtype=np.int64) * total // frames


def resize_frames(frames: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """[T, H, W, 3] uint8 RGB → [T, size, size, 3] uint8 (PIL; a frame already at the size is unchanged)."""
    resample = getattr(Image.Resampling, prep.resample.upper())
    return np.stack([np.asarray(Image.fromarray(frame).resize((prep.size, prep.size), resample=resample))
                     for frame in frames])


def preprocess_frames(frames: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """[T, H, W, 3] uint8 RGB → [T, 3, size, size] float32: PIL resize, rescale, normalise (HF's PIL backend)."""
    pixels = resize_frames(frames, prep).astype(np.float32) * np.float32(prep.rescale_factor)
    pixels = (pixels - np.asarray(prep.mean, np.float32)) / np.asarray(prep.std, np.float32)
    return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))
