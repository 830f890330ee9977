"""Calibration samples from real video, prepared exactly as the export's manifest says the runtime prepares them.

A sample is one input of the static graph: `frames` [T, 3, S, S] float32. Each video gives `clips_per_video`
samples:

- one clip: the runtime's own sampling, `aot_export.video.decode_frames(path, T)` (Hugging Face's uniform
  `i · total // T` over the whole video), then `aot_export.preprocess.preprocess_frames`;
- C > 1 clips: the video is cut into C equal consecutive segments (segment k = frames
  [k · total // C, (k + 1) · total // C)), and T frames are sampled uniformly inside each segment with the same
  formula, shifted by a phase drawn in [0, segment // T) from `numpy.random.default_rng([seed, video number])`.
  The same videos, clip count and seed always give the same frame indices; the indices are recorded.

Provenance (video names, sha256, frame counts, the indices of every clip, seed) goes into the quantized export's
manifest, so that a calibrated graph says which footage it was calibrated on.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from aot_export.artifacts import sha256_file
from aot_export.errors import InputError
from aot_export.manifest import Manifest
from aot_export.preprocess import Preprocessing, preprocess_frames, sample_indices
from aot_export.video import VideoError, count_frames, decode_frames

VIDEO_SUFFIXES = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v")


@dataclass(frozen=True)
class VideoSource:
    """One calibration video and the frame indices of each clip taken from it."""

    path: Path
    sha256: str
    total_frames: int
    clips: tuple[tuple[int, ...], ...]

    @property
    def name(self) -> str:
        return self.path.name

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self.sha256, "total_frames": self.total_frames,
                "clips": [list(clip) for clip in self.clips]}


@dataclass
class CalibrationData:
    """Preprocessed samples ([T, 3, S, S] float32 each, in video then clip order) and where they came from."""

    samples: list[np.ndarray]
    sources: list[VideoSource]
    frames: int
    clips_per_video: int
    seed: int
    preprocessing: Preprocessing
    seconds: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.samples)

    def provenance(self) -> dict[str, Any]:
        return {"videos": [source.to_dict() for source in self.sources], "samples": len(self.samples),
                "frames_per_sample": self.frames, "clips_per_video": self.clips_per_video, "seed": self.seed,
                "sampling": "uniform over the video" if self.clips_per_video == 1 else
                            "uniform inside equal consecutive segments, seeded phase"}

    def reader(self, input_name: str = "frames") -> "VideoCalibrationReader":
        return VideoCalibrationReader(self.samples, input_name)


class VideoCalibrationReader(CalibrationDataReader):
    """ONNX Runtime's calibration reader over preprocessed samples: `{"frames": [T, 3, S, S] float32}` each.

    `set_range(start, end)` restricts it to samples [start, end) (ORT's strided calibration uses it; so does
    `calibration.ort_quantize`, which calibrates one sample at a time to bound memory)."""

    def __init__(self, samples: list[np.ndarray], input_name: str = "frames"):
        if not samples:
            raise InputError("no calibration samples; pass at least one video")
        self.samples = samples
        self.input_name = input_name
        self.start, self.end = 0, len(samples)
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.start + self.position >= self.end:
            return None
        sample = self.samples[self.start + self.position]
        self.position += 1
        return {self.input_name: sample}

    def rewind(self) -> None:
        self.position = 0

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end = max(0, start_index), min(len(self.samples), end_index)
        self.position = 0

    def __len__(self) -> int:
        return len(self.samples)


# ---- videos -------------------------------------------------------------------------------------------------------
def expand_videos(videos: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Video paths from a path, a directory (its video files, sorted) or a list of either; duplicates (same file)
    are dropped. Refuses a missing path and an empty result."""
    items = [videos] if isinstance(videos, (str, os.PathLike)) else list(videos or [])
    found: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found.extend(sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES))
        elif path.is_file():
            found.append(path)
        else:
            raise InputError(f"{path}: no such video file or directory; pass existing videos to calibrate on")
    unique: dict[Path, Path] = {}
    for path in found:
        unique.setdefault(path.resolve(), path)
    if not unique:
        raise InputError("no calibration videos (an empty list, or directories without "
                         f"{'/'.join(VIDEO_SUFFIXES)} files); pass at least one video")
    return list(unique.values())


def clip_indices(total: int, frames: int, clips: int, rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """Frame indices of `clips` clips of `frames` frames from a video of `total` frames (see the module doc).
    One clip is exactly the runtime's sampling; more clips never exceed the video (a segment shorter than
    `frames` repeats frames, as the runtime does for a short video)."""
    if total < 1:
        raise InputError("the video has no frames; pass a non-empty video")
    if clips < 1:
        raise InputError(f"clips_per_video={clips}: must be at least 1")
    if clips == 1:
        return [sample_indices(total, frames)]
    clips = min(clips, total)
    rng = rng or np.random.default_rng(0)
    result = []
    for k in range(clips):
        start, end = k * total // clips, (k + 1) * total // clips
        length = end - start
        phase = int(rng.integers(0, max(1, length // frames)))
        result.append(np.minimum(start + sample_indices(length, frames) + phase, end - 1))
    return result


def _frame_count(path: Path, exact: bool = False) -> int:
    """The stream header's frame count, as `aot_export.video.decode_frames` takes it (decoded and counted when the
    header has none, or when `exact`). Call after `decode_frames` has accepted the file."""
    import av


    if not exact:
        with av.open(str(path)) as container:
            total = container.streams.video[0].frames
        if total:
            return total
    return count_frames(path)


def _decode_at(path: Path, indices: set[int]) -> dict[int, np.ndarray]:
    """RGB frames at `indices`, in one decoding pass (errors mapped to the runtime's VideoError)."""
    import av


    picked: dict[int, np.ndarray] = {}
    last = max(indices)
    try:
        with av.open(str(path)) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i > last:
                    break
                if i in indices:
                    picked[i] = frame.to_ndarray(format="rgb24")
    except av.FFmpegError as exc:
        raise VideoError(f"{path}: cannot be decoded ({exc.__class__.__name__}); pass a valid video file") from exc
    return picked


def video_clips(path: Path, frames: int, clips: int, rng: np.random.Generator) -> tuple[int, list[np.ndarray],
                                                                                           list[np.ndarray]]:
    """(total frames, indices of each clip, [T, H, W, 3] uint8 RGB of each clip)."""

    # The runtime's decoding first: it refuses a missing, unreadable, stream-less or empty file with a VideoError.
    rgb = decode_frames(path, frames)
    if clips == 1:
        # Exactly what the runtime feeds the graph.
        total = _frame_count(path)
        return total, [sample_indices(total, frames)], [rgb]
    total = _frame_count(path)
    state = rng.bit_generator.state
    indices = clip_indices(total, frames, clips, rng)
    picked = _decode_at(path, {int(i) for clip in indices for i in clip})
    if len(picked) < len({int(i) for clip in indices for i in clip}):      # the header overcounted its frames
        total = _frame_count(path, exact=True)
        rng.bit_generator.state = state
        indices = clip_indices(total, frames, clips, rng)
        picked = _decode_at(path, {int(i) for clip in indices for i in clip})
    return total, indices, [np.stack([picked[int(i)] for i in clip]) for clip in indices]


def calibration_data(videos: str | os.PathLike | Iterable[str | os.PathLike], frames: int,
                     preprocessing: Preprocessing, clips_per_video: int = 1, seed: int = 0) -> CalibrationData:
    """Decode, sample and preprocess every video into graph inputs (see the module doc)."""
    if clips_per_video < 1:
        raise InputError(f"clips_per_video={clips_per_video}: must be at least 1")
    paths = expand_videos(videos)
    start = time.perf_counter()
    samples, sources = [], []
    for number, path in enumerate(paths):
        rng = np.random.default_rng([seed, number])
        total, indices, clips = video_clips(path, frames, clips_per_video, rng)
        samples.extend(preprocess_frames(rgb, preprocessing) for rgb in clips)
        sources.append(VideoSource(path, sha256_file(path), total,
                                   tuple(tuple(int(i) for i in clip) for clip in indices)))
    return CalibrationData(samples, sources, frames, clips_per_video, seed, preprocessing,
                           {"decode + preprocess": time.perf_counter() - start})


def manifest_calibration_data(videos: str | os.PathLike | Iterable[str | os.PathLike], manifest: Manifest,
                              clips_per_video: int = 1, seed: int = 0) -> CalibrationData:
    """`calibration_data` with the frame count and preprocessing an export's manifest declares."""
    return calibration_data(videos, manifest.aot.frames, manifest.preprocessing, clips_per_video, seed)
