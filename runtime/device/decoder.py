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

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from aot_export.errors import InputError
from aot_export.manifest import confinement_finding, file_findings, read_json_object, read_manifest_file
from aot_export.runners import session_options

LLM_MANIFEST = "llm.json"
GENAI_CONFIG = "genai_config.json"
KV_MODES = ("bound", "numpy")
# The LLM of `run` on an artifact that is not a bundle (a bundle carries its own ONNX LLM) when --llm names none:
# the fp32 reference. `transformers-int8` (torch dynamic int8) failed the int8 chain gates on the trained fixture
# (first-token KL 1.7 against 0.05) and is an explicit choice only; docs/benchmarks.md.
DEFAULT_LLM = "transformers"
LLM_CHOICES_HELP = ("transformers (fp32), transformers-int8 (torch dynamic int8: fails the int8 gates on a trained "
                    "LLM) or an ONNX LLM directory (`aot-export quantize-llm`; --precision int8 holds the int8 gates)")


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
           max_new_tokens: int, eos: int | None, forced: list[int] | None,
           on_token: Callable[[int], None] | None = None) -> tuple[list[int], list[np.ndarray]]:
    """The decoding loop shared by every backend: `step(embedding [1,1,H]) -> logits [V]`; `forced` feeds the
    given tokens instead of the argmax (teacher forcing, to compare two backends step by step); `on_token` sees each
    token as it is chosen (streamed answers)."""
    tokens, logits = [], [first_logits]
    for i in range(max_new_tokens):
        token = forced[i] if forced is not None else int(np.argmax(logits[-1]))
        tokens.append(token)
        if on_token is not None:
            on_token(token)
        if i + 1 == max_new_tokens or (forced is None and token == eos):
            break
        logits.append(step(embed(token)))
    return tokens, logits


def read_llm_manifest(directory: str | os.PathLike, *, verify_hashes: bool = True) -> dict:
    """`llm.json`, refused unless the directory holds exactly the files it names (`file_findings`), each with its
    recorded size and (with `verify_hashes`) sha256, and genai_config.json's decoder graph is one of them."""
    directory = Path(directory)
    path = directory / LLM_MANIFEST
    fix = "rebuild it with `aot-export quantize-llm`"
    if not path.is_file():
        raise InputError(f"{directory}: no {LLM_MANIFEST}; build the ONNX LLM with `aot-export quantize-llm`")
    manifest = read_manifest_file(directory, LLM_MANIFEST, fix)
    files, sizes = manifest.get("files"), manifest.get("sizes", {})
    if not isinstance(sizes, dict):
        raise InputError(f"{path}: its 'sizes' is a JSON {type(sizes).__name__}, not an object; {fix}")
    findings = file_findings(directory, files, sizes, verify_hashes, LLM_MANIFEST)
    if findings:
        raise InputError(f"{directory}: {findings[0]}; the LLM was changed after it was built: {fix} or restore it")
    read_genai_config(directory, files)
    return manifest


def read_genai_config(directory: Path, files: dict) -> dict:
    """genai_config.json's `model` section, refused unless it is one of the files llm.json lists (`files`) and
    so is the decoder graph it names — inside the directory and hashed like the rest."""
    path, fix = directory / GENAI_CONFIG, "rebuild it with `aot-export quantize-llm`"
    if GENAI_CONFIG not in files:
        raise InputError(f"{directory}: {LLM_MANIFEST} does not list {GENAI_CONFIG}; {fix}")
    model = read_json_object(path, fix).get("model")
    decoder = model.get("decoder") if isinstance(model, dict) else None
    if not isinstance(decoder, dict) or not isinstance(model.get("vocab_size"), int) or not all(
            isinstance(decoder.get(key), int) for key in ("num_hidden_layers", "num_key_value_heads", "head_size",
                                                          "hidden_size")):
        raise InputError(f"{path}: no decoder section with its sizes (model.decoder, model.vocab_size); {fix}")
    filename = decoder.get("filename")
    why = confinement_finding(directory, filename) or (
        None if filename in files else f"{filename} is not listed in {LLM_MANIFEST}")
    if why:
        raise InputError(f"{path} names the decoder graph, but {why}; {fix}")
    return model


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
        config = read_genai_config(self.directory, self.manifest["files"])["decoder"]
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
        # Radians each key dimension turns per unit step of each position axis (`quantize-llm` records them from the
        # model's own rotary module); what a live window needs to move cached keys. None: an LLM built before.
        rotary = self.manifest.get("rotary")
        self.rotary = None if rotary is None else np.asarray(rotary, np.float64)
        self.name = f"onnx-{self.manifest['precision']}"
        self.settings = {"providers": list(self.providers), "kv": self.kv,
                         "intra_op_threads": self.intra_op_threads, "allow_spinning": self.allow_spinning}

    def generate(self, embeds: np.ndarray, max_new_tokens: int, embed: Callable[[int], np.ndarray],
                 eos: int | None = None, forced: list[int] | None = None,
                 position_ids: np.ndarray | None = None,
                 on_token: Callable[[int], None] | None = None) -> Generation:
        """`embeds` [1, L, H] float32 → greedy tokens; `embed(token)` gives a generated token's [1, 1, H];
        `position_ids` [3, 1, L]: explicit 3-D positions (generated tokens continue after the largest);
        `on_token` sees each token as it is chosen (an exception it raises stops the generation)."""
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
        return run(embeds, max_new_tokens, embed, eos, forced, positions, on_token)

    def _numpy(self, embeds, max_new_tokens, embed, eos, forced, positions: "Positions",
               on_token=None) -> Generation:
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
        tokens, logits = greedy(step, embed, first, max_new_tokens, eos, forced, on_token)
        return Generation(tokens, logits, prefill, time.perf_counter() - start, embeds.shape[1])

    def _bound(self, embeds, max_new_tokens, embed, eos, forced, positions: "Positions",
               on_token=None) -> Generation:
        # Room for a few tokens more than the prompt; the cache grows if the answer runs longer.
        cache = KVCache(self, embeds.shape[1] + min(max_new_tokens, 64))
        start = time.perf_counter()
        first = cache.append(embeds, positions.feed().get("position_ids"))
        prefill = time.perf_counter() - start

        def step(embedding: np.ndarray) -> np.ndarray:
            return cache.append(embedding, positions.feed().get("position_ids"))

        start = time.perf_counter()
        tokens, logits = greedy(step, embed, first, max_new_tokens, eos, forced, on_token)
        return Generation(tokens, logits, prefill, time.perf_counter() - start, embeds.shape[1])

    def cache(self, capacity: int) -> "KVCache":
        """A cache kept across calls (the live window): see `KVCache`."""
        return KVCache(self, capacity)


def rotate_keys(keys: np.ndarray, turns: np.ndarray) -> np.ndarray:
    """keys [..., n, D] rotated by `turns` [n, D] radians in the rotate-half layout every family here uses (dimension
    i pairs with i + D/2): the rotary embedding composes, so R(a)·R(p)·k = R(p + a)·k — a cached key moves to another
    position without its token being run again."""
    half = keys.shape[-1] // 2
    cos, sin = np.cos(turns).astype(np.float32), np.sin(turns).astype(np.float32)
    rotated_half = np.concatenate([-keys[..., half:], keys[..., :half]], axis=-1)
    return keys * cos + rotated_half * sin


class KVCache:
    """One decoder's cache kept across calls, as the live window needs it: one [1, kv_heads, capacity, head_size]
    buffer per layer and side, bound to the session as both past input and present output (GroupQueryAttention
    appends in place from the valid length the mask gives, so nothing is copied per call).

    `append(embeds, positions)` runs the decoder on the next tokens (a segment of a prompt, or one generated token)
    and returns the last token's logits; `rewind(length)` takes back everything after `length` (a question and its
    answer leave the window as it was); `drop(begin, end, new_positions)` removes slots [begin, end) and moves the
    rest down, turning each moved key to its new rotary position (`rotary` [axes, head_size]: radians per unit step
    of each position axis, recorded by `quantize-llm`). The buffers grow when a call needs more room (copied once),
    so a cache is sized by what it holds, never by a request up front.

    `positions` [axes, capacity] records every cached token's rotary position: the explicit ids where the decoder
    takes them, else its slot (a plain decoder derives positions from the valid length)."""

    def __init__(self, decoder: "OrtDecoder", capacity: int):
        self.decoder = decoder
        self.explicit = decoder.position_axes == 3
        self.length = 0
        self.positions = np.zeros((3 if self.explicit else 1, 0), np.int64)
        self.binding = decoder.session.io_binding()
        # Logits come back to the host (argmax, reports); bound first, so get_outputs()[0] is them.
        self.binding.bind_output("logits", "cpu")
        self.buffers: list[np.ndarray] = []
        self._allocate(max(capacity, 1))

    @property
    def capacity(self) -> int:
        return self.buffers[0].shape[2]

    def _allocate(self, capacity: int) -> None:
        import onnxruntime as ort

        shape = (1, self.decoder.kv_heads, capacity, self.decoder.head_size)
        old = self.buffers
        # Host buffers the OrtValues share (CPU): the cache is moved and rotated in place by numpy.
        self.buffers = [np.zeros(shape, np.float32) for _ in self.decoder.past_names]
        for new, previous in zip(self.buffers, old):
            new[:, :, :self.length] = previous[:, :, :self.length]
        self.values = [ort.OrtValue.ortvalue_from_numpy(b, self.decoder.device) for b in self.buffers]
        for past, present, value in zip(self.decoder.past_names, self.decoder.present_names, self.values):
            self.binding.bind_ortvalue_input(past, value)
            self.binding.bind_ortvalue_output(present, value)
        self.positions = np.concatenate([self.positions, np.zeros((self.positions.shape[0], capacity
                                                                   - self.positions.shape[1]), np.int64)], axis=1)

    def _sync_from_device(self) -> None:
        if self.decoder.device != "cpu":
            for buffer, value in zip(self.buffers, self.values):
                buffer[...] = value.numpy()

    def _sync_to_device(self) -> None:
        if self.decoder.device != "cpu":
            for buffer, value in zip(self.buffers, self.values):
                value.update_inplace(buffer)

    def reserve(self, extra: int) -> None:
        """Room for `extra` more tokens (the buffers grow by at least half, so growth is rare)."""
        if self.length + extra > self.capacity:
            self._sync_from_device()
            self._allocate(max(self.length + extra, self.capacity + self.capacity // 2))

    def append(self, embeds: np.ndarray, position_ids: np.ndarray | None = None) -> np.ndarray:
        """embeds [1, n, H] (explicit decoders: position_ids [3, 1, n]) → logits [V] of the last token."""
        embeds = np.ascontiguousarray(embeds, dtype=np.float32)
        count = embeds.shape[1]
        self.reserve(count)
        total = self.length + count
        self.binding.bind_cpu_input("inputs_embeds", embeds)
        self.binding.bind_cpu_input("attention_mask", np.ones((1, total), np.int64))
        if self.explicit:
            if position_ids is None:
                raise InputError("this decoder takes 3-D position ids and none were given")
            ids = np.ascontiguousarray(position_ids, dtype=np.int64)
            self.binding.bind_cpu_input("position_ids", ids)
            self.positions[:, self.length:total] = ids[:, 0]
        else:
            self.positions[0, self.length:total] = np.arange(self.length, total)
        self.binding.bind_output("logits", "cpu")
        self.decoder.session.run_with_iobinding(self.binding)
        self.length = total
        return self.binding.get_outputs()[0].numpy()[0, -1]

    def rewind(self, length: int) -> None:
        """Forget every token after the first `length` (their slots are overwritten by the next append)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"rewind to {length} of a cache holding {self.length}")
        self.length = length

    def drop(self, begin: int, end: int, rotary: np.ndarray, new_positions: np.ndarray | None = None) -> None:
        """Remove slots [begin, end); the tokens after them move down to `begin` and take `new_positions`
        [axes, moved] (a plain decoder: their new slots), their keys turned by the difference (values carry no
        position). `rotary` [axes, head_size]: radians per unit step of each axis (`OrtDecoder.rotary`)."""
        if not 0 <= begin <= end <= self.length:
            raise ValueError(f"drop [{begin}, {end}) of a cache holding {self.length}")
        moved = self.length - end
        if new_positions is None:
            new_positions = np.arange(begin, begin + moved)[None]
        old = self.positions[:, end:self.length]
        turns = (np.asarray(new_positions, np.int64) - old).T.astype(np.float64) @ np.asarray(rotary, np.float64)
        self._sync_from_device()
        for i, buffer in enumerate(self.buffers):
            tail = buffer[:, :, end:self.length]
            buffer[:, :, begin:begin + moved] = rotate_keys(tail, turns) if i % 2 == 0 else tail.copy()
        self._sync_to_device()
        self.positions[:, begin:begin + moved] = new_positions
        self.length = begin + moved
