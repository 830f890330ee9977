"""The text side on the device: the checkpoint's tokenizer through the `tokenizers` library, the bundle's
`PromptSpec` (chat template pieces, placeholder, layout) and the LLM's embedding table as an array (memory-mapped,
so only the rows a prompt uses are read). The prompt itself is built by the one assembly,
`aot_export.prompt_assembly`, as the reference pipeline builds it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from aot_export.prompt_assembly import (AssembledPrompt, PromptSpec, assemble_prompt, chat_ids, prompt_token_ids,
                                        refuse_ids_past_table, refuse_over_context)


class DeviceText:
    """Tokenizer + prompt description + embedding table (+ the newline vector of a family that has one)."""

    def __init__(self, tokenizer_file: Path, embeddings_file: Path, newline_file: Path | None, spec: PromptSpec,
                 eos_token_id: int | None):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.table = np.load(embeddings_file, mmap_mode="r")
        self.newline = None if newline_file is None else np.load(newline_file).astype(np.float32)
        self.spec = spec
        self.eos_token_id = eos_token_id

    def prompt_ids(self, prompt: str) -> np.ndarray:
        """The chat template around `prompt` as ids (refuses an empty or overlong prompt)."""
        return chat_ids(self.spec, self.tokenizer, prompt)

    def check_token_rows(self, where: str) -> None:
        """The placeholder, the template's tokens and the tokenizer's vocabulary are rows of the embedding table
        (before the vision graph and the LLM load)."""
        refuse_ids_past_table(prompt_token_ids(self.spec, self.tokenizer), len(self.table), where)

    def check_request(self, prompt: str, max_new_tokens: int, visual_tokens: int, frames: int) -> None:
        """`prompt` with the video's `visual_tokens` and `max_new_tokens` fits the context (before any work)."""
        refuse_over_context(self.spec, self.tokenizer, prompt, visual_tokens, max_new_tokens, frames)

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """ids [L] → [L, H] float32 from the table."""
        return np.asarray(self.table[ids], dtype=np.float32)

    def assemble(self, prompt: str, visual: np.ndarray, index: np.ndarray | None, frames: int) -> AssembledPrompt:
        """The prompt with the vision graph's tokens [n, H] at the positions its `index` [n, 3] names."""
        return assemble_prompt(self.spec, self.tokenizer, prompt, visual, index, self.embed, self.newline, frames)

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def embed_token(self, token: int) -> np.ndarray:
        return np.asarray(self.table[token], dtype=np.float32)[None, None]


class TextStream:
    """Greedy tokens → the text each one adds, for answers streamed as they are chosen: a piece is held back while
    the text so far ends inside a character (U+FFFD), and comes out whole with the token that completes it."""

    def __init__(self, text: DeviceText):
        self.text, self.tokens, self.shown = text, [], ""

    def push(self, token: int) -> str:
        self.tokens.append(token)
        decoded = self.text.decode(self.tokens)
        if decoded.endswith("\ufffd") or len(decoded) <= len(self.shown):
            return ""
        piece, self.shown = decoded[len(self.shown):], decoded
        return piece
