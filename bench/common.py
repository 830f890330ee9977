"""Shared by the benchmark scripts: real-video inputs and timing."""

from __future__ import annotations

from pathlib import Path

import torch

from runtime.ratios import best_of
from runtime.patch_features import patch_features
from aot_export.video import decode_frames

SHARED_VIDEOS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "videos"


def shared_videos() -> list[Path]:
    videos = sorted(SHARED_VIDEOS.glob("*.mp4"))
    if not videos:
        raise SystemExit(f"no videos in {SHARED_VIDEOS}: the benchmarks need ../shared/data/videos")
    return videos


def video_inputs(path: Path, frames: int, hidden: int, grid: int = 27, patch: int = 14):
    return patch_features(decode_frames(path, frames, size=384), grid, patch, hidden)


def best_time(fn, repeats: int = 3) -> float:
    """Fastest of `repeats` runs after one warm-up, in seconds."""
    return best_of(fn, repeats)


@torch.inference_mode()
def cosine_min(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).min())
