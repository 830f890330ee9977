"""The device runtime: a bundle → answers about videos, with no torch, transformers or onnx in the process
(numpy, onnxruntime, tokenizers, av, pillow; tensorrt + Polygraphy's CUDA binding for an engine bundle).

`DevicePipeline(bundle).answer(video, prompt)` → `RunReport`; `measure(...)` repeats it for p50 / p90 / max per
stage. The reference it is validated against is `runtime.pipeline.Pipeline` (PyTorch / Hugging Face).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from aot_export.errors import InputError
from aot_export.manifest import read_manifest
from aot_export.preprocess import Preprocessing, preprocess_frames
from aot_export.prompt_assembly import AssembledPrompt
from aot_export.report import format_table
from aot_export.runners import OnnxRuntimeRunner, VisionRunner, onnxruntime_providers
from aot_export.video import decode_frames

from .bundle import EMBEDDINGS, LLM_DIR, NEWLINE, TOKENIZER, VISION_DIR, Bundle, read_bundle
from .decoder import OrtDecoder
from .latency import repeat_stages
from .text import DeviceText

TTFT = "time to first token"
TTFT_STAGES = ("decode", "preprocess", "vision + AOT", "vision", "prompt assembly", "LLM prefill")


@dataclass
class RunReport:
    answer: str
    reduced: bool
    vision_backend: str
    llm_backend: str
    visual_tokens: int                     # positions the video takes in the prompt (tokens, + LLaVA's newline)
    prompt_tokens: int
    generated_tokens: int
    seconds: dict[str, float] = field(default_factory=dict)
    decode_tokens_per_s: float = float("nan")
    latency: dict[str, dict[str, float]] = field(default_factory=dict)    # stage → p50/p90/max over repeats
    settings: dict[str, Any] = field(default_factory=dict)                # threads, spinning, providers, KV mode

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def table(self) -> str:
        if self.latency:
            n = next(iter(self.latency.values()))["n"]
            rows = [(stage, *(f"{s[k] * 1e3:.1f} ms" for k in ("p50", "p90", "max")))
                    for stage, s in self.latency.items()]
            timing = format_table(rows, (f"stage ({n} runs)", "p50", "p90", "max"))
        else:
            timing = format_table([(stage, f"{seconds * 1e3:.1f} ms") for stage, seconds in self.seconds.items()],
                                  ("stage", "latency"))
        rows = [("decode tokens/s", f"{self.decode_tokens_per_s:.1f}"),
                ("visual tokens in the prompt", self.visual_tokens), ("prompt tokens", self.prompt_tokens),
                ("generated tokens", self.generated_tokens),
                ("backends", f"vision {self.vision_backend}{' + AOT' if self.reduced else ', no reduction'}, "
                             f"LLM {self.llm_backend}")]
        return f"answer: {self.answer!r}\n\n{timing}\n\n" + format_table(rows, ("run", ""))


def with_ttft(seconds: dict[str, float]) -> dict[str, float]:
    """Adds the time from the start of decoding the video to the first token (the stages before it, summed)."""
    return {**seconds, TTFT: sum(v for k, v in seconds.items() if k in TTFT_STAGES)}


def measure(pipeline: Any, video: str | os.PathLike, prompt: str, max_new_tokens: int = 32, warmup: int = 0,
            repeat: int = 1, progress: Callable[[str], None] | None = None) -> RunReport:
    """`pipeline.answer` (device or reference) `repeat` times after `warmup`: the last report, with p50 / p90 /
    max of every stage over the timed runs in `latency`. `progress` gets a line per run when there are several."""
    reports: list[RunReport] = []

    def once() -> dict[str, float]:
        reports.append(pipeline.answer(video, prompt, max_new_tokens))
        return reports[-1].seconds

    stats = repeat_stages(once, warmup, repeat, progress if warmup + repeat > 1 else None)
    report = reports[-1]
    report.latency = stats if repeat > 1 or warmup > 0 else {}
    return report


class DevicePipeline:
    """Holds an active vision runner and the LLM session: a context manager (or call `close()`). `verify_hashes`:
    every file's sha256 checked against the bundle's records (sizes of the vision and LLM parts always);
    `expect_id`: only the bundle whose id (`bundle_id`) it is runs; `allow_failed`: a bundle with a part that failed
    its gates runs too (`warning` says so)."""

    def __init__(self, bundle: str | os.PathLike | Bundle, device: str = "auto", intra_op_threads: int | None = None,
                 allow_spinning: bool = False, kv: str = "bound", *, verify_hashes: bool = True,
                 expect_id: str | None = None, allow_failed: bool = False):
        self.bundle = bundle if isinstance(bundle, Bundle) else read_bundle(
            bundle, verify_hashes=verify_hashes, expect_id=expect_id, allow_failed=allow_failed)
        self.warning = self.bundle.warning
        data, root = self.bundle.data, self.bundle.directory
        self.preprocessing = Preprocessing.from_dict(data["preprocessing"])
        self.frames = data["frames"]                                  # decoded frames the graph takes
        self.aot_frames = self.bundle.export_manifest.aot.frames         # grids: the prompt's frames
        spec = self.bundle.prompt_spec
        self.text = DeviceText(root / TOKENIZER, root / EMBEDDINGS, root / NEWLINE if spec.layout is None else None,
                               spec, data["text"]["eos_token_id"])
        self.text.check_token_rows(str(root))                # before the vision graph and the LLM load
        self.vision = self._vision(device, intra_op_threads, allow_spinning, verify_hashes)
        providers = onnxruntime_providers(device)
        self.llm = OrtDecoder(root / LLM_DIR, tuple(providers), kv=kv, intra_op_threads=intra_op_threads,
                              allow_spinning=allow_spinning, verify_hashes=verify_hashes)
        self.vision.activate()
        self.settings = {"vision": self.vision.settings, "llm": self.llm.settings}

    def _vision(self, device: str, intra_op_threads: int | None, allow_spinning: bool,
                verify_hashes: bool) -> VisionRunner:
        vision_dir = self.bundle.path(VISION_DIR)
        if self.bundle.vision_kind == "engine":
            from engines.runner import TensorRTRunner
            from engines.sidecar import check_against_export, read_sidecar

            check_against_export(read_sidecar(vision_dir, verify_hashes=verify_hashes), self.bundle.export_manifest)
            return TensorRTRunner(vision_dir, verify_hashes=verify_hashes)
        # Its sha256 are bundle.json's (checked above unless skipped); its consistency and sizes are checked here.
        manifest = read_manifest(vision_dir, verify_hashes=False)
        # No arena: the graph's activations (≈0.8 GB at full size, 8 frames) are freed before the LLM runs.
        return OnnxRuntimeRunner.from_export(vision_dir, device, manifest, intra_op_threads=intra_op_threads,
                                             allow_spinning=allow_spinning, memory_arena=False)

    def close(self) -> None:
        if self.vision.is_active:
            self.vision.deactivate()

    def __enter__(self) -> "DevicePipeline":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def answer(self, video: str | Path, prompt: str, max_new_tokens: int = 32) -> RunReport:
        self.check_request(prompt, max_new_tokens)  # a bad prompt is refused before the video is decoded
        start = time.perf_counter()
        frames = decode_frames(video, self.frames)
        return self.answer_frames(frames, prompt, max_new_tokens, {"decode": time.perf_counter() - start})

    def check_request(self, prompt: str, max_new_tokens: int) -> None:
        """The prompt, the graph's visual tokens and `max_new_tokens` fit the LLM's context."""
        self.text.check_request(prompt, max_new_tokens, self.bundle.export_manifest.aot.output_tokens,
                                self.aot_frames)

    def reduce(self, frames: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """[frames, H, W, 3] uint8 RGB → the vision graph's outputs (`tokens`, `index`) and the seconds of each
        stage (preprocess, vision + AOT)."""
        if len(frames) != self.frames:
            raise InputError(f"{len(frames)} frames given, the bundle's vision graph takes {self.frames}")
        start = time.perf_counter()
        pixels = preprocess_frames(frames, self.preprocessing)
        preprocessed = time.perf_counter()
        outputs = self.vision.run(pixels)                    # the TensorRT runner synchronizes its stream
        return outputs, {"preprocess": preprocessed - start, "vision + AOT": time.perf_counter() - preprocessed}

    def live(self, source: Any, settings: Any, questions: Any = None) -> Iterator[Any]:
        """Events of this bundle on a live source (`runtime.device.live.live_events`)."""
        from .live import live_events

        return live_events(self, source, settings, questions)

    def answer_frames(self, frames: np.ndarray, prompt: str, max_new_tokens: int = 32,
                      seconds: dict[str, float] | None = None) -> RunReport:
        self.check_request(prompt, max_new_tokens)
        outputs, stages = self.reduce(frames)
        seconds = {**(seconds or {}), **stages}
        start = time.perf_counter()
        assembled = self.assemble(prompt, outputs)
        seconds["prompt assembly"] = time.perf_counter() - start
        generation = self.generate(assembled, max_new_tokens)
        seconds["LLM prefill"] = generation.prefill_s
        seconds["LLM decode"] = generation.decode_s
        return RunReport(self.text.decode(generation.tokens), True, self.vision.name, self.llm.name,
                         assembled.visual_tokens, assembled.length, len(generation.tokens), with_ttft(seconds),
                         generation.decode_tokens_per_s, settings=self.settings)

    def assemble(self, prompt: str, outputs: dict[str, np.ndarray]) -> AssembledPrompt:
        """The vision graph's `tokens` and `index` in the family's prompt (the one assembly)."""
        return self.text.assemble(prompt, outputs["tokens"], outputs["index"], self.aot_frames)

    def generate(self, prompt: AssembledPrompt, max_new_tokens: int, forced: list[int] | None = None,
                 on_token: Callable[[int], None] | None = None):
        """The LLM on an assembled prompt (its 3-D positions, where it has them); `on_token` sees each token."""
        return self.llm.generate(prompt.embeds, max_new_tokens, self.text.embed_token, eos=self.text.eos_token_id,
                                 forced=forced, position_ids=prompt.position_ids, on_token=on_token)
