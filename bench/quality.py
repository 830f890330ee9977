"""Reduction quality without labels: AOT against baselines and its own ablations at equal token budgets.

For each shared video (32 frames) and retention r in 10 / 15 / 25 % (`AOTConfig.from_retention(32, r)`; every
method returns exactly that config's `output_tokens`), every method of bench/baselines.py reduces the same encoder
outputs (`adapter.encode`), and two label-free figures compare the reduced tokens with the full set the LLM would
see without reduction (every frame pooled as the VLM pools it, T·P tokens):

1. `readout_err`: the relative L2 error of the LLM's first decoder layer at the text positions after the video.
   The sequence is the model's chat prompt around one video, as `runtime.prompt` assembles it (the adapter's
   tokenizer and chat template: the user turn, the visual tokens, LLaVA-OneVision's newline token, the question
   and the assistant header); layer 0 of the LLM (`adapter.decoder()[0].layers[0]`, with its rotary position
   embeddings and the causal mask) is run for the text after the video, attending over everything before it. The
   figure is ‖Δ_reduced − Δ_full‖ / ‖Δ_full‖ over those positions of three fixed questions, where Δ is the layer's
   update (output − input): the residual input is identical in both runs and would only dilute the error. Visual
   tokens take consecutive positions in the order each method emits them (as deployed), so the text sits closer
   to the visual tokens after reduction; that shift is part of what a deployment changes. Without a tokenizer the
   text is fixed seeded token ids. The row `no_visual` (no visual tokens at all) gives the scale: the error of
   ignoring the video. The layer is computed from its own modules for the text positions only (keys and values
   for all positions); tests/test_baselines.py checks it against Hugging Face's full forward.
2. `W_mass`: the mass-weighted transport distance from the full token set to the reduced one. Each full token
   carries mass 1/(T·P); each reduced token carries the mass it represents, and since which full tokens a reduced
   token stands for is not defined alike for selection, pooling and merging methods, that mass is chosen
   optimally: the transport cost min_ν OT(μ_full, ν on the reduced tokens) with cost 1 − cos. Its solution sends
   every full token to its most similar reduced token (ν = the reduced tokens' Voronoi masses), so it is exact and
   cheap: W_mass = mean over full tokens of (1 − max cos to a reduced token). 0 means every full token has an
   identical representative; it does not reward or punish duplicates (a token set as the LLM weighs it, one vote
   per token, is what the readout measures). An entropic (Sinkhorn) plan with these marginals converges to it as
   ε → 0 (checked in tests/test_baselines.py).

Caveats, printed with the table: with the built-in tiny model the tower, projector and LLM weights are random, so
the anchors follow a random tower's attention and the readout a random layer; the figures then say how well each
method preserves random features of real footage, not what a trained model would answer. Pass `--model` a
LLaVA-OneVision checkpoint directory for trained weights (the study runs unchanged). Neither figure is task
accuracy: a first-layer readout sees only how visual tokens enter the first attention, and W_mass only the
geometry of the token set; the paper's benchmark scores (AOT_SPEC §6) need the full model and labelled data.

    python bench/quality.py [--model tiny-llava-ov|DIR] [--videos PATH ...] [--retentions 0.1 0.15 0.25]
                            [--methods aot visionzip ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import baselines as B  # noqa: E402
from common import shared_videos  # noqa: E402

from aot_export import AOTConfig  # noqa: E402
from aot_export.adapters import BUILTIN_MODELS, ModelAdapter, load_model  # noqa: E402
from aot_export.report import format_table  # noqa: E402
from aot_export.preprocess import preprocess_frames  # noqa: E402
from aot_export.video import decode_frames  # noqa: E402

FRAMES = 32
RETENTIONS = (0.10, 0.15, 0.25)
QUESTIONS = (
    "What is happening in this video? Describe the main events in order.",
    "How many people or animals appear, and what are they doing?",
    "What changes between the beginning and the end of the video?",
)
SEEDED_PREFIX, SEEDED_QUESTION = 12, 16          # token counts when the model has no tokenizer


# ---- metric 1: first decoder layer readout --------------------------------------------------------------------
@dataclass
class Readout:
    """Layer 0 of the LLM at the text positions after the video in `prefix + visual + newline + suffix`, for each
    prompt (prefix, suffix): the chat template around one video, as `runtime.prompt` assembles it."""

    language_model: torch.nn.Module
    prompts: list[tuple[Tensor, Tensor]]        # (prefix [p, H], suffix [q, H]) embeddings per question
    newline: Tensor | None = None               # [H]: LLaVA-OneVision's token after the video's visual tokens
    text: str = ""                              # how the prompts were made

    def _sequence(self, visual: Tensor, prefix: Tensor, suffix: Tensor) -> Tensor:
        video = [visual.to(prefix.dtype)] + ([self.newline.to(prefix.dtype).unsqueeze(0)] if self.newline is not None
                                             else [])
        return torch.cat([prefix, *video, suffix]).unsqueeze(0)                              # [1, S, H]

    def _attention_inputs(self, x: Tensor, q_len: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """q [1, heads, q, d] of the last `q_len` positions, k and v [1, heads, S, d] of all, with rotary position
        embeddings and grouped-query heads expanded; and the causal mask [q, S]."""
        from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb, repeat_kv

        lm = self.language_model
        layer = lm.layers[0]
        attention = layer.self_attn
        length = x.shape[1]
        cos, sin = lm.rotary_emb(x, torch.arange(length).unsqueeze(0))
        h = layer.input_layernorm(x)

        def heads(projection, rows):
            return projection(rows).view(1, rows.shape[1], -1, attention.head_dim).transpose(1, 2)

        q = heads(attention.q_proj, h[:, -q_len:])
        k, v = heads(attention.k_proj, h), heads(attention.v_proj, h)
        q, _ = apply_rotary_pos_emb(q, q, cos[:, -q_len:], sin[:, -q_len:])
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
        groups = q.shape[1] // k.shape[1]
        causal = torch.arange(length).unsqueeze(0) <= torch.arange(length - q_len, length).unsqueeze(1)
        return q, repeat_kv(k, groups), repeat_kv(v, groups), causal

    @torch.no_grad()
    def update(self, visual: Tensor, prefix: Tensor, suffix: Tensor) -> Tensor:
        """[q, H]: layer output − layer input at the suffix positions."""
        layer = self.language_model.layers[0]
        attention = layer.self_attn
        x = self._sequence(visual, prefix, suffix)
        q_len = suffix.shape[0]
        q, k, v, causal = self._attention_inputs(x, q_len)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal, scale=attention.scaling)
        out = attention.o_proj(out.transpose(1, 2).reshape(1, q_len, -1))
        y = x[:, -q_len:] + out
        y = y + layer.mlp(layer.post_attention_layernorm(y))
        return (y - x[:, -q_len:])[0]

    @torch.no_grad()
    def attention_entropy(self, visual: Tensor) -> float:
        """Entropy of layer 0's attention at the suffix positions over the positions each attends, divided by its
        maximum (log of that count), averaged over heads, positions and prompts: 1.0 is uniform attention."""
        scaling = self.language_model.layers[0].self_attn.scaling
        values = []
        for prefix, suffix in self.prompts:
            q, k, _, causal = self._attention_inputs(self._sequence(visual, prefix, suffix), suffix.shape[0])
            logits = ((q @ k.transpose(-1, -2)) * scaling).double().masked_fill(~causal, float("-inf"))
            weights = torch.softmax(logits, dim=-1)
            entropy = -(weights * weights.clamp_min(1e-300).log()).sum(-1)                  # [1, heads, q]
            values.append((entropy / causal.sum(-1).double().log()).flatten())
        return float(torch.cat(values).mean())

    def __call__(self, visual: Tensor) -> Tensor:
        """[Σq, H]: the updates for every prompt, stacked."""
        return torch.cat([self.update(visual, prefix, suffix) for prefix, suffix in self.prompts])


def prompt_embeddings(adapter: ModelAdapter, seed: int = 0) -> tuple[list[tuple[Tensor, Tensor]], str]:
    """(prefix, suffix) embeddings around the video for each question, and how they were made: the adapter's
    tokenizer and chat template (`runtime.prompt.chat_ids`, as the runtime prompts the model), else fixed seeded
    token ids (not the video placeholder)."""
    def embed(ids: Tensor) -> Tensor:
        return adapter.embed_tokens(ids.unsqueeze(0))[0]

    with torch.no_grad():
        tokenizer = adapter.tokenizer
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            from runtime.prompt import chat_ids

            prompts = []
            for question in QUESTIONS:
                ids = chat_ids(adapter, question)
                at = ids.index(adapter.video_token_id)
                prompts.append((embed(torch.tensor(ids[:at])).float(), embed(torch.tensor(ids[at + 1:])).float()))
            return prompts, "chat template"
        _, lm_head = adapter.decoder()
        vocabulary = lm_head(torch.zeros(1, adapter.info.hidden)).shape[-1]
        allowed = torch.tensor([i for i in range(vocabulary) if i != adapter.video_token_id])
        g = torch.Generator().manual_seed(seed)
        pick = lambda n: allowed[torch.randint(len(allowed), (n,), generator=g)]  # noqa: E731
        return [(embed(pick(SEEDED_PREFIX)).float(), embed(pick(SEEDED_QUESTION)).float())
                for _ in QUESTIONS], "seeded token ids"


def layer_readout(adapter: ModelAdapter, seed: int = 0) -> Readout:
    prompts, text = prompt_embeddings(adapter, seed)
    language_model, _ = adapter.decoder()
    return Readout(language_model.eval(), prompts, adapter.image_newline.detach().float(), text)


def relative_error(actual: Tensor, reference: Tensor) -> float:
    return float((actual.double() - reference.double()).norm() / reference.double().norm().clamp_min(1e-30))


# ---- metric 2: mass-weighted transport distance ------------------------------------------------------------------
def transport_cost(full: Tensor, reduced: Tensor) -> Tensor:
    """[M, n] 1 − cos between every full and every reduced token."""
    return 1.0 - F.normalize(full.double(), dim=-1) @ F.normalize(reduced.double(), dim=-1).T


def mass_weighted_distance(full: Tensor, reduced: Tensor, chunk: int = 4096) -> float:
    """min over the reduced tokens' masses ν of OT(uniform on `full`, ν) with cost 1 − cos: each full token goes to
    its most similar reduced token (the module docstring says why this is the figure)."""
    reduced_unit = F.normalize(reduced.double(), dim=-1)
    best = torch.cat([(F.normalize(part.double(), dim=-1) @ reduced_unit.T).amax(-1) for part in full.split(chunk)])
    return float((1.0 - best).mean())


def voronoi_mass(full: Tensor, reduced: Tensor) -> Tensor:
    """[n] the share of the full tokens whose most similar reduced token each reduced token is."""
    nearest = transport_cost(full, reduced).argmin(-1)
    return torch.bincount(nearest, minlength=reduced.shape[0]).double() / full.shape[0]


# ---- the study --------------------------------------------------------------------------------------------------
def encode_video(adapter: ModelAdapter, video: Path, frames: int) -> tuple[Tensor, Tensor, Tensor]:
    cfg = AOTConfig(frames=frames, grid=adapter.info.grid)
    pixels = torch.from_numpy(preprocess_frames(decode_frames(video, frames), adapter.preprocessing))
    features, shallow, deep = adapter.encode(cfg, pixels)
    return features.float().clone(), shallow.float().clone(), deep.float().clone()


def configs(adapter: ModelAdapter, frames: int, retentions: tuple[float, ...]) -> dict[float, AOTConfig]:
    return {r: AOTConfig.from_retention(frames, r, grid=adapter.info.grid) for r in retentions}


@torch.no_grad()
def study(adapter: ModelAdapter, videos: list[Path], retentions: tuple[float, ...] = RETENTIONS,
          methods: dict[str, B.Method] | None = None, frames: int = FRAMES, seed: int = 0,
          log=print) -> list[dict]:
    """One row per (video, retention, method): token counts, readout_err, W_mass, seconds."""
    methods = methods or B.METHODS
    readout = layer_readout(adapter, seed)
    log(f"readout: layer 0 at {sum(s.shape[0] for _, s in readout.prompts)} text positions of {len(readout.prompts)} "
        f"prompts ({readout.text})")
    rows = []
    for video in videos:
        start = time.perf_counter()
        features, shallow, deep = encode_video(adapter, video, frames)
        log(f"{video.name}: encoded {frames} frames in {time.perf_counter() - start:.1f} s")
        cfgs = configs(adapter, frames, retentions)
        full = B.full_tokens(next(iter(cfgs.values())), features)
        full_update = readout(full)
        rows.append({"video": video.name, "retention": 1.0, "method": "full", "tokens": int(full.shape[0]),
                     "readout_err": 0.0, "W_mass": 0.0, "seconds": 0.0,
                     "attention_entropy": readout.attention_entropy(full)})
        rows.append({"video": video.name, "retention": 0.0, "method": "no_visual", "tokens": 0,
                     "readout_err": relative_error(readout(full[:0]), full_update), "W_mass": float("nan"),
                     "seconds": 0.0})
        for retention, cfg in cfgs.items():
            for name, method in methods.items():
                start = time.perf_counter()
                tokens = method(cfg, features, shallow, deep)
                seconds = time.perf_counter() - start
                if tokens.shape[0] != cfg.output_tokens:
                    raise AssertionError(f"{name} returned {tokens.shape[0]} tokens, budget {cfg.output_tokens}")
                rows.append({"video": video.name, "retention": retention, "method": name,
                             "tokens": int(tokens.shape[0]), "input_tokens": cfg.input_tokens,
                             "readout_err": relative_error(readout(tokens), full_update),
                             "W_mass": mass_weighted_distance(full, tokens), "seconds": seconds})
            log(f"{video.name}: r={retention:.2f} ({cfg.output_tokens} tokens) done")
    return rows


def tables(rows: list[dict], videos: list[str]) -> str:
    """Per retention: methods × (readout_err, W_mass per video, and their mean over videos)."""
    out = []
    reference = ("full", "no_visual")
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] not in reference))
    for retention in sorted({r["retention"] for r in rows if r["method"] not in reference}):
        at = {(r["method"], r["video"]): r for r in rows if r["retention"] == retention}
        budget = next(r["tokens"] for r in rows if r["retention"] == retention)
        full = next(r["input_tokens"] for r in rows if r["retention"] == retention)
        lines = []
        for method in methods:
            cells = [at[(method, v)] for v in videos]
            lines.append([method]
                         + [f"{c['readout_err']:.4f}" for c in cells]
                         + [f"{sum(c['readout_err'] for c in cells) / len(cells):.4f}"]
                         + [f"{c['W_mass']:.4f}" for c in cells]
                         + [f"{sum(c['W_mass'] for c in cells) / len(cells):.4f}"])
        lines.sort(key=lambda line: float(line[len(videos) + 1]))
        headers = (["method"] + [f"readout {Path(v).stem}" for v in videos] + ["readout mean"]
                   + [f"W_mass {Path(v).stem}" for v in videos] + ["W_mass mean"])
        out.append(f"retention {retention:.0%}: {budget} of {full} tokens (sorted by mean readout error)\n"
                   + format_table(lines, headers))
    scale = [r for r in rows if r["method"] == "no_visual"]
    out.append("scale: readout error with no visual tokens at all: "
               + ", ".join(f"{Path(r['video']).stem} {r['readout_err']:.4f}" for r in scale))
    entropy = [r for r in rows if r["method"] == "full"]
    out.append("layer-0 attention at the text positions after the video, entropy / max entropy "
               "(1 = uniform): " + ", ".join(f"{Path(r['video']).stem} {r['attention_entropy']:.5f}" for r in entropy))
    return "\n\n".join(out)


def caveats(adapter: ModelAdapter, rows: list[dict] | None = None) -> str:
    random = adapter.info.model_id in BUILTIN_MODELS
    lines = ["Caveats:"]
    entropies = [r["attention_entropy"] for r in rows or () if r["method"] == "full"]
    uniform = bool(entropies) and min(entropies) > 0.999
    if random:
        lines.append(f"- {adapter.info.model_id} has RANDOM weights (seeded): anchors follow a random tower's "
                     "attention and the readout is a random LLM layer. These figures say how well each method "
                     "preserves random features of real footage, not what a trained model would answer. Pass "
                     "--model DIR (a LLaVA-OneVision checkpoint) for trained weights.")
    else:
        lines.append(f"- trained weights from {adapter.info.model_id}.")
    if uniform:
        lines.append(f"- the first layer's attention is uniform here (entropy ratio >= {min(entropies):.5f}): the "
                     "readout is then the mean of the value vectors, so readout_err measures how well a method keeps "
                     "the MEAN of the visual tokens (plus the visual share of the sequence, equal at equal budgets). "
                     "Unbiased samplers (random, uniform pooling) win that by construction; score-driven selection "
                     "(AOT's anchors, VisionZip, top-k) is biased towards the tokens the scores favour and loses.")
    lines += [
        "- readout_err is one decoder layer (the first) at the text positions after the video: it measures how the visual "
        "tokens enter the first attention, not what later layers or the answer do.",
        "- W_mass is geometry only (cosine transport from the full token set to its best-weighted reduced set); it "
        "ignores the LLM and does not punish duplicated tokens.",
        "- Neither is task accuracy (AOT_SPEC §6 needs the full model and labelled benchmarks); use them to rank "
        "methods and ablations on the same inputs, and to catch regressions.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llava-ov", help="built-in model or LLaVA-OneVision checkpoint dir")
    parser.add_argument("--videos", nargs="*", default=None, help="videos (default ../shared/data/videos)")
    parser.add_argument("--retentions", nargs="*", type=float, default=list(RETENTIONS))
    parser.add_argument("--methods", nargs="*", default=None, choices=list(B.METHODS), help="default: all")
    parser.add_argument("--frames", type=int, default=FRAMES)
    parser.add_argument("--seed", type=int, default=0, help="seed of the text token ids without a tokenizer")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    videos = [Path(v) for v in args.videos] if args.videos else shared_videos()
    methods = {name: B.METHODS[name] for name in args.methods} if args.methods else B.METHODS
    start = time.perf_counter()
    adapter = load_model(args.model)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    rows = study(adapter, videos, tuple(args.retentions), methods, args.frames, args.seed, log)
    print(f"model {adapter.info.model_id}, {args.frames} frames, {len(videos)} videos, "
          f"{time.perf_counter() - start:.0f} s\n")
    print(tables(rows, [v.name for v in videos]))
    print()
    print(caveats(adapter, rows))
    payload = {"model": adapter.info.model_id, "random_weights": adapter.info.model_id in BUILTIN_MODELS,
               "frames": args.frames, "rows": rows}
    payload["rows"] = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
                       for row in rows]
    print(json.dumps(payload))
    if args.json:
        from aot_export.report import write_json

        write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
