"""LLM backends behind one interface: prefill `inputs_embeds`, then greedy decoding with a KV cache.

- `TransformersDecoder`: the checkpoint's decoder in PyTorch, fp32 (the reference) or with int8 dynamic
  quantization of every Linear (CPU).
- `OnnxDecoder`: an int4 ONNX decoder built by onnxruntime-genai's model builder from the checkpoint's language
  model (`inputs_embeds` input), run with plain onnxruntime and an explicit KV-cache loop — the deployable edge
  path (onnxruntime on CPU here, onnxruntime-gpu on Jetson / datacenter).

`generate(..., forced=ids)` feeds the given tokens instead of its own choices (teacher forcing), so two backends
can be compared step by step on the same continuation.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from aot_export.artifacts import atomic_dir, check_destination
from aot_export.errors import InputError
from aot_export.manifest import VERIFY_HASHES, file_findings, hash_files, read_json_object

LLM_MANIFEST = "llm.json"


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


@torch.inference_mode()
def embed_token(adapter, token: int) -> Tensor:
    """[1, 1, H]: one generated token through the LLM's own embedding table (every backend feeds embeddings)."""
    return adapter.embed_tokens(torch.tensor([[token]])).float()


def greedy(step, embed, first_logits: np.ndarray, max_new_tokens: int, eos: int | None,
           forced: list[int] | None) -> tuple[list[int], list[np.ndarray]]:
    """The decoding loop shared by every backend: `step(embedding [1,1,H]) -> logits [V]`."""
    tokens, logits = [], [first_logits]
    for i in range(max_new_tokens):
        token = forced[i] if forced is not None else int(np.argmax(logits[-1]))
        tokens.append(token)
        if i + 1 == max_new_tokens or (forced is None and token == eos):
            break
        logits.append(step(embed(token)))
    return tokens, logits


@dataclass
class TransformersDecoder:
    adapter: object
    int8: bool = False
    name: str = field(init=False)

    def __post_init__(self) -> None:
        decoder, lm_head = self.adapter.decoder()
        if self.int8:
            # Dynamic int8: weights int8, activations quantized per batch at run time (CPU kernels). torch warns
            # that its quantized tensor types will move to torchao; the kernels are today's.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                decoder, lm_head = (torch.ao.quantization.quantize_dynamic(copy.deepcopy(m), {nn.Linear},
                                                                           dtype=torch.qint8)
                                    for m in (decoder, lm_head))
        self.decoder, self.lm_head = decoder.eval(), lm_head.eval()
        self.name = "transformers-int8" if self.int8 else "transformers-fp32"

    @torch.inference_mode()
    def generate(self, embeds: Tensor, max_new_tokens: int, eos: int | None = None,
                 forced: list[int] | None = None, position_ids: Tensor | None = None) -> Generation:
        """`position_ids` [3, 1, L]: explicit 3-D rotary positions of the prompt (Qwen2.5-VL, Cosmos3-Edge); each
        generated token then takes the next position after the largest, on all three axes, as Hugging Face does."""
        from transformers import DynamicCache

        cache = DynamicCache()
        start = time.perf_counter()
        out = self.decoder(inputs_embeds=embeds, cache=cache, use_cache=True, position_ids=position_ids)
        first = self.lm_head(out.last_hidden_state[:, -1]).float()[0].numpy()
        prefill = time.perf_counter() - start
        position = embeds.shape[1] if position_ids is None else int(position_ids.max()) + 1
        axes = 1 if position_ids is None else position_ids.shape[0]

        def step(embedding: Tensor) -> np.ndarray:
            nonlocal position
            ids = torch.tensor([[position]]) if axes == 1 else torch.full((axes, 1, 1), position)
            out = self.decoder(inputs_embeds=embedding, cache=cache, use_cache=True, position_ids=ids)
            position += 1
            return self.lm_head(out.last_hidden_state[:, -1]).float()[0].numpy()

        start = time.perf_counter()
        tokens, logits = greedy(step, partial(embed_token, self.adapter), first, max_new_tokens, eos, forced)
        return Generation(tokens, logits, prefill, time.perf_counter() - start, embeds.shape[1])


@dataclass
class OnnxDecoder:
    directory: Path
    adapter: object
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    name: str = field(init=False)

    def __post_init__(self) -> None:
        import onnxruntime as ort

        self.directory = Path(self.directory)
        manifest = read_llm_manifest(self.directory)
        built_for = manifest.get("execution_provider", "cpu")
        if built_for != "cpu" and self.providers == ("CPUExecutionProvider",):
            raise InputError(f"{self.directory} was built for the {built_for} execution provider and cannot run on "
                             f"this CPU; rebuild it with `aot-export quantize-llm --ep cpu`, or run where "
                             f"{built_for} is available")
        hidden = self.adapter.info.hidden
        if manifest["hidden_size"] != hidden or manifest["config_hash"] != self.adapter.info.config_hash:
            raise InputError(f"{self.directory} was built from {manifest['model_id']} (hidden "
                             f"{manifest['hidden_size']}, config {manifest['config_hash']}), not from "
                             f"{self.adapter.info.model_id} (hidden {hidden}, config "
                             f"{self.adapter.info.config_hash}); rebuild it with `aot-export quantize-llm`")
        config = json.loads((self.directory / "genai_config.json").read_text())["model"]["decoder"]
        self.layers, self.kv_heads, self.head_size = (config["num_hidden_layers"], config["num_key_value_heads"],
                                                      config["head_size"])
        self.session = ort.InferenceSession(str(self.directory / config["filename"]), providers=list(self.providers))
        self.position_axes = next((len(i.shape) for i in self.session.get_inputs() if i.name == "position_ids"), 0)
        self.name = f"onnx-{manifest['precision']}"

    def _run(self, embeds: np.ndarray, past: dict[str, np.ndarray], total: int, positions: np.ndarray | None = None):
        feeds = {"inputs_embeds": embeds.astype(np.float32), "attention_mask": np.ones((1, total), np.int64), **past}
        if positions is not None:
            feeds["position_ids"] = positions.astype(np.int64)
        outputs = self.session.run(None, feeds)
        names = [o.name for o in self.session.get_outputs()]
        result = dict(zip(names, outputs))
        present = {name.replace("present", "past_key_values"): value for name, value in result.items()
                   if name.startswith("present")}
        return result["logits"][0, -1], present

    def generate(self, embeds: Tensor, max_new_tokens: int, eos: int | None = None,
                 forced: list[int] | None = None, position_ids: Tensor | None = None) -> Generation:
        """`position_ids` [3, 1, L] as for `TransformersDecoder.generate`; the decoder must take them (the builder
        gives Qwen2.5-VL's text model a 3-D `position_ids` input)."""
        if position_ids is not None and self.position_axes != 3:
            raise InputError(f"{self.directory}: this ONNX decoder has no 3-D position_ids input, so it cannot place "
                             "visual tokens at their (t, h, w) positions; rebuild it with `aot-export quantize-llm` "
                             "from a Qwen2.5-VL checkpoint or use --llm transformers")
        empty = np.zeros((1, self.kv_heads, 0, self.head_size), np.float32)
        past = {f"past_key_values.{i}.{kind}": empty for i in range(self.layers) for kind in ("key", "value")}
        length = embeds.shape[1]
        positions = None if position_ids is None else position_ids.numpy()
        start = time.perf_counter()
        first, past = self._run(embeds.numpy(), past, length, positions)
        prefill = time.perf_counter() - start
        position = None if positions is None else int(positions.max()) + 1

        def step(embedding: Tensor) -> np.ndarray:
            nonlocal past, length, position
            length += 1
            logits, past = self._run(embedding.numpy(), past, length,
                                     None if position is None else np.full((3, 1, 1), position))
            if position is not None:
                position += 1
            return logits

        start = time.perf_counter()
        tokens, logits = greedy(step, partial(embed_token, self.adapter), first, max_new_tokens, eos, forced)
        return Generation(tokens, logits, prefill, time.perf_counter() - start, embeds.shape[1])


def read_llm_manifest(directory: Path, verify: bool | None = None) -> dict:
    """`llm.json`, refused unless every file it names is there with its recorded size and (unless `verify` is
    False or hashes are skipped) sha256."""
    directory = Path(directory)
    path = directory / LLM_MANIFEST
    if not path.is_file():
        raise InputError(f"{directory}: no {LLM_MANIFEST}; build the ONNX LLM with `aot-export quantize-llm`")
    manifest = read_json_object(path, "rebuild it with `aot-export quantize-llm`")
    files, sizes = manifest.get("files"), manifest.get("sizes", {})
    if not isinstance(files, dict) or not isinstance(sizes, dict) or not files:
        raise InputError(f"{path}: names no files with their sha256; rebuild it with `aot-export quantize-llm`")
    hashes = VERIFY_HASHES.get() if verify is None else verify
    findings = file_findings(directory, files, sizes, hashes)
    if findings:
        raise InputError(f"{directory}: {findings[0]}; the LLM was changed after it was built: rebuild it with "
                         "`aot-export quantize-llm` or restore it")
    return manifest


def build_onnx_decoder(adapter, out_dir: str | os.PathLike, precision: str = "int4",
                       execution_provider: str = "cpu", progress: bool = True, force: bool = False) -> Path:
    """The checkpoint's language model → onnxruntime-genai's model builder (`inputs_embeds` in, no embedding
    table: the runtime embeds text itself) → `out_dir` with `llm.json`. `force` replaces an existing ONNX LLM
    there; anything else is refused."""
    if precision not in ("int4", "fp32", "fp16"):
        raise InputError(f"precision {precision!r}: the ONNX LLM is built as int4, fp16 or fp32")
    out_dir = Path(out_dir)
    decoder, _ = adapter.decoder()
    bytes_per_weight = {"int4": 1, "fp16": 2, "fp32": 4}[precision]
    check_destination(out_dir, "llm", force, sum(p.numel() for p in decoder.parameters()) * bytes_per_weight)
    with tempfile.TemporaryDirectory() as work, atomic_dir(out_dir, "llm", force) as staging:
        source = adapter.save_language_model(Path(work) / "hf")
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o", str(staging),
                   "-p", precision, "-e", execution_provider, "-c", str(Path(work) / "cache"),
                   "--extra_options", "exclude_embeds=true"]
        done = subprocess.run(command, capture_output=not progress, text=True)
        if done.returncode != 0:
            tail = (done.stderr or "").strip().splitlines()[-1:] or ["see above"]
            raise RuntimeError(f"onnxruntime-genai's model builder failed: {tail[0]}")
        shutil.rmtree(staging / "cache", ignore_errors=True)
        files = sorted(p.name for p in staging.iterdir())
        manifest = {"model_id": adapter.info.model_id, "config_hash": adapter.info.config_hash,
                    "hidden_size": adapter.info.hidden, "precision": precision,
                    "execution_provider": execution_provider, "builder": "onnxruntime_genai.models.builder",
                    "inputs_embeds": True, "files": hash_files(staging, files),
                    "sizes": {name: (staging / name).stat().st_size for name in files}}
        (staging / LLM_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out_dir


def load_llm(spec: str, adapter) -> TransformersDecoder | OnnxDecoder:
    """`transformers` (fp32), `transformers-int8`, or the directory of an ONNX LLM."""
    if spec == "transformers":
        return TransformersDecoder(adapter)
    if spec == "transformers-int8":
        return TransformersDecoder(adapter, int8=True)
    if Path(spec).is_dir():
        return OnnxDecoder(Path(spec), adapter)
    raise InputError(f"--llm {spec!r}: use transformers, transformers-int8 or an ONNX LLM directory "
                     "(`aot-export quantize-llm`)")
