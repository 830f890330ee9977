"""A network camera on loopback: looped footage muxed as MPEG-TS (h264) over TCP at its own rate, for
`aot-export live --source tcp://127.0.0.1:PORT` and the live benchmark. One client; the stream ends after --seconds.

    python bench/stream_server.py --video ../shared/data/videos/bikes.mp4 --seconds 60 --port 8554 [--fps 10]
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from fractions import Fraction
from pathlib import Path

import av

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aot_export.video import decode_frames  # noqa: E402


def serve(video: Path, seconds: float, port: int, fps: int, size: int, realtime: bool = True) -> None:
    frames = decode_frames(video, 64, size=size)
    with socket.create_server(("127.0.0.1", port)) as listener:
        print(f"serving {seconds:g} s of {video.name} on tcp://127.0.0.1:{port}", flush=True)
        connection, _ = listener.accept()
        with connection, connection.makefile("wb") as sink, av.open(sink, "w", format="mpegts") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width = stream.height = size
            stream.pix_fmt = "yuv420p"
            stream.codec_context.options = {"tune": "zerolatency"}        # no frames held back by the encoder
            start = time.perf_counter()
            for i in range(int(seconds * fps)):
                if realtime:
                    time.sleep(max(0.0, start + i / fps - time.perf_counter()))
                frame = av.VideoFrame.from_ndarray(frames[i % len(frames)], format="rgb24")
                frame.pts, frame.time_base = i, Fraction(1, fps)
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", required=True)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--port", type=int, default=8554)
    parser.add_argument("--fps", type=int, default=10)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--flat-out", action="store_true", help="send as fast as the client reads")
    args = parser.parse_args()
    serve(Path(args.video), args.seconds, args.port, args.fps, args.size, realtime=not args.flat_out)


if __name__ == "__main__":
    main()
