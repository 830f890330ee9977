"""The text side on the device: the checkpoint's tokenizer through the `tokenizers` library, the chat template as
the two rendered pieces around the user's text, and the LLM's embedding table as an array (memory-mapped, so
only the rows a prompt uses are read)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aot_export.errors import InputError


@dataclass(frozen=True)
class PromptText:
    """The chat template rendered for one user turn with a video and the text "PROMPT", split at "PROMPT":
    `before` holds the video placeholder (LLaVA-OneVision renders the video before the text)."""

    before: str
    after: str
    video_token_id: int
    special_tokens: tuple[str, ...]

    def render(self, prompt: str) -> str:
        return self.before + prompt + self.after


class DeviceText:
    """Tokenizer + chat pieces + embedding table + newline vector, as the bundle stores them."""

    def __init__(self, tokenizer_file: Path, embeddings_file: Path, newline_file: Path, chat: PromptText,
                 eos_token_id: int | None):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.table = np.load(embeddings_file, mmap_mode="r")
        self.newline = np.load(newline_file).astype(np.float32)
        self.chat = chat
        self.eos_token_id = eos_token_id

    def prompt_ids(self, prompt: str) -> np.ndarray:
        if not prompt or not prompt.strip():
            raise InputError("the prompt is empty; pass --prompt with a question about the video")
        injected = [token for token in self.chat.special_tokens if token in prompt]
        if injected:
            raise InputError(f"the prompt contains the special token {injected[0]!r}; remove it (the runtime places "
                             "the video and the chat markers itself)")
        ids = np.asarray(self.tokenizer.encode(self.chat.render(prompt), add_special_tokens=False).ids, np.int64)
        if int((ids == self.chat.video_token_id).sum()) != 1:
            raise InputError("the bundle's chat template does not render exactly one video placeholder; rebuild the "
                             "bundle from an intact checkpoint")
        return ids

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """ids [L] → [1, L, H] float32 from the table."""
        return np.asarray(self.table[ids], dtype=np.float32)[None]

    def assemble(self, ids: np.ndarray, visual: np.ndarray) -> tuple[np.ndarray, int]:
        """The prompt's embeddings with the visual tokens [n, H] and the newline in place of the placeholder:
        ([1, L + n, H], n + 1 video positions), as `runtime.prompt.assemble` does with the adapter."""
        hidden = self.newline.shape[-1]
        if visual.shape[-1] != hidden:
            raise InputError(f"the vision output is {visual.shape[-1]} wide but the LLM's hidden size is {hidden}; "
                             "rebuild the bundle from one model's export and LLM")
        at = int(np.flatnonzero(ids == self.chat.video_token_id)[0])
        video = np.concatenate([np.asarray(visual, np.float32), self.newline[None]])
        text = self.embed(ids)[0]
        embeds = np.concatenate([text[:at], video, text[at + 1:]])[None]
        return np.ascontiguousarray(embeds), video.shape[0]

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def embed_token(self, token: int) -> np.ndarray:
        return np.asarray(self.table[token], dtype=np.float32)[None, None]
