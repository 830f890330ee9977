"""LLM backends behind one interface: prefill `inputs_embeds`, then greedy decoding with a KV cache.

- `TransformersDecoder`: the checkpoint's decoder in PyTorch, fp32 (the reference, and `run`'s default LLM where
  the artifact is not a bundle: `DEFAULT_LLM`) or with torch's dynamic int8 quantization of every Linear, lm_head
  included (`transformers-int8`, CPU, an explicit choice only: on the trained Qwen2.5-0.5B its per-tensor int8
  activations fail the int8 chain gates — first-token KL 1.7 against 0.05 — where the int8 ONNX LLM,
  `quantize-llm --precision int8`, holds them at ~1e-3; docs/benchmarks.md).
- `OnnxDecoder`: an int4 (or int8, fp16, fp32) ONNX decoder built from the checkpoint's language model
  (`inputs_embeds` input) by onnxruntime-genai's model builder, or, for a text model the builder lacks, by
  torch.onnx and ONNX Runtime's MatMulNBits quantizer (runtime/decoder_export.py); run with plain onnxruntime and an
  explicit KV-cache loop — the deployable edge path (onnxruntime on CPU here, onnxruntime-gpu on Jetson / datacenter).

`generate(..., forced=ids)` feeds the given tokens instead of its own choices (teacher forcing), so two backends
can be compared step by step on the same continuation.
"""

from __future__ import annotations

import contextlib
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
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from aot_export.artifacts import atomic_dir, check_destination, reported_os_error
from aot_export.errors import InputError
from aot_export.manifest import hash_files

from .device.decoder import DEFAULT_LLM, LLM_MANIFEST, Generation, OrtDecoder, greedy, read_llm_manifest

__all__ = ["DEFAULT_LLM", "LLM_MANIFEST", "ONNX_PRECISIONS", "Generation", "OnnxDecoder", "TransformersDecoder",
           "build_onnx_decoder", "greedy", "load_llm", "read_llm_manifest"]


@torch.inference_mode()
def embed_token(adapter, token: int) -> Tensor:
    """[1, 1, H]: one generated token through the LLM's own embedding table (every backend feeds embeddings)."""
    return adapter.embed_tokens(torch.tensor([[token]])).float()


@dataclass
class TransformersDecoder:
    adapter: object
    int8: bool = False
    name: str = field(init=False)

    def __post_init__(self) -> None:
        decoder, lm_head = self.adapter.decoder()
        if self.int8:
            # Dynamic int8: weights int8 per tensor, activations quantized per tensor per batch at run time (CPU
            # kernels). quantize_dynamic swaps a module's Linear children, never the module itself: lm_head, a bare
            # Linear, goes in a Sequential or it stays fp32 (as it did before: 27 % of a 0.5B model's weights).
            # Measured on the trained Qwen2.5-0.5B (docs/benchmarks.md): the activations cost most (inputs of
            # mlp.down_proj reach 500× their median channel), per-channel weights do not save it. torch warns that
            # its quantized tensor types will move to torchao; the kernels are today's.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                decoder, lm_head = (torch.ao.quantization.quantize_dynamic(nn.Sequential(copy.deepcopy(m)),
                                                                           {nn.Linear}, dtype=torch.qint8)[0]
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
    """The device runtime's `OrtDecoder` (IOBinding KV loop), fed the adapter's embeddings; `verify_hashes`: the
    files' sha256 checked against llm.json (sizes always)."""

    directory: Path
    adapter: object
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    verify_hashes: bool = True
    name: str = field(init=False)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        manifest = read_llm_manifest(self.directory, verify_hashes=self.verify_hashes)
        hidden = self.adapter.info.hidden
        if manifest["hidden_size"] != hidden or manifest["config_hash"] != self.adapter.info.config_hash:
            raise InputError(f"{self.directory} was built from {manifest['model_id']} (hidden "
                             f"{manifest['hidden_size']}, config {manifest['config_hash']}), not from "
                             f"{self.adapter.info.model_id} (hidden {hidden}, config "
                             f"{self.adapter.info.config_hash}); rebuild it with `aot-export quantize-llm`")
        self.core = OrtDecoder(self.directory, tuple(self.providers), verify_hashes=self.verify_hashes)
        self.name, self.settings = self.core.name, self.core.settings

    def generate(self, embeds: Tensor, max_new_tokens: int, eos: int | None = None,
                 forced: list[int] | None = None, position_ids: Tensor | None = None) -> Generation:
        """`position_ids` [3, 1, L] as for `TransformersDecoder.generate` (the decoder must take them: genai's builder
        gives Qwen2.5-VL's text model a 3-D `position_ids` input, runtime/decoder_export.py Cosmos3-Edge's)."""
        embed = partial(embed_token, self.adapter)
        return self.core.generate(embeds.numpy(), max_new_tokens, lambda token: embed(token).numpy(), eos, forced,
                                  None if position_ids is None else position_ids.numpy())


GENAI_BUILDER = "onnxruntime_genai.models.builder"


def run_genai_builder(adapter, staging: Path, work: Path, precision: str, execution_provider: str,
                      progress: bool, release_weights: bool = False, verbose: bool = False) -> dict:
    """The checkpoint's language model → onnxruntime-genai's model builder (`inputs_embeds` in, no embedding table:
    the runtime embeds text itself) → `staging`; returns what llm.json records of how it was built (nothing more).
    `release_weights`: the adapter's weights are freed once the checkpoint is written (the builder loads its own).
    The builder's output (~60 lines for the tiny model, a line per weight) is shown with `verbose` (--debug) or
    as its last lines on failure; `progress` shows its latest line as one status line."""
    try:
        with transformers_progress(progress):
            source = adapter.save_language_model(work / "hf")
    except Exception as exc:       # safetensors reports a full disk or a file-size limit as its own error type
        where = f"{work / 'hf'} (the LLM's checkpoint for the builder; TMPDIR moves it)"
        raise reported_os_error(str(exc), where) or exc
    if release_weights:
        adapter.release_weights()
    drop_stale_gguf_config(Path(source))
    command = [sys.executable, "-m", GENAI_BUILDER, "-i", str(source), "-o", str(staging),
               "-p", precision, "-e", execution_provider, "-c", str(work / "cache"),
               "--extra_options", "exclude_embeds=true"]
    returncode, output = run_child(command, "onnxruntime-genai builder", progress, verbose)
    if returncode != 0:
        if not verbose:
            print("\n".join(output[-FAILURE_LINES:]), file=sys.stderr)
        tail = output[-1:] or ["see above"]
        failed = RuntimeError(f"onnxruntime-genai's model builder failed: {tail[0]}")
        raise reported_os_error(tail[0], staging) or failed
    shutil.rmtree(staging / "cache", ignore_errors=True)
    return {}


FAILURE_LINES = 10         # of a failed builder's output, shown before the error


def drop_stale_gguf_config(checkpoint: Path) -> None:
    """A model loaded from a GGUF file (`from_pretrained(gguf_file=...)`, dequantized) keeps a `quantization_config`
    with `quant_method: gguf` in its config, which it carries into every checkpoint saved from it; the weights
    written are plain floats, yet genai's builder refuses the checkpoint ("The gguf quantized model is not
    currently supported"). Drop it from the LLM checkpoint written for the builder."""
    path = checkpoint / "config.json"
    config = json.loads(path.read_text())
    if (config.get("quantization_config") or {}).get("quant_method") == "gguf":
        del config["quantization_config"]
        path.write_text(json.dumps(config, indent=2) + "\n")


@contextlib.contextmanager
def transformers_progress(show: bool) -> Iterator[None]:
    """Transformers' own progress bars (writing a checkpoint's shards) only where ours show (not with --quiet)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    if enabled and not show:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled and not show:
            hf_logging.enable_progress_bar()


def run_child(command: list[str], name: str, progress: bool, verbose: bool) -> tuple[int, list[str]]:
    """Run `command` with its stdout and stderr read here: every line echoed on stderr when `verbose`, else the
    latest one as a status line (on a terminal, when `progress`); returns its exit status and its lines (a
    progress bar's redraws, split at carriage returns, count as lines)."""
    from tqdm import tqdm

    # The child runs in its own session, outside the terminal's process group: Ctrl-C interrupts us only, and we
    # end the child, which so prints no traceback (no preexec_fn: unsafe once threads run). Bytes: its progress
    # bars' carriage returns reach the terminal as they are (text mode makes each redraw a line).
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    lines: list[str] = []
    status = tqdm(disable=None if progress and not verbose else True, file=sys.stderr, leave=False,
                  bar_format="{desc} [{elapsed}]")
    try:
        for raw in child.stdout:
            if verbose:
                sys.stderr.write(raw.decode(errors="replace"))
                sys.stderr.flush()
            for line in filter(None, (part.strip() for part in raw.decode(errors="replace").split("\r"))):
                lines.append(line)
            if lines:
                status.set_description_str(f"{name}: {lines[-1][:70]}")
        return child.wait(), lines
    finally:
        status.close()
        if child.poll() is None:
            child.kill()
            child.wait()


def decoder_builder(adapter, precision: str, execution_provider: str,
                    verbose: bool = False) -> tuple[str, Callable[..., dict]]:
    """The family's route, its settings checked before any work: (llm.json's `builder`, the function that writes
    the decoder into a staging directory and returns what llm.json records of it). `verbose`: the genai builder's
    own output on stderr."""
    if adapter.genai_builder:
        return GENAI_BUILDER, partial(run_genai_builder, verbose=verbose)
    from .decoder_export import BUILDER, check_settings, export_decoder

    check_settings(precision, execution_provider)
    return BUILDER, export_decoder


def rotary_turns(adapter) -> list[list[float]] | None:
    """[axes, head_size] radians each key dimension turns per unit step of each rotary position axis, read from the
    model's own rotary module (its sections and their order included); None where the stack has no such module.
    Recorded in llm.json: the device moves a cached key to another position with it (`KVCache.drop`)."""
    stack = adapter.decoder()[0]
    rotary = getattr(stack, "rotary_emb", None)
    if rotary is None:
        return None
    axes = adapter.position_axes
    units = torch.eye(axes, dtype=torch.long)
    turns = []
    with torch.inference_mode():
        for unit in units:
            cos, sin = rotary(torch.zeros(1, 1, 1), unit.view(axes, 1, 1) if axes == 3 else unit.view(1, 1))
            turns.append(torch.atan2(sin.double(), cos.double()).reshape(-1).tolist())
    return turns


# Weight precisions of `quantize-llm`: int4 / int8 weights in MatMulNBits blocks of 32 rows.
ONNX_PRECISIONS = ("int4", "int8", "fp16", "fp32")


def build_onnx_decoder(adapter, out_dir: str | os.PathLike, precision: str = "int4",
                       execution_provider: str = "cpu", progress: bool = True, force: bool = False,
                       release_weights: bool = False, verbose: bool = False) -> Path:
    """The checkpoint's language model as an ONNX decoder with `inputs_embeds` in → `out_dir` with `llm.json`:
    onnxruntime-genai's model builder where it takes the family's text model (`adapter.genai_builder`), otherwise
    the text model exported with torch.onnx, int4 by ONNX Runtime's MatMulNBits quantizer
    (runtime/decoder_export.py); llm.json's `builder` says which. `force` replaces an existing ONNX LLM there;
    anything else is refused. `release_weights` (the CLI, which needs the model no further): the adapter's weights
    are freed as soon as the route has what it needs of them — measured, `quantize-llm` of qwen2.5-vl-3b-random held
    15 GB beside the builder's own copy and did not fit in 24 GB. `verbose` (--debug): the genai builder's output
    as it prints it (otherwise only its last lines, if it fails)."""
    if precision not in ONNX_PRECISIONS:
        raise InputError(f"precision {precision!r}: the ONNX LLM is built as {', '.join(ONNX_PRECISIONS)}")
    builder, build = decoder_builder(adapter, precision, execution_provider, verbose)
    out_dir = Path(out_dir)
    bytes_per_weight = {"int4": 1, "int8": 1, "fp16": 2, "fp32": 4}[precision]
    weights = sum(p.numel() for p in adapter.decoder()[0].parameters())
    check_destination(out_dir, "llm", force, weights * bytes_per_weight)
    rotary = rotary_turns(adapter)                       # before the route may release the weights
    with tempfile.TemporaryDirectory() as work, atomic_dir(out_dir, "llm", force) as staging:
        details = build(adapter, staging, Path(work), precision, execution_provider, progress,
                        release_weights=release_weights)
        files = sorted(p.name for p in staging.iterdir())
        manifest = {"model_id": adapter.info.model_id, "config_hash": adapter.info.config_hash,
                    "hidden_size": adapter.info.hidden, "precision": precision,
                    "execution_provider": execution_provider, "builder": builder, **details,
                    **({"rotary": rotary} if rotary is not None else {}),
                    "inputs_embeds": True, "files": hash_files(staging, files),
                    "sizes": {name: (staging / name).stat().st_size for name in files}}
        (staging / LLM_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out_dir


def load_llm(spec: str, adapter, *, verify_hashes: bool = True) -> TransformersDecoder | OnnxDecoder:
    """`transformers` (fp32), `transformers-int8`, or the directory of an ONNX LLM (`verify_hashes`: its sha256
    checked against llm.json; sizes always)."""
    if spec == "transformers":
        return TransformersDecoder(adapter)
    if spec == "transformers-int8":
        return TransformersDecoder(adapter, int8=True)
    if Path(spec).is_dir():
        return OnnxDecoder(Path(spec), adapter, verify_hashes=verify_hashes)
    raise InputError(f"--llm {spec!r}: use transformers, transformers-int8 or an ONNX LLM directory "
                     "(`aot-export quantize-llm`)")
