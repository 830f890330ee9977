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

Everything is computed with `aot_export.reducer`'s own functions on `adapter.encode(cfg, frames)` and checked
against `AOTReducer` (tests/test_visualize.py): the picture shows what the exported graph computes.
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
from aot_export.reducer import (config_sinkhorn, gather_rows, grid_positions, inter_frame_cost, intra_frame_transport,
                                mask_indices, merge_into_anchors, pool_retained, pooling_matrix, retained_cells,
                                select_anchors, top_k_raster, window_table, Transport)

from .video import decode_frames

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


# ---- the reduction, traced -------------------------------------------------------------------------------------
def local_anchor_mask(cfg: AOTConfig, table: Tensor, score_shallow: Tensor, per_window: int | None = None) -> Tensor:
    """[T, N] bool: the `per_window` (default `cfg.local_per_window`) local anchors of every window — the first
    half of `select_anchors`, which does not return it separately."""
    frames, n = score_shallow.shape
    per_window = cfg.local_per_window if per_window is None else per_window
    lowest = torch.finfo(score_shallow.dtype).min
    padded = torch.cat([score_shallow, score_shallow.new_full((frames, 1), lowest)], dim=1)
    window_scores = padded.index_select(1, table.flatten()).view(frames, *table.shape)
    local_pos = top_k_raster(per_window, window_scores)
    local_idx = table.expand(frames, -1, -1).gather(2, local_pos).flatten(1)
    return torch.zeros(frames, n, dtype=torch.bool, device=score_shallow.device).scatter(1, local_idx, True)


@dataclass
class Trace:
    """Every intermediate of one AOT reduction. T frames, N tokens, V anchors, A kept cells, K distinct, C clips."""

    cfg: AOTConfig
    local: Tensor            # [T, N] bool local anchors (as `select_anchors` picks them)
    anchors: Tensor          # [T, N] bool all anchors (local | global)
    transport: Transport     # the intra-frame transport (anchor_idx [T, V], self_weight, weights [T, N, V])
    cells: Tensor            # [T, A] kept pooled cells, raster order
    retained: Tensor         # [T, A, H] the kept cells' tokens, anchors carrying their transported values
    distinct: Tensor         # [T, A] bool: in a non-key frame, kept as a distinct token (False in keyframes)
    merged: Tensor           # [T, A] merge weight Σ_m P_im a non-key cell sent to its keyframe's anchors
    absorbed: Tensor         # [T, A] in a keyframe, the later-frame mass each anchor absorbed (0 elsewhere)
    output_weight: Tensor    # [T, N] each token's weight summed over all output tokens (see module docstring)
    tokens: Tensor           # [cfg.output_tokens, H] what AOTReducer returns
    index: Tensor            # [cfg.output_tokens, 3] int32 (frame, row, col)

    @property
    def global_(self) -> Tensor:
        return self.anchors & ~self.local

    @property
    def keyframes(self) -> Tensor:
        """[T] bool."""
        frames = torch.arange(self.cfg.frames)
        return frames % self.cfg.clip_len == 0 if self.cfg.inter_frame else torch.ones_like(frames, dtype=torch.bool)


def trace_reduction(cfg: AOTConfig, features: Tensor, score_shallow: Tensor, score_deep: Tensor, *,
                    anchor_mask: Tensor | None = None, transport_cfg: AOTConfig | None = None,
                    inter_frame: bool = True) -> Trace:
    """`AOTReducer(cfg)(features, score_shallow, score_deep)`, composed from the reducer's functions step by step,
    keeping every intermediate. With the defaults `tokens`/`index` equal the reducer's.

    For studies: `anchor_mask` ([T, N] bool, the same count per frame) replaces the anchor selection;
    `transport_cfg` is the config of the intra-frame transport only (e.g. alpha=0, lam=0: anchors unchanged);
    `inter_frame=False` stops after the kept cells (`tokens` is then every kept cell, T·A of them).
    """
    features = features.detach().float().clone()
    score_shallow, score_deep = score_shallow.detach().float().clone(), score_deep.detach().float().clone()
    frames, hidden = features.shape[0], features.shape[-1]
    table, positions, pooling = window_table(cfg.grid, cfg.windows), grid_positions(cfg.grid), pooling_matrix(cfg)

    local = local_anchor_mask(cfg, table, score_shallow)
    if anchor_mask is None:
        anchor_mask = select_anchors(cfg, table, score_shallow, score_deep)
    counts = anchor_mask.sum(1)
    if not bool((counts == counts[0]).all()):
        raise ValueError("anchor_mask must set the same number of anchors in every frame")
    local = local & anchor_mask
    pooled_mask = anchor_mask.float() @ pooling.T
    pooled_deep = score_deep @ pooling.T
    cells = retained_cells(cfg, pooled_mask, pooled_deep)                                     # [T, A]
    anchor_idx = mask_indices(anchor_mask, int(counts[0]))
    tcfg = transport_cfg or cfg
    transport = intra_frame_transport(tcfg, features, anchor_idx, positions, config_sinkhorn(tcfg))
    pool_rows = pooling[cells]                                                                # [T, A, N]
    retained = pool_retained(features, transport, pool_rows)                                  # [T, A, H]
    frame_ids = torch.arange(frames).unsqueeze(-1).expand_as(cells)
    gp = cfg.pooled_grid
    zeros = torch.zeros(cells.shape)

    if not (cfg.inter_frame and inter_frame):
        tokens = retained.reshape(-1, hidden)
        index = torch.stack([frame_ids.reshape(-1), cells.reshape(-1) // gp, cells.reshape(-1) % gp], -1)
        weight = _output_weight(transport, pool_rows, torch.ones(cells.shape), pooling)
        return Trace(cfg, local, anchor_mask, transport, cells, retained, zeros.bool(), zeros, zeros, weight,
                     tokens, index.to(torch.int32))

    clips, length, a = cfg.clips, cfg.clip_len, cfg.pooled_anchors
    clip_tokens = retained.reshape(clips, length, a, hidden)
    anchors = clip_tokens[:, 0]
    # The updated anchors as a linear map of the clip's kept-cell tokens: [C, A (anchor), L, A (cell)].
    coefficients = torch.zeros(clips, a, length, a)
    coefficients[:, :, 0] = torch.eye(a)
    sinkhorn = config_sinkhorn(cfg)
    kept_positions, distinct, merged = [], torch.zeros(clips, length, a), torch.zeros(clips, length, a)
    absorbed_mass = torch.zeros(clips, a)
    for offset in range(1, length):                       # as `inter_frame_transport`, recording what it decides
        sources = clip_tokens[:, offset]
        cost = inter_frame_cost(cfg, sources, anchors, offset)
        uniform = torch.full_like(cost[:, :, 0], -math.log(a))
        plan = sinkhorn(cost, uniform, uniform, joint=False)
        assignment = plan / plan.sum(-1, keepdim=True)
        confidence = assignment.amax(-1)
        keep_mask = torch.ones_like(confidence)
        if cfg.keep:
            chosen = top_k_raster(cfg.keep, -confidence)
            keep_mask = keep_mask.scatter(1, chosen, 0.0)
            kept_positions.append(chosen)
            distinct[:, offset] = 1.0 - keep_mask
        weights = assignment * keep_mask.unsqueeze(-1)                                        # [C, S, A]
        merged[:, offset] = weights.sum(-1)
        absorbed_mass = absorbed_mass + weights.sum(1)
        denominator = 1.0 + cfg.lam * weights.sum(1)                                          # [C, A]
        anchors = merge_into_anchors(cfg, anchors, sources, weights)
        coefficients = coefficients / denominator[:, :, None, None]
        coefficients[:, :, offset] += cfg.lam * weights.transpose(1, 2) / denominator.unsqueeze(-1)

    if kept_positions:
        kept_pos = torch.stack(kept_positions, dim=1)                                         # [C, L-1, K]
    else:
        kept_pos = torch.zeros(clips, length - 1, 0, dtype=torch.long)
    later_tokens = clip_tokens[:, 1:].flatten(1, 2)
    offsets = (torch.arange(length - 1) * a).view(1, -1, 1)
    kept_flat = (kept_pos + offsets).flatten(1)
    clip_cells, clip_frames = cells.reshape(clips, length, a), frame_ids.reshape(clips, length, a)
    kept_tokens = gather_rows(later_tokens, kept_flat)
    kept_cells = clip_cells[:, 1:].flatten(1).gather(1, kept_flat)
    kept_frames = clip_frames[:, 1:].flatten(1).gather(1, kept_flat)
    tokens = torch.cat([clip_tokens[:, 0], kept_tokens, anchors], dim=1).reshape(-1, hidden)
    out_cells = torch.cat([clip_cells[:, 0], kept_cells, clip_cells[:, 0]], dim=1).reshape(-1)
    out_frames = torch.cat([clip_frames[:, 0], kept_frames, clip_frames[:, 0]], dim=1).reshape(-1)
    index = torch.stack([out_frames, out_cells // gp, out_cells % gp], dim=-1).to(torch.int32)

    # Weight of every kept-cell token in the clip's output: keyframe cells once as themselves, distinct cells once,
    # plus every cell's coefficient summed over the updated anchors.
    cell_weight = coefficients.sum(1) + distinct                                              # [C, L, A]
    cell_weight[:, 0] += 1.0
    absorbed = torch.zeros(clips, length, a)
    absorbed[:, 0] = absorbed_mass
    weight = _output_weight(transport, pool_rows, cell_weight.reshape(frames, a), pooling)
    return Trace(cfg, local, anchor_mask, transport, cells, retained, distinct.reshape(frames, a).bool(),
                 merged.reshape(frames, a), absorbed.reshape(frames, a), weight, tokens, index)


def _output_weight(transport: Transport, pool_rows: Tensor, cell_weight: Tensor, pooling: Tensor) -> Tensor:
    """[T, N]: Σ_a cell_weight[t, a] · (coefficient of token i in kept cell a), through `pool_retained` itself —
    it is linear in the tokens, so its gradient for one scalar channel is exactly that sum — divided by the mean
    token's weight in the unreduced output (every pooled cell once: P / N). Not by each token's own weight: the
    bilinear 27->14 pooling gives some token rows 7 % of others' weight, and a pruned token's share comes from its
    anchor's pooling weight, not its own, so a per-token ratio would mostly draw the pooling's pattern."""
    with torch.inference_mode(False), torch.enable_grad():          # also under a caller's inference_mode
        transport = Transport(*(t.clone() for t in (transport.anchor_idx, transport.self_weight, transport.weights)))
        probe = torch.zeros(pool_rows.shape[0], pooling.shape[1], 1, requires_grad=True)
        retained = pool_retained(probe, transport, pool_rows.clone())                         # [T, A, 1]
        (retained[..., 0] * cell_weight.clone()).sum().backward()
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


def render_overlay(trace: Trace, frames_rgb: np.ndarray, title: list[str], frames_shown: int | None = 8,
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
    weight = trace.output_weight.numpy()
    keyframes = trace.keyframes

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
                for cell, distinct in zip(cells, trace.distinct[frame].tolist()):
                    if distinct:
                        draw.rectangle(layout.cell_box(frame, cell, gp), outline=DISTINCT_COLOUR, width=2)
            for mask, colour in ((trace.global_[frame], GLOBAL_COLOUR), (trace.local[frame], LOCAL_COLOUR)):
                for token in torch.nonzero(mask).flatten().tolist():
                    cx, cy = layout.token_centre(frame, token, g)
                    draw.ellipse((cx - DOT_RADIUS, cy - DOT_RADIUS, cx + DOT_RADIUS, cy + DOT_RADIUS),
                                 fill=colour, outline=(0, 0, 0))
            if is_key:
                draw.rectangle((ox - 3, oy - 3, ox + tile + 2, oy + tile + 2), outline=KEY_COLOUR, width=3)
            n_distinct = int(trace.distinct[frame].sum())
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
def video_trace(adapter: ModelAdapter, video: str | os.PathLike, cfg: AOTConfig) -> tuple[np.ndarray, Trace]:
    """Decode and preprocess `cfg.frames` frames of `video` as the runtime does, encode them with the adapter and
    trace the reduction. Returns the frames at the model's input size (uint8 RGB) and the trace."""
    adapter.check_fits(cfg)
    prep = adapter.preprocessing
    frames = decode_frames(video, cfg.frames)
    pixels = torch.from_numpy(preprocess_frames(frames, prep))
    resample = getattr(Image.Resampling, prep.resample.upper())
    shown = np.stack([np.asarray(Image.fromarray(f).resize((prep.size, prep.size), resample=resample))
                      for f in frames])
    features, shallow, deep = adapter.encode(cfg, pixels)
    return shown, trace_reduction(cfg, features, shallow, deep)


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
