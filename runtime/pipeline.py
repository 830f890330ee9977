"""video → frames → vision backend (+AOT) → prompt assembly → LLM backend → answer, with a latency report.

`aot-export run` is `Pipeline(...).answer(video, prompt)`; a camera or robot feed goes through
`Pipeline.answer_frames` on the clips `aot_export.video.rolling_clips` cuts from its frame iterator.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aot_export.manifest import refuse_failed_gates
from aot_export.preprocess import Preprocessing, preprocess_frames
from aot_export.prompt_assembly import full_index
from aot_export.video import decode_frames

from .device.pipeline import RunReport, with_ttft
from .llm import DEFAULT_LLM, load_llm
from .prompt import assemble, check_request
from .vision import model_adapter, open_runner, resolve_artifact

DEFAULT_FRAMES = 32


class Pipeline:
    """Holds an active vision runner: use it as a context manager (or call `close()`). `verify_hashes`: the
    artifacts' sha256 checked on load (sizes always)."""

    def __init__(self, model: str, backend: str | None = None, llm: str = DEFAULT_LLM, device: str = "auto",
                 reduce: bool = True, adapter: Any = None, export: str | None = None, allow_failed: bool = False, *,
                 verify_hashes: bool = True):
        artifact = resolve_artifact(model, export, verify_hashes=verify_hashes)
        self.reduce = reduce
        self.adapter = model_adapter(artifact, adapter)
        self.manifest = artifact.manifest
        self.warning = refuse_failed_gates(model, artifact.failures, allow_failed)
        self.vision = (open_runner(artifact, backend, device, self.adapter, verify_hashes=verify_hashes) if reduce
                       else None)
        self.frames = self.manifest.video_frames if self.manifest else DEFAULT_FRAMES
        self.preprocessing: Preprocessing = (self.manifest.preprocessing if self.manifest
                                             else self.adapter.preprocessing)
        self.llm = load_llm(llm, self.adapter, verify_hashes=verify_hashes)
        self.eos = self.adapter.tokenizer.eos_token_id
        if self.vision is not None:
            self.vision.activate()

    def close(self) -> None:
        if self.vision is not None and self.vision.is_active:
            self.vision.deactivate()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def visual_tokens(self, pixels: np.ndarray) -> torch.Tensor:
        return self.visual_tokens_at(pixels)[0]

    def visual_tokens_at(self, pixels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [n, H], index [n, 3]): the reduced tokens, or every token of HF's video path on the full grid."""
        if self.vision is None:
            features = self.adapter.full_video_features(torch.from_numpy(pixels))
            if self.adapter.image_newline is not None:
                features = features[:-1]                                            # newline re-added below
            steps = self.adapter.aot_frames(len(pixels))
            return features, torch.from_numpy(full_index(steps, self.adapter.info.grid))
        outputs = self.vision.run(pixels)
        return (torch.from_numpy(np.asarray(outputs["tokens"], dtype=np.float32)),
                torch.from_numpy(np.asarray(outputs["index"])))

    def answer(self, video: str | Path, prompt: str, max_new_tokens: int = 32) -> RunReport:
        # A bad prompt, or one that leaves no room for max_new_tokens, is refused before the video is decoded.
        check_request(self.adapter, prompt, self.expected_visual_tokens(), max_new_tokens,
                      self.adapter.aot_frames(self.frames))
        start = time.perf_counter()
        frames = decode_frames(video, self.frames)
        decoded = time.perf_counter() - start
        return self.answer_frames(frames, prompt, max_new_tokens, {"decode": decoded})

    def expected_visual_tokens(self) -> int:
        """Visual tokens a video gives, known before the vision side runs: its static graph's, or every token."""
        if self.vision is None:
            return self.adapter.aot_frames(self.frames) * self.adapter.info.grid ** 2
        return (self.manifest.aot if self.manifest else self.vision.cfg).output_tokens

    def answer_frames(self, frames: np.ndarray, prompt: str, max_new_tokens: int = 32,
                      seconds: dict[str, float] | None = None) -> RunReport:
        seconds = dict(seconds or {})
        start = time.perf_counter()
        pixels = preprocess_frames(frames, self.preprocessing)
        seconds["preprocess"] = time.perf_counter() - start
        start = time.perf_counter()
        visual, index = self.visual_tokens_at(pixels)
        seconds["vision + AOT" if self.reduce else "vision"] = time.perf_counter() - start
        start = time.perf_counter()
        inputs = assemble(self.adapter, prompt, visual, index, self.adapter.aot_frames(len(pixels)))
        seconds["prompt assembly"] = time.perf_counter() - start
        generation = self.llm.generate(inputs.embeds, max_new_tokens, eos=self.eos, **inputs.generate_kwargs)
        seconds["LLM prefill"] = generation.prefill_s
        seconds["LLM decode"] = generation.decode_s
        answer = self.adapter.tokenizer.decode(generation.tokens, skip_special_tokens=True)
        return RunReport(answer, self.reduce, self.vision.name if self.vision else "torch (HF video path)",
                         self.llm.name, inputs.visual_tokens, inputs.length, len(generation.tokens),
                         with_ttft(seconds), generation.decode_tokens_per_s,
                         settings={"vision": self.vision.settings if self.vision else {"backend": "torch"},
                                   "llm": getattr(self.llm, "settings", {"backend": self.llm.name})})
