"""Reducer time against the vision encoder it sits behind, measured side by side in one run.

The encoder is a SigLIP-so400m-sized tower as LLaVA-OneVision uses it (26 layers, no pooling head, sdpa
attention), built from its config with random weights and fed real frames of the first shared video; it is timed
on a few frames (one warm-up, best of `--encoder-repeats`) and reported per frame. The reducer is
`AOTReducer(AOTConfig(sinkhorn=S))` (32 frames × 729 tokens) for each Sinkhorn solver S ("fixed": 10 log-domain
iterations; "reference": the authors' stopping unrolled to 100 plain-domain iterations) on that video's features
at each LLM width H, best of 3 under `torch.inference_mode`, whole and split into its intra-frame stages (select,
intra-frame transport, pooling) and its inter-frame stage (stages timed separately; their sum next to the whole
shows how noisy a run was).

Encoder and reducers are measured alternately for `--rounds` rounds; each round's ratios are printed, and the
summary takes every quantity's fastest time over all rounds (the least-disturbed estimate on a shared machine).
The ratio is reducer time / (32 × encoder time per frame). Thread count is torch's default.

    python bench/overhead.py
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
from pathlib import Path

import numpy as np
import torch

from aot_export import AOTConfig, AOTReducer
from aot_export.reducer import inter_frame_transport, intra_frame_transport, mask_indices, pool_retained
from aot_export.video import decode_frames

sys.path.insert(0, str(Path(__file__).parent))
from common import best_time, shared_videos, video_inputs  # noqa: E402

WIDTHS = (896, 3584)          # Qwen2-0.5B and Qwen2-7B: LLaVA-OneVision-0.5B / -7B
SOLVERS = ("fixed", "reference")
IMAGE_SIZE = 384
GOAL = 0.003                  # the issue's target: reducer <= 0.3 % of 32 frames' encoder time
STAGES = ("total", "select", "intra_transport", "pooling", "intra", "inter_transport", "stages")


def siglip_tower() -> torch.nn.Module:
    """SigLIP-so400m/14 at 384 px with LLaVA-OneVision's 26 layers (SigLIP's last of 27 dropped), random weights."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                                num_attention_heads=16, image_size=IMAGE_SIZE, patch_size=14,
                                vision_use_head=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    tower = SiglipVisionModel(config).eval()
    assert tower.config._attn_implementation == "sdpa", tower.config._attn_implementation
    return tower


def pixel_values(video: Path, frames: int) -> torch.Tensor:
    """[frames, 3, 384, 384] in [-1, 1] (SigLIP's mean = std = 0.5) from real frames of `video`."""
    rgb = decode_frames(video, frames, size=IMAGE_SIZE).astype(np.float32)
    return torch.from_numpy(rgb).permute(0, 3, 1, 2) / 127.5 - 1.0


@torch.inference_mode()
def encoder_seconds_per_frame(tower: torch.nn.Module, pixels: torch.Tensor, repeats: int) -> float:
    return best_time(lambda: tower(pixel_values=pixels).last_hidden_state, repeats=repeats) / pixels.shape[0]


@torch.inference_mode()
def reducer_seconds(cfg: AOTConfig, inputs: tuple[torch.Tensor, ...]) -> dict[str, float]:
    """Best-of-3 seconds of the whole reducer and of its stages, each stage fed the previous stage's output."""
    reducer = AOTReducer(cfg)
    features, shallow, deep = inputs
    hidden = features.shape[-1]
    times = {"total": best_time(lambda: reducer(features, shallow, deep))}

    def select():
        anchor_mask, cells = reducer.select(shallow, deep)
        return mask_indices(anchor_mask, cfg.anchors), cells

    anchor_idx, cells = select()
    transport = intra_frame_transport(cfg, features, anchor_idx, reducer.positions, reducer.sinkhorn)
    pool_rows = reducer.pooling[cells]

    def pool():
        return pool_retained(features, transport, pool_rows)

    clip_tokens = pool().reshape(cfg.clips, cfg.clip_len, cfg.pooled_anchors, hidden)
    times["select"] = best_time(select)
    times["intra_transport"] = best_time(
        lambda: intra_frame_transport(cfg, features, anchor_idx, reducer.positions, reducer.sinkhorn))
    times["pooling"] = best_time(pool)
    times["inter_transport"] = best_time(lambda: inter_frame_transport(cfg, clip_tokens, reducer.sinkhorn))
    times["intra"] = times["select"] + times["intra_transport"] + times["pooling"]
    times["stages"] = times["intra"] + times["inter_transport"]
    return times


def ratios(times: dict[str, float], encoder_total: float) -> dict[str, float]:
    return {"ratio": times["total"] / encoder_total, "ratio_intra": times["intra"] / encoder_total,
            "ratio_inter": times["inter_transport"] / encoder_total}


def print_table(results: dict[int, dict[str, float]], encoder_total: float) -> None:
    width = {c: max(9, len(c) + 3) for c in STAGES}
    print(f"{'H':>5} " + " ".join(f"{c + ' ms':>{width[c]}}" for c in STAGES)
          + f" {'ratio total':>12} {'ratio intra':>12} {'ratio inter':>12} {'goal <=0.3%':>12}")
    for hidden, t in results.items():
        r = ratios(t, encoder_total)
        print(f"{hidden:>5} " + " ".join(f"{1e3 * t[c]:>{width[c]}.1f}" for c in STAGES)
              + " " + " ".join(f"{100 * r[k]:>11.3f}%" for k in ("ratio", "ratio_intra", "ratio_inter"))
              + f" {'met' if r['ratio'] <= GOAL else 'NOT met':>12}")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # Linux: kilobytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder-frames", type=int, default=2)
    parser.add_argument("--encoder-repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    cfg = AOTConfig()
    solver_cfgs = {solver: dataclasses.replace(cfg, sinkhorn=solver) for solver in SOLVERS}
    video = shared_videos()[0]
    print(f"video {video.name}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"AOTConfig(): {cfg.frames} frames x {cfg.tokens_per_frame} tokens, V={cfg.anchors}, "
          f"A={cfg.pooled_anchors}, K={cfg.keep}, fixed: sinkhorn_iters={cfg.sinkhorn_iters}, reference: "
          f"sinkhorn_max_iters={cfg.sinkhorn_max_iters} tol={cfg.sinkhorn_tol}, {cfg.output_tokens} output tokens")
    tower = siglip_tower()
    parameters = sum(p.numel() for p in tower.parameters())
    pixels = pixel_values(video, args.encoder_frames)
    inputs = {h: video_inputs(video, cfg.frames, hidden=h, grid=cfg.grid) for h in WIDTHS}

    encoder_runs = []
    reducer_runs: dict[str, list] = {solver: [] for solver in SOLVERS}
    for round_ in range(1, args.rounds + 1):
        per_frame = encoder_seconds_per_frame(tower, pixels, args.encoder_repeats)
        encoder_runs.append(per_frame)
        for solver, scfg in solver_cfgs.items():
            results = {h: reducer_seconds(scfg, inputs[h]) for h in WIDTHS}
            reducer_runs[solver].append(results)
            print(f"round {round_}: encoder {per_frame:.3f} s/frame; {solver}: "
                  + "; ".join(f"H={h}: reducer {1e3 * t['total']:.1f} ms (stages {1e3 * t['stages']:.1f} ms), "
                              f"ratio {100 * t['total'] / (cfg.frames * per_frame):.3f}%" for h, t in results.items()),
                  flush=True)

    per_frame = min(encoder_runs)
    encoder_total = cfg.frames * per_frame
    best = {solver: {h: {k: min(run[h][k] for run in runs) for k in STAGES if k not in ("intra", "stages")}
                     for h in WIDTHS} for solver, runs in reducer_runs.items()}
    for per_width in best.values():
        for t in per_width.values():
            t["intra"] = t["select"] + t["intra_transport"] + t["pooling"]
            t["stages"] = t["intra"] + t["inter_transport"]
    print(f"encoder: SigLIP-so400m-sized tower ({parameters / 1e6:.1f} M parameters, 26 layers, sdpa), "
          f"batch of {args.encoder_frames} frames, best of {args.encoder_repeats} x {args.rounds} rounds: "
          f"{per_frame:.3f} s/frame, x{cfg.frames} frames = {encoder_total:.1f} s")
    for solver in SOLVERS:
        print(f"reducer with sinkhorn={solver!r}, fastest of {args.rounds} rounds x best of 3:")
        print_table(best[solver], encoder_total)
    rss = peak_rss_mib()
    print(f"peak RSS {rss:.0f} MiB")
    print(json.dumps({
        "video": video.name, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "encoder_frames": args.encoder_frames, "rounds": args.rounds, "encoder_s_per_frame": per_frame,
        "encoder_s_32_frames": encoder_total, "encoder_s_per_frame_rounds": encoder_runs,
        "reducer": {solver: {str(h): {**{f"{k}_s": v for k, v in t.items()}, **ratios(t, encoder_total)}
                             for h, t in per_width.items()} for solver, per_width in best.items()},
        "reducer_total_s_rounds": {solver: {str(h): [run[h]["total"] for run in runs] for h in WIDTHS}
                                   for solver, runs in reducer_runs.items()},
        "goal_ratio": GOAL, "peak_rss_mib": rss,
    }))


if __name__ == "__main__":
    main()
