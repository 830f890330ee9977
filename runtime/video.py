"""Video in: PyAV decoding with uniform frame sampling."""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np

from aot_export.errors import InputError


class VideoError(InputError):
    """A video that cannot be used; the message names the file and what to do."""


def uniform_indices(total: int, frames: int) -> np.ndarray:
    """`frames` indices spread evenly over `total` frames, first and last included; repeats when the video is
    shorter than `frames` (as Hugging Face's uniform sampling does)."""
    return np.linspace(0, total - 1, frames).round().astype(np.int64)


def decode_frames(path: str | os.PathLike, frames: int, size: int) -> np.ndarray:
    """[frames, size, size, 3] uint8 RGB, uniformly sampled over the whole video and resized by FFmpeg."""
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"{path}: no such video file; pass an existing .mp4/.mkv/.avi path")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: has no video stream; pass a video file")
            decoded = [frame.to_ndarray(width=size, height=size, format="rgb24")
                       for frame in container.decode(video=0)]
    except av.FFmpegError as exc:
        raise VideoError(f"{path}: cannot be decoded ({exc.__class__.__name__}); pass a valid video file") from exc
    if not decoded:
        raise VideoError(f"{path}: contains no frames; pass a non-empty video")
    return np.stack([decoded[i] for i in uniform_indices(len(decoded), frames)])


def synthesize_clip(path: str | os.PathLike, frames: int = 48, size: int = 160, fps: int = 24) -> Path:
    """Write a short h264 clip of moving shapes (for machines without the shared footage)."""
    path = Path(path)
    ys, xs = np.mgrid[0:size, 0:size]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for t in range(frames):
            image = np.zeros((size, size, 3), dtype=np.uint8)
            image[..., 0] = (xs * 255 // size).astype(np.uint8)
            image[..., 2] = (ys * 255 // size).astype(np.uint8)
            cx, cy = (size // 4 + 2 * t) % size, size // 2
            image[(xs - cx) ** 2 + (ys - cy) ** 2 < (size // 8) ** 2] = (255, 255, 0)
            image[size // 8: size // 4, (3 * t) % size: (3 * t) % size + size // 10] = (0, 255, 0)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


SHARED_VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "videos"


def shared_videos() -> list[Path]:
    """The team's real footage beside the project root (`../shared/data/videos`), if this checkout has it."""
    return sorted(SHARED_VIDEOS.glob("*.mp4"))
