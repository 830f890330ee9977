"""A ROS 2 recording of real footage, written with rosbags (no ROS installation): `sensor_msgs/msg/Image` rgb8 (or
`CompressedImage` jpeg with --compressed) on /camera/image, header stamps at --rate, sqlite3 or MCAP storage — what a
robot's camera topic records, for `aot-export live --source BAG`.

    python bench/make_rosbag.py --video ../shared/data/videos/bikes.mp4 --seconds 60 --out /tmp/camera_bag [--mcap]
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aot_export.video import decode_frames  # noqa: E402


def write_bag(video: Path, out: Path, seconds: float, rate: float, size: int, compressed: bool, mcap: bool) -> Path:
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.LATEST)
    kind = "sensor_msgs/msg/CompressedImage" if compressed else "sensor_msgs/msg/Image"
    message_type, header, stamp_type = (store.types[n] for n in (kind, "std_msgs/msg/Header",
                                                                 "builtin_interfaces/msg/Time"))
    frames = decode_frames(video, int(seconds * rate), size=size)
    storage = StoragePlugin.MCAP if mcap else StoragePlugin.SQLITE3
    with Writer(out, version=8, storage_plugin=storage) as writer:
        connection = writer.add_connection("/camera/image", message_type.__msgtype__, typestore=store)
        for i, frame in enumerate(frames):
            ns = int(i / rate * 1e9)
            head = header(stamp_type(ns // 10 ** 9, ns % 10 ** 9), "camera")
            if compressed:
                jpeg = io.BytesIO()
                PILImage.fromarray(frame).save(jpeg, format="JPEG", quality=90)
                message = message_type(head, "jpeg", np.frombuffer(jpeg.getvalue(), np.uint8))
            else:
                message = message_type(head, size, size, "rgb8", 0, size * 3, np.ascontiguousarray(frame).reshape(-1))
            writer.write(connection, ns, store.serialize_cdr(message, message_type.__msgtype__))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", required=True)
    parser.add_argument("--out", required=True, help="the recording's directory (must not exist)")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=10.0, help="camera frames per second (10)")
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--compressed", action="store_true", help="CompressedImage (jpeg) instead of raw rgb8")
    parser.add_argument("--mcap", action="store_true", help="MCAP storage instead of sqlite3")
    args = parser.parse_args()
    print(write_bag(Path(args.video), Path(args.out), args.seconds, args.rate, args.size, args.compressed, args.mcap))


if __name__ == "__main__":
    main()
