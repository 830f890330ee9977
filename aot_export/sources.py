"""Live video in: a video file, a network stream (RTSP, HTTP, TCP, UDP, SRT, RTMP), a V4L2 camera or a rosbag2
recording, read as one iterator of timestamped RGB frames (`open_source`); `sample_at_rate` thins it by stream time
and `cut_clips` cuts it into the fixed-length clips an export takes.

A live feed misbehaves, so a source never hangs and never stops on one bad packet: a stream silent for
`stall_timeout` ends iteration ("stalled: …" in `end_reason`), undecodable packets or messages are skipped and
counted, and frames after a resolution change are scaled back to the first frame's size (the export's shapes are
static). Part of the torch-free device runtime: numpy, PyAV and Pillow, and `rosbags` only once a bag is opened."""

from __future__ import annotations

import io
import math
import threading
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import av
import av.logging
import numpy as np
from PIL import Image

from .errors import InputError
from .video import ffmpeg_reason, open_container

# Demuxer options per URL scheme. Probing is capped at 1 s of stream: FFmpeg's default (5 s, 20 frames for the rate)
# would hold a slow live feed at open for that long in wall-clock time.
_LIVE = {"analyzeduration": "1000000"}
_SCHEMES: dict[str, dict[str, str]] = {
    "rtsp": {"rtsp_transport": "tcp"},      # UDP RTP loses frames through NAT and firewalls
    "rtsps": {"rtsp_transport": "tcp"},
    "http": {},
    "https": {},
    "tcp": {},
    "udp": {"overrun_nonfatal": "1"},       # a consumer that falls behind loses packets, not the stream
    "srt": {},
    "rtmp": {},
}
_SPEC_HELP = f"a video file, a rosbag2 directory or .mcap, /dev/videoN, or a URL ({', '.join(_SCHEMES)})"


@dataclass(frozen=True)
class Frame:
    seconds: float          # stream time (pts / bag stamp), 0.0 at the source's first frame
    image: np.ndarray       # [H, W, 3] uint8 RGB, C-contiguous


@dataclass(frozen=True, eq=False)
class Clip:
    index: int              # 0, 1, 2 … in the order clips were cut from the source
    frames: np.ndarray      # [L, H, W, 3] uint8
    seconds: np.ndarray     # [L] float64 stream time of each frame

    @property
    def start(self) -> float:
        return float(self.seconds[0])

    @property
    def end(self) -> float:
        return float(self.seconds[-1])


@dataclass(frozen=True)
class _Settings:
    realtime: bool
    stall_timeout: float
    topic: str | None


class _QuietFFmpeg:
    """FFmpeg's log off while any source is open (a flaky stream logs every damaged packet), the caller's level
    back after the last one closes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._saved: int | None = None

    def enter(self) -> None:
        with self._lock:
            if self._users == 0:
                self._saved = av.logging.get_level()
                av.logging.set_level(None)
            self._users += 1

    def leave(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                av.logging.set_level(self._saved)


_QUIET = _QuietFFmpeg()


class _Pacer:
    """Sleeps until each frame's stream time has passed on the wall clock since the first frame."""

    def __init__(self) -> None:
        self._origin: float | None = None

    def wait(self, seconds: float) -> None:
        now = time.monotonic()
        if self._origin is None:
            self._origin = now - seconds
        delay = self._origin + seconds - now
        if delay > 0:
            time.sleep(delay)


class Source:
    """Frames from one opened source; iterate it once, close it (or use `with`). Subclasses yield
    (stream seconds, picture) from `_pictures` and say how to measure and convert a picture."""

    def __init__(self, name: str, realtime: bool) -> None:
        self.name = name
        self.end_reason: str | None = None
        self.corrupt = 0
        self.resized = 0
        self._realtime = realtime
        self._size: tuple[int, int] | None = None       # (width, height) of the first frame
        self._frames: Iterator[Frame] | None = None
        self._closed = False

    def _pictures(self) -> Iterator[tuple[float, Any]]:
        raise NotImplementedError

    def _picture_size(self, picture: Any) -> tuple[int, int]:
        raise NotImplementedError

    def _to_rgb(self, picture: Any, size: tuple[int, int] | None) -> np.ndarray:
        """[H, W, 3] uint8 RGB, scaled to `size` (width, height) when given."""
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError

    def __iter__(self) -> Source:
        return self

    def __next__(self) -> Frame:
        if self._frames is None:
            self._frames = self._timed_frames()
        return next(self._frames)

    def _timed_frames(self) -> Iterator[Frame]:
        origin, pacer = None, _Pacer() if self._realtime else None
        for stamp, picture in self._pictures():
            origin = stamp if origin is None else origin
            image = self._first_size_rgb(picture)
            if pacer:
                pacer.wait(stamp - origin)
            yield Frame(stamp - origin, image)
        self.end_reason = self.end_reason or "end of stream"

    def _first_size_rgb(self, picture: Any) -> np.ndarray:
        size = self._picture_size(picture)
        self._size = self._size or size
        if size == self._size:
            return np.ascontiguousarray(self._to_rgb(picture, None))
        self.resized += 1
        return np.ascontiguousarray(self._to_rgb(picture, self._size))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.end_reason = self.end_reason or "closed"
        try:
            self._release()
        finally:
            _QUIET.leave()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} end_reason={self.end_reason!r}>"


class _AVSource(Source):
    """A file, stream or camera through PyAV; a read that waits `stall_timeout` is interrupted by PyAV's timeout."""

    def __init__(self, name: str, container: av.container.InputContainer, settings: _Settings) -> None:
        super().__init__(name, settings.realtime)
        self._container = container
        self._stream = container.streams.video[0]
        self._stall_timeout = settings.stall_timeout
        self._last_stamp = 0.0

    def _pictures(self) -> Iterator[tuple[float, av.VideoFrame]]:
        waiting_since = time.monotonic()
        for packet in self._packets():
            for frame in self._decode(packet):
                yield self._stamp(frame), frame
                waiting_since = time.monotonic()
            # packets that keep coming without a picture (another stream's, or damaged ones) are a stall too
            if time.monotonic() - waiting_since > self._stall_timeout:
                self.end_reason = f"stalled: no frame for {self._stall_timeout:.1f} s"
                return

    def _packets(self) -> Iterator[av.Packet | None]:
        """The video stream's packets until it ends, stalls or breaks off (why goes to end_reason), then None to
        flush the decoder where the demuxer did not."""
        try:
            yield from self._container.demux(self._stream)     # ends with its own flush packet
            return
        except av.ExitError:        # PyAV's read timeout: no data for stall_timeout
            self.end_reason = f"stalled: no data for {self._stall_timeout:.1f} s"
        except av.FFmpegError as exc:    # a reset connection, or HTTP's way of ending a stream without a length
            self.end_reason = f"read error ({(exc.strerror or ffmpeg_reason(exc)).lower()})"
        yield None

    def _decode(self, packet: av.Packet | None) -> list[av.VideoFrame]:
        """The packet's frames; a damaged packet is counted and skipped (the next keyframe repairs the picture)."""
        damaged = packet is not None and packet.is_corrupt
        try:
            frames = self._stream.codec_context.decode(packet)
        except av.FFmpegError:
            frames, damaged = [], packet is not None
        self.corrupt += damaged
        return frames

    def _stamp(self, frame: av.VideoFrame) -> float:
        if frame.time is not None:
            self._last_stamp = float(frame.time)
        else:                       # no pts: one frame period after the last one
            self._last_stamp += 1.0 / float(self._stream.guessed_rate or 25)
        return self._last_stamp

    def _picture_size(self, picture: av.VideoFrame) -> tuple[int, int]:
        return picture.width, picture.height

    def _to_rgb(self, picture: av.VideoFrame, size: tuple[int, int] | None) -> np.ndarray:
        if size is None:
            return picture.to_ndarray(format="rgb24")
        return picture.to_ndarray(width=size[0], height=size[1], format="rgb24")

    def _release(self) -> None:
        self._container.close()


# ---- rosbag2 -----------------------------------------------------------------------------------------------------

# sensor_msgs/msg/Image encodings: (channels, the channels that make R, G, B)
_ENCODINGS: dict[str, tuple[int, list[int]]] = {
    "rgb8": (3, [0, 1, 2]),
    "bgr8": (3, [2, 1, 0]),
    "rgba8": (4, [0, 1, 2]),
    "bgra8": (4, [2, 1, 0]),
    "mono8": (1, [0, 0, 0]),
    "8UC1": (1, [0, 0, 0]),
}


def _raw_image(name: str, message: Any) -> np.ndarray:
    if message.encoding not in _ENCODINGS:
        raise InputError(f"{name}: image encoding {message.encoding!r} is not supported; record one of "
                         f"{', '.join(_ENCODINGS)} or a jpeg/png CompressedImage topic")
    channels, rgb = _ENCODINGS[message.encoding]
    height, width, step = message.height, message.width, message.step
    rows = np.asarray(message.data, dtype=np.uint8)[: height * step].reshape(height, step)
    return rows[:, : width * channels].reshape(height, width, channels)[..., rgb]


def _compressed_image(name: str, message: Any) -> np.ndarray:
    if "compressedDepth" in message.format:
        raise InputError(f"{name}: compressedDepth images are depth, not a camera's colour; pass a colour topic")
    with Image.open(io.BytesIO(np.asarray(message.data, dtype=np.uint8).tobytes())) as picture:
        return np.array(picture.convert("RGB"))


_BAG_IMAGES: dict[str, Callable[[str, Any], np.ndarray]] = {
    "sensor_msgs/msg/Image": _raw_image,
    "sensor_msgs/msg/CompressedImage": _compressed_image,
}


class _BagSource(Source):
    """One image topic of a rosbag2 recording, timed by the messages' header stamps (log time when unset)."""

    def __init__(self, name: str, reader: Any, topic: str, settings: _Settings) -> None:
        super().__init__(name, settings.realtime)
        self._reader = reader
        connections = [c for c in reader.connections if c.topic == topic]
        self._decode_image = _BAG_IMAGES[connections[0].msgtype]
        self._header_time: bool | None = None
        self._messages = self._images(reader.messages(connections=connections))
        # the first image now, so that an unsupported encoding is refused by open_source, not mid-run
        self._first = next(self._messages, None)

    def _pictures(self) -> Iterator[tuple[float, np.ndarray]]:
        if self._first is not None:
            yield self._first
        yield from self._messages

    def _images(self, messages: Iterable[tuple[Any, int, bytes]]) -> Iterator[tuple[float, np.ndarray]]:
        for connection, log_time, raw in messages:
            try:
                message = self._reader.deserialize(raw, connection.msgtype)
                image = self._decode_image(self.name, message)
            except InputError:
                raise
            except Exception:   # rosbags' and Pillow's errors for a damaged message are many and unrelated
                self.corrupt += 1
                continue
            yield self._stamp(message, log_time), image

    def _stamp(self, message: Any, log_time: int) -> float:
        stamp = message.header.stamp.sec + message.header.stamp.nanosec * 1e-9
        if self._header_time is None:   # one clock for the whole topic: an unset stamp is 0 on every message
            self._header_time = stamp > 0
        return stamp if self._header_time else log_time * 1e-9

    def _picture_size(self, picture: np.ndarray) -> tuple[int, int]:
        return picture.shape[1], picture.shape[0]

    def _to_rgb(self, picture: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
        if size is None:
            return picture
        return np.array(Image.fromarray(picture).resize(size, Image.Resampling.BILINEAR))

    def _release(self) -> None:
        self._reader.close()


def _bag_reader(spec: str) -> Any:
    try:
        from rosbags.highlevel import AnyReader
        from rosbags.typesys import Stores, get_typestore
    except ImportError as exc:
        raise InputError(f'{spec}: reading rosbag2 recordings needs rosbags; pip install "aot-export[live]"') \
            from exc
    try:
        reader = AnyReader([Path(spec)], default_typestore=get_typestore(Stores.LATEST))
        reader.open()
    except Exception as exc:    # rosbags, sqlite3, yaml and mcap parsing each raise their own kind
        why = (str(exc).splitlines() or [""])[0][:120]
        raise InputError(f"{spec}: cannot be read as a rosbag2 recording ({exc.__class__.__name__}: {why}); "
                         "pass an intact recording") from exc
    return reader


def _image_topic(spec: str, reader: Any, wanted: str | None) -> str:
    images = sorted(name for name, info in reader.topics.items() if info.msgtype in _BAG_IMAGES)
    if wanted is not None:
        if wanted not in images:
            raise InputError(f"{spec}: no image topic {wanted!r} (image topics: {', '.join(images) or 'none'}); "
                             "pass one of them")
        return wanted
    if not images:
        raise InputError(f"{spec}: no sensor_msgs/msg/Image or CompressedImage topic (topics: "
                         f"{', '.join(sorted(reader.topics)) or 'none'}); pass a recording of a camera")
    if len(images) > 1:
        raise InputError(f"{spec}: {len(images)} image topics ({', '.join(images)}); name the one to read as the "
                         "topic")
    return images[0]


# ---- opening: one table from spec to opener --------------------------------------------------------------------

def _is_url(spec: str) -> bool:
    return "://" in spec and spec.split("://", 1)[0].lower() in _SCHEMES


def _is_camera(spec: str) -> bool:
    return spec.startswith(("/dev/video", "/dev/v4l/"))


def _is_bag(spec: str) -> bool:
    path = Path(spec)
    return (path / "metadata.yaml").is_file() or (path.suffix in (".mcap", ".db3") and path.is_file())


def _open_url(spec: str, settings: _Settings) -> Source:
    scheme = spec.split("://", 1)[0].lower()
    container = open_container(spec, name=spec, fix="check that the stream is up and the address is right",
                               timeout=(settings.stall_timeout, settings.stall_timeout),
                               container_options={**_LIVE, **_SCHEMES[scheme]})
    return _AVSource(spec, container, settings)


def _open_camera(spec: str, settings: _Settings) -> Source:
    if not Path(spec).exists():
        raise InputError(f"{spec}: no such camera; connect it or pass an existing /dev/videoN (ls /dev/video*)")
    container = open_container(spec, name=spec, fix="check that no other program holds the camera and that you "
                               "may read it (video group)", format="v4l2",
                               timeout=(settings.stall_timeout, settings.stall_timeout))
    return _AVSource(spec, container, settings)


def _open_bag(spec: str, settings: _Settings) -> Source:
    reader = _bag_reader(spec)
    try:
        topic = _image_topic(spec, reader, settings.topic)
        return _BagSource(f"{spec}:{topic}", reader, topic, settings)
    except BaseException:
        reader.close()
        raise


def _open_file(spec: str, settings: _Settings) -> Source:
    if Path(spec).is_dir():
        raise InputError(f"{spec}: a directory without metadata.yaml, so not a rosbag2 recording; pass {_SPEC_HELP}")
    if not Path(spec).is_file():
        raise InputError(f"{spec}: no such file, camera or URL; pass {_SPEC_HELP}")
    return _AVSource(spec, open_container(spec, name=spec, fix="pass a valid video file"), settings)


_OPENERS: tuple[tuple[Callable[[str], bool], Callable[[str, _Settings], Source]], ...] = (
    (_is_url, _open_url),
    (_is_camera, _open_camera),
    (_is_bag, _open_bag),
    (lambda spec: True, _open_file),
)


def open_source(spec: str, *, realtime: bool = False, stall_timeout: float = 10.0,
                topic: str | None = None) -> Source:
    """Open `spec` (see `_SPEC_HELP`) as a `Source` of frames; InputError (one line) when it cannot be opened.

    `realtime` paces a recording (file, bag) at its own rate; `stall_timeout` is how long a stream or camera may
    stay silent (at open and between frames) before it counts as stalled; `topic` picks a bag's image topic."""
    if stall_timeout <= 0:
        raise InputError(f"{spec}: stall timeout must be > 0 s, got {stall_timeout}")
    opener = next(open_ for matches, open_ in _OPENERS if matches(spec))
    if topic is not None and opener is not _open_bag:
        raise InputError(f"{spec}: a topic ({topic}) applies to rosbag2 recordings only; drop it or pass a bag")
    _QUIET.enter()
    try:
        return opener(spec, _Settings(realtime, stall_timeout, topic))
    except BaseException:
        _QUIET.leave()
        raise


# ---- frames → what a model takes -----------------------------------------------------------------------------

def sample_at_rate(frames: Iterable[Frame], fps: float) -> Iterator[Frame]:
    """The first frame at or after each tick k / fps of stream time; ticks no frame reached are skipped, so a
    frame is never repeated (a 30 fps camera at fps=2 gives 2 frames per stream second)."""
    if fps <= 0:
        raise InputError(f"sampling rate must be > 0 frames per second, got {fps}")
    slack = 1e-6        # timestamps are float products of a time base: 15 * (1/30) may miss 0.5 by an ulp
    next_tick = 0
    for frame in frames:
        if frame.seconds * fps + slack >= next_tick:
            yield frame
            next_tick = math.floor(frame.seconds * fps + slack) + 1


def cut_clips(frames: Iterable[Frame], clip_frames: int) -> Iterator[Clip]:
    """Consecutive, non-overlapping clips of `clip_frames` frames; a last, partial clip is dropped."""
    if clip_frames < 1:
        raise InputError(f"clip length must be >= 1 frame, got {clip_frames}")
    frames, index = iter(frames), 0
    while len(batch := list(islice(frames, clip_frames))) == clip_frames:
        yield Clip(index, np.stack([f.image for f in batch]), np.array([f.seconds for f in batch], np.float64))
        index += 1
