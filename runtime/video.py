"""Video in for the runtime: decoding (from `aot_export.video`), synthetic clips, and rolling clips from a live feed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator

import av
import numpy as np

from aot_export.errors import InputError
from aot_export.preprocess import sample_indices
from aot_export.video import VideoError, count_frames, decode_frames, shared_videos

__all__ = ["VideoError", "count_frames", "decode_frames", "rolling_clips", "shared_videos", "synthesize_clip"]


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


def rolling_clips(source: Iterable[np.ndarray], frames: int, window: int, stride: int) -> Iterator[np.ndarray]:
    """Clips of `frames` frames from a live feed: every `stride` new frames, `frames` frames sampled uniformly
    (as from a file) over the last `window` frames. The first clip comes once `window` frames have arrived."""
    from collections import deque

    if stride < 1 or frames > window:
        raise InputError(f"rolling window: need stride >= 1 and frames ({frames}) <= window ({window})")
    recent: deque = deque(maxlen=window)
    since = 0
    for frame in source:
        recent.append(frame)
        since += 1
        if len(recent) == window and since >= stride:
            since = 0
            yield np.stack([recent[i] for i in sample_indices(window, frames)])
