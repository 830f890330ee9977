"""Live video benchmark (issue #19): a long stream of looped footage through a bundle, clip by clip, faster than real
time (a file read flat out), with every way of answering side by side in one run.

Per clip: the vision graph once (`runtime.device.live.clip_tokens`), then the same tokens into two live windows —
`shift` (the oldest clip's slots dropped, later keys turned to their new positions) and `reprefill` (the kept clips
run again) — timing each one's eviction and prefill. At minute 1 and at the last minute the same question is asked:
- of both windows (TTFT: only the question's tokens run; first-token KL of shift against reprefill, which equals a
  fresh prefill of the window);
- with no cache (the window's whole prompt prefilled, as `run` would);
- about the last clip alone (a one-clip window);
- without AOT, at the last minute where --export is given (the window's frames through the PyTorch reference's full
  video path, every pooled token, prefilled by the same ONNX LLM).
RSS (current, not peak) is read at both minutes. A second, short run plays the stream at its own rate through
`live_events` and counts the clips it drops.

    python bench/live.py --bundle B --video ../shared/data/videos/bikes.mp4 --minutes 10 --fps 1 --window 32 \
        [--export EXPORT_DIR] [--realtime-seconds 60] --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aot_export.sources import cut_clips, open_source, sample_at_rate  # noqa: E402
from aot_export.video import decode_frames  # noqa: E402
from runtime.device.live import LiveSettings, LiveWindow, clip_tokens, live_events  # noqa: E402
from runtime.device.pipeline import DevicePipeline  # noqa: E402

QUESTION = "What is happening in this video?"


def looped_stream(video: Path, path: Path, minutes: float, fps: float, size: int = 384) -> Path:
    """`minutes` of `video`'s frames looped, encoded at `fps` (the rate it is sampled at) as h264."""
    frames = decode_frames(video, 64, size=size)
    count = int(round(minutes * 60 * fps))
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(count):
            frame = av.VideoFrame.from_ndarray(frames[i % len(frames)], format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """KL(p ‖ q) of the softmaxes of two logit vectors."""
    def log_softmax(x):
        x = np.asarray(x, np.float64)
        x = x - x.max()
        return x - np.log(np.exp(x).sum())

    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return float((np.exp(lp) * (lp - lq)).sum())


def no_cache(pipeline, window: LiveWindow, question: str) -> dict:
    """The window's whole prompt laid out and prefilled for this question, as `run` would (timed as the live
    question is: layout included)."""
    start = time.perf_counter()
    prompt, _ = window.layout(question)
    laid_out = time.perf_counter() - start
    generation = pipeline.llm.generate(prompt.embeds, 1, pipeline.text.embed_token, position_ids=prompt.position_ids)
    return {"ttft_s": laid_out + generation.prefill_s, "prompt_tokens": prompt.length,
            "first_logits": generation.step_logits[0]}


def without_aot(export: Path, pipeline, frames: np.ndarray, question: str) -> dict:
    """The window's frames with every pooled token (the reference's full video path), prefilled by the bundle's
    LLM: the prompt `run --no-reduce` would give it."""
    from aot_export.preprocess import preprocess_frames
    from runtime.pipeline import Pipeline

    with Pipeline(str(export), reduce=False, llm="transformers") as reference:
        chunks = [reference.visual_tokens_at(preprocess_frames(frames[i:i + pipeline.frames],
                                                               pipeline.preprocessing))
                  for i in range(0, len(frames), pipeline.frames)]
    tokens = np.concatenate([c[0].numpy() for c in chunks])
    index = np.concatenate([c[1].numpy() + [k * pipeline.aot_frames, 0, 0] for k, c in enumerate(chunks)])
    start = time.perf_counter()
    prompt = pipeline.text.assemble(question, tokens, index, len(chunks) * pipeline.aot_frames)
    laid_out = time.perf_counter() - start
    generation = pipeline.llm.generate(prompt.embeds, 1, pipeline.text.embed_token, position_ids=prompt.position_ids)
    return {"ttft_s": laid_out + generation.prefill_s, "prompt_tokens": prompt.length,
            "visual_tokens": prompt.visual_tokens}


def median_of(runs: int, ask):
    """The run with the median TTFT of `runs` (one-shot TTFTs of a tiny model are a fraction of a millisecond)."""
    replies = sorted((ask() for _ in range(runs)), key=lambda r: r["ttft_s"] if isinstance(r, dict) else r.ttft_s)
    return replies[runs // 2]


def ask_everything(pipeline, windows: dict, question: str, runs: int = 5) -> dict:
    replies = {name: median_of(runs, lambda w=window: w.ask(question, 1)) for name, window in windows.items()}
    shift, fresh = replies["shift"], replies["reprefill"]
    flat = median_of(runs, lambda: no_cache(pipeline, windows["reprefill"], question))
    last = windows["reprefill"].clips[-1]
    alone = LiveWindow(pipeline.text, pipeline.llm, pipeline.aot_frames, 1, eviction="reprefill")
    alone.add(last)
    one = median_of(runs, lambda: alone.ask(question, 1))
    return {"seen": shift.seen, "prompt_tokens": shift.prompt_tokens, "question_tokens": shift.question_tokens,
            "ttft_shift_s": shift.ttft_s, "ttft_reprefill_s": fresh.ttft_s, "ttft_no_cache_s": flat["ttft_s"],
            "ttft_one_clip_s": one.ttft_s,
            "kl_shift_vs_reprefill": kl(fresh.first_logits, shift.first_logits),
            "kl_reprefill_vs_no_cache": kl(flat["first_logits"], fresh.first_logits),
            "top1_shift_equals_reprefill": int(np.argmax(shift.first_logits)) == int(np.argmax(fresh.first_logits)),
            "rss_mb": rss_mb()}


def flat_out(args, pipeline: DevicePipeline, stream: Path) -> dict:
    clip_seconds = pipeline.frames / args.fps
    size = int(args.window / clip_seconds + 1e-9)
    windows = {name: LiveWindow(pipeline.text, pipeline.llm, pipeline.aot_frames, size, eviction=name)
               for name in ("shift", "reprefill")}
    rows, asked, recent = [], {}, []
    marks = {"minute 1": 60.0, "last minute": args.minutes * 60 - clip_seconds}
    with open_source(str(stream)) as source:
        for clip in cut_clips(sample_at_rate(source, args.fps), pipeline.frames):
            tokens, seconds = clip_tokens(pipeline, clip)
            row = {"clip": clip.index, "end": float(clip.end), **seconds}
            for name, window in windows.items():
                _, evict_s, prefill_s = window.add(tokens)
                row[f"{name}: evict"], row[f"{name}: prefill"] = evict_s, prefill_s
            row["latency shift"] = seconds["preprocess"] + seconds["vision + AOT"] + row["shift: evict"] + \
                row["shift: prefill"]
            # Where eviction time goes: laying the window out again (the one assembly) is part of both policies.
            start = time.perf_counter()
            windows["shift"].layout(args.question)
            row["layout"] = time.perf_counter() - start
            rows.append(row)
            recent = (recent + [clip.frames])[-size:]
            for mark, at in marks.items():
                if mark not in asked and clip.end >= at:
                    asked[mark] = ask_everything(pipeline, windows, args.question)
                    print(f"{mark}: {json.dumps({k: v for k, v in asked[mark].items() if k != 'seen'})}",
                          flush=True)
    if args.export:
        asked["last minute"]["without_aot"] = without_aot(Path(args.export), pipeline, np.concatenate(recent),
                                                          args.question)
    latency = np.asarray([r["latency shift"] for r in rows])
    full = [r for r in rows[size:]]                     # clips that made one leave
    return {"clips": len(rows), "clip_seconds": clip_seconds, "window_clips": size,
            "latency_p50_s": float(np.percentile(latency, 50)), "latency_p99_s": float(np.percentile(latency, 99)),
            "realtime_factor_p50": float(np.percentile(latency, 50) / clip_seconds),
            "realtime_factor_p99": float(np.percentile(latency, 99) / clip_seconds),
            "vision_p50_s": float(np.median([r["vision + AOT"] for r in rows])),
            "evict_p50_s": {n: float(np.median([r[f"{n}: evict"] for r in full])) if full else None
                            for n in windows},
            "prefill_p50_s": {n: float(np.median([r[f"{n}: prefill"] for r in full])) if full else None
                              for n in windows},
            "layout_p50_s": float(np.median([r["layout"] for r in full])) if full else None,
            "asked": asked}


def realtime(args, pipeline: DevicePipeline, stream: Path) -> dict:
    settings = LiveSettings(fps=args.fps, window_s=args.window, drop=True, duration_s=args.realtime_seconds)
    start = time.perf_counter()
    end = None
    for event in live_events(pipeline, open_source(str(stream), realtime=True), settings):
        end = event if event.kind == "end" else end
    return {"wall_s": time.perf_counter() - start, **end.to_dict()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--video", required=True)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--fps", type=float, default=1.0)
    parser.add_argument("--window", type=float, default=32.0)
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--export", default=None, help="the bundle's export: also answer without AOT")
    parser.add_argument("--realtime-seconds", type=float, default=60.0, help="stream seconds played at real time")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work, DevicePipeline(args.bundle) as pipeline:
        stream = looped_stream(Path(args.video), Path(work) / "stream.mp4", args.minutes, args.fps)
        result = {"bundle": args.bundle, "minutes": args.minutes, "fps": args.fps, "window_s": args.window,
                  "flat_out": flat_out(args, pipeline, stream)}
        if args.realtime_seconds > 0:
            result["realtime"] = realtime(args, pipeline, stream)
    text = json.dumps(result, indent=2, default=float)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
