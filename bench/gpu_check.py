"""GPU checks for a lent GPU machine: fp16 fidelity of tower + projector + AOT, and reducer and prefill timings
synchronised with the device (docs/benchmarks.md "GPU checks").

    python bench/gpu_check.py prepare --out gpu_frames.npz                      # here (PyAV, the shared videos)
    python bench/gpu_check.py run --frames gpu_frames.npz --json gpu_check.json # on the GPU machine
    python bench/gpu_check.py timing --json gpu_timing.json                     # on the GPU machine
    python bench/gpu_check.py prefill --json gpu_prefill.json --positions 212 1593 # on the GPU machine

`prepare` decodes the shared videos as `validate` does and stores them resized to each model's size as uint8;
`run` normalises them with `preprocess_frames` (PIL leaves a frame already at its size unchanged), so the pixels
are the ones `validate` feeds, and the GPU machine needs no PyAV and no export.

Per model and video, `run` holds the PyTorch reference (`adapter.reference`: eager attention, fp32, on the CPU)
against the same module on the device in fp32 (TF32 off), under autocast fp16 (matmuls fp16; softmax and
normalisation fp32), and with fp16 weights. The reducer computes in fp32 in all of them, as it does in the fp16
export. Each is judged by `compare_outputs` under `VISION_GATES` of its precision. Then it times, per stage
(`runtime.device.latency.repeat_stages`, the device synchronised around each): tower + projector + scores
(`encode`), the reducer, and the LLM prefill on AOT's tokens and on all visual tokens (Hugging Face's video path
counts them), each with a 24-token question.

`timing` takes the full-size built-in at several frame counts (random pixels: every stage's cost depends only on
shapes, since the stopping Sinkhorn is unrolled) and times each stage eagerly and as a replayed CUDA graph, the
closest PyTorch gets to an engine's launch cost: the encoder in fp16, the reducer with each solver, the prefill.
`prefill` times the prefill alone at given prompt lengths for the LLM sizes LLaVA-OneVision pairs with SigLIP
(Qwen2-0.5B and Qwen2-7B architectures, random fp16 weights made on the GPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "videos"
CLIPS = ("bigbuckbunny.mp4", "bikes.mp4")
# built-in → video frames of its export (Qwen2.5-VL folds 2 frames into one grid)
MODELS = {"tiny-llava-ov": 8, "tiny-qwen2.5-vl": 16, "tiny-cosmos3-edge": 8, "llava-ov-0.5b-random": 8,
          "qwen2.5-vl-3b-random": 16, "cosmos3-edge-random": 8}
DEFAULT_MODELS = ["tiny-llava-ov", "tiny-qwen2.5-vl", "tiny-cosmos3-edge", "llava-ov-0.5b-random"]
PRECISIONS = ("fp32", "autocast-fp16", "fp16-weights")


def frames_key(model: str, clip: str) -> str:
    return f"{model}/{clip}"


def prepare(args) -> int:
    from aot_export.preprocess import resize_frames
    from aot_export.video import decode_frames

    arrays = {}
    for model in args.models:
        prep = preprocessing_of(model)
        for clip in args.clips:
            arrays[frames_key(model, clip)] = resize_frames(decode_frames(VIDEOS / clip, MODELS[model]), prep)
    np.savez_compressed(args.out, **arrays)
    print(f"{args.out}: {', '.join(f'{k} {v.shape}' for k, v in arrays.items())}")
    return 0


def preprocessing_of(model: str):
    """The built-in's preprocessing; for the full-size merged-grid built-ins without building their 3–4 B random
    weights (minutes and ~15 GB here) only to read it."""
    from aot_export.adapters import load_model
    from aot_export.adapters.cosmos3_edge import COSMOS_PREPROCESSING
    from aot_export.adapters.qwen2_5_vl import QWEN_PREPROCESSING

    unbuilt = {"qwen2.5-vl-3b-random": QWEN_PREPROCESSING, "cosmos3-edge-random": COSMOS_PREPROCESSING}
    return unbuilt[model] if model in unbuilt else load_model(model).preprocessing


def environment(torch) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, compute_capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1))
    import transformers
    info["transformers"] = transformers.__version__
    try:
        import onnxruntime
        info["onnxruntime"] = onnxruntime.__version__
        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError as exc:
        info["onnxruntime"] = f"absent ({exc})"
    for name in ("tensorrt", "tensorrt_rtx"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = "absent"
    return info


def device_outputs(torch, module, pixels, precision: str) -> dict[str, np.ndarray]:
    """tokens, index of `module` on `pixels` (already on the device) in one precision; the reducer stays fp32."""
    with torch.inference_mode():
        if precision == "autocast-fp16":
            with torch.autocast(pixels.device.type, dtype=torch.float16):
                encoded = module.encode(pixels)
        elif precision == "fp16-weights":
            encoded = module.encode(pixels.half())
        else:
            encoded = module.encode(pixels)
        tokens, index = module.reducer(*encoded)
    return {"tokens": tokens.float().cpu().numpy(), "index": index.cpu().numpy()}


def as_precision(module, precision: str):
    """The module's weights in `precision` (the reducer's buffers stay fp32)."""
    if precision == "fp16-weights":
        module.half()
    else:
        module.float()
    module.reducer.float()
    return module


def timed_stages(torch, module, pixels, decoder, lm_head, lengths: dict[str, int], warmup: int,
                 repeat: int) -> dict:
    from runtime.device.latency import repeat_stages

    device = pixels.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dtype = next(decoder.parameters()).dtype
    hidden = lm_head.in_features
    embeds = {name: torch.randn(1, n, hidden, device=device, dtype=dtype) * 0.02 for name, n in lengths.items()}

    def run() -> dict[str, float]:
        seconds = {}
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16):
            sync()
            start = time.perf_counter()
            encoded = module.encode(pixels)
            sync()
            seconds["encode"] = time.perf_counter() - start
            with torch.autocast(device.type, enabled=False):
                start = time.perf_counter()
                module.reducer(*encoded)
                sync()
                seconds["reduce"] = time.perf_counter() - start
            for name, x in embeds.items():
                start = time.perf_counter()
                lm_head(decoder(inputs_embeds=x, use_cache=True).last_hidden_state[:, -1])
                sync()
                seconds[f"prefill_{name}"] = time.perf_counter() - start
        return seconds

    return repeat_stages(run, warmup, repeat)


def check_model(torch, model: str, frames: np.lib.npyio.NpzFile, clips: list[str], device, warmup: int,
                repeat: int) -> dict:
    from aot_export.adapters import load_model
    from aot_export.fidelity import VISION_GATES, compare_outputs, gate_checks
    from aot_export.preprocess import preprocess_frames
    from runtime.ratios import TEXT_TOKENS, model_config

    start = time.perf_counter()
    adapter = load_model(model)
    cfg = model_config(adapter, MODELS[model])
    result = {"model": model, "video_frames": MODELS[model], "aot": cfg.to_dict(),
              "load_s": time.perf_counter() - start, "fidelity": {}}
    pixels = {clip: torch.from_numpy(preprocess_frames(frames[frames_key(model, clip)], adapter.preprocessing))
              for clip in clips}
    start = time.perf_counter()
    reference = {}
    for clip, x in pixels.items():
        tokens, index = adapter.reference(cfg, x)
        reference[clip] = {"tokens": tokens.numpy(), "index": index.numpy()}
    result["reference_cpu_s"] = time.perf_counter() - start
    full_tokens = int(adapter.full_video_features(pixels[clips[0]]).shape[0])

    module = adapter.vision_aot(cfg).to(device)
    for precision in PRECISIONS:
        as_precision(module, precision)
        gates = VISION_GATES["fp32" if precision == "fp32" else "fp16"]
        for clip, x in pixels.items():
            metrics = compare_outputs(cfg, reference[clip], device_outputs(torch, module, x.to(device), precision),
                                      gates)
            checks = gate_checks(metrics, gates)
            result["fidelity"][f"{precision}/{clip}"] = {**metrics, "checks": checks, "passed": all(checks.values())}
    as_precision(module, "fp32")

    decoder, lm_head = adapter.decoder()
    decoder, lm_head = decoder.to(device, torch.float16), lm_head.to(device, torch.float16)
    lengths = {"aot": cfg.output_tokens + TEXT_TOKENS, "all_tokens": full_tokens + TEXT_TOKENS}
    result["prefill_positions"] = lengths
    result["timings_autocast_fp16"] = timed_stages(torch, module, pixels[clips[0]].to(device), decoder, lm_head,
                                                   lengths, warmup, repeat)
    return result


def summary(results: list[dict]) -> str:
    from aot_export.report import format_table

    rows = []
    for r in results:
        for key, m in r["fidelity"].items():
            rows.append([r["model"], key, f"{m['cosine_min']:.6f}", f"{m['matched_cosine_min']:.6f}",
                         f"{m['max_abs']:.2e}", f"{m['index_agreement']:.3f}", f"{m['anchor_agreement']:.3f}",
                         "PASS" if m["passed"] else "FAIL " + ",".join(k for k, v in m["checks"].items() if not v)])
    fidelity = format_table(rows, ["model", "precision/video", "cos min", "matched cos min", "max abs",
                                   "index agr", "anchor agr", "verdict"])
    rows = []
    for r in results:
        t = r["timings_autocast_fp16"]
        rows.append([r["model"], *(f"{t[s]['p50'] * 1e3:.2f}" for s in ("encode", "reduce")),
                     f"{t['reduce']['p50'] / t['encode']['p50']:.3f}",
                     f"{r['prefill_positions']['aot']} / {r['prefill_positions']['all_tokens']}",
                     *(f"{t[s]['p50'] * 1e3:.2f}" for s in ("prefill_aot", "prefill_all_tokens")),
                     f"{t['prefill_aot']['p50'] / t['prefill_all_tokens']['p50']:.3f}"])
    timing = format_table(rows, ["model", "encode ms", "reduce ms", "reduce / encode", "positions AOT / all",
                                 "prefill AOT ms", "prefill all ms", "AOT / all"])
    return fidelity + "\n\n" + timing


def cuda_graph(torch, fn, *args):
    """`fn(*args)` captured once; → a callable that replays it (static shapes, no host syncs inside)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(*args)
    return graph.replay


def stage_timings(torch, model: str, frames: int, warmup: int, repeat: int) -> dict:
    import dataclasses

    from aot_export.adapters import load_model
    from aot_export.reducer import AOTReducer
    from runtime.device.latency import repeat_stages
    from runtime.ratios import TEXT_TOKENS, model_config

    device = torch.device("cuda")
    adapter = load_model(model)
    cfg = model_config(adapter, frames)
    pixels = adapter.example_frames(frames * adapter.info.temporal_patch)
    with torch.inference_mode():
        all_tokens = int(adapter.full_video_features(pixels).shape[0])     # on the CPU, before anything moves
    module = as_precision(adapter.vision_aot(cfg).to(device), "fp16-weights")
    pixels = pixels.to(device, torch.float16)
    reducers = {solver: AOTReducer(dataclasses.replace(cfg, sinkhorn=solver)).to(device)
                for solver in ("reference", "fixed")}
    decoder, lm_head = (m.to(device, torch.float16) for m in adapter.decoder())
    lengths = {"aot": cfg.output_tokens + TEXT_TOKENS, "all_tokens": all_tokens + TEXT_TOKENS}
    embeds = {name: torch.randn(1, n, lm_head.in_features, device=device, dtype=torch.float16) * 0.02
              for name, n in lengths.items()}
    errors = {}
    with torch.inference_mode():
        encoded = module.encode(pixels)
        calls = {"encode eager": lambda: module.encode(pixels)}
        calls.update({f"reduce {solver} eager": (lambda r=r: r(*encoded)) for solver, r in reducers.items()})
        calls.update({f"prefill {name} eager": (lambda x=x: lm_head(decoder(inputs_embeds=x).last_hidden_state[:, -1]))
                      for name, x in embeds.items()})
        for name in [n for n in calls if not n.startswith("prefill")]:
            try:
                calls[name.replace("eager", "graph")] = cuda_graph(torch, calls[name])
            except Exception as exc:  # noqa: BLE001 - a stage that cannot be captured is reported, not fatal
                errors[name] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"

        def run() -> dict[str, float]:
            seconds = {}
            for name, call in calls.items():
                torch.cuda.synchronize()
                start = time.perf_counter()
                call()
                torch.cuda.synchronize()
                seconds[name] = time.perf_counter() - start
            return seconds

        stages = repeat_stages(run, warmup, repeat)
    return {"model": model, "video_frames": frames * adapter.info.temporal_patch, "aot_tokens": cfg.output_tokens,
            "prefill_positions": lengths, "stages": stages, "capture_errors": errors}


def timing(args) -> int:
    import torch

    from aot_export.report import format_table

    report = {"environment": environment(torch), "warmup": args.warmup, "repeat": args.repeat, "runs": []}
    for frames in args.frames:
        report["runs"].append(stage_timings(torch, args.model, frames, args.warmup, args.repeat))
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    rows = [[r["video_frames"], name, f"{s['p50'] * 1e3:.3f}", f"{s['p90'] * 1e3:.3f}", f"{s['max'] * 1e3:.3f}"]
            for r in report["runs"] for name, s in r["stages"].items()]
    print(format_table(rows, ["frames", "stage", "p50 ms", "p90 ms", "max ms"]))
    for r in report["runs"]:
        print(r["video_frames"], "frames: positions", r["prefill_positions"], "capture errors", r["capture_errors"])
    return 0


# Qwen2 architectures of LLaVA-OneVision-0.5B / -7B (the published configs' sizes)
LLMS = {"qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                           num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
        "qwen2-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)}


def prefill_stages(torch, model, positions: list[int], warmup: int, repeat: int) -> dict:
    from runtime.device.latency import repeat_stages

    embeds = {n: torch.randn(1, n, model.config.hidden_size, device="cuda", dtype=torch.float16) * 0.02
              for n in positions}

    def run() -> dict[str, float]:
        seconds = {}
        with torch.inference_mode():
            for n, x in embeds.items():
                torch.cuda.synchronize()
                start = time.perf_counter()
                model.lm_head(model.model(inputs_embeds=x, use_cache=True).last_hidden_state[:, -1])
                torch.cuda.synchronize()
                seconds[str(n)] = time.perf_counter() - start
        return seconds

    return repeat_stages(run, warmup, repeat)


def prefill(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from aot_export.report import format_table

    report = {"environment": environment(torch), "warmup": args.warmup, "repeat": args.repeat, "llms": {}}
    for name in args.llms:
        config = Qwen2Config(**LLMS[name], max_position_embeddings=32768)
        config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float16).eval()
        report["llms"][name] = prefill_stages(torch, model, args.positions, args.warmup, args.repeat)
        del model
        torch.cuda.empty_cache()
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    rows = [[name, n, f"{s['p50'] * 1e3:.2f}", f"{s['p90'] * 1e3:.2f}", f"{s['max'] * 1e3:.2f}"]
            for name, stages in report["llms"].items() for n, s in stages.items()]
    print(format_table(rows, ["LLM", "positions", "p50 ms", "p90 ms", "max ms"]))
    return 0


def run(args) -> int:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(args.device)
    report = {"environment": environment(torch), "warmup": args.warmup, "repeat": args.repeat, "models": []}
    print(json.dumps(report["environment"]), flush=True)
    frames = np.load(args.frames)
    failed = []
    for model in args.models:
        start = time.perf_counter()
        try:
            report["models"].append(check_model(torch, model, frames, args.clips, device, args.warmup, args.repeat))
        except Exception as exc:  # noqa: BLE001 - one model's failure is recorded; the others still run
            failed.append(model)
            report["models"].append({"model": model, "error": f"{type(exc).__name__}: {exc}"})
        print(f"{model}: {time.perf_counter() - start:.1f} s", flush=True)
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    print(summary([r for r in report["models"] if "error" not in r]))
    for r in report["models"]:
        if "error" in r:
            print(f"{r['model']}: {r['error']}")
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", required=True)
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(MODELS))
    p.add_argument("--clips", nargs="+", default=list(CLIPS), choices=CLIPS)
    p.set_defaults(fn=prepare)
    p = sub.add_parser("run")
    p.add_argument("--frames", required=True)
    p.add_argument("--json", required=True)
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(MODELS))
    p.add_argument("--clips", nargs="+", default=list(CLIPS), choices=CLIPS)
    p.add_argument("--device", default="cuda")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=20)
    p.set_defaults(fn=run)
    p = sub.add_parser("timing")
    p.add_argument("--json", required=True)
    p.add_argument("--model", default="llava-ov-0.5b-random", choices=list(MODELS))
    p.add_argument("--frames", type=int, nargs="+", default=[8, 32])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=20)
    p.set_defaults(fn=timing)
    p = sub.add_parser("prefill")
    p.add_argument("--json", required=True)
    p.add_argument("--positions", type=int, nargs="+", required=True)
    p.add_argument("--llms", nargs="+", default=list(LLMS), choices=list(LLMS))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=10)
    p.set_defaults(fn=prefill)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
