"""`aot-export visualize --model DIR --video PATH --out overlay.png`: a picture of what AOT keeps, per frame.

The sampled frames (resized to the model's input size, as the tower sees them) in a grid, one clip per row, with:
- local anchors (top shallow-score tokens of each window) and global anchors (top deep-score tokens of the rest)
  as dots on the 27×27 token grid, in two colours;
- the pooled cells each frame keeps: the keyframe's cells (emitted, and the anchors of the inter-frame stage) and,
  in non-key frames, the distinct cells kept as temporal dynamics;
- keyframes framed and labelled;
- a heat overlay (brightness): how much of each token reaches the LLM, relative to the unreduced model. For fixed
  transport plans the whole reduction is a linear map of the tokens, so every output token is a weighted sum of
  input tokens; a token's output weight is its coefficient summed over all output tokens, divided by the same sum
  for the unreduced output (every pooled cell once). About 1: emitted as without AOT (a kept distinct cell); above
  1: a keyframe cell, emitted and again inside its updated anchor; between: a cell merged into the keyframe's
  anchors (its merge weight), or a token on the edge of a kept cell; near 0 (dark): pruned, reaching the output
  only through the ~1 % the intra-frame transport moves into its anchors.
  The transport masses themselves are not drawn: the intra-frame plan has uniform marginals, so every pruned
  token sends 1/M and every anchor absorbs 1/V; only where the mass goes differs, and the weight map shows that.

What is drawn is `AOTReducer(cfg).trace` of `adapter.encode(cfg, frames)`: the reducer's own decisions, the
trace whose tokens and index the exported graph computes. The heat map's coefficients are derived from the trace's
recorded transport and merge weights (tests/test_visualize.py checks them against the reducer's output).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from aot_export.adapters import BUILTIN_MODELS, ModelAdapter, load_model
from aot_export.artifacts import atomic_file
from aot_export.config import AOTConfig
from aot_export.preprocess import preprocess_frames
from aot_export.progress import Stages
from aot_export.reducer import AOTReducer, ReductionTrace, Transport, pool_retained, pooling_matrix
from aot_export.video import decode_frames

# Category colours (RGB); the legend and the tests read them from here.
LOCAL_COLOUR = (0, 229, 255)          # cyan
GLOBAL_COLOUR = (255, 48, 230)        # magenta
DISTINCT_COLOUR = (255, 221, 0)       # yellow
KEY_COLOUR = (255, 64, 64)            # red
KEY_CELL_COLOUR = (255, 255, 255)     # white
BACKGROUND = (24, 24, 28)
TEXT = (235, 235, 235)
# Heat: a token's output weight w is shown as brightness HEAT_FLOOR + (1 - HEAT_FLOOR) · h, with h the position of
# w on a log scale from HEAT_RANGE[0] (and below) to HEAT_RANGE[1] (and above).
HEAT_FLOOR = 0.28
HEAT_RANGE = (1e-2, 1.0)
DOT_RADIUS = 4
MAX_WIDTH = 1600


# ---- the reduction's output weight ------------------------------------------------------------------------------
def cell_output_weight(trace: ReductionTrace) -> Tensor:
    """[T, A]: each kept cell's coefficient summed over the output tokens, from the trace's recorded merges.

    A keyframe cell is emitted once and is anchor m's starting value; a distinct cell is emitted once; a merged
    cell enters its anchors with its merge weights. Merge step s divides anchor m by d_s = 1 + λ·Σ_i w_s[i, m], so
    a contribution made at step s ends up divided by the product of d over steps s … L−1."""
    cfg = trace.cfg
    if trace.inter is None:
        return torch.ones(trace.cells.shape)
    weights = trace.inter.merge_weights                                                       # [C, L-1, S, A]
    divisor = 1.0 + cfg.lam * weights.sum(2)                                                  # [C, L-1, A]
    remaining = divisor.flip(1).cumprod(1).flip(1)                                            # Π over steps s…L−1
    keyframe = 1.0 + 1.0 / remaining[:, 0]                                                    # [C, A]
    later = trace.distinct.view(cfg.clips, cfg.clip_len, -1)[:, 1:].float() \
        + (cfg.lam * weights / remaining.unsqueeze(2)).sum(-1)                                # [C, L-1, A]
    return torch.cat([keyframe.unsqueeze(1), later], dim=1).reshape(trace.cells.shape)


def output_weight(trace: ReductionTrace) -> Tensor:
    """[T, N]: Σ_a cell_weight[t, a] · (coefficient of token i in kept cell a), through `pool_retained` itself —
    it is linear in the tokens, so its gradient for one scalar channel is exactly that sum — divided by the mean
    token's weight in the unreduced output (every pooled cell once: P / N). Not by each token's own weight: the
    bilinear 27->14 pooling gives some token rows 7 % of others' weight, and a pruned token's share comes from its
    anchor's pooling weight, not its own, so a per-token ratio would mostly draw the pooling's pattern."""
    pooling = pooling_matrix(trace.cfg)
    with torch.inference_mode(False), torch.enable_grad():          # also under a caller's inference_mode
        transport = Transport(*(t.detach().clone() for t in (trace.transport.anchor_idx,
                                                             trace.transport.self_weight, trace.transport.weights)))
        probe = torch.zeros(trace.cells.shape[0], pooling.shape[1], 1, requires_grad=True)
        retained = pool_retained(probe, transport, pooling[trace.cells.clone()])              # [T, A, 1]
        (retained[..., 0] * cell_output_weight(trace).clone()).sum().backward()
    return probe.grad[..., 0].detach() * (pooling.shape[1] / pooling.shape[0])


# ---- the picture ------------------------------------------------------------------------------------------------
def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:                                   # Pillow without FreeType sizes
        return ImageFont.load_default()


def heat_brightness(weight: np.ndarray) -> np.ndarray:
    """Token output weight → brightness factor in [HEAT_FLOOR, 1] (log scale over HEAT_RANGE)."""
    low, high = (math.log(v) for v in HEAT_RANGE)
    h = (np.log(np.maximum(weight, HEAT_RANGE[0] * 1e-3)) - low) / (high - low)
    return HEAT_FLOOR + (1.0 - HEAT_FLOOR) * np.clip(h, 0.0, 1.0)


@dataclass(frozen=True)
class Layout:
    """Where each shown frame's tile lies in the picture (top-left corners) and how big tiles are."""

    tile: int
    origins: dict[int, tuple[int, int]]        # frame → (x, y)
    width: int
    height: int

    def token_centre(self, frame: int, token: int, grid: int) -> tuple[float, float]:
        x0, y0 = self.origins[frame]
        step = self.tile / grid
        return x0 + (token % grid + 0.5) * step, y0 + (token // grid + 0.5) * step

    def cell_box(self, frame: int, cell: int, pooled_grid: int) -> tuple[float, float, float, float]:
        x0, y0 = self.origins[frame]
        step = self.tile / pooled_grid
        r, c = divmod(cell, pooled_grid)
        return x0 + c * step, y0 + r * step, x0 + (c + 1) * step, y0 + (r + 1) * step


def shown_frames(cfg: AOTConfig, frames_shown: int | None) -> list[list[int]]:
    """Rows of frames to draw: whole clips (keyframe first), evenly spread over the video; None: every frame."""
    per_row = cfg.clip_len if cfg.inter_frame else min(cfg.frames, 4)
    rows = [list(range(s, min(s + per_row, cfg.frames))) for s in range(0, cfg.frames, per_row)]
    if frames_shown is None or frames_shown >= cfg.frames:
        return rows
    if frames_shown < 1:
        raise ValueError(f"frames_shown={frames_shown}: must be >= 1 (or None for all)")
    wanted = max(1, math.ceil(frames_shown / per_row))
    picks = sorted({round(i * (len(rows) - 1) / max(wanted - 1, 1)) for i in range(wanted)})
    return [rows[i] for i in picks]


HEADER, ROW_LABEL, FOOTER, GAP = 96, 24, 74, 8


def layout_for(cfg: AOTConfig, rows: list[list[int]], tile: int) -> Layout:
    columns = max(len(r) for r in rows)
    width = GAP + columns * (tile + GAP)
    origins, y = {}, HEADER
    for row in rows:
        y += ROW_LABEL
        for col, frame in enumerate(row):
            origins[frame] = (GAP + col * (tile + GAP), y)
        y += tile + GAP
    return Layout(tile, origins, width, y + FOOTER)


def render_overlay(trace: ReductionTrace, frames_rgb: np.ndarray, title: list[str], frames_shown: int | None = 8,
                   tile: int | None = None) -> tuple[Image.Image, Layout]:
    """The picture (RGB) and where its tiles are. `frames_rgb` [T, S, S, 3] uint8, the frames the tower saw."""
    cfg = trace.cfg
    rows = shown_frames(cfg, frames_shown)
    columns = max(len(r) for r in rows)
    size = frames_rgb.shape[1]
    tile = tile or min(size, (MAX_WIDTH - GAP) // columns - GAP)
    layout = layout_for(cfg, rows, tile)
    image = Image.new("RGB", (layout.width, layout.height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    small, medium, large = _font(13), _font(15), _font(19)
    g, gp = cfg.grid, cfg.pooled_grid
    weight = output_weight(trace).numpy()
    keyframes, distinct_cells = trace.keyframes, trace.distinct
    local, global_ = trace.anchors

    for line, text in enumerate(title):
        draw.text((GAP + 2, 8 + line * 22), text, fill=TEXT if line else (255, 255, 255),
                  font=large if line == 0 else medium)

    for row in rows:
        x0, y0 = layout.origins[row[0]]
        clip = row[0] // cfg.clip_len
        label = (f"clip {clip}: frames {row[0]}-{row[-1]} (keyframe {row[0]})" if cfg.inter_frame
                 else f"frames {row[0]}-{row[-1]} (no inter-frame stage: clip_len 1)")
        draw.text((x0, y0 - ROW_LABEL + 4), label, fill=TEXT, font=medium)
        for frame in row:
            ox, oy = layout.origins[frame]
            picture = frames_rgb[frame] if frames_rgb.shape[1] == tile else np.asarray(
                Image.fromarray(frames_rgb[frame]).resize((tile, tile), Image.Resampling.BILINEAR))
            heat = heat_brightness(weight[frame]).reshape(g, g).astype(np.float32)
            heat = np.asarray(Image.fromarray(heat, mode="F").resize((tile, tile), Image.Resampling.NEAREST))
            shaded = (picture.astype(np.float32) * heat[..., None]).clip(0, 255).astype(np.uint8)
            image.paste(Image.fromarray(shaded), (ox, oy))

            is_key = bool(keyframes[frame])
            cells = trace.cells[frame].tolist()
            if is_key:
                for cell in cells:
                    draw.rectangle(layout.cell_box(frame, cell, gp), outline=KEY_CELL_COLOUR, width=1)
            else:
                for cell, distinct in zip(cells, distinct_cells[frame].tolist()):
                    if distinct:
                        draw.rectangle(layout.cell_box(frame, cell, gp), outline=DISTINCT_COLOUR, width=2)
            for mask, colour in ((global_[frame], GLOBAL_COLOUR), (local[frame], LOCAL_COLOUR)):
                for token in torch.nonzero(mask).flatten().tolist():
                    cx, cy = layout.token_centre(frame, token, g)
                    draw.ellipse((cx - DOT_RADIUS, cy - DOT_RADIUS, cx + DOT_RADIUS, cy + DOT_RADIUS),
                                 fill=colour, outline=(0, 0, 0))
            if is_key:
                draw.rectangle((ox - 3, oy - 3, ox + tile + 2, oy + tile + 2), outline=KEY_COLOUR, width=3)
            n_distinct = int(distinct_cells[frame].sum())
            tag = (f"t={frame} KEYFRAME: {len(cells)} cells" if is_key and cfg.inter_frame
                   else f"t={frame}: {len(cells)} cells" if is_key
                   else f"t={frame}: +{n_distinct} distinct, {len(cells) - n_distinct} merged")
            box = draw.textbbox((ox + 4, oy + 3), tag, font=medium)
            draw.rectangle((box[0] - 3, box[1] - 2, box[2] + 3, box[3] + 2), fill=(0, 0, 0))
            draw.text((ox + 4, oy + 3), tag, fill=KEY_COLOUR if is_key and cfg.inter_frame else TEXT, font=medium)

    _legend(draw, layout, cfg, small, medium)
    return image, layout


def _legend(draw: ImageDraw.ImageDraw, layout: Layout, cfg: AOTConfig, small, medium) -> None:
    y = layout.height - FOOTER + 6
    x = GAP + 2
    r = DOT_RADIUS + 1
    items = [("dot", LOCAL_COLOUR, f"local anchor ({cfg.local_per_window}/window, shallow score)"),
             ("dot", GLOBAL_COLOUR, f"global anchor ({cfg.global_anchors}, deep score)"),
             ("box", KEY_CELL_COLOUR, "keyframe cell (emitted; inter-frame anchor)"),
             ("box", DISTINCT_COLOUR, "distinct cell kept (temporal dynamics)"),
             ("frame", KEY_COLOUR, "keyframe")]
    for kind, colour, text in items:
        if kind == "dot":
            draw.ellipse((x, y + 9 - r, x + 2 * r, y + 9 + r), fill=colour, outline=(0, 0, 0))
        elif kind == "box":
            draw.rectangle((x, y + 1, x + 16, y + 17), outline=colour, width=2)
        else:
            draw.rectangle((x, y + 1, x + 16, y + 17), outline=colour, width=3)
        draw.text((x + 22, y + 1), text, fill=TEXT, font=medium)
        x += 22 + int(draw.textlength(text, font=medium)) + 22
    # Brightness scale of the heat overlay.
    y += 28
    text = "brightness: token's weight in the output, 1 = an average token without reduction (log):"
    draw.text((GAP + 2, y + 6), text, fill=TEXT, font=medium)
    x = GAP + 2 + int(draw.textlength(text, font=medium)) + 10
    bar_w = 220
    for i in range(bar_w):
        w = math.exp(math.log(HEAT_RANGE[0]) + (math.log(HEAT_RANGE[1]) - math.log(HEAT_RANGE[0])) * i / (bar_w - 1))
        level = int(round(200 * float(heat_brightness(np.array([w]))[0])))
        draw.line((x + i, y + 4, x + i, y + 20), fill=(level, level, level))
    draw.text((x - 4, y + 22), f"<={HEAT_RANGE[0]:g} (dropped)", fill=TEXT, font=small)
    draw.text((x + bar_w - 60, y + 22), f">={HEAT_RANGE[1]:g} (emitted)", fill=TEXT, font=small)
    note = "merged cells lie in between"
    draw.text((x + bar_w + 14, y + 6), note, fill=TEXT, font=medium)


# ---- the command's library function -------------------------------------------------------------------------------
def video_trace(adapter: ModelAdapter, video: str | os.PathLike, cfg: AOTConfig) -> tuple[np.ndarray, ReductionTrace]:
    """Decode and preprocess `cfg.frames` frames of `video` as the runtime does, encode them with the adapter and
    trace the reduction. Returns the frames at the model's input size (uint8 RGB) and the trace."""
    adapter.check_fits(cfg)
    prep = adapter.preprocessing
    temporal = adapter.info.temporal_patch
    frames = decode_frames(video, cfg.frames * temporal)
    pixels = torch.from_numpy(preprocess_frames(frames, prep))
    resample = getattr(Image.Resampling, prep.resample.upper())
    # One picture per AOT frame: the first frame of its temporal patch (Qwen2.5-VL folds 2 frames into one grid).
    shown = np.stack([np.asarray(Image.fromarray(f).resize((prep.size, prep.size), resample=resample))
                      for f in frames[::temporal]])
    features, shallow, deep = adapter.encode(cfg, pixels)
    return shown, AOTReducer(cfg).trace(features, shallow, deep)


def is_random(adapter: ModelAdapter) -> bool:
    return adapter.info.model_id in BUILTIN_MODELS


def visualize(model: str | ModelAdapter, video: str | os.PathLike, out_png: str | os.PathLike,
              cfg: AOTConfig | None = None, frames_shown: int | None = 8, progress: bool = True) -> dict:
    """Write the overlay PNG of `video` reduced by AOT on `model` (a built-in name, a checkpoint directory or an
    adapter) to `out_png` (atomically). `cfg` defaults to the reference config on the model's grid;
    `frames_shown` whole clips' worth of frames (None: all). Returns token counts and where things are."""
    stages = Stages(["load model", "decode + encode + trace", "draw + write"], progress)
    with stages.step():
        adapter = model if isinstance(model, ModelAdapter) else load_model(model)
    cfg = cfg or AOTConfig(grid=adapter.info.grid)
    with stages.step():
        frames_rgb, trace = video_trace(adapter, video, cfg)
    with stages.step():
        random = is_random(adapter)
        title = [
            f"AOT token reduction: {Path(video).name} on {adapter.info.model_id}"
            + ("  (RANDOM weights: anchors reflect a random tower; a checkpoint dir gives real attention)"
               if random else ""),
            f"{cfg.frames} frames: {cfg.input_tokens} input tokens -> {cfg.output_tokens} output tokens "
            f"({cfg.retention:.1%} retained).  Per frame {cfg.anchors} anchors ({cfg.windows ** 2}x"
            f"{cfg.local_per_window} local + {cfg.global_anchors} global) on the {cfg.grid}x{cfg.grid} grid, "
            f"{cfg.pooled_anchors} of {cfg.cells_per_frame} pooled cells kept",
            (f"clips of {cfg.clip_len}: keyframe's {cfg.pooled_anchors} cells + {cfg.keep} distinct cells per later "
             f"frame + {cfg.pooled_anchors} updated anchors = {cfg.tokens_per_clip} tokens per clip"
             if cfg.inter_frame else "clip_len 1: no inter-frame stage, every kept cell is emitted"),
        ]
        image, layout = render_overlay(trace, frames_rgb, title, frames_shown)
        with atomic_file(out_png) as staging:
            image.save(staging, format="PNG", optimize=True)
    stages.close()
    path = Path(out_png)
    return {
        "out": str(path), "png_bytes": path.stat().st_size, "size": [layout.width, layout.height],
        "video": str(video), "model": adapter.info.model_id, "random_weights": random,
        "frames": cfg.frames, "frames_shown": sorted(layout.origins), "tile": layout.tile,
        "input_tokens": cfg.input_tokens, "output_tokens": cfg.output_tokens, "retention": cfg.retention,
        "anchors": cfg.anchors, "local_anchors": cfg.windows ** 2 * cfg.local_per_window,
        "global_anchors": cfg.global_anchors, "pooled_anchors": cfg.pooled_anchors, "keep": cfg.keep,
        "config": cfg.to_dict(), "seconds": stages.seconds,
    }
