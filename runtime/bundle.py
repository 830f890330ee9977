"""`aot-export bundle`: an export (or engine) directory + an ONNX LLM directory (`quantize-llm`) → one directory with
everything the device runtime (`runtime.device`) needs and nothing else; layout and refusals in
`runtime.device.bundle`. Writing needs the model (tokenizer, embedding table, newline vector, the prompt description
`runtime.prompt.prompt_spec` — chat template pieces, placeholder, 3-D layout), so it runs where the export stack is
installed; reading needs none of it.

The text embedding table is stored as an .npy array, memory-mapped on the device (only the rows a prompt uses are
read; no session, no graph), in fp16 by default (half the file) — docs/benchmarks.md has the measured cost.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from aot_export.adapters import ADAPTERS
from aot_export.artifacts import atomic_dir, check_destination, sha256_file
from aot_export.errors import InputError
from aot_export.manifest import MANIFEST, failed_gates, read_manifest, refuse_failed_gates
from engines.sidecar import PLAN, SIDECAR, check_against_export, read_sidecar

from .device.bundle import BUNDLE, BUNDLE_SCHEMA, EMBEDDINGS, LLM_DIR, NEWLINE, REFUSED_ON, TOKENIZER, VISION_DIR
from .device.decoder import GENAI_CONFIG, LLM_MANIFEST, read_genai_config, read_llm_manifest
from .prompt import backend_tokenizer, prompt_spec
from .vision import model_adapter, resolve_artifact

EMBEDDING_DTYPES = {"fp16": np.float16, "fp32": np.float32}


def decoder_position_axes(llm: Path, files: dict) -> int:
    """3 where the ONNX decoder takes 3-D `position_ids` [3, 1, L], 1 where it derives 1-D positions itself (read
    from the graph's inputs, without its weights); `files`: what its llm.json lists."""
    import onnx

    config = read_genai_config(llm, files)["decoder"]
    graph = onnx.load(str(llm / config["filename"]), load_external_data=False).graph
    inputs = {i.name: len(i.type.tensor_type.shape.dim) for i in graph.input}
    return 3 if inputs.get("position_ids") == 3 else 1


def check_decoder_positions(llm: Path, files: dict, model: dict) -> int:
    """The decoder's position axes, refused unless they are the exported family's (before its weights load)."""
    adapter = ADAPTERS.get(model.get("model_type"))
    axes = decoder_position_axes(llm, files)
    if adapter is not None and axes != adapter.position_axes:
        needs = ("places visual tokens at 3-D (t, h, w) positions" if adapter.position_axes == 3
                 else "takes 1-D positions")
        has = "takes 3-D position_ids" if axes == 3 else "takes no 3-D position_ids"
        raise InputError(f"{llm}: the export's model ({model.get('model_id')}) {needs} but this decoder {has}; "
                         "rebuild the LLM with `aot-export quantize-llm --model` the exported model")
    return axes


def write_bundle(model: str | os.PathLike, llm: str | os.PathLike, out: str | os.PathLike,
                 export: str | os.PathLike | None = None, embeddings: str = "fp16", adapter=None,
                 force: bool = False, *, verify_hashes: bool = True, allow_failed: bool = False) -> Path:
    """`model`: an export or engine directory (an engine is checked against `export`, or the export found beside
    it); `llm`: an ONNX LLM directory. Parts from another model are refused before anything is written, and so
    are parts whose files differ from their manifests (sizes always, sha256 with `verify_hashes`), and a part
    whose recorded verdict failed its gates unless `allow_failed` (bundle.json's `failed_gates` then says which,
    and the device refuses it unless told the same)."""
    if embeddings not in EMBEDDING_DTYPES:
        raise InputError(f"--embeddings {embeddings!r}: choose fp16 or fp32")
    out = check_destination(out, "bundle", force, sources={"artifact": model, "export": export, "LLM": llm})
    artifact = resolve_artifact(model, export, verify_hashes=verify_hashes)
    if artifact.kind == "model":
        raise InputError(f"{model} is neither an export nor an engine directory; export one with `aot-export export`")
    if artifact.kind == "engine" and artifact.export_dir is None:
        raise InputError(f"{model}: the export this engine was built from is not beside it; pass --export EXPORT_DIR "
                         "so that the bundle records (and the device checks) the engine against it")
    export_manifest = read_manifest(artifact.export_dir, verify_hashes=verify_hashes)
    if artifact.kind == "engine":
        check_against_export(read_sidecar(model, verify_hashes=verify_hashes), export_manifest)
    failures = list(dict.fromkeys([*artifact.failures, *failed_gates(export_manifest.extra)]))
    warning = refuse_failed_gates(model, failures, allow_failed)
    if warning:
        print(warning, file=sys.stderr)
    llm = Path(llm)
    llm_manifest = read_llm_manifest(llm, verify_hashes=verify_hashes)
    model_info = export_manifest.model
    if llm_manifest["config_hash"] != model_info["config_hash"]:
        raise InputError(f"{llm} was built from {llm_manifest['model_id']} (config {llm_manifest['config_hash']}), "
                         f"the export from {model_info['model_id']} (config {model_info['config_hash']}); pass the "
                         "LLM of the exported model (`aot-export quantize-llm --model ...`)")
    position_axes = check_decoder_positions(llm, llm_manifest["files"], model_info)
    adapter = model_adapter(artifact, adapter)
    spec = prompt_spec(adapter)
    tokenizer = adapter.tokenizer
    vocab = read_genai_config(llm, llm_manifest["files"])["vocab_size"]     # every id the LLM can emit
    with torch.inference_mode():
        table = adapter.embed_tokens(torch.arange(vocab).unsqueeze(0))[0].float().numpy()
    newline = None if adapter.image_newline is None else adapter.image_newline.detach().float().numpy()
    with atomic_dir(out, "bundle", force) as staging:
        vision = staging / VISION_DIR
        vision.mkdir()
        names = [PLAN, SIDECAR] if artifact.kind == "engine" else [MANIFEST, *export_manifest.files]
        for name in names:
            shutil.copy2(Path(model) / name, vision / name)
        (staging / LLM_DIR).mkdir()
        # The decoder's own files only (the tokenizer travels as text/tokenizer.json); the bundle's llm.json names
        # just those, with the sizes and hashes the LLM directory recorded, so the decoder verifies what is there.
        decoder_files = [name for name in llm_manifest["files"]
                         if name.endswith((".onnx", ".data")) or name == GENAI_CONFIG]
        for name in dict.fromkeys([GENAI_CONFIG, *decoder_files]):
            shutil.copy2(llm / name, staging / LLM_DIR / name)
        kept = {**llm_manifest, "files": {n: llm_manifest["files"][n] for n in decoder_files},
                "sizes": {n: s for n, s in llm_manifest.get("sizes", {}).items() if n in decoder_files}}
        (staging / LLM_DIR / LLM_MANIFEST).write_text(json.dumps(kept, indent=2, sort_keys=True) + "\n")
        (staging / "text").mkdir()
        backend_tokenizer(adapter).save(str(staging / TOKENIZER))
        np.save(staging / EMBEDDINGS, table.astype(EMBEDDING_DTYPES[embeddings]))
        if newline is not None:
            np.save(staging / NEWLINE, newline)
        files = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
        sidecar = read_sidecar(model, verify_hashes=verify_hashes) if artifact.kind == "engine" else None
        data = {"schema_version": BUNDLE_SCHEMA,
                "model": {"model_id": model_info["model_id"], "config_hash": model_info["config_hash"],
                          "hidden": int(table.shape[-1]), "vocab": int(table.shape[0])},
                "vision": {"kind": artifact.kind,
                           "flavour": sidecar.flavour if sidecar is not None else "onnxruntime"},
                "export_manifest": export_manifest.to_dict(),
                "frames": export_manifest.video_frames, "preprocessing": export_manifest.preprocessing.to_dict(),
                # How `aot-export live` runs it: one call of the vision graph per `frames_per_call` sampled frames.
                "stream": {"frames_per_call": export_manifest.video_frames,
                           "clips_per_call": export_manifest.aot.clips,
                           "stream_export": "stream" in export_manifest.extra},
                "llm": {"precision": llm_manifest["precision"], "config_hash": llm_manifest["config_hash"],
                        "position_axes": position_axes},
                "text": {"prompt": spec.to_dict(), "eos_token_id": tokenizer.eos_token_id,
                         "embeddings_dtype": embeddings},
                "files": {name: sha256_file(staging / name) for name in files},
                "failed_gates": failures,           # non-empty only where it was forced (allow_failed)
                "refused_on": REFUSED_ON}
        (staging / BUNDLE).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return out
