"""`aot-export bench`: ratios measured side by side in one run, each measurement in its own process so that its
peak memory is its own.

- reduction / encoder: `AOTReducer` on 32 frames against a SigLIP-so400m-sized tower (random weights) timed on a
  few frames and scaled to 32, intra-frame and inter-frame stages apart;
- exported graph on ONNX Runtime / the same module in PyTorch eager, same frames (the tiny model by default);
- LLM prefill (time to first token) of a Qwen2-0.5B-sized decoder (random weights) with AOT at several retentions
  against all visual tokens, next to the theoretical 1 / retention.
"""

from __future__ import annotations

import multiprocessing as mp
import queue as queues
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from aot_export.config import AOTConfig
from aot_export.errors import InputError
from aot_export.report import format_table, peak_rss_mib

RETENTIONS = (0.10, 0.15, 0.20, 0.25)
TEXT_TOKENS = 24          # a short question in the chat template


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


# ---- measurements, each run in a child process -----------------------------------------------------------------
@torch.inference_mode()
def reduction_vs_encoder(hidden: int, encoder_frames: int, repeats: int) -> dict[str, float]:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from aot_export import AOTConfig, AOTReducer
    from aot_export.reducer import inter_frame_transport, intra_frame_transport, mask_indices, pool_retained

    cfg = AOTConfig()
    g = torch.Generator().manual_seed(0)
    vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                                num_attention_heads=16, image_size=384, patch_size=14, vision_use_head=False)
    vision._attn_implementation = "sdpa"
    tower = SiglipVisionModel(vision).eval()
    pixels = torch.randn(encoder_frames, 3, 384, 384, generator=g)
    encoder = best_of(lambda: tower(pixels), repeats) / encoder_frames * cfg.frames
    del tower
    features = torch.randn(cfg.frames, cfg.tokens_per_frame, hidden, generator=g)
    shallow, deep = torch.rand(cfg.frames, cfg.tokens_per_frame, generator=g), torch.rand(cfg.frames,
                                                                                           cfg.tokens_per_frame,
                                                                                           generator=g)
    reducer = AOTReducer(cfg)
    total = best_of(lambda: reducer(features, shallow, deep), repeats)

    def intra():
        mask, cells = reducer.select(shallow, deep)
        transport = intra_frame_transport(cfg, features, mask_indices(mask, cfg.anchors), reducer.positions)
        return pool_retained(features, transport, reducer.pooling[cells])

    retained = intra().reshape(cfg.clips, cfg.clip_len, cfg.pooled_anchors, hidden)
    intra_s = best_of(intra, repeats)
    inter_s = best_of(lambda: inter_frame_transport(cfg, retained), repeats)
    return {"hidden": hidden, "encoder_32_frames_s": encoder, "reducer_s": total, "intra_s": intra_s,
            "inter_s": inter_s, "ratio": total / encoder, "ratio_intra": intra_s / encoder,
            "ratio_inter": inter_s / encoder}


@torch.inference_mode()
def model_config(adapter, frames: int, retention: float | None = None) -> AOTConfig:
    """`frames` video frames on the model's grid: the reference budgets where they fit it (LLaVA-OneVision), else 25 %
    retention (the small merged grids of the tiny Qwen2.5-VL / Cosmos3-Edge built-ins), or `retention`."""
    from aot_export.export import solve_config

    fields = adapter.aot_fields()
    reference = AOTConfig(frames=adapter.aot_frames(frames))
    if retention is None and fields != {name: getattr(reference, name) for name in fields}:
        retention = 0.25        # not export's default budget for these grids: the figures in docs/benchmarks.md
    return solve_config(adapter.aot_frames(frames), retention, None, None, None, **fields)


def onnxruntime_vs_eager(frames: int, repeats: int, model: str = "tiny-llava-ov") -> dict[str, float]:
    import tempfile

    from aot_export.adapters import load_model
    from aot_export.export import export_vision_aot
    from aot_export.runners import OnnxRuntimeRunner

    adapter = load_model(model)
    cfg = model_config(adapter, frames)
    pixels = adapter.example_frames(frames, seed=1)
    module = adapter.vision_aot(cfg)
    with tempfile.TemporaryDirectory() as work:
        result = export_vision_aot(adapter, cfg, f"{work}/x", progress=False)
        with OnnxRuntimeRunner.from_export(result.directory, "cpu", result.manifest) as runner:
            ort_s = best_of(lambda: runner.run(pixels.numpy()), repeats)
            settings = runner.settings
    eager_s = best_of(lambda: module(pixels), repeats)
    return {"model": model, "frames": frames, "onnxruntime_s": ort_s, "eager_s": eager_s,
            "ratio": ort_s / eager_s, "onnxruntime_settings": settings}


@torch.inference_mode()
def prefill(visual_tokens: int) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                         tie_word_embeddings=True)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    embeds = torch.randn(1, visual_tokens + TEXT_TOKENS, config.hidden_size) * 0.02
    start = time.perf_counter()
    out = model.model(inputs_embeds=embeds, use_cache=True)
    model.lm_head(out.last_hidden_state[:, -1])
    return {"sequence": visual_tokens + TEXT_TOKENS, "prefill_s": time.perf_counter() - start}


class WorkerFailed(RuntimeError):
    """A measurement's process raised or died; the message is its error in one line."""


def _child(queue: mp.Queue, fn: Callable[..., dict], args: tuple) -> None:
    try:
        result = fn(*args)
    except BaseException as exc:  # noqa: BLE001 - handed to the parent, which reports it
        queue.put({"error": f"{exc.__class__.__name__}: {' '.join(str(exc).split())}",
                   "traceback": traceback.format_exc()})
        return
    result["peak_rss_mib"] = peak_rss_mib()
    queue.put(result)


def isolated(fn: Callable[..., dict], *args: Any, poll_s: float = 0.5) -> dict:
    """`fn(*args)` in a fresh process; its result with that process's peak RSS. A process that raises or dies
    (killed, out of memory) ends the wait with `WorkerFailed` instead of leaving the parent on an empty queue."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, fn, args))
    process.start()
    call = f"{fn.__name__}{args}"
    try:
        while True:
            try:
                result = queue.get(timeout=poll_s)
                break
            except queues.Empty:
                if not process.is_alive():
                    # it may have put its result just before exiting
                    try:
                        result = queue.get(timeout=poll_s)
                        break
                    except queues.Empty:
                        raise WorkerFailed(f"bench worker {call} died with exit code {process.exitcode} "
                                           "(a negative code is the signal that killed it, -9 often out of memory)"
                                           ) from None
    finally:
        process.join(timeout=10)
        if process.is_alive():
            process.kill()
            process.join()
    if "error" in result:
        raise WorkerFailed(f"bench worker {call} failed: {result['error']}")
    return result


def check_bench_arguments(widths: tuple[int, ...], encoder_frames: int, repeats: int, graph_frames: int,
                          retentions: tuple[float, ...], frames: int) -> None:
    """Every argument checked before the first measurement (each takes minutes)."""
    from aot_export import AOTConfig

    for name, values, low in (("--widths", widths, 1), ("--encoder-frames", (encoder_frames,), 1),
                              ("--repeats", (repeats,), 1), ("--graph-frames", (graph_frames,), 0),
                              ("--frames", (frames,), 1)):
        bad = [v for v in values if int(v) != v or v < low]
        if bad:
            raise InputError(f"{name} {bad[0]} is out of range; give whole numbers of {low} or more")
    if graph_frames:
        AOTConfig(frames=graph_frames, clip_len=4 if graph_frames % 4 == 0 else 1)
    for retention in retentions:
        if not 0 < retention <= 1:
            raise InputError(f"--retentions {retention} is not a share in (0, 1]; e.g. 0.15 keeps 15 % of the tokens")
        try:
            AOTConfig.from_retention(frames, retention)
        except ValueError as exc:
            raise InputError(f"--retentions {retention} with --frames {frames}: {exc}") from exc


@dataclass
class BenchReport:
    reduction: list[dict] = field(default_factory=list)
    graph: dict = field(default_factory=dict)
    prefill: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"reduction_vs_encoder": self.reduction, "onnxruntime_vs_eager": self.graph,
                "prefill": self.prefill}

    def table(self) -> str:

        parts = [format_table([(r["hidden"], f"{r['reducer_s'] * 1e3:.0f}", f"{r['encoder_32_frames_s']:.1f}",
                                f"{r['ratio']:.3%}", f"{r['ratio_intra']:.3%}", f"{r['ratio_inter']:.4%}",
                                f"{r['peak_rss_mib']:.0f}") for r in self.reduction],
                              ("H", "AOT ms", "encoder s (32 fr)", "AOT / encoder", "intra", "inter",
                               "peak MiB"))]
        if self.graph:
            g = self.graph
            parts.append(format_table([(g["model"], g["frames"], f"{g['onnxruntime_s'] * 1e3:.0f}",
                                        f"{g['eager_s'] * 1e3:.0f}", f"{g['ratio']:.2f}",
                                        f"{g['peak_rss_mib']:.0f}")],
                                      ("graph", "frames", "ORT ms", "eager ms", "ORT / eager", "peak MiB")))
        if self.prefill:
            full = self.prefill[0]
            parts.append(format_table(
                [(p["label"], p["sequence"], f"{p['prefill_s']:.2f}", f"{p['prefill_s'] / full['prefill_s']:.3f}",
                  f"{p['theory']:.3f}", f"{p['peak_rss_mib']:.0f}") for p in self.prefill],
                ("LLM prefill", "tokens", "TTFT s", "with / without", "length ratio (theory)", "peak MiB")))
        return "\n\n".join(parts)


def run_bench(widths: tuple[int, ...] = (896, 3584), encoder_frames: int = 2, repeats: int = 2,
              graph_frames: int = 32, retentions: tuple[float, ...] = RETENTIONS,
              frames: int = 32, model: str = "tiny-llava-ov") -> BenchReport:
    """`model` picks the graph timed on ORT vs eager and the grid behind the prefill lengths (visual tokens with and
    without AOT); the reducer-vs-encoder leg and the prefill decoder are the fixed LLaVA-OneVision-sized ones."""
    from aot_export.adapters import load_model

    check_bench_arguments(widths, encoder_frames, repeats, graph_frames, retentions, frames)
    adapter = load_model(model)
    report = BenchReport()
    for hidden in widths:
        report.reduction.append(isolated(reduction_vs_encoder, hidden, encoder_frames, repeats))
    if graph_frames:
        report.graph = isolated(onnxruntime_vs_eager, graph_frames, repeats, model)
    if retentions:
        cells = model_config(adapter, frames).input_tokens
        full = isolated(prefill, cells + 1)
        report.prefill.append({**full, "label": "without AOT", "theory": 1.0})
        for retention in retentions:
            cfg = model_config(adapter, frames, retention)
            result = isolated(prefill, cfg.output_tokens + 1)
            report.prefill.append({**result, "label": f"AOT {retention:.0%} ({cfg.output_tokens} tokens)",
                                   "theory": (cfg.output_tokens + 1 + TEXT_TOKENS) / (cells + 1 + TEXT_TOKENS)})
    return report

