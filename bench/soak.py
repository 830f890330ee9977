"""Soak: many clips through one loaded pipeline; does memory stay flat and latency steady?

An 8-frame tiny-llava-ov export on ONNX Runtime with the int4 ONNX LLM (both built here into a temporary
directory), the shared videos taken in turn, a fresh clip window each time (a rolling window over the decoded
footage, as a camera feed would give). Prints RSS before / after / peak and p50 / p95 / max end-to-end latency.

    python bench/soak.py [--clips 200] [--llm int4|transformers-int8]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from itertools import cycle
from pathlib import Path

import numpy as np

from aot_export import AOTConfig
from aot_export.adapters import load_model
from aot_export.export import export_vision_aot
from aot_export.report import peak_rss_mib
from runtime.llm import build_onnx_decoder
from runtime.pipeline import Pipeline
from aot_export.video import decode_frames, rolling_clips

sys.path.insert(0, str(Path(__file__).parent))
from common import shared_videos  # noqa: E402

PROMPT = "What is happening in this video?"


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def feed(frames: int):
    """An endless camera-like feed at one resolution (384 × 384, as a camera gives one size): the shared videos'
    frames, 64 sampled from each, one video after another."""
    decoded = [decode_frames(video, 64, size=384) for video in shared_videos()]
    for footage in cycle(decoded):
        for frame in footage:
            yield frame


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clips", type=int, default=200)
    parser.add_argument("--llm", choices=("int4", "transformers-int8"), default="int4")
    parser.add_argument("--new-tokens", type=int, default=8)
    args = parser.parse_args()
    cfg = AOTConfig(frames=8)
    with tempfile.TemporaryDirectory() as work:
        adapter = load_model("tiny-llava-ov")
        export = export_vision_aot(adapter, cfg, Path(work) / "export", progress=False).directory
        llm = str(build_onnx_decoder(adapter, Path(work) / "llm", progress=False)) if args.llm == "int4" \
            else args.llm
        with Pipeline(str(export), llm=llm, adapter=adapter) as pipeline:
            clips = rolling_clips(feed(cfg.frames), frames=cfg.frames, window=32, stride=16)
            pipeline.answer_frames(next(clips), PROMPT, args.new_tokens)          # warm-up
            before = rss_mib()
            latencies = []
            for i, clip in zip(range(args.clips), clips):
                start = time.perf_counter()
                pipeline.answer_frames(clip, PROMPT, args.new_tokens)
                latencies.append(time.perf_counter() - start)
                if (i + 1) % 50 == 0:
                    p50 = np.percentile(latencies, 50) * 1e3
                    print(f"{i + 1} clips: RSS {rss_mib():.0f} MiB, p50 {p50:.0f} ms", flush=True)
            after = rss_mib()
    result = {"clips": len(latencies), "llm": args.llm, "frames": cfg.frames, "rss_before_mib": before,
              "rss_after_mib": after, "rss_growth_mib": after - before,
              "peak_rss_mib": peak_rss_mib(),
              "p50_ms": float(np.percentile(latencies, 50) * 1e3), "p95_ms": float(np.percentile(latencies, 95) * 1e3),
              "max_ms": float(max(latencies) * 1e3)}
    print(f"{result['clips']} clips: RSS {before:.0f} → {after:.0f} MiB ({after - before:+.1f}), peak "
          f"{result['peak_rss_mib']:.0f} MiB; latency p50 {result['p50_ms']:.0f} ms, p95 {result['p95_ms']:.0f} ms, "
          f"max {result['max_ms']:.0f} ms")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
