"""Live sources against real streams, cameras and recordings made here: MPEG-TS served over loopback TCP and UDP,
rosbag2 recordings written with rosbags, short files. No mocks; every server thread and loop is bounded."""

import io
import socket
import struct
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

import av
import av.logging
import numpy as np
import pytest

from aot_export.errors import InputError
from aot_export.sources import Clip, Frame, cut_clips, open_source, sample_at_rate
from aot_export.video import synthesize_clip

FPS = 30


def grey(i: int, size: tuple[int, int]) -> np.ndarray:
    """Frame i: one grey level that rises with i, so order and identity survive lossy coding."""
    return np.full((size[1], size[0], 3), (16 + 8 * i) % 240, np.uint8)


def mux_ts(out, segments: list[tuple[int, tuple[int, int]]], fps: int = FPS, gop: int = 10) -> None:
    """MPEG-TS into `out` (a path, URL or writable file): `segments` of (frames, (width, height)), each encoded by
    its own H.264 encoder into the one stream, pts rising across them, as a camera that changes resolution."""
    with av.open(out, "w", format="mpegts") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = segments[0][1]
        pts = 0
        for count, size in segments:
            encoder = av.CodecContext.create("libx264", "w")
            encoder.width, encoder.height = size
            encoder.pix_fmt, encoder.time_base, encoder.framerate = "yuv420p", Fraction(1, fps), fps
            encoder.gop_size, encoder.options = gop, {"tune": "zerolatency"}     # no B-frames: none held back
            for _ in range(count):
                frame = av.VideoFrame.from_ndarray(grey(pts, size), format="rgb24")
                frame.pts, frame.time_base = pts, Fraction(1, fps)
                pts += 1
                for packet in encoder.encode(frame):
                    packet.stream = stream
                    container.mux(packet)
            for packet in encoder.encode(None):
                packet.stream = stream
                container.mux(packet)


def ts_bytes(segments, **kw) -> bytes:
    buf = io.BytesIO()
    mux_ts(buf, segments, **kw)
    return buf.getvalue()


class Server:
    """One-connection loopback TCP server in a thread: sends `payload`, then stays open and silent for `hold` s
    (a stalled camera) or until stopped; `http` answers a request first, `reset` aborts the connection at the end.

    A Python socket rather than PyAV muxing to tcp://…?listen=1: PyAV holds the GIL while FFmpeg waits in accept(),
    so a client in the same process never gets to connect. Listening before the thread starts also leaves no race."""

    def __init__(self, payload: bytes, hold: float = 0.0, http: bool = False, reset: bool = False):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(10)
        self.port = self.listener.getsockname()[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(payload, hold, http, reset), daemon=True)
        self.thread.start()

    def _serve(self, payload: bytes, hold: float, http: bool, reset: bool) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            while http and not conn.recv(4096).endswith(b"\r\n\r\n"):
                pass
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: video/mp2t\r\n\r\n" * http + payload)
            self.stop.wait(hold)
            if reset:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.listener.close()
        self.thread.join(5)


def take(source, limit: int = 2000, seconds: float = 8.0) -> list[Frame]:
    """Frames from `source` until it ends, at most `limit` frames or `seconds` of wall time."""
    frames, deadline = [], time.monotonic() + seconds
    for frame in source:
        frames.append(frame)
        if len(frames) >= limit or time.monotonic() > deadline:
            break
    return frames


# ---- network streams ------------------------------------------------------------------------------------------

def test_tcp_stream_timestamps_sampling_and_clips():
    size = (64, 48)
    with Server(ts_bytes([(90, size)])) as server, open_source(f"tcp://127.0.0.1:{server.port}") as source:
        frames = take(source)
    assert source.end_reason == "end of stream" and source.corrupt == 0 and source.resized == 0
    assert len(frames) == 90
    assert np.allclose([f.seconds for f in frames], np.arange(90) / FPS, atol=1e-6)
    assert all(f.image.shape == (48, 64, 3) and f.image.dtype == np.uint8 and f.image.flags.c_contiguous
               for f in frames)
    levels = [int(f.image.mean()) for f in frames]
    assert all(abs(level - grey(i, size).mean()) < 6 for i, level in enumerate(levels))

    sampled = list(sample_at_rate(frames, 2))           # 3 s of stream at 2 fps: ticks 0, 0.5, … 2.5
    assert [round(f.seconds, 3) for f in sampled] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    clips = list(cut_clips(frames, 8))                  # 90 = 11 × 8 + 2 left over
    assert [c.index for c in clips] == list(range(11))
    assert all(isinstance(c, Clip) and c.frames.shape == (8, 48, 64, 3) and c.seconds.dtype == np.float64
               for c in clips)
    assert clips[1].start == pytest.approx(8 / FPS) and clips[1].end == pytest.approx(15 / FPS)


def test_udp_stream():
    """MPEG-TS over loopback UDP, sent at its own rate; the receiver joins mid-stream at a keyframe and, UDP having
    no end, stops as stalled once the sender is done."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sent, size = 60, (64, 48)

    def send():
        time.sleep(0.2)                                 # let the receiver bind; what it misses it misses
        with av.open(f"udp://127.0.0.1:{port}?pkt_size=1316", "w", format="mpegts") as container:
            stream = container.add_stream("libx264", rate=FPS)
            stream.width, stream.height = size
            stream.codec_context.gop_size, stream.codec_context.options = 5, {"tune": "zerolatency"}
            start = time.monotonic()
            for i in range(sent):
                time.sleep(max(0.0, start + i / FPS - time.monotonic()))
                frame = av.VideoFrame.from_ndarray(grey(i, size), format="rgb24")
                frame.pts = i
                for packet in stream.encode(frame):
                    container.mux(packet)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    with open_source(f"udp://127.0.0.1:{port}", stall_timeout=1.0) as source:
        frames = take(source)
    sender.join(5)
    assert source.end_reason.startswith("stalled")
    assert len(frames) >= sent // 2
    gaps = np.diff([f.seconds for f in frames])
    assert frames[0].seconds == 0.0 and np.all(gaps > 0) and np.allclose(gaps, 1 / FPS, atol=1e-3)


def test_a_stalled_stream_ends_within_the_stall_timeout():
    with Server(ts_bytes([(40, (64, 48))]), hold=20) as server:
        source = open_source(f"tcp://127.0.0.1:{server.port}", stall_timeout=1.0)
        start = time.monotonic()
        frames = take(source, seconds=15)
        waited = time.monotonic() - start
        source.close()
    assert len(frames) == 40
    assert source.end_reason.startswith("stalled") and waited < 1.0 + 1.5


def test_corrupted_packets_are_skipped_and_counted():
    data = bytearray(ts_bytes([(90, (64, 48))]))
    packets = [data[i:i + 188] for i in range(0, len(data), 188)]
    middle = len(packets) // 2
    for packet in packets[middle: middle + 6]:          # damaged payloads, sync bytes kept
        packet[20:120] = bytes(b ^ 0x5A for b in packet[20:120])
    del packets[middle + 10: middle + 14]               # lost packets: a continuity-counter gap
    av.logging.set_level(av.logging.INFO)
    try:
        with Server(b"".join(packets)) as server, open_source(f"tcp://127.0.0.1:{server.port}") as source:
            frames, level = take(source), av.logging.get_level()
        assert level is None                            # FFmpeg's complaints silenced while the source runs
        assert av.logging.get_level() == av.logging.INFO
    finally:
        av.logging.set_level(None)
    assert source.end_reason == "end of stream" and source.corrupt >= 1
    assert len(frames) >= 80 and np.all(np.diff([f.seconds for f in frames]) > 0)


def test_http_stream_and_a_reset_connection():
    data = ts_bytes([(30, (64, 48))])
    with Server(data, http=True) as server, open_source(f"http://127.0.0.1:{server.port}/live.ts") as source:
        assert len(take(source)) == 30
    assert source.end_reason.startswith(("end of stream", "read error"))     # HTTP without a length ends in EIO
    with Server(data[: len(data) // 2], hold=0.3, reset=True) as server, \
            open_source(f"tcp://127.0.0.1:{server.port}") as source:
        frames = take(source)
    assert 5 <= len(frames) < 30 and source.end_reason == "read error (connection reset by peer)"


def test_resolution_change_mid_stream_keeps_the_first_size():
    with Server(ts_bytes([(20, (64, 48)), (20, (96, 80))])) as server, \
            open_source(f"tcp://127.0.0.1:{server.port}") as source:
        frames = take(source)
    assert len(frames) == 40 and source.resized == 20
    assert {f.image.shape for f in frames} == {(48, 64, 3)}
    assert abs(frames[30].image.mean() - grey(30, (64, 48)).mean()) < 6


# ---- files ------------------------------------------------------------------------------------------------------

def test_a_file_plays_at_its_own_rate_only_when_asked(tmp_path):
    clip = synthesize_clip(tmp_path / "clip.mp4", frames=24, size=64, fps=24)       # 1 s
    for realtime, low, high in ((True, 0.85, 3.0), (False, 0.0, 0.5)):
        start = time.monotonic()
        with open_source(str(clip), realtime=realtime) as source:
            frames = take(source)
        took = time.monotonic() - start
        assert len(frames) == 24 and source.end_reason == "end of stream"
        assert low <= took < high, (realtime, took)
    assert frames[-1].seconds == pytest.approx(23 / 24)


def test_real_footage_sampled_by_stream_time(shared_videos):
    bikes = next((v for v in shared_videos if v.name == "bikes.mp4"), None)
    if bikes is None:
        pytest.skip("bikes.mp4 (25 fps, 10 s) is not among the shared videos")
    with open_source(str(bikes)) as source:
        sampled = list(sample_at_rate(source, 2))
    assert len(sampled) == 20 and source.end_reason == "end of stream"      # 10 s at 2 fps
    assert np.allclose([f.seconds for f in sampled], np.arange(20) / 2, atol=1 / 25)
    assert sampled[0].image.shape == (272, 640, 3)


# ---- rosbag2 ------------------------------------------------------------------------------------------------------

try:        # the `live` extra; without it only the bag tests skip
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore
    TYPES = get_typestore(Stores.LATEST)
except ImportError:
    TYPES = None
needs_rosbags = pytest.mark.skipif(TYPES is None, reason='rosbags is not installed: pip install "aot-export[live]"')
RGB = (200, 100, 10)
T0 = 1_700_000_000          # header stamps in seconds since the epoch, as a robot's clock gives them


def image_msg(kind: str, stamp: float, encoding: str = "rgb8", size=(32, 24), rgb=RGB, payload=None):
    """A sensor_msgs Image (raw, `encoding`) or CompressedImage (jpeg) of one colour, stamped `stamp` s."""
    header = TYPES.types["std_msgs/msg/Header"](
        stamp=TYPES.types["builtin_interfaces/msg/Time"](sec=int(stamp), nanosec=round(stamp % 1 * 1e9)),
        frame_id="camera")
    image = np.empty((size[1], size[0], 3), np.uint8)
    image[...] = rgb
    if kind == "sensor_msgs/msg/CompressedImage":
        from PIL import Image
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=95)
        return TYPES.types[kind](header=header, format="jpeg", data=np.frombuffer(buf.getvalue(), np.uint8))
    pixels = {"rgb8": image, "bgr8": image[..., ::-1], "mono8": image[..., :1], "16UC1": image[..., :2]}[encoding]
    data = np.ascontiguousarray(pixels).reshape(-1) if payload is None else payload
    return TYPES.types[kind](header=header, height=size[1], width=size[0], encoding=encoding, is_bigendian=0,
                             step=size[0] * pixels.shape[2], data=data)


def write_bag(path: Path, topics: dict, storage: str = "SQLITE3") -> Path:
    """A rosbag2 recording of `topics`: {name: [(log time ns, message), …]} in `storage` (SQLITE3 or MCAP)."""
    with Writer(path, version=9, storage_plugin=StoragePlugin[storage]) as writer:
        for topic, messages in topics.items():
            connection = writer.add_connection(topic, messages[0][1].__msgtype__, typestore=TYPES)
            for log_time, message in messages:
                writer.write(connection, log_time, TYPES.serialize_cdr(message, message.__msgtype__))
    return path


def images(n, encoding="rgb8", period=0.1, kind="sensor_msgs/msg/Image", **kw):
    return [(int((T0 + i * period) * 1e9) + 7, image_msg(kind, T0 + i * period, encoding, **kw)) for i in range(n)]


@pytest.fixture(scope="module")
def sqlite_bag(tmp_path_factory):
    """sqlite3 storage: the same colour as rgb8 and bgr8, a topic that changes size (and holds one truncated
    message), and a non-image topic."""
    text = TYPES.types["std_msgs/msg/String"]
    bad = image_msg("sensor_msgs/msg/Image", T0 + 0.45, payload=np.zeros(10, np.uint8))
    resizing = images(4) + [(int((T0 + 0.45) * 1e9), bad)] + images(3, size=(48, 40))[1:]
    return write_bag(tmp_path_factory.mktemp("bags") / "sqlite", {
        "/camera/rgb": images(11), "/camera/bgr": images(11, "bgr8"), "/camera/resizing": resizing,
        "/log": [(T0 * 10**9, text(data="hello"))]})


@needs_rosbags
def test_bag_raw_images_in_rgb_order_with_header_stamps(sqlite_bag):
    for topic in ("/camera/rgb", "/camera/bgr"):
        with open_source(str(sqlite_bag), topic=topic) as source:
            frames = take(source)
        assert source.name == f"{sqlite_bag}:{topic}" and source.end_reason == "end of stream"
        assert len(frames) == 11 and tuple(frames[0].image[0, 0]) == RGB, topic
        assert frames[0].image.shape == (24, 32, 3) and frames[0].image.flags.c_contiguous
        assert np.allclose([f.seconds for f in frames], np.arange(11) * 0.1, atol=1e-6)


@needs_rosbags
def test_bag_topic_is_required_when_there_are_several(sqlite_bag):
    with pytest.raises(InputError) as refused:
        open_source(str(sqlite_bag))
    message = str(refused.value)
    assert "\n" not in message and str(sqlite_bag) in message
    assert all(t in message for t in ("/camera/rgb", "/camera/bgr", "/camera/resizing")) and "/log" not in message
    with pytest.raises(InputError, match="/nope.*image topics"):
        open_source(str(sqlite_bag), topic="/nope")


@needs_rosbags
def test_bag_resolution_change_and_a_damaged_message(sqlite_bag):
    with open_source(str(sqlite_bag), topic="/camera/resizing") as source:
        frames = take(source)
    assert len(frames) == 6 and source.resized == 2 and source.corrupt == 1
    assert {f.image.shape for f in frames} == {(24, 32, 3)} and tuple(frames[-1].image[5, 5]) == RGB


@needs_rosbags
def test_bag_realtime_follows_the_stamps(sqlite_bag):
    start = time.monotonic()
    with open_source(str(sqlite_bag), topic="/camera/rgb", realtime=True) as source:      # 1.0 s of stamps
        frames = take(source)
    assert len(frames) == 11 and 0.8 <= time.monotonic() - start < 3.0


@needs_rosbags
def test_mcap_compressed_images(tmp_path):
    jpeg = images(5, kind="sensor_msgs/msg/CompressedImage", period=0.2)
    bag = write_bag(tmp_path / "mcap", {"/camera/jpeg": jpeg}, storage="MCAP")
    for spec in (bag, next(bag.glob("*.mcap"))):        # the recording's directory, or its one .mcap file
        with open_source(str(spec)) as source:          # the only image topic: no need to name it
            frames = take(source)
        assert source.name.endswith(":/camera/jpeg") and len(frames) == 5 and source.corrupt == 0
        assert np.abs(frames[2].image[10, 10].astype(int) - RGB).max() <= 6
        assert np.allclose([f.seconds for f in frames], np.arange(5) * 0.2, atol=1e-6)


@needs_rosbags
def test_bag_without_header_stamps_uses_log_time(tmp_path):
    unstamped = [(log_time, image_msg("sensor_msgs/msg/Image", 0.0)) for log_time, _ in images(3, period=0.25)]
    with open_source(str(write_bag(tmp_path / "bag", {"/camera": unstamped}))) as source:
        assert [round(f.seconds, 6) for f in take(source)] == [0.0, 0.25, 0.5]


@needs_rosbags
def test_bag_unsupported_encoding_is_refused_at_open(tmp_path):
    bag = write_bag(tmp_path / "bag", {"/depth": images(2, "16UC1")})
    with pytest.raises(InputError, match="'16UC1' is not supported"):
        open_source(str(bag))


# ---- refusals: one line that names the source -----------------------------------------------------------------

def closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        return listener.getsockname()[1]


def damaged_bag(tmp_path):
    bag = write_bag(tmp_path / "damaged", {"/camera": images(2)})
    next(bag.glob("*.db3")).write_bytes(b"not sqlite " * 100)
    return bag


def no_image_bag(tmp_path):
    return write_bag(tmp_path / "text-only", {"/log": [(T0 * 10**9, TYPES.types["std_msgs/msg/String"](data="x"))]})


@pytest.mark.parametrize("make_spec, words", [
    (lambda tmp: str(tmp / "missing.mp4"), "no such file"),
    (lambda tmp: str(Path(tmp / "notes.mp4").write_text("not a video " * 50) and tmp / "notes.mp4"), "video"),
    (lambda tmp: f"tcp://127.0.0.1:{closed_port()}", "connection refused"),
    pytest.param(lambda tmp: str(no_image_bag(tmp)), "no sensor_msgs/msg/Image", marks=needs_rosbags),
    pytest.param(lambda tmp: str(damaged_bag(tmp)), "cannot be read as a rosbag2 recording", marks=needs_rosbags),
    (lambda tmp: "/dev/video9", "no such camera"),
    (lambda tmp: str(tmp), "not a rosbag2 recording"),
], ids=["missing-file", "not-a-video", "refused-port", "bag-without-images", "damaged-bag", "missing-camera",
        "plain-directory"])
def test_sources_that_cannot_be_opened(tmp_path, make_spec, words):
    spec = make_spec(tmp_path)
    start = time.monotonic()
    with pytest.raises(InputError) as refused:
        open_source(spec, stall_timeout=3.0)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(spec) and words in message, message
    assert time.monotonic() - start < 2.0
    assert av.logging.get_level() is None


def test_bad_arguments():
    with pytest.raises(InputError, match="rosbag2 recordings only"):
        open_source("rtsp://127.0.0.1:1/x", topic="/camera")
    with pytest.raises(InputError, match="> 0"):
        list(sample_at_rate([], 0))
    with pytest.raises(InputError, match=">= 1"):
        list(cut_clips([], 0))


def test_sampling_is_by_timestamps_not_by_count():
    jittery = [Frame(s, np.zeros((1, 1, 3), np.uint8)) for s in (0.0, 0.2, 0.49, 0.51, 0.6, 1.7, 1.71, 2.0)]
    assert [f.seconds for f in sample_at_rate(jittery, 2)] == [0.0, 0.51, 1.7, 2.0]   # tick 1.0 had no frame


def test_a_bag_without_the_live_extra_says_how_to_install_it(tmp_path, monkeypatch):
    (tmp_path / "metadata.yaml").write_text("rosbag2_bagfile_information: {}\n")
    monkeypatch.setitem(sys.modules, "rosbags.highlevel", None)        # as if rosbags were not installed
    with pytest.raises(InputError, match=r'^[^\n]*pip install "aot-export\[live\]"$'):
        open_source(str(tmp_path))
