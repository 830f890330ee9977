"""Prompt assembly as the checkpoint's Hugging Face model does it: the chat template with one `<video>`
placeholder, the placeholder expanded to one position per visual token plus LLaVA-OneVision's newline token, the
text embedded with the LLM's own table and the visual tokens scattered into the video positions."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from aot_export.errors import InputError


@dataclass(frozen=True)
class PromptInputs:
    embeds: Tensor           # [1, L, H] float32
    input_ids: Tensor        # [1, L], the video positions hold the video token id
    visual_tokens: int       # positions that carry visual tokens (reduced tokens + newline)

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]


# Stands in for the user's text while the chat template renders, so the template's own special tokens and the
# user's text can be encoded apart: only the template may produce special tokens.
USER_TEXT = "\ue000user text\ue000"


def refuse_overlong(adapter, length: int, what: str) -> None:
    limit = adapter.context_length
    if length > limit:
        raise InputError(f"{what} is {length} tokens, over the model's context of {limit}; shorten the prompt"
                         " (or export fewer frames / a lower retention)")


def chat_ids(adapter, prompt: str) -> list[int]:
    """Token ids of the rendered chat template for a user turn with one video and `prompt`. The prompt is
    encoded as plain text: `<image>`, `<|im_start|>` and the like typed by a user are ordinary characters."""
    if not prompt or not prompt.strip():
        raise InputError("the prompt is empty; pass --prompt with a question about the video")
    tokenizer = adapter.tokenizer
    if tokenizer is None or tokenizer.chat_template is None:
        raise InputError(f"{adapter.info.model_id} has no tokenizer with a chat template; add the checkpoint's "
                         "tokenizer and chat_template files to its directory")
    # A prompt longer in characters than the context is in tokens cannot fit (a token is at least one character
    # of text here); refusing it before tokenizing keeps a pasted book from costing seconds.
    if len(prompt) > 16 * adapter.context_length:
        refuse_overlong(adapter, len(prompt), "the prompt (in characters)")
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": USER_TEXT}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    parts = text.split(USER_TEXT)
    if len(parts) != 2:
        raise InputError(f"{adapter.info.model_id}'s chat template does not place the user's text once; fix the "
                         "checkpoint's chat template")
    before, after = (tokenizer(part, add_special_tokens=False).input_ids for part in parts)
    user = tokenizer(prompt, add_special_tokens=False, split_special_tokens=True).input_ids
    ids = before + user + after
    refuse_overlong(adapter, len(ids), "the prompt")
    count = ids.count(adapter.video_token_id)
    if count != 1:
        raise InputError(f"the chat template rendered {count} video placeholders for this prompt, not 1 (a prompt "
                         "must not contain the video token itself, and the template must place one); remove "
                         "'<video>' from the prompt or fix the checkpoint's chat template")
    return ids


@torch.inference_mode()
def assemble(adapter, prompt: str, visual: Tensor) -> PromptInputs:
    """`visual` [n, H] are the reduced tokens (or every pooled token) without the newline; it is appended here."""
    ids = chat_ids(adapter, prompt)
    hidden = adapter.image_newline.shape[-1]
    if visual.shape[-1] != hidden:
        raise InputError(f"the vision output is {visual.shape[-1]} wide but the LLM's hidden size is {hidden}; "
                         "pair the export with the LLM of the same checkpoint")
    refuse_overlong(adapter, len(ids) - 1 + visual.shape[0] + 1, "the prompt with its visual tokens")
    at = ids.index(adapter.video_token_id)
    video = torch.cat([visual.float(), adapter.image_newline.detach().float().unsqueeze(0)])
    expanded = ids[:at] + [adapter.video_token_id] * video.shape[0] + ids[at + 1:]
    input_ids = torch.tensor([expanded])
    embeds = adapter.embed_tokens(input_ids).float().clone()
    embeds[0, at:at + video.shape[0]] = video
    return PromptInputs(embeds, input_ids, video.shape[0])
