"""`aot-export`: a thin shell over the library. Each command parses its arguments, calls one library function
and prints what it returns; errors are one line (exit 2 bad input, 1 a failed check) unless `--debug`.

The CLI wires every package together, so it sits on top of them and nothing imports it (the import-linter
contract in pyproject.toml). Commands import their library when they run, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import signal
import sys
import traceback
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

from aot_export.artifacts import check_destination, check_output_file, describe_os_error
from aot_export.config import MAX_FRAMES
from aot_export.errors import CheckFailed, InputError
from aot_export.report import format_table, peak_rss_mib, write_json

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3
BACKENDS = ("torch", "onnxruntime", "tensorrt")          # runtime.vision.RUNNERS, without importing it for --help
EXIT_INTERRUPTED = {signal.SIGINT: 130, signal.SIGTERM: 143}
DEFAULT_FRAMES = 32
# The team's footage beside a checkout, where the README's commands run from; a default of the shell, not the library.
DEMO_FOOTAGE = "../shared/data/videos"
# Video frames: AOT's frames (AOTConfig's bound) times the largest temporal patch (Qwen2.5-VL folds 2 into one).
MAX_VIDEO_FRAMES = MAX_FRAMES * 2
EXPORT_STACK = ("torch", "transformers", "onnx", "onnxscript", "onnxruntime_genai", "tqdm")   # pyproject [export]


# ---- argument types: a bad value is one line from argparse (exit 2) before any work -----------------------------
def _integer(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value} is out of range; give {low} or more")
    return value


def positive_int(text: str) -> int:
    return _integer(text, 1)


def non_negative_int(text: str) -> int:
    return _integer(text, 0)


def frame_count(text: str) -> int:
    """--frames: refused past what any static graph takes before a model loads (the exact bound is AOTConfig's)."""
    value = positive_int(text)
    if value > MAX_VIDEO_FRAMES:
        raise argparse.ArgumentTypeError(f"{value} is out of range; give at most {MAX_VIDEO_FRAMES} (the static "
                                         "graph holds every frame at once, so its memory grows with them)")
    return value


def fraction(text: str) -> float:
    """A share in (0, 1]: a retention."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value} is not a share in (0, 1]; e.g. 0.15 keeps 15 % of the tokens")
    return value


def positive_seconds(text: str) -> float:
    """A positive, finite number (seconds, a rate)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{value:g} is out of range; give a positive number")
    return value


def sha256_hex(text: str) -> str:
    """A sha256 as 64 hex digits (a bundle's id)."""
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text.lower()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a sha256 (64 hex digits); pass the id `aot-export bundle` "
                                         "printed")
    return text.lower()


def frames_shown(text: str) -> int | None:
    return None if text == "all" else positive_int(text)


# ---- commands --------------------------------------------------------------------------------------------------
def _export(args: argparse.Namespace) -> int:
    from aot_export.adapters import load_model
    from aot_export.config import SHORTEST_CLIP
    from aot_export.export import export_vision_aot, solve_config

    import time

    check_destination(args.out, "export", args.force,          # before seconds of model loading
                      sources={"model": args.model, "config": args.config})
    if args.stream and (args.config or args.frames is not None):
        raise InputError(f"--stream exports one clip, so it takes no {'--config' if args.config else '--frames'};"
                         " set the clip's length with --clip-len (default 4)")
    config = _read_config(args.config) if args.config else None  # its errors too
    start = time.perf_counter()
    adapter = load_model(args.model)
    load_seconds = time.perf_counter() - start
    if args.stream:
        # One clip per call (`aot-export live`): the graph's frames are the clip's.
        args.clip_len = args.clip_len or SHORTEST_CLIP
        args.frames = args.clip_len * adapter.info.temporal_patch
    args.frames = args.frames or DEFAULT_FRAMES
    if config is not None:
        cfg = config
    else:
        cfg = solve_config(adapter.aot_frames(args.frames), args.retention, args.anchors, args.pooled_anchors,
                           args.keep, clip_len=args.clip_len, temporal_patch=adapter.info.temporal_patch,
                           **adapter.aot_fields())
        _print_clip_len_notice(args, adapter)
    result = export_vision_aot(adapter, cfg, args.out, progress=not args.quiet, force=args.force,
                               extra={"stream": {"clips_per_call": 1}} if args.stream else None)
    result.seconds["load model"] = load_seconds
    sizes = {name: (result.directory / name).stat().st_size for name in result.manifest.files}
    rows = [("model", adapter.info.model_id), ("frames", cfg.frames * adapter.info.temporal_patch),
            ("visual tokens without AOT", cfg.input_tokens), ("visual tokens with AOT", cfg.output_tokens),
            ("retention", f"{cfg.retention:.2%}"),
            ("anchors / pooled anchors / keep", f"{cfg.anchors} / {cfg.pooled_anchors} / {cfg.keep}"),
            ("Sinkhorn solver", _solver(cfg)),
            ("frames per clip", cfg.clip_len * adapter.info.temporal_patch),
            ("clips per call", f"{cfg.clips}{' (--stream: for aot-export live)' if args.stream else ''}"),
            *[(f"{name}", f"{size / 1e6:.1f} MB") for name, size in sizes.items()],
            *[(f"time: {stage}", f"{seconds:.1f} s") for stage, seconds in result.seconds.items()],
            ("peak RSS", f"{peak_rss_mib():.0f} MiB"), ("written", str(result.directory))]
    print(format_table(rows, ("export", "")))
    write_json(args.json, {"manifest": result.manifest.to_dict(), "seconds": result.seconds, "sizes": sizes,
                           "peak_rss_mib": peak_rss_mib()})
    return EXIT_OK


def _solver(cfg) -> str:
    if cfg.sinkhorn == "fixed":
        return f"fixed ({cfg.sinkhorn_iters} iterations, log domain)"
    return f"{cfg.sinkhorn} (at most {cfg.sinkhorn_max_iters} iterations, early stop at {cfg.sinkhorn_tol:g})"


def _print_clip_len_notice(args: argparse.Namespace, adapter) -> None:
    """One line on stderr where the clip length follows a frame count the authors do not define (none where
    --clip-len gives it)."""
    from aot_export.export import clip_len_notice

    notice = None if args.clip_len is not None else clip_len_notice(adapter.aot_frames(args.frames),
                                                                    adapter.info.temporal_patch)
    if notice:
        print(notice, file=sys.stderr)


def _add_export(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny-llava-ov",
                        help="built-in model (tiny-llava-ov, llava-ov-0.5b-random) or a local checkpoint directory")
    _add_budget(parser, frames_help="frames per video, static in the graph (32)")
    parser.add_argument("--config", default=None, metavar="JSON",
                        help="an AOTConfig as a JSON object; fields left out take their defaults (overrides the above)")
    parser.add_argument("--stream", action="store_true",
                        help="a streaming export for `aot-export live`: the graph holds one clip of --clip-len "
                             "frames (default 4), run once per clip as a stream arrives")
    parser.add_argument("--out", required=True, help="export directory to write (new, empty, or an export with --force)")
    parser.add_argument("--force", action="store_true", help="replace an existing export at --out")


def _add_budget(parser: argparse.ArgumentParser, frames_help: str) -> None:
    parser.add_argument("--frames", type=frame_count, default=None, help=frames_help)
    parser.add_argument("--clip-len", type=positive_int, default=None,
                        help="frames per inter-frame clip, temporal patches for Qwen2.5-VL (default: as the authors, "
                             "32 → 4 and 64 → 8, other counts the longest of 4 to frames/8 dividing them, with a "
                             "note; it must divide the frames; 1: no inter-frame merging)")
    parser.add_argument("--retention", type=fraction, default=None, help="target share of visual tokens kept")
    parser.add_argument("--anchors", type=positive_int, default=None, help="intra-frame anchors per frame (V)")
    parser.add_argument("--pooled-anchors", type=positive_int, default=None, help="pooled cells kept per frame (A)")
    parser.add_argument("--keep", type=positive_int, default=None, help="distinct tokens per non-key frame (K)")


def _check(args: argparse.Namespace) -> int:
    from engines.check import check_export

    report = check_export(args.dir, tensorrt=not args.no_tensorrt, verify_hashes=not args.skip_hash)
    print(report.table())
    write_json(args.json, report.to_dict())
    return EXIT_OK if report.passed else EXIT_FAILED


def _add_check(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="export directory (with manifest.json)")
    parser.add_argument("--no-tensorrt", action="store_true", help="skip the TensorRT parse and build")


def _validate(args: argparse.Namespace) -> int:
    from runtime.chain import validate_chain
    from runtime.validate import validate_export

    if args.llm:
        report = validate_chain(args.dir, args.video, args.llm, prompt=args.prompt, tokens=args.tokens,
                                model=args.model, device=args.device, progress=not args.quiet,
                                backend=args.backend, export=args.export, noise_draws=args.noise_draws,
                                verify_hashes=not args.skip_hash)
    else:
        report = validate_export(args.dir, args.video, model=args.model, device=args.device,
                                 progress=not args.quiet, backend=args.backend, export=args.export,
                                 noise_draws=args.noise_draws, verify_hashes=not args.skip_hash)
    print(report.table())
    write_json(args.json, report.to_dict())
    return EXIT_OK if report.passed else EXIT_FAILED


def _add_validate(parser: argparse.ArgumentParser) -> None:
    from runtime.device.decoder import LLM_CHOICES_HELP

    parser.add_argument("dir", help="export directory (with manifest.json) or engine directory (engine.json)")
    parser.add_argument("--video", required=True, help="video file to decode and run")
    parser.add_argument("--model", default=None, help="reference model, if not where the manifest says")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="backend compared with the reference (default: from DIR; torch: the reference itself)")
    parser.add_argument("--export", default=None, help="the export an engine DIR was built from, checked first")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="ONNX Runtime device (auto: CUDA when available)")
    parser.add_argument("--llm", default=None,
                        help=f"also validate the LLM side: {LLM_CHOICES_HELP}")
    parser.add_argument("--prompt", default="What is happening in this video?", help="prompt for --llm")
    parser.add_argument("--tokens", type=positive_int, default=16, help="greedy tokens compared with --llm (16)")
    _add_noise_draws(parser)


def _run(args: argparse.Namespace) -> int:
    from runtime.device.bundle import is_bundle
    from runtime.device.pipeline import measure

    if not args.prompt.strip():
        raise InputError("the prompt is empty; pass --prompt with a question about the video")
    if is_bundle(args.model):
        pipeline = _device_pipeline(args)
    else:
        _refuse_a_non_bundle_without_torch(args.model)
        from runtime.device.decoder import DEFAULT_LLM
        from runtime.pipeline import Pipeline

        if args.expect_id:
            raise InputError(f"--expect-id pins a bundle; {args.model} is not one (no bundle.json): drop --expect-id "
                             "or pass the bundle's directory")

        pipeline = Pipeline(args.model, backend=args.backend, llm=args.llm or DEFAULT_LLM, device=args.device,
                            reduce=not args.no_reduce, export=args.export, allow_failed=args.allow_failed,
                            verify_hashes=not args.skip_hash)
        if pipeline.warning:
            print(pipeline.warning, file=sys.stderr)
    with pipeline:
        report = measure(pipeline, args.video, args.prompt, args.max_new_tokens, args.warmup, args.repeat,
                         progress=None if args.quiet else partial(print, file=sys.stderr, flush=True))
    report.settings["peak_rss_mib"] = peak_rss_mib()
    print(report.table())
    write_json(args.json, report.to_dict())
    return EXIT_OK


def _refuse_a_non_bundle_without_torch(model: str) -> None:
    """The runtime-only install runs bundles only: a --model that is not one (a typo, a directory without
    bundle.json) is named as such there, not reported as a missing torch."""
    import importlib.util

    if importlib.util.find_spec("torch") is not None:
        return
    path = Path(model)
    why = ("no such directory" if not path.exists() else "no bundle.json in it" if path.is_dir()
           else "a file, not a directory")
    raise InputError(f"--model {model}: not a bundle ({why}); this install runs bundles: pass a bundle directory "
                     "(`aot-export bundle` makes one), or install the export stack (pip install 'aot-export[export]') "
                     "to run exports and models")


def _add_run(parser: argparse.ArgumentParser) -> None:
    from runtime.device.decoder import DEFAULT_LLM, LLM_CHOICES_HELP

    parser.add_argument("--model", required=True,
                        help="engine directory, export directory, built-in model or checkpoint directory")
    parser.add_argument("--video", required=True, help="video file")
    parser.add_argument("--prompt", required=True, help="the question about the video")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="vision backend (default: from the artifact)")
    parser.add_argument("--export", default=None,
                        help="the export an engine --model was built from, checked first (default: found beside it)")
    parser.add_argument("--llm", default=None,
                        help=f"{LLM_CHOICES_HELP}; default {DEFAULT_LLM} (fp32); a bundle carries its own")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="ONNX Runtime device for the vision graph (auto: CUDA when available)")
    parser.add_argument("--no-reduce", action="store_true", help="all visual tokens, no AOT, for comparison")
    parser.add_argument("--max-new-tokens", type=positive_int, default=32, help="most tokens generated (32)")
    parser.add_argument("--allow-failed", action="store_true",
                        help="run an export, engine or bundle whose recorded calibration or validation failed its "
                             "gates (refused otherwise)")
    _add_run_latency(parser)


# ---- the device runtime: `run --model BUNDLE`, latency repeats, `bundle` (issue #13) ----------------------------
def _device_pipeline(args: argparse.Namespace):
    from runtime.device.pipeline import DevicePipeline

    for option in ("--backend", "--export", "--no-reduce", "--llm"):
        if getattr(args, option[2:].replace("-", "_"), None):
            raise InputError(f"{option} does not apply to a bundle (it holds its vision artifact, checked against "
                             "its export, and its LLM); drop it, or run the export/engine directory instead")
    pipeline = DevicePipeline(args.model, **_device_options(args))
    if pipeline.warning:
        print(pipeline.warning, file=sys.stderr)
    return pipeline


def _add_run_latency(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--warmup", type=non_negative_int, default=0, help="untimed runs before the timed ones (0)")
    parser.add_argument("--repeat", type=positive_int, default=1, help="timed runs: p50 / p90 / max per stage (1)")
    _add_device_settings(parser)


def _add_device_settings(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="bundle: ONNX Runtime intra-op threads per session (default: one per core)")
    parser.add_argument("--spinning", choices=("on", "off"), default="off",
                        help="bundle: ONNX Runtime intra-op thread spinning (off: docs/benchmarks.md)")
    parser.add_argument("--kv", choices=("bound", "numpy"), default="bound",
                        help="bundle: KV cache bound in place with IOBinding (default) or copied through numpy")
    parser.add_argument("--expect-id", type=sha256_hex, default=None, metavar="SHA256",
                        help="bundle: run it only if its id (the sha256 of bundle.json, printed by `aot-export "
                             "bundle`) is this one")


# ---- live video: `live --model BUNDLE --source SRC` (issue #19) ------------------------------------------------
def _live(args: argparse.Namespace) -> int:
    from aot_export.sources import open_source
    from runtime.device.bundle import is_bundle
    from runtime.device.live import AnswerToken, ClipReduced, End, LiveSettings, live_events, stdin_questions

    if not is_bundle(args.model):
        raise InputError(f"--model {args.model}: live runs a bundle (`aot-export bundle`); pass its directory")
    # A file or recording read flat out waits for the pipeline; a live source (or --realtime) cannot, so it drops.
    flat_out = not args.realtime and (Path(args.source).is_file() or Path(args.source).is_dir())
    settings = LiveSettings(fps=args.fps, window_s=args.window, prompt=args.prompt,
                            max_new_tokens=args.max_new_tokens, eviction=args.eviction, pending=args.pending,
                            drop=not flat_out, duration_s=args.duration)
    settings.check()
    pipeline = _device_pipeline(args)
    events: list[dict] = []
    seen, end = 0, None
    with pipeline:
        settings.window_clips(pipeline.frames)                  # before the source is opened
        if args.prompt is not None:
            pipeline.text.prompt_ids(args.prompt)
        source = open_source(args.source, realtime=args.realtime, stall_timeout=args.stall_timeout,
                             topic=args.topic)
        questions = None if args.prompt is not None else stdin_questions()
        stream = live_events(pipeline, source, settings, questions)
        try:
            for event in stream:
                seen += 1
                if len(events) < MAX_LOGGED_EVENTS:
                    events.append(event.to_dict())
                if isinstance(event, End):
                    end = event
                if not isinstance(event, AnswerToken) and (not args.quiet or not isinstance(event, ClipReduced)):
                    print(event.line(), flush=True)
        finally:
            stream.close()
            summary = {"source": args.source, "settings": vars(settings),
                       "end": None if end is None else end.to_dict(), "events": events,
                       "events_left_out": seen - len(events)}
            write_json(args.json, summary)
    return EXIT_OK


# The --json log keeps this many events (a 10-minute stream at 1 clip / 4 s with answers is ~600).
MAX_LOGGED_EVENTS = 20000


def _add_live(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="bundle directory (`aot-export bundle`)")
    parser.add_argument("--source", required=True,
                        help="video file, rtsp:// http(s):// tcp:// udp:// URL, /dev/videoN camera, or a ROS 2 "
                             "recording (rosbag2 directory or .mcap)")
    parser.add_argument("--window", type=positive_seconds, default=30.0, help="seconds of stream the LLM keeps (30)")
    parser.add_argument("--fps", type=positive_seconds, default=1.0, help="frames sampled per stream second (1)")
    parser.add_argument("--prompt", default=None,
                        help="a standing prompt asked again after every clip (default: questions read from stdin, "
                             "one per line)")
    parser.add_argument("--realtime", action="store_true",
                        help="play a file or recording at its own rate (clips dropped when the pipeline is behind)")
    parser.add_argument("--topic", default=None, help="ROS 2 recording: the image topic (default: the only one)")
    parser.add_argument("--stall-timeout", type=positive_seconds, default=10.0,
                        help="seconds without a frame before a stream is ended as stalled (10)")
    parser.add_argument("--duration", type=positive_seconds, default=None, help="stop after this many seconds of stream")
    parser.add_argument("--max-new-tokens", type=positive_int, default=32, help="most tokens per answer (32)")
    parser.add_argument("--eviction", choices=("shift", "reprefill"), default="shift",
                        help="how the oldest clip leaves a full window: its slots dropped and later keys turned to "
                             "their new positions (shift), or the kept clips prefilled again (docs/benchmarks.md)")
    parser.add_argument("--pending", type=positive_int, default=1,
                        help="clips waiting for the pipeline before the oldest is dropped (1)")
    _add_bundle_runtime(parser, "run")


# ---- serving: `serve --model BUNDLE` (issue #20) --------------------------------------------------------------
def _serve_settings(args: argparse.Namespace):
    from runtime.device.serve import ServeSettings

    api_key = args.api_key
    if args.api_key_file:
        try:
            api_key = _read_text(args.api_key_file).strip()
        except InputError as exc:
            raise InputError(f"--api-key-file {exc}") from None
        if not api_key:
            raise InputError(f"--api-key-file {args.api_key_file} is empty; put the key in it")
    settings = ServeSettings(host=args.host, port=args.port, api_key=api_key,
                             allow_paths=tuple(Path(p) for p in args.allow_path), allow_remote=args.allow_remote,
                             max_queue=args.max_queue, max_body_bytes=args.max_body_mib << 20,
                             max_video_bytes=args.max_video_mib << 20, remote_timeout_s=args.remote_timeout,
                             max_tokens=args.max_tokens, model_name=args.served_model_name)
    settings.check()
    return settings


def _serve(args: argparse.Namespace) -> int:
    from runtime.device.bundle import is_bundle

    if not is_bundle(args.model):
        raise InputError(f"--model {args.model}: serve runs a bundle (`aot-export bundle`); pass its directory")
    settings = _serve_settings(args)                  # before the bundle loads
    if args.ray:
        from runtime.device.serve_ray import serve_on_ray

        serve_on_ray(Path(args.model), settings, replicas=args.replicas, cpus=args.cpus_per_replica,
                     gpus=args.gpus_per_replica, pipeline_options=_device_options(args),
                     on_ready=lambda url: print(f"serving {url} ({args.replicas} Ray Serve replicas; Ctrl-C stops)",
                                                flush=True))
        return EXIT_OK
    from runtime.device.serve import serve

    with _device_pipeline(args) as pipeline:
        serve(pipeline, settings, on_ready=lambda url: print(f"serving {url} (Ctrl-C stops)", flush=True))
    return EXIT_OK


def _add_serve(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="bundle directory (`aot-export bundle`)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1; others need --api-key)")
    parser.add_argument("--port", type=non_negative_int, default=8000, help="port (8000)")
    parser.add_argument("--api-key", default=None, help="clients send it as `Authorization: Bearer KEY`")
    parser.add_argument("--api-key-file", default=None, help="read the key from this file instead")
    parser.add_argument("--allow-path", action="append", default=[], metavar="DIR",
                        help="a directory video paths may point into (repeatable; none: no local files)")
    parser.add_argument("--allow-remote", action="store_true", help="fetch http(s) video URLs (off by default)")
    parser.add_argument("--max-queue", type=positive_int, default=8,
                        help="requests waiting behind the running one before 429 (8)")
    parser.add_argument("--max-tokens", type=positive_int, default=256, help="the most a request may generate (256)")
    parser.add_argument("--max-body-mib", type=positive_int, default=64, help="largest request body (64 MiB)")
    parser.add_argument("--max-video-mib", type=positive_int, default=48,
                        help="largest video in a data URL or fetched from a URL (48 MiB)")
    parser.add_argument("--remote-timeout", type=positive_seconds, default=10.0,
                        help="seconds to fetch a remote video (10)")
    parser.add_argument("--served-model-name", default=None, help="the model id clients ask for (the bundle's)")
    parser.add_argument("--ray", action="store_true", help="deploy on a local Ray Serve cluster (the [ray] extra)")
    parser.add_argument("--replicas", type=positive_int, default=2, help="Ray Serve replicas (2)")
    parser.add_argument("--cpus-per-replica", type=positive_seconds, default=1.0,
                        help="CPUs Ray reserves per replica (fractions allowed; 1)")
    parser.add_argument("--gpus-per-replica", type=positive_seconds, default=0.0,
                        help="GPUs Ray reserves per replica (fractions allowed; none by default)")
    _add_bundle_runtime(parser, "serve")


def _add_bundle_runtime(parser: argparse.ArgumentParser, verb: str) -> None:
    """The options of a command that runs a bundle on the device (`live`, `serve`)."""
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="ONNX Runtime device (auto: CUDA when available)")
    parser.add_argument("--allow-failed", action="store_true",
                        help=f"{verb} a bundle with a part whose recorded calibration or validation failed its gates "
                             "(refused otherwise)")
    _add_device_settings(parser)


def _device_options(args: argparse.Namespace) -> dict:
    """`DevicePipeline`'s keyword arguments from the device options (a Ray replica builds its own pipeline)."""
    return {"device": args.device, "intra_op_threads": args.threads, "allow_spinning": args.spinning == "on",
            "kv": args.kv, "verify_hashes": not args.skip_hash, "expect_id": args.expect_id,
            "allow_failed": args.allow_failed}


def _bundle(args: argparse.Namespace) -> int:
    from runtime.bundle import write_bundle

    from runtime.device.bundle import bundle_id

    out = write_bundle(args.model, args.llm, args.out, export=args.export, embeddings=args.embeddings,
                       force=args.force, verify_hashes=not args.skip_hash, allow_failed=args.allow_failed)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    size = sum(p.stat().st_size for p in files)
    identity = bundle_id(out)
    print(format_table([("bundle", str(out)), ("id", identity), ("files", len(files)),
                        ("size", f"{size / 1e6:.1f} MB"), ("peak RSS", f"{peak_rss_mib():.0f} MiB")], ("bundle", "")))
    write_json(args.json, {"directory": str(out), "id": identity, "files": len(files), "bytes": size})
    return EXIT_OK


def _add_bundle(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="export directory or engine directory")
    parser.add_argument("--llm", required=True, help="ONNX LLM directory (`aot-export quantize-llm`)")
    parser.add_argument("--export", default=None, help="the export an engine --model was built from")
    parser.add_argument("--embeddings", choices=("fp16", "fp32"), default="fp16",
                        help="dtype of the stored text embedding table (fp16)")
    parser.add_argument("--out", required=True, help="bundle directory to write (new, empty, or a bundle with --force)")
    parser.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    parser.add_argument("--allow-failed", action="store_true",
                        help="bundle an artifact whose recorded calibration or validation failed its gates (refused "
                             "otherwise); bundle.json records it, and the device runs it only with --allow-failed")


def _quantize_llm(args: argparse.Namespace) -> int:
    from runtime.llm import build_onnx_decoder

    from aot_export.adapters import load_model

    check_destination(args.out, "llm", args.force, sources={"model": args.model})
    adapter = load_model(args.model)
    out = build_onnx_decoder(adapter, args.out, precision=args.precision, execution_provider=args.ep,
                             progress=not args.quiet, force=args.force, release_weights=True, verbose=args.debug)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(format_table([("model", adapter.info.model_id), ("precision", args.precision),
                        ("execution provider", args.ep), ("size", f"{size / 1e6:.1f} MB"), ("written", str(out))],
                       ("quantize-llm", "")))
    write_json(args.json, {"directory": str(out), "bytes": size})
    return EXIT_OK


def _add_quantize_llm(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny-llava-ov", help="built-in model or checkpoint directory")
    parser.add_argument("--precision", choices=("int4", "int8", "fp16", "fp32"), default="int4",
                        help="weight precision of the ONNX LLM (int4): int4 / int8 weights in MatMulNBits blocks of 32 "
                             "rows; int8 holds the int8 chain gates on the trained fixture, int4 its own "
                             "(docs/benchmarks.md)")
    parser.add_argument("--ep", choices=("cpu", "cuda"), default="cpu", help="execution provider it is built for")
    parser.add_argument("--out", required=True, help="directory for the ONNX LLM (new, empty, or one with --force)")
    parser.add_argument("--force", action="store_true", help="replace an existing ONNX LLM at --out")


def _quantize_weights(args: argparse.Namespace) -> int:
    from calibration.weight_only import quantize_weights

    out = quantize_weights(args.dir, args.out, block_size=args.block_size, force=args.force,
                           float_blocks=args.float_blocks, verify_hashes=not args.skip_hash)
    size, source_size = (sum(p.stat().st_size for p in Path(d).iterdir()) for d in (out, args.dir))
    print(format_table([("source", args.dir), ("weights", f"8-bit blocks of {args.block_size} rows (MatMulNBits)"),
                        ("kept fp32", f"the tower's first {args.float_blocks} encoder block(s), scores, AOT"),
                        ("size", f"{source_size / 1e6:.1f} MB → {size / 1e6:.1f} MB"), ("written", str(out))],
                       ("quantize-weights", "")))
    write_json(args.json, {"directory": str(out), "bytes": size})
    return EXIT_OK


def _add_quantize_weights(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="fp32 export directory (with manifest.json)")
    parser.add_argument("--out", required=True,
                        help="the new export directory (new, empty, or an export with --force)")
    parser.add_argument("--block-size", type=int, default=32, help="input rows per fp32 scale (32)")
    parser.add_argument("--float-blocks", type=non_negative_int, default=1,    # weight_only.FLOAT_BLOCKS
                        help="the tower's first N encoder blocks keep fp32 weights (1: the block whose rounding "
                             "moves the anchor scores most on a trained tower, docs/benchmarks.md)")
    parser.add_argument("--force", action="store_true", help="replace an existing export at --out")


def _calibrate(args: argparse.Namespace) -> int:
    from calibration import calibrate_export

    report = calibrate_export(args.dir, args.videos, args.precision, args.out, holdout=args.holdout,
                              clips_per_video=args.clips_per_video, seed=args.seed, progress=not args.quiet,
                              noise_draws=args.noise_draws, force=args.force, verify_hashes=not args.skip_hash,
                              float_layers=[] if args.float_layers == ["none"] else args.float_layers,
                              calibration_method=args.calibration_method)
    print(report.table())
    write_json(args.json, report.to_dict())
    return EXIT_OK if report.passed else EXIT_FAILED


def _add_calibrate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="fp32 export directory (with manifest.json)")
    parser.add_argument("--videos", nargs="+", required=True, help="calibration videos or directories of videos")
    parser.add_argument("--precision", choices=("int8", "fp8"), required=True, help="quantized precision")
    parser.add_argument("--out", required=True,
                        help="the new (quantized) export directory (new, empty, or an export with --force)")
    parser.add_argument("--force", action="store_true", help="replace an existing export at --out")
    parser.add_argument("--holdout", default=None,
                        help="video for the fidelity report, not one of --videos (required)")
    parser.add_argument("--clips-per-video", type=positive_int, default=4,
                        help="calibration clips cut from each video (4)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the clip sampling (0)")
    parser.add_argument("--float-layers", nargs="+", default=None, metavar="RULE",
                        help="quantizable layers kept float: 'score-path' (every layer the attention scores that "
                             "choose the anchors depend on), globs over module paths ('*.fc2', "
                             "'tower.encoder.layers.0.*'), or 'none' (default: score-path projector.*)")
    # checked by `calibration.ort_quantize.calibration_method` (the parser imports no calibration module: the
    # device install, without onnx, builds the same parser)
    parser.add_argument("--calibration-method", default=None, metavar="METHOD",
                        help="ONNX Runtime calibrator for the activation ranges: minmax (default), percentile, entropy "
                             "or distribution (ORT's own std-based float8 scales, fp8 only)")
    _add_noise_draws(parser)


def _add_noise_draws(parser: argparse.ArgumentParser) -> None:
    from aot_export.fidelity import NOISE_DRAWS

    parser.add_argument("--noise-draws", type=non_negative_int, default=NOISE_DRAWS,
                        help="runs of the fp32 selection under 1/4-pixel-step input noise on the video; the anchor "
                             f"gate is the fixed one or their median, whichever is lower (0: fixed gate; "
                             f"{NOISE_DRAWS})")


def _build(args: argparse.Namespace) -> int:
    from engines.build import build_engine_dir, settings_for, trtexec_command
    from engines.targets import get_target

    target = get_target(args.target)
    if args.timing_cache:
        check_output_file(args.timing_cache, "--timing-cache")
    settings = settings_for(target, args.precision, typing=args.typing, optimization_level=args.opt_level,
                            workspace_bytes=args.workspace_mib << 20 if args.workspace_mib else None,
                            timing_cache=args.timing_cache, dla=args.dla,
                            compute_capabilities=tuple(args.compute_capability or ()), float_part=args.float_part)
    if args.print_trtexec:
        print(trtexec_command(args.dir, settings))
        return EXIT_OK
    out = args.out or f"{args.dir.rstrip('/')}-{target.name}-{args.precision}"
    result = build_engine_dir(args.dir, settings, out, progress=not args.quiet, force=args.force,
                              allow_failed=args.allow_failed, verify_hashes=not args.skip_hash)
    sidecar = result.sidecar
    rows = [("target", f"{target.name} (SM {', '.join(sidecar.compute_capabilities)})"),
            ("builder", f"{sidecar.flavour} {sidecar.tensorrt_version} (CUDA {sidecar.cuda})"),
            ("precision", f"{sidecar.precision}, {settings.typing}ly typed"
                          f"{', float layers fp16' if settings.float_part == 'fp16' else ''}"),
            ("layers", sidecar.network["layers"]), ("output dtypes", sidecar.network["output_dtypes"]),
            ("plan", f"{result.plan_bytes / 1e6:.1f} MB"),
            *[(f"time: {stage}", f"{seconds:.1f} s") for stage, seconds in result.seconds.items()],
            ("layer report", "layers.json" if result.layer_info else "needs a GPU to deserialize; not written"),
            ("written", str(result.directory))]
    print(format_table(rows, ("build", "")))
    write_json(args.json, {"sidecar": sidecar.to_dict(), "seconds": result.seconds, "plan_bytes": result.plan_bytes})
    return EXIT_OK


def _add_build(parser: argparse.ArgumentParser) -> None:
    from engines.targets import PRECISIONS, TARGETS

    parser.add_argument("dir", help="export directory (with manifest.json)")
    parser.add_argument("--target", required=True, choices=list(TARGETS), help="deployment target")
    parser.add_argument("--precision", required=True, choices=PRECISIONS, help="engine precision")
    parser.add_argument("--typing", choices=("strong", "weak"), default="strong",
                        help="weak: TensorRT 10 precision flags + fp32 layer constraints (JetPack 6)")
    parser.add_argument("--float-part", choices=("fp32", "fp16"), default="fp32",
                        help="int8 / fp8: the precision of the layers the calibrated export left float (fp32: as "
                             "`calibrate` gated it; fp16: faster on a GPU, measured to hold the same gates on the "
                             "trained fixture, docs/benchmarks.md; the AOT block, scores, LayerNorm, Softmax stay fp32)")
    parser.add_argument("--opt-level", type=non_negative_int, default=3, help="builder optimization level 0..5 (3)")
    parser.add_argument("--workspace-mib", type=positive_int, default=None, help="workspace pool limit (target's cap)")
    parser.add_argument("--timing-cache", default=None, help="timing cache file to load and update")
    parser.add_argument("--dla", action="store_true", help="run on DLA core 0 with GPU fallback (Jetson)")
    parser.add_argument("--compute-capability", action="append", default=None,
                        help="TensorRT-RTX: build for this SM (repeatable; default: the target's list)")
    parser.add_argument("--print-trtexec", action="store_true",
                        help="print the equivalent trtexec / tensorrt_rtx command instead of building")
    parser.add_argument("--out", default=None, help="engine directory (default: DIR-TARGET-PRECISION)")
    parser.add_argument("--force", action="store_true", help="replace an existing engine directory at --out")
    parser.add_argument("--allow-failed", action="store_true",
                        help="build from an export whose calibration failed its gates (refused otherwise)")


def _bench(args: argparse.Namespace) -> int:
    from runtime.ratios import run_bench

    report = run_bench(widths=tuple(args.widths), encoder_frames=args.encoder_frames, repeats=args.repeats,
                       graph_frames=args.graph_frames, retentions=tuple(args.retentions), frames=args.frames,
                       model=args.model)
    print(report.table())
    write_json(args.json, report.to_dict())
    return EXIT_OK


def _add_bench(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--widths", type=positive_int, nargs="*", default=[896, 3584],
                        help="LLM widths for the reduction / encoder ratio (896 3584)")
    parser.add_argument("--encoder-frames", type=positive_int, default=2, help="frames the encoder is timed on (2)")
    parser.add_argument("--repeats", type=positive_int, default=2, help="best of N after a warm-up (2)")
    parser.add_argument("--graph-frames", type=non_negative_int, default=32, help="frames for ORT vs eager (0: skip)")
    parser.add_argument("--retentions", type=fraction, nargs="*", default=[0.10, 0.15, 0.20, 0.25],
                        help="retentions for the LLM prefill comparison (none: skip)")
    parser.add_argument("--frames", type=positive_int, default=32, help="video frames behind the prefill lengths (32)")
    parser.add_argument("--model", default="tiny-llava-ov",
                        help="built-in model or checkpoint for the graph and the visual token counts (tiny-llava-ov)")


def _visualize(args: argparse.Namespace) -> int:
    from runtime.visualize import visualize

    from runtime.vision import model_adapter, resolve_artifact

    from aot_export.export import solve_config

    artifact = resolve_artifact(args.model, verify_hashes=not args.skip_hash)
    adapter = model_adapter(artifact)
    args.frames = args.frames or DEFAULT_FRAMES
    cfg = (artifact.manifest.aot if artifact.manifest is not None else
           solve_config(adapter.aot_frames(args.frames), args.retention, args.anchors, args.pooled_anchors, args.keep, clip_len=args.clip_len, temporal_patch=adapter.info.temporal_patch,
                        **adapter.aot_fields()))
    check_output_file(args.out, "--out")
    if artifact.manifest is None:
        _print_clip_len_notice(args, adapter)
    info = visualize(adapter, args.video, args.out, cfg, frames_shown=args.frames_shown, progress=not args.quiet)
    model = info["model"] + (" (random weights)" if info["random_weights"] else "")
    rows = [("video", info["video"]), ("model", model), ("visual tokens without AOT", info["input_tokens"]),
            ("visual tokens with AOT", info["output_tokens"]), ("retention", f"{info['retention']:.2%}"),
            ("frames shown", len(info["frames_shown"])), ("written", f"{info['out']} ({info['png_bytes'] / 1e6:.2f} MB)")]
    print(format_table(rows, ("visualize", "")))
    write_json(args.json, info)
    return EXIT_OK


def _add_visualize(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny-llava-ov",
                        help="engine directory, export directory (its model and AOT config), built-in model or "
                             "checkpoint directory")
    parser.add_argument("--video", required=True, help="video file")
    parser.add_argument("--out", required=True, help="PNG to write")
    _add_budget(parser, frames_help="frames per video (32)")
    parser.add_argument("--frames-shown", type=frames_shown, default=8, help="frames drawn (whole clips), or 'all' (8)")


def _demo(args: argparse.Namespace) -> int:
    from runtime.demo import run_demo

    videos = args.video or sorted(Path(DEMO_FOOTAGE).glob("*.mp4"))
    report = run_demo(workdir=Path(args.workdir), videos=videos, progress=not args.quiet,
                      verify_hashes=not args.skip_hash)
    print(report.table())
    write_json(args.json, report.to_dict())
    return EXIT_OK if report.passed else EXIT_FAILED


def _add_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="aot-demo", help="where the demo writes its artifacts (aot-demo/)")
    parser.add_argument("--video", action="append", default=None,
                        help="video to run on (repeatable; default: the .mp4 files in ../shared/data/videos "
                             "relative to the current directory, else a synthesized clip)")


def _read_text(path: str, limit: int = 1 << 16) -> str:
    """A small UTF-8 text file an option names (`--api-key-file`), its errors one line naming the option's file."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror}); pass an existing file") from exc
    if len(data) > limit:
        raise InputError(f"{path}: larger than {limit} bytes; pass a file holding only the key")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text ({exc.reason}); pass a text file") from exc


def _read_config(path: str):
    """`--config`: an AOTConfig read through the bounded JSON reader, its errors naming the file."""
    from aot_export.config import AOTConfig
    from aot_export.manifest import read_json_object

    fix = 'pass a JSON object of AOTConfig fields, e.g. {"frames": 8}'
    try:
        return AOTConfig.from_dict(read_json_object(Path(path), fix))
    except OSError as exc:
        raise InputError(f"--config {path}: cannot be read ({exc.strerror}); pass an existing file") from exc
    except InputError as exc:
        raise InputError(f"--config {exc}") from exc
    except ValueError as exc:
        raise InputError(f"--config {path}: {exc}") from exc


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {
    "export": Command("export vision tower + projector + AOT as one static ONNX graph", _add_export, _export),
    "check": Command("ONNX checker, TensorRT-compatibility lint, TensorRT parse + build", _add_check, _check),
    "validate": Command("run the export on a video against the PyTorch reference", _add_validate, _validate),
    "calibrate": Command("INT8/FP8 Q/DQ export calibrated on real video, fidelity on a held-out one",
                         _add_calibrate, _calibrate),
    "quantize-weights": Command("8-bit weight-only export for ONNX Runtime devices (MatMulNBits, no calibration)",
                                _add_quantize_weights, _quantize_weights),
    "build": Command("build a TensorRT engine for a target from an export", _add_build, _build),
    "quantize-llm": Command("build an int4 (or int8) ONNX decoder of the checkpoint's LLM (onnxruntime-genai's "
                            "builder, or torch.onnx + MatMulNBits where it lacks the family)",
                            _add_quantize_llm, _quantize_llm),
    "bench": Command("ratios side by side: AOT / encoder, ORT / eager, LLM prefill with / without AOT",
                     _add_bench, _bench),
    "visualize": Command("a PNG of what AOT keeps, merges and drops on a video", _add_visualize, _visualize),
    "run": Command("answer a prompt about a video: vision (+AOT) → LLM, with a latency table", _add_run, _run),
    "live": Command("answer questions about a live stream (camera, network, file, ROS 2 recording) while it plays",
                    _add_live, _live),
    "serve": Command("an OpenAI-compatible /v1/chat/completions endpoint with video_url parts over a bundle",
                     _add_serve, _serve),
    "demo": Command("the whole chain on the built-in default, no arguments needed", _add_demo, _demo),
    "bundle": Command("export/engine + ONNX LLM → one directory the device runtime runs (no torch)",
                      _add_bundle, _bundle),
}


# commands that read no artifact, so have no hash to skip
WRITES_ONLY = ("export", "quantize-llm", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aot-export", description="Export a video LLM's vision encoder with AOT token reduction to one static "
                                       "ONNX graph, build TensorRT engines, and prove every step against PyTorch.")
    from aot_export import __version__

    parser.add_argument("--version", action="version", version=f"aot-export {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        child = sub.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(child)
        child.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON")
        child.add_argument("--quiet", action="store_true", help="no progress bars")
        child.add_argument("--debug", action="store_true", help="show tracebacks")
        if name not in WRITES_ONLY:
            child.add_argument("--skip-hash", action="store_true",
                               help="check artifacts' file sizes only, not their sha256 (faster on large models)")
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is: the running command unwinds and removes its staging."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        check_output_file(args.json, "--json")        # before the work, not after it
        return COMMANDS[args.command].run(args)
    except OSError as exc:
        if args.debug:
            traceback.print_exc()
        line = describe_os_error(exc, getattr(args, "out", None))
        if line is None:
            return _internal(args, exc)
        print(f"aot-export {args.command}: error: {line}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (InputError, ValueError) as exc:
        if args.debug:
            traceback.print_exc()
        print(f"aot-export {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except CheckFailed as exc:
        if args.debug:
            traceback.print_exc()
        print(f"aot-export {args.command}: failed: {_one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt as exc:
        signum = signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT
        print(f"aot-export {args.command}: {'terminated' if isinstance(exc, Terminated) else 'interrupted'}; "
              "no partial artifact was left", file=sys.stderr)
        return EXIT_INTERRUPTED[signum]
    except Exception as exc:  # noqa: BLE001 - the shell's last line of defence, reported in one line
        missing = exc.name.split(".")[0] if isinstance(exc, ModuleNotFoundError) and exc.name else None
        if missing in EXPORT_STACK:
            # The base install is the device runtime; making artifacts needs the export stack (pyproject [export]).
            print(f"aot-export {args.command}: error: this command needs {missing}, which the device runtime install "
                  "leaves out; install the export stack: pip install 'aot-export[export]'", file=sys.stderr)
            return EXIT_BAD_INPUT
        if args.debug:
            traceback.print_exc()
        return _internal(args, exc)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _internal(args: argparse.Namespace, exc: BaseException) -> int:
    print(f"aot-export {args.command}: internal error: {exc.__class__.__name__}: {_one_line(exc)} "
          "(rerun with --debug for the traceback)", file=sys.stderr)
    return EXIT_INTERNAL


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or exc.__class__.__name__


if __name__ == "__main__":
    sys.exit(main())
