"""The reference pipeline's side of the one prompt assembly (`aot_export.prompt_assembly`): what it needs of a
Hugging Face model — the chat template's two pieces, the placeholder, the layout, the tokenizer behind the fast
tokenizer, the LLM's embedding table — and the result as tensors for the PyTorch LLM backends. A bundle stores the
same `PromptSpec` (`runtime.bundle`), so the device assembles exactly what the reference does."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from aot_export.errors import InputError
from aot_export.prompt_assembly import ChatTemplate, PromptSpec, assemble_prompt, refuse_over_context
from aot_export.prompt_assembly import chat_ids as spec_chat_ids

# Stands in for the user's text while the chat template renders, so that the template's pieces and the user's text
# are encoded apart: only the template may produce special tokens.
USER_TEXT = "\ue000user text\ue000"


@dataclass(frozen=True)
class PromptInputs:
    input_ids: Tensor                 # [1, L], the video positions hold the video token id
    embeds: Tensor                    # [1, L, H] float32
    position_ids: Tensor | None       # [3, 1, L] (t, h, w) rotary positions, or None (1-D)
    visual_tokens: int                # positions that carry visual tokens (and the newline, where there is one)

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    @property
    def generate_kwargs(self) -> dict[str, Any]:
        """What the LLM backends' `generate` takes besides the embeddings: explicit positions, where there are."""
        return {} if self.position_ids is None else {"position_ids": self.position_ids}


def backend_tokenizer(adapter) -> Any:
    tokenizer = adapter.tokenizer
    if tokenizer is None or tokenizer.chat_template is None:
        raise InputError(f"{adapter.info.model_id} has no tokenizer with a chat template; add the checkpoint's "
                         "tokenizer and chat_template files to its directory")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise InputError(f"{adapter.info.model_id}: its tokenizer has no tokenizer.json (a fast tokenizer), which the "
                         "runtime and bundles use; add the checkpoint's tokenizer.json")
    return backend


def chat_template(adapter) -> ChatTemplate:
    """The chat template rendered for a user turn with one video and a marker text, split at the marker."""
    backend_tokenizer(adapter)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": USER_TEXT}]}]
    text = adapter.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if text.count(USER_TEXT) != 1:
        raise InputError(f"{adapter.info.model_id}'s chat template does not place the user's text once; fix the "
                         "checkpoint's chat template")
    before, after = text.split(USER_TEXT)
    return ChatTemplate(before, after)


def prompt_spec(adapter) -> PromptSpec:
    return PromptSpec(chat_template(adapter), int(adapter.video_token_id), adapter.info.grid,
                      int(adapter.context_length), adapter.video_layout)


def chat_ids(adapter, prompt: str) -> list[int]:
    """Token ids of the rendered chat template for a user turn with one video and `prompt` (plain text)."""
    return spec_chat_ids(prompt_spec(adapter), backend_tokenizer(adapter), prompt).tolist()


def check_request(adapter, prompt: str, visual_tokens: int, max_new_tokens: int, frames: int) -> None:
    """The device's rule (`refuse_over_context`): the prompt with `visual_tokens` and `max_new_tokens` fits the
    context, checked before any work."""
    refuse_over_context(prompt_spec(adapter), backend_tokenizer(adapter), prompt, visual_tokens, max_new_tokens,
                        frames)


@torch.inference_mode()
def embed_ids(adapter, ids: np.ndarray) -> np.ndarray:
    """[L] ids → [L, H] float32 through the LLM's own embedding table."""
    return adapter.embed_tokens(torch.from_numpy(np.asarray(ids, np.int64))[None])[0].float().numpy()


def assemble(adapter, prompt: str, visual: Tensor, index: Any = None, frames: int | None = None) -> PromptInputs:
    """The chat prompt with `visual` [n, H] (without LLaVA's newline, which is appended here) at the positions
    `index` [n, 3] names (families with 3-D positions need it); `frames`: grids in the video."""
    newline = adapter.image_newline
    assembled = assemble_prompt(
        prompt_spec(adapter), backend_tokenizer(adapter), prompt, visual.detach().float().numpy(),
        None if index is None else np.asarray(index), lambda ids: embed_ids(adapter, ids),
        None if newline is None else newline.detach().float().numpy(), frames)
    positions = assembled.position_ids
    return PromptInputs(torch.from_numpy(assembled.input_ids)[None], torch.from_numpy(assembled.embeds),
                        None if positions is None else torch.from_numpy(positions), assembled.visual_tokens)


@torch.inference_mode()
def prefill_logits(adapter, prompt: PromptInputs) -> Tensor:
    """[L, V] logits of the LLM (PyTorch) on the prompt with its explicit positions."""
    decoder, lm_head = adapter.decoder()
    out = decoder(inputs_embeds=prompt.embeds, position_ids=prompt.position_ids, use_cache=False)
    return lm_head(out.last_hidden_state)[0].float()
