"""The one prompt assembly, numpy only: the device runtime (a bundle's tokenizer and embedding table) and the
reference pipeline (the Hugging Face model's) both build every family's prompt here.

A prompt is the chat template rendered around the user's text (`ChatTemplate`: the two pieces, stored in a bundle)
with the video placeholder replaced by the visual tokens, laid out as the family's `VideoLayout` says:
- no layout (LLaVA-OneVision): the reduced tokens in one run, closed by the learned newline vector; 1-D positions
  (the decoder derives them), so `position_ids` is None;
- Qwen2.5-VL: one `<|vision_start|>` … `<|vision_end|>` block; a visual token at `(start + ⌊t·interval⌋, start +
  row, start + col)`;
- Cosmos3-Edge: one timestamped block per frame (`<{s:.1f} seconds><|vision_start|>` … `<|vision_end|>`), each its
  own grid with t = its start, holding the reduced tokens whose index names that frame (a frame whose tokens all
  merged keeps its empty block).
The reducer's `index [n, 3]` is (frame, row, col) on the merged grid, so a kept token gets the position it had in
the full video and an updated keyframe anchor its keyframe cell's. Text after a video block continues at
`start + G` (transformers 5.24's `get_rope_index` advances by the grid's side, not past the largest t); with
`index` the full raster grid (`full_index`) this is Hugging Face's own rule, which tests hold it to.

User text is encoded as plain text, so `<|im_start|>` typed in a prompt is characters, never a control token —
and so is every other token added to the tokenizer, special or not (`plain_text_tokenizer`); only the template's
pieces may produce them.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from .errors import InputError

# A prompt of more characters than this many times the context cannot fit (a token here spans at most a few
# characters); refusing it before tokenizing keeps a pasted book from costing seconds.
CHARACTERS_PER_TOKEN_BOUND = 16


@dataclass(frozen=True)
class VideoLayout:
    """How a family lays a video out in its prompt when it places visual tokens by 3-D rotary positions (t, row,
    col) instead of closing the video with a learned vector: `start_token` … `end_token` around each block of
    video-token ids; one block for the whole video, or one per frame (`per_frame`: each frame its own grid, preceded
    by `frame_stamp` formatted with its time in seconds); a grid's t advances by `time_interval` per frame."""

    start_token: int
    end_token: int
    time_interval: float = 1.0
    per_frame: bool = False
    frame_stamp: str | None = None


@dataclass(frozen=True)
class ChatTemplate:
    """The chat template rendered for one user turn with a video and the user's text, split around that text
    (`before` holds the video placeholder in every family here)."""

    before: str
    after: str


@dataclass(frozen=True)
class PromptSpec:
    """Everything the assembly needs to know of a model, without the model: stored in a bundle, derived from the
    adapter by the reference (`runtime.prompt.prompt_spec`)."""

    chat: ChatTemplate
    video_token_id: int
    grid: int
    context_length: int
    layout: VideoLayout | None = None          # None: LLaVA-OneVision's newline-closed run with 1-D positions

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PromptSpec":
        try:
            layout = data.get("layout")
            return cls(ChatTemplate(**data["chat"]), int(data["video_token_id"]), int(data["grid"]),
                       int(data["context_length"]), VideoLayout(**layout) if layout is not None else None)
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"the prompt description is incomplete or malformed ({exc}); rebuild the bundle with "
                             "`aot-export bundle`") from exc


@dataclass(frozen=True)
class AssembledPrompt:
    input_ids: np.ndarray                      # [L] int64, visual positions hold the video token id
    embeds: np.ndarray                         # [1, L, H] float32
    position_ids: np.ndarray | None            # [3, 1, L] int64 rotary positions, or None (1-D, derived)
    visual_tokens: int                         # positions carrying visual tokens (and the newline, where there is one)
    frame_of: np.ndarray                       # [L] int64 the video frame each position belongs to (its tokens, its
                                               # block's stamp and end), −1 for text and whole-video wrappers

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


def full_index(frames: int, grid: int) -> np.ndarray:
    """[frames·G², 3] (frame, row, col) of every merged token in raster order: the index of "no reduction"."""
    return np.stack(np.meshgrid(np.arange(frames), np.arange(grid), np.arange(grid), indexing="ij"),
                    axis=-1).reshape(-1, 3).astype(np.int32)


def refuse_overlong(spec: PromptSpec, length: int, what: str) -> None:
    if length > spec.context_length:
        raise InputError(f"{what} is {length} tokens, over the model's context of {spec.context_length}; shorten "
                         "the prompt (or export fewer frames / a lower retention)")


@functools.lru_cache(maxsize=8)
def plain_text_tokenizer(tokenizer: Any) -> Any:
    """A copy of `tokenizer` in which every added token is marked special, so that with `encode_special_tokens`
    none is matched in text. `encode_special_tokens` alone splits only the special ones: a trained Qwen2.5
    tokenizer also adds `<tool_call>`, `<|fim_prefix|>` … as non-special tokens, which text would still produce."""
    data = json.loads(tokenizer.to_str())
    for token in data.get("added_tokens", []):
        token["special"] = True
    return type(tokenizer).from_str(json.dumps(data))


def encode(tokenizer: Any, text: str, split_special: bool = False) -> list[int]:
    """`text` → ids with a `tokenizers.Tokenizer` (a Hugging Face fast tokenizer's `backend_tokenizer`), no
    added BOS/EOS; `split_special`: every added token spelled in `text` (special or not) is encoded as its
    characters."""
    ids = _encode(tokenizer, text, split_special)
    if split_special and not set(ids).isdisjoint(tokenizer.get_added_tokens_decoder()):
        # A non-special added token was matched: encode again with none matchable (a copy, built once: ~0.5 s for
        # a 2.5 MB tokenizer.json, so only for a text that needs it).
        ids = _encode(plain_text_tokenizer(tokenizer), text, split_special)
    return ids


def _encode(tokenizer: Any, text: str, split_special: bool) -> list[int]:
    previous = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = split_special
    try:
        return tokenizer.encode(text, add_special_tokens=False).ids
    finally:
        tokenizer.encode_special_tokens = previous


def chat_ids(spec: PromptSpec, tokenizer: Any, prompt: str) -> np.ndarray:
    """[L] token ids of the chat template around `prompt`, the video placeholder once; the prompt is plain text."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("the prompt is empty; pass --prompt with a question about the video")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"the prompt is not valid UTF-8 (its character {exc.start + 1} is not); pass the question "
                         "in UTF-8") from None
    if len(prompt) > CHARACTERS_PER_TOKEN_BOUND * spec.context_length:
        raise InputError(f"the prompt is {len(prompt)} characters, over the model's context of {spec.context_length} "
                         "tokens however it is tokenized; shorten the prompt")
    ids = (encode(tokenizer, spec.chat.before) + encode(tokenizer, prompt, split_special=True)
           + encode(tokenizer, spec.chat.after))
    refuse_overlong(spec, len(ids), "the prompt")
    count = ids.count(spec.video_token_id)
    if count != 1:
        raise InputError(f"the chat template rendered {count} video placeholders, not 1; rebuild the bundle from "
                         "the checkpoint's own chat template")
    return np.asarray(ids, np.int64)


def refuse_ids_past_table(ids: dict[str, int], rows: int, where: str) -> None:
    """Token ids every prompt holds (`ids`: what each is → id) must be rows of the LLM's embedding table: checked
    before any weights load, not met as an IndexError after the vision stage."""
    for name, token in ids.items():
        if not 0 <= token < rows:
            raise InputError(f"{where}: {name} is id {token}, past the embedding table's {rows} rows; the tokenizer "
                             "and the LLM come from different checkpoints, or tokens were added to the tokenizer "
                             "without the embeddings: use the checkpoint's own tokenizer")


def prompt_token_ids(spec: PromptSpec, tokenizer: Any) -> dict[str, int]:
    """The ids every prompt of `spec` holds (what each is → id), and the largest id plain text can give."""
    ids = {"the video placeholder": spec.video_token_id}
    if spec.layout is not None:
        ids.update({"the video start token": spec.layout.start_token, "the video end token": spec.layout.end_token})
    for token in encode(tokenizer, spec.chat.before) + encode(tokenizer, spec.chat.after):
        ids.setdefault(f"the chat template's token {tokenizer.id_to_token(token)!r}", token)
    ids["the tokenizer's last plain-text id"] = tokenizer.get_vocab_size(with_added_tokens=False) - 1
    return ids


def request_length(spec: PromptSpec, tokenizer: Any, prompt: str, visual_tokens: int,
                   frames: int | None = None) -> int:
    """Positions the prompt takes once the video's `visual_tokens` are laid out in it, known before any work: the
    one assembly run on stand-ins one value wide (a layout fixes every count but that of the visual tokens)."""
    index = np.zeros((visual_tokens, 3), np.int64)
    return assemble_prompt(spec, tokenizer, prompt, np.zeros((visual_tokens, 1), np.float32), index,
                           lambda ids: np.zeros((len(ids), 1), np.float32), np.zeros(1, np.float32),
                           frames).length


def refuse_over_context(spec: PromptSpec, tokenizer: Any, prompt: str, visual_tokens: int, max_new_tokens: int,
                        frames: int | None = None) -> None:
    """The prompt with its visual tokens and the `max_new_tokens` asked for must fit the context: the decoder has
    no positions past it (ONNX Runtime's rotary cache ends there)."""
    length = request_length(spec, tokenizer, prompt, visual_tokens, frames)
    room = spec.context_length - length
    if max_new_tokens > room:
        fix = f"pass --max-new-tokens {room} or fewer" if room > 0 else "shorten the prompt"
        raise InputError(f"the prompt with its visual tokens is {length} tokens and {max_new_tokens} new tokens are "
                         f"asked for, past the model's context of {spec.context_length}; {fix}")


def ragged_arange(lengths: np.ndarray) -> np.ndarray:
    """arange(l) for each l in `lengths`, concatenated: [0, 1, …, l0−1, 0, 1, …, l1−1, …]."""
    lengths = np.asarray(lengths, np.int64)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.arange(int(lengths.sum()), dtype=np.int64) - starts


def video_span(spec: PromptSpec, ids: np.ndarray) -> tuple[int, int]:
    """[begin, end) of the template's `<|vision_start|><|video_pad|><|vision_end|>` in `ids`."""
    at = int(np.flatnonzero(ids == spec.video_token_id)[0])
    layout = spec.layout
    if at == 0 or at + 1 == len(ids) or (ids[at - 1], ids[at + 1]) != (layout.start_token, layout.end_token):
        raise InputError("the chat template does not wrap the video in its start and end tokens; use the "
                         "checkpoint's chat template")
    return at - 1, at + 2


@dataclass(frozen=True)
class VideoBlocks:
    """The video as the prompt lays it out: blocks (one, or one per frame), each `opening` tokens (its stamp and
    start token), its visual tokens and an end token."""

    opening: np.ndarray          # [sum of opening lengths] ids, block after block
    opening_lengths: np.ndarray  # [B]
    counts: np.ndarray           # [B] visual tokens per block
    order: np.ndarray            # [n] rows of the visual tokens in prompt order
    within: np.ndarray           # [n, 3] (t, row, col) of each, in prompt order, within its block's grid
    frames: np.ndarray           # [n] the video frame of each, in prompt order
    block_frames: np.ndarray     # [B] the frame a block belongs to (−1: the one block of the whole video)


def video_blocks(spec: PromptSpec, tokenizer: Any, index: np.ndarray, frames: int,
                 frame_seconds: np.ndarray) -> VideoBlocks:
    layout = spec.layout
    index = np.asarray(index, np.int64)
    if not layout.per_frame:
        return VideoBlocks(np.asarray([layout.start_token], np.int64), np.asarray([1]), np.asarray([len(index)]),
                           np.arange(len(index)), index, index[:, 0], np.asarray([-1]))
    order = np.argsort(index[:, 0], kind="stable")
    within = index[order] * np.asarray([0, 1, 1])
    stamps = [encode(tokenizer, layout.frame_stamp.format(s)) + [layout.start_token] for s in frame_seconds]
    return VideoBlocks(np.asarray([t for stamp in stamps for t in stamp], np.int64),
                       np.asarray([len(stamp) for stamp in stamps]), np.bincount(index[:, 0], minlength=frames),
                       order, within, index[order, 0], np.arange(frames))


def lay_out_3d(spec: PromptSpec, ids: np.ndarray,
               blocks: VideoBlocks) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(input ids [L], position ids [3, L], where the visual tokens go [n], the frame of each position [L]) with the
    template's video wrapper replaced by `blocks`; visual positions hold the video token id."""
    begin, end = video_span(spec, ids)
    grid, layout = spec.grid, spec.layout
    opening, counts = blocks.opening_lengths, blocks.counts
    # Each block takes opening + count + 1 ids but advances positions by opening + G + 1.
    id_starts = begin + np.cumsum(opening + counts + 1) - (opening + counts + 1)
    pos_starts = begin + np.cumsum(opening + grid + 1) - (opening + grid + 1)
    after = ids[end:]
    length = begin + int((opening + counts + 1).sum()) + len(after)
    input_ids = np.full(length, spec.video_token_id, np.int64)
    positions = np.zeros((3, length), np.int64)
    input_ids[:begin], positions[:, :begin] = ids[:begin], np.arange(begin)
    at = np.repeat(id_starts, opening) + ragged_arange(opening)
    input_ids[at], positions[:, at] = blocks.opening, np.repeat(pos_starts, opening) + ragged_arange(opening)
    frame_of = np.full(length, -1, np.int64)
    frame_of[at] = np.repeat(blocks.block_frames, opening)
    visual_at = np.repeat(id_starts + opening, counts) + ragged_arange(counts)
    t = np.floor(blocks.within[:, 0] * layout.time_interval).astype(np.int64)
    positions[:, visual_at] = (np.stack([t, blocks.within[:, 1], blocks.within[:, 2]])
                               + np.repeat(pos_starts + opening, counts))
    frame_of[visual_at] = blocks.frames
    end_at = id_starts + opening + counts
    input_ids[end_at], positions[:, end_at] = layout.end_token, pos_starts + opening + grid
    frame_of[end_at] = blocks.block_frames
    tail = begin + int((opening + counts + 1).sum())
    text_resumes = int(pos_starts[-1] + opening[-1] + grid + 1)
    input_ids[tail:], positions[:, tail:] = after, text_resumes + np.arange(len(after))
    return input_ids, positions, visual_at, frame_of


def check_width(visual: np.ndarray, hidden: int) -> None:
    if visual.ndim != 2 or visual.shape[-1] != hidden:
        raise InputError(f"the vision output is {visual.shape[-1]} wide but the LLM's hidden size is {hidden}; pair "
                         "the export with the LLM of the same checkpoint")


def assemble_prompt(spec: PromptSpec, tokenizer: Any, prompt: str, visual: np.ndarray, index: np.ndarray | None,
                    embed: Callable[[np.ndarray], np.ndarray], newline: np.ndarray | None = None,
                    frames: int | None = None, frame_seconds: np.ndarray | None = None) -> AssembledPrompt:
    """The prompt with `visual` [n, H] in place of the video placeholder, laid out as `spec` says.

    `index` [n, 3]: the reducer's (frame, row, col) of each visual token (a 3-D layout needs it); `embed(ids [L])`
    → [L, H] the LLM's input embeddings of text ids; `newline` [H]: the vector closing the video where the family
    has one; `frames`: grids in the video (default: the last frame `index` names); `frame_seconds`: each frame's
    time for a layout with frame stamps (default 0, 1, 2 … s)."""
    ids = chat_ids(spec, tokenizer, prompt)
    visual = np.asarray(visual, np.float32)
    if spec.layout is None:
        if newline is None:
            raise InputError("this model closes a video with its newline vector, which is missing; rebuild the "
                             "bundle with `aot-export bundle`")
        check_width(visual, len(newline))
        video = np.concatenate([visual, np.asarray(newline, np.float32)[None]])
        at = int(np.flatnonzero(ids == spec.video_token_id)[0])
        input_ids = np.concatenate([ids[:at], np.full(len(video), spec.video_token_id), ids[at + 1:]])
        slots, rows, positions = at + np.arange(len(video)), np.arange(len(video)), None
        frame_of = np.full(len(input_ids), -1, np.int64)
        if index is not None and len(index) == len(visual):
            frame_of[slots[:-1]] = np.asarray(index, np.int64)[:, 0]
    else:
        if index is None or len(index) != len(visual):
            raise InputError(f"the vision output has {len(visual)} tokens but "
                             f"{'no' if index is None else len(index)} (frame, row, col) positions; pair the "
                             "export with the LLM of the same checkpoint")
        index = np.asarray(index, np.int64)
        frames = frames if frames is not None else int(index[:, 0].max()) + 1
        seconds = frame_seconds if frame_seconds is not None else np.arange(frames, dtype=np.float64)
        blocks = video_blocks(spec, tokenizer, index, frames, seconds)
        input_ids, flat_positions, slots, frame_of = lay_out_3d(spec, ids, blocks)
        video, rows, positions = visual, blocks.order, flat_positions[:, None, :]
    refuse_overlong(spec, len(input_ids), "the prompt with its visual tokens")
    embeds = np.array(embed(input_ids), dtype=np.float32)
    check_width(video, embeds.shape[-1])
    embeds[slots] = video[rows]
    return AssembledPrompt(input_ids, embeds[None], positions, len(slots), frame_of)
