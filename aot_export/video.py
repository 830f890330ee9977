"""Video in, the one decoder: PyAV decoding with the checkpoint's frame sampling
(`aot_export.preprocess.sample_indices`), clips cut from a live feed (`rolling_clips`), and a synthetic clip for
machines without footage.

Part of `aot_export` because every consumer of an export — the runtime, calibration, a benchmark — must feed it frames
sampled exactly as the manifest says."""

from __future__ import annotations

import os
from collections import deque
from pathlib import Path
from typing import Iterable, Iterator

import av
import numpy as np

from .errors import InputError
from .preprocess import sample_indices


class VideoError(InputError):
    """A video that cannot be used; the message names the file and what to do."""


# FFmpeg's reasons in the words a person fixing the source needs (anything else is named by its class), and the
# fix where the reason decides it rather than the kind of source.
_REASONS: tuple[tuple[type[BaseException], str, str | None], ...] = (
    (ConnectionRefusedError, "connection refused", None),
    (av.ExitError, "no answer within the timeout", None),
    (av.error.ProtocolNotFoundError, "this FFmpeg build lacks the protocol",
     "relay the stream over one it has (rtsp, http, tcp, udp)"),
    (PermissionError, "permission denied", None),
    (FileNotFoundError, "not found", None),
)


def ffmpeg_reason(exc: BaseException) -> str:
    return next((words for kind, words, _ in _REASONS if isinstance(exc, kind)), exc.__class__.__name__)


def open_container(target: str, *, name: str, fix: str, **av_options) -> "av.container.InputContainer":
    """`av.open(target, **av_options)` that refuses with one VideoError line naming `name`, FFmpeg's reason and
    `fix`, and that insists on a video stream."""
    try:
        container = av.open(target, **av_options)
    except (av.FFmpegError, OSError, UnicodeDecodeError) as exc:
        fix = next((own for kind, _, own in _REASONS if isinstance(exc, kind) and own), fix)
        raise VideoError(f"{name}: cannot be opened as a video ({ffmpeg_reason(exc)}); {fix}") from exc
    if not container.streams.video:
        container.close()
        raise VideoError(f"{name}: has no video stream; {fix}")
    return container


def _open(path: Path) -> "av.container.InputContainer":
    if not path.is_file():
        raise VideoError(f"{path}: no such video file; pass an existing .mp4/.mkv/.avi path")
    return open_container(str(path), name=str(path), fix="pass a valid video file")


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
