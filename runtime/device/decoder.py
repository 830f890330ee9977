"""The int4 ONNX decoder (onnxruntime-genai's model builder, `inputs_embeds` in) with a KV-cache loop — the one
implementation: the device runtime feeds it embeddings from the bundle's table, the reference pipeline's
`runtime.llm.OnnxDecoder` from the adapter.

KV cache: the graph's attention is `GroupQueryAttention`, which accepts a past buffer that is also its present
output (`past_present_share_buffer` in genai_config.json). `kv="bound"` allocates one [1, kv_heads, capacity,
head_size] OrtValue per layer and side, binds it as both past input and present output with ORT IOBinding, and
the kernel appends each step's key/value in place: nothing of the cache crosses into numpy or is copied per
token. `kv="numpy"` feeds the past as numpy arrays and takes the grown present back (the whole cache copied every
step): the portable fallback, and the baseline the decode figures in docs/benchmarks.md compare against.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from aot_export.errors import InputError
from aot_export.manifest import file_findings, read_json_object
from aot_export.runners import session_options

LLM_MANIFEST = "llm.json"
GENAI_CONFIG = "genai_config.json"
KV_MODES = ("bound", "numpy")


@dataclass
class Generation:
    tokens: list[int]
    step_logits: list[np.ndarray]          # logits [V] before each generated token (index 0: the first token)
    prefill_s: float                       # time to first token
    decode_s: float                        # the remaining tokens
    prompt_tokens: int

    @property
    def decode_tokens_per_s(self) -> float:
        return (len(self.tokens) - 1) / self.decode_s if len(self.tokens) > 1 and self.decode_s > 0 else float("nan")


def greedy(step: Callable[[np.ndarray], np.ndarray], embed: Callable[[int], np.ndarray], first_logits: np.ndarray,
           max_new_tokens: int, eos: int | None, forced: list[int] | None) -> tuple[list[int], list[np.ndarray]]:
    """The decoding loop shared by every backend: `step(embedding [1,1,H]) -> logits [V]`; `forced` feeds the
    given tokens instead of the argmax (teacher forcing, to compare two backends step by step)."""
    tokens, logits = [], [first_logits]
    for i in range(max_new_tokens):
        token = forced[i] if forced is not None else int(np.argmax(logits[-1]))
        tokens.append(token)
        if i + 1 == max_new_tokens or (forced is None and token == eos):
            break
        logits.append(step(embed(token)))
    return tokens, logits


def read_llm_manifest(directory: str | os.PathLike, *, verify_hashes: bool = True) -> dict:
    """`llm.json`, refused unless every file it names is there with its recorded size and (with `verify_hashes`)
    sha256."""
    directory = Path(directory)
    path = directory / LLM_MANIFEST
    if not path.is_file():
        raise InputError(f"{directory}: no {LLM_MANIFEST}; build the ONNX LLM with `aot-export quantize-llm`")
    manifest = read_json_object(path, "rebuild it with `aot-export quantize-llm`")
    files, sizes = manifest.get("files"), manifest.get("sizes", {})
    if not isinstance(files, dict) or not isinstance(sizes, dict) or not files:
        raise InputError(f"{path}: names no files with their sha256; rebuild it with `aot-export quantize-llm`")
    findings = file_findings(directory, files, sizes, verify_hashes)
    if findings:
        raise InputError(f"{directory}: {findings[0]}; the LLM was changed after it was built: rebuild it with "
                         "`aot-export quantize-llm` or restore it")
    return manifest


class Positions:
    """Explicit 3-D position ids, where the prompt has them: the prompt's own [3, 1, L] on the first forward pass,
    then one position per generated token after the largest (none: the decoder derives 1-D positions)."""

    def __init__(self, prompt: np.ndarray | None):
        self.prompt = None if prompt is None else np.ascontiguousarray(prompt, dtype=np.int64)
        self.next = None if prompt is None else int(self.prompt.max()) + 1
        self.started = False

    def feed(self) -> dict[str, np.ndarray]:
        """The `position_ids` feed of the next forward pass."""
        if self.prompt is None:
            return {}
        if not self.started:
            self.started = True
            return {"position_ids": self.prompt}
        ids = np.full((3, 1, 1), self.next, np.int64)
        self.next += 1
        return {"position_ids": ids}


@dataclass
class OrtDecoder:
    """An ONNX LLM directory (`llm.json` + genai_config.json + the graph) on ONNX Runtime; `verify_hashes`: its
    files' sha256 checked against llm.json (sizes always)."""

    directory: Path
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    kv: str = "bound"
    intra_op_threads: int | None = None
    allow_spinning: bool = False
    verify_hashes: bool = True
    manifest: dict = field(init=False)
    name: str = field(init=False)

    def __post_init__(self) -> None:
        import onnxruntime as ort

        if self.kv not in KV_MODES:
            raise InputError(f"kv {self.kv!r}: choose one of {', '.join(KV_MODES)}")
        self.directory = Path(self.directory)
        self.manifest = read_llm_manifest(self.directory, verify_hashes=self.verify_hashes)
        built_for = self.manifest.get("execution_provider", "cpu")
        if built_for != "cpu" and self.providers == ("CPUExecutionProvider",):
            raise InputError(f"{self.directory} was built for the {built_for} execution provider and cannot run on "
                             f"this CPU; rebuild it with `aot-export quantize-llm --ep cpu`, or run where "
                             f"{built_for} is available")
        config = json.loads((self.directory / GENAI_CONFIG).read_text())["model"]["decoder"]
        self.layers, self.kv_heads, self.head_size = (config["num_hidden_layers"], config["num_key_value_heads"],
                                                      config["head_size"])
        self.hidden = config["hidden_size"]
        self.session = ort.InferenceSession(str(self.directory / config["filename"]),
                                            sess_options=session_options(self.intra_op_threads, self.allow_spinning),
                                            providers=list(self.providers))
        # Qwen2.5-VL's text model takes 3-D position ids [3, 1, L]; a plain decoder derives 1-D ones from the mask.
        self.position_axes = next((len(i.shape) for i in self.session.get_inputs() if i.name == "position_ids"), 0)
        self.past_names = [f"past_key_values.{i}.{kind}" for i in range(self.layers) for kind in ("key", "value")]
        self.present_names = [name.replace("past_key_values", "present") for name in self.past_names]
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        self.name = f"onnx-{self.manifest['precision']}"
        self.settings = {"providers": list(self.providers), "kv": self.kv,
                         "intra_op_threads": self.intra_op_threads, "allow_spinning": self.allow_spinning}

    def generate(self, embeds: np.ndarray, max_new_tokens: int, embed: Callable[[int], np.ndarray],
                 eos: int | None = None, forced: list[int] | None = None,
                 position_ids: np.ndarray | None = None) -> Generation:
        """`embeds` [1, L, H] float32 → greedy tokens; `embed(token)` gives a generated token's [1, 1, H];
        `position_ids` [3, 1, L]: explicit 3-D positions (generated tokens continue after the largest)."""
        embeds = np.ascontiguousarray(embeds, dtype=np.float32)
        if embeds.ndim != 3 or embeds.shape[0] != 1 or embeds.shape[2] != self.hidden:
            raise InputError(f"the prompt embeddings are {list(embeds.shape)}, the LLM takes [1, L, {self.hidden}]; "
                             "pair the bundle's parts from one model")
        if position_ids is not None and self.position_axes != 3:
            raise InputError(f"{self.directory}: this ONNX decoder has no 3-D position_ids input, so it cannot place "
                             "visual tokens at their (t, h, w) positions; rebuild it with `aot-export quantize-llm "
                             "--model` the exported model (or use --llm transformers)")
        positions = Positions(position_ids)
        run = self._bound if self.kv == "bound" else self._numpy
        return run(embeds, max_new_tokens, embed, eos, forced, positions)

    def _numpy(self, embeds, max_new_tokens, embed, eos, forced, positions: "Positions") -> Generation:
        empty = np.zeros((1, self.kv_heads, 0, self.head_size), np.float32)
        past = dict.fromkeys(self.past_names, empty)
        length = embeds.shape[1]
        output_names = ["logits", *self.present_names]

        def forward(inputs: np.ndarray) -> np.ndarray:
            nonlocal past
            feeds = {"inputs_embeds": inputs, "attention_mask": np.ones((1, length), np.int64), **past,
                     **positions.feed()}
            logits, *present = self.session.run(output_names, feeds)
            past = dict(zip(self.past_names, present))
            return logits[0, -1]

        start = time.perf_counter()
        first = forward(embeds)
        prefill = time.perf_counter() - start

        def step(embedding: np.ndarray) -> np.ndarray:
            nonlocal length
            length += 1
            return forward(embedding)

        start = time.perf_counter()
        tokens, logits = greedy(step, embed, first, max_new_tokens, eos, forced)
        return Generation(tokens, logits, prefill, time.perf_counter() - start, embeds.shape[1])

    def _bound(self, embeds, max_new_tokens, embed, eos, forced, positions: "Positions") -> Generation:
        import onnxruntime as ort

        length = embeds.shape[1]
        capacity = length + max_new_tokens
        shape = (1, self.kv_heads, capacity, self.head_size)
        cache = [ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, self.device) for _ in self.past_names]
        # GroupQueryAttention reads the valid length from the mask's sum and writes at that offset, so the buffer's
        # unused (uninitialised) tail is never read: the test against the numpy loop holds the logits to 1e-5.
        binding = self.session.io_binding()
        # Logits come back to the host (argmax, reports); the cache stays where the session runs.
        binding.bind_output("logits", "cpu")                    # first: get_outputs()[0] is the logits
        for past, present, value in zip(self.past_names, self.present_names, cache):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        mask = np.ones((1, capacity), np.int64)

        def forward(inputs: np.ndarray, total: int) -> np.ndarray:
            binding.bind_cpu_input("inputs_embeds", inputs)
            binding.bind_cpu_input("attention_mask", mask[:, :total])
            for name, value in positions.feed().items():
                binding.bind_cpu_input(name, value)
            binding.bind_output("logits", "cpu")
            self.session.run_with_iobinding(binding)
            return binding.get_outputs()[0].numpy()[0, -1]

        start = time.perf_counter()
        first = forward(embeds, length)
        prefill = time.perf_counter() - start

        def step(embedding: np.ndarray) -> np.ndarray:
            nonlocal length
            length += 1
            return forward(np.ascontiguousarray(embedding, dtype=np.float32), length)

        start = time.perf_counter()
        tokens, logits = greedy(step, embed, first, max_new_tokens, eos, forced)
        return Generation(tokens, logits, prefill, time.perf_counter() - start, embeds.shape[1])
