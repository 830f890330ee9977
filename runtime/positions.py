"""Prompts with 3-D rotary positions (Qwen2.5-VL, Cosmos3-Edge): every visual token sits at its original (t, h, w).

Both models place a visual token at `(start + t, start + row, start + col)` and let text continue after a video at
`start + G` (transformers 5.24's `get_rope_index` advances by the merged grid's side, not past the largest t). A reduction keeps a subset of the tokens (and merges others into anchors); the reducer's
`index [n, 3]` is (frame, row, col) on the merged grid, so a kept token gets the position it had in the full video
and an updated keyframe anchor its keyframe's. With `index` the full raster grid this is Hugging Face's own rule
(`get_rope_index`), which tests/test_model_families.py checks by comparing logits with Hugging Face's forward.

The layout comes from the adapter (`ModelAdapter.video_layout`):
- Qwen2.5-VL: one `<|vision_start|><|video_pad|>…<|vision_end|>` block for the video; t is the temporal patch times
  `tokens_per_second · seconds_per_grid` (truncated to an integer, as Hugging Face does).
- Cosmos3-Edge: one timestamped block per frame, `<{s:.1f} seconds><|vision_start|><|video_pad|>…<|vision_end|>`
  (its processor's format); each frame block is its own grid with t = its start, and holds the reduced tokens whose
  index names that frame, in the reducer's order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from aot_export.adapters.base import VideoLayout
from aot_export.errors import InputError

from .prompt import PromptInputs, assemble, chat_ids


@dataclass(frozen=True)
class PositionedPrompt:
    input_ids: Tensor        # [1, L], visual positions hold the video token id
    embeds: Tensor           # [1, L, H] float32
    position_ids: Tensor     # [3, 1, L] (t, h, w) rotary positions
    visual_tokens: int

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]


def full_index(frames: int, grid: int) -> Tensor:
    """[frames·G², 3] (frame, row, col) of every merged token in raster order: the index of "no reduction"."""
    f, r, c = torch.meshgrid(torch.arange(frames), torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.stack([f, r, c], dim=-1).reshape(-1, 3).to(torch.int32)


def text_positions(start: int, count: int) -> Tensor:
    return (torch.arange(count) + start).expand(3, count)


def grid_positions(index: Tensor, start: int, time_interval: float) -> Tensor:
    """[3, n] positions of tokens at `index` (frame, row, col) of a video block starting at `start`."""
    index = index.long()
    return torch.stack([(index[:, 0] * time_interval).long(), index[:, 1], index[:, 2]]) + start


def _wrapper_span(ids: list[int], adapter, layout: VideoLayout) -> tuple[int, int]:
    """[begin, end) of the template's `<|vision_start|><|video_pad|><|vision_end|>` in `ids`."""
    at = ids.index(adapter.video_token_id)
    if at == 0 or at + 1 == len(ids) or (ids[at - 1], ids[at + 1]) != (layout.start_token, layout.end_token):
        raise InputError(f"{adapter.info.model_id}: the chat template does not wrap the video in its start and end "
                         "tokens; use the checkpoint's chat template")
    return at - 1, at + 2


def video_blocks(layout: VideoLayout, index: Tensor, frames: int) -> list[tuple[Tensor, Tensor]]:
    """(rows of the visual tokens, their index within the block's grid) per prompt block: the whole video, or one
    block per frame (a frame whose tokens were all merged keeps its empty block)."""
    if not layout.per_frame:
        return [(torch.arange(index.shape[0]), index)]
    blocks = []
    for frame in range(frames):
        rows = torch.nonzero(index[:, 0] == frame).squeeze(-1)
        within = index[rows].clone()
        within[:, 0] = 0
        blocks.append((rows, within))
    return blocks


@torch.inference_mode()
def assemble_positioned(adapter, prompt: str, visual: Tensor, index: Tensor, frames: int | None = None,
                        frame_seconds: list[float] | None = None) -> PositionedPrompt:
    """The chat prompt with `visual` [n, H] at the positions `index` [n, 3] names, laid out as
    `adapter.video_layout` says (see the module doc). `frames`: grids in the video (default: the last frame
    `index` names); `frame_seconds`: each frame's time for a layout with frame stamps (default 0, 1, 2 … s)."""
    layout = adapter.video_layout
    hidden = adapter.info.hidden
    if visual.shape[-1] != hidden or visual.shape[0] != index.shape[0]:
        raise InputError(f"the vision output is {tuple(visual.shape)} with {index.shape[0]} positions but the LLM "
                         f"takes [n, {hidden}]; pair the export with the LLM of the same checkpoint")
    frames = frames if frames is not None else int(index[:, 0].max()) + 1
    ids = chat_ids(adapter, prompt)
    begin, end = _wrapper_span(ids, adapter, layout)
    pad, grid = adapter.video_token_id, adapter.info.grid
    seconds = frame_seconds if frame_seconds is not None else [float(f) for f in range(frames)]
    pieces_ids: list[list[int]] = [ids[:begin]]
    pieces_pos: list[Tensor] = [text_positions(0, begin)]
    order: list[Tensor] = []                     # rows of `visual` in prompt order
    current = begin
    for block, (rows, within) in enumerate(video_blocks(layout, index.long(), frames)):
        opening = [layout.start_token]
        if layout.frame_stamp is not None:
            stamp = layout.frame_stamp.format(seconds[block])
            opening = adapter.tokenizer(stamp, add_special_tokens=False).input_ids + opening
        pieces_ids += [opening, [pad] * len(rows), [layout.end_token]]
        pieces_pos.append(text_positions(current, len(opening)))
        current += len(opening)
        pieces_pos.append(grid_positions(within, current, layout.time_interval))
        current += grid
        pieces_pos.append(text_positions(current, 1))
        current += 1
        order.append(rows)
    after = ids[end:]
    pieces_ids.append(after)
    pieces_pos.append(text_positions(current, len(after)))
    input_ids = torch.tensor([[token for piece in pieces_ids for token in piece]])
    embeds = adapter.embed_tokens(input_ids).float().clone()
    embeds[0, input_ids[0] == pad] = visual[torch.cat(order)].float()
    return PositionedPrompt(input_ids, embeds, torch.cat(pieces_pos, dim=1).unsqueeze(1), visual.shape[0])


@torch.inference_mode()
def prefill_logits(adapter, prompt: PositionedPrompt) -> Tensor:
    """[L, V] logits of the LLM (PyTorch) on the prompt with its explicit 3-D positions."""
    decoder, lm_head = adapter.decoder()
    out = decoder(inputs_embeds=prompt.embeds, position_ids=prompt.position_ids, use_cache=False)
    return lm_head(out.last_hidden_state)[0].float()


def assemble_for(adapter, prompt: str, visual: Tensor, index: Tensor,
                 frames: int | None = None) -> tuple[PromptInputs | PositionedPrompt, dict]:
    """The prompt as the adapter's family builds it, and what the LLM backends' `generate` needs besides the
    embeddings: explicit 3-D positions for a family with a `video_layout`."""
    if adapter.video_layout is not None:
        inputs = assemble_positioned(adapter, prompt, visual, index, frames)
        return inputs, {"position_ids": inputs.position_ids}
    return assemble(adapter, prompt, visual), {}
