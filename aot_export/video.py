"""Video in: PyAV decoding with the checkpoint's frame sampling (`aot_export.preprocess.sample_indices`).

Part of `aot_export` because every consumer of an export — the runtime, calibration, a benchmark — must feed it frames
sampled exactly as the manifest says."""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np

from .errors import InputError
from .preprocess import sample_indices


class VideoError(InputError):
    """A video that cannot be used; the message names the file and what to do."""


def _open(path: Path) -> "av.container.InputContainer":
    if not path.is_file():
        raise VideoError(f"{path}: no such video file; pass an existing .mp4/.mkv/.avi path")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, UnicodeDecodeError) as exc:
        raise VideoError(f"{path}: cannot be opened as a video ({exc.__class__.__name__}); pass a valid video file") \
            from exc
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path}: has no video stream; pass a video file")
    return container


def _pick(path: Path, indices: np.ndarray, size: int | None) -> dict[int, np.ndarray]:
    """Decode from the start and convert only the frames at `indices` (RGB; resized by FFmpeg if `size`)."""
    wanted, picked = set(indices.tolist()), {}
    with _open(path) as container:
        try:
            for i, frame in enumerate(container.decode(video=0)):
                if i > indices[-1]:
                    break
                if i in wanted:
                    picked[i] = (frame.to_ndarray(format="rgb24") if size is None
                                 else frame.to_ndarray(width=size, height=size, format="rgb24"))
        except av.FFmpegError as exc:
            raise VideoError(f"{path}: cannot be decoded ({exc.__class__.__name__}); pass a valid video file") \
                from exc
    return picked


def count_frames(path: Path) -> int:
    with _open(path) as container:
        try:
            return sum(1 for _ in container.decode(video=0))
        except av.FFmpegError as exc:
            raise VideoError(f"{path}: cannot be decoded ({exc.__class__.__name__}); pass a valid video file") \
                from exc


def decode_frames(path: str | os.PathLike, frames: int, size: int | None = None) -> np.ndarray:
    """[frames, H, W, 3] uint8 RGB sampled as Hugging Face samples them (`aot_export.preprocess.sample_indices`
    over the stream's frame count), at the video's own resolution unless `size` asks FFmpeg for size × size.

    A video shorter than `frames` repeats frames; a stream whose header miscounts its frames is counted by
    decoding it."""
    path = Path(path)
    with _open(path) as container:
        total = container.streams.video[0].frames
    total = total or count_frames(path)
    if total == 0:
        raise VideoError(f"{path}: contains no frames; pass a non-empty video")
    indices = sample_indices(total, frames)
    picked = _pick(path, indices, size)
    if len(picked) < len(set(indices.tolist())):
        total = count_frames(path)
        indices = sample_indices(total, frames)
        picked = _pick(path, indices, size)
    if not picked:
        raise VideoError(f"{path}: contains no frames; pass a non-empty video")
    return np.stack([picked[i] for i in indices.tolist()])


SHARED_VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "videos"


def shared_videos() -> list[Path]:
    """The team's real footage beside the project root (`../shared/data/videos`), if this checkout has it."""
    return sorted(SHARED_VIDEOS.glob("*.mp4"))
