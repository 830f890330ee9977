"""`aot-export bundle`: an export (or engine) directory + an ONNX LLM directory (`quantize-llm`) → one directory with
everything the device runtime (`runtime.device`) needs and nothing else; layout and refusals in
`runtime.device.bundle`. Writing needs the model (tokenizer, embedding table, newline vector, chat template), so
it runs where the export stack is installed; reading needs none of it.

The text embedding table is stored as an .npy array, memory-mapped on the device (only the rows a prompt uses are
read; no session, no graph), in fp16 by default (half the file) — docs/benchmarks.md has the measured cost.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from aot_export.artifacts import atomic_dir, check_destination, sha256_file
from aot_export.errors import InputError
from aot_export.manifest import MANIFEST, read_manifest
from engines.sidecar import PLAN, SIDECAR, check_against_export, read_sidecar

from .device.bundle import BUNDLE, BUNDLE_SCHEMA, EMBEDDINGS, LLM_DIR, NEWLINE, REFUSED_ON, TOKENIZER, VISION_DIR
from .device.decoder import GENAI_CONFIG, LLM_MANIFEST, read_llm_manifest
from .vision import model_adapter, resolve_artifact

PROMPT_MARK = "\x00PROMPT\x00"
EMBEDDING_DTYPES = {"fp16": np.float16, "fp32": np.float32}


def chat_pieces(adapter) -> dict[str, str]:
    """The chat template rendered for a user turn with one video and a marker text, split at the marker."""
    tokenizer = adapter.tokenizer
    if tokenizer is None or tokenizer.chat_template is None:
        raise InputError(f"{adapter.info.model_id} has no tokenizer with a chat template; add the checkpoint's "
                         "tokenizer and chat_template files to its directory")
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": PROMPT_MARK}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if text.count(PROMPT_MARK) != 1:
        raise InputError(f"{adapter.info.model_id}: its chat template does not render the user's text once; fix the "
                         "checkpoint's chat template")
    before, after = text.split(PROMPT_MARK)
    return {"before": before, "after": after}


def write_bundle(model: str | os.PathLike, llm: str | os.PathLike, out: str | os.PathLike,
                 export: str | os.PathLike | None = None, embeddings: str = "fp16", adapter=None,
                 force: bool = False, *, verify_hashes: bool = True) -> Path:
    """`model`: an export or engine directory (an engine is checked against `export`, or the export found beside
    it); `llm`: an ONNX LLM directory. Parts from another model are refused before anything is written, and so
    are parts whose files differ from their manifests (sizes always, sha256 with `verify_hashes`)."""
    if embeddings not in EMBEDDING_DTYPES:
        raise InputError(f"--embeddings {embeddings!r}: choose fp16 or fp32")
    out = check_destination(out, "bundle", force)
    artifact = resolve_artifact(model, export, verify_hashes=verify_hashes)
    if artifact.kind == "model":
        raise InputError(f"{model} is neither an export nor an engine directory; export one with `aot-export export`")
    if artifact.kind == "engine" and artifact.export_dir is None:
        raise InputError(f"{model}: the export this engine was built from is not beside it; pass --export EXPORT_DIR "
                         "so that the bundle records (and the device checks) the engine against it")
    export_manifest = read_manifest(artifact.export_dir, verify_hashes=verify_hashes)
    if artifact.kind == "engine":
        check_against_export(read_sidecar(model, verify_hashes=verify_hashes), export_manifest)
    llm = Path(llm)
    llm_manifest = read_llm_manifest(llm, verify_hashes=verify_hashes)
    model_info = export_manifest.model
    if llm_manifest["config_hash"] != model_info["config_hash"]:
        raise InputError(f"{llm} was built from {llm_manifest['model_id']} (config {llm_manifest['config_hash']}), "
                         f"the export from {model_info['model_id']} (config {model_info['config_hash']}); pass the "
                         "LLM of the exported model (`aot-export quantize-llm --model ...`)")
    adapter = model_adapter(artifact, adapter)
    if adapter.video_layout is not None:
        raise InputError(f"{adapter.info.model_id} places visual tokens by 3-D positions, which the device runtime "
                         "does not assemble yet; run it with `aot-export run --model EXPORT_DIR`")
    tokenizer = adapter.tokenizer
    chat = chat_pieces(adapter)
    vocab = json.loads((llm / GENAI_CONFIG).read_text())["model"]["vocab_size"]     # every id the LLM can emit
    with torch.inference_mode():
        table = adapter.embed_tokens(torch.arange(vocab).unsqueeze(0))[0].float().numpy()
        newline = adapter.image_newline.detach().float().numpy()
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
        tokenizer.backend_tokenizer.save(str(staging / TOKENIZER))
        np.save(staging / EMBEDDINGS, table.astype(EMBEDDING_DTYPES[embeddings]))
        np.save(staging / NEWLINE, newline)
        files = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
        sidecar = read_sidecar(model, verify_hashes=verify_hashes) if artifact.kind == "engine" else None
        data = {"schema_version": BUNDLE_SCHEMA,
                "model": {"model_id": model_info["model_id"], "config_hash": model_info["config_hash"],
                          "hidden": int(newline.shape[-1]), "vocab": int(table.shape[0])},
                "vision": {"kind": artifact.kind,
                           "flavour": sidecar.flavour if sidecar is not None else "onnxruntime"},
                "export_manifest": export_manifest.to_dict(),
                "frames": export_manifest.aot.frames, "preprocessing": export_manifest.preprocessing.to_dict(),
                "llm": {"precision": llm_manifest["precision"], "config_hash": llm_manifest["config_hash"]},
                "text": {"chat": chat, "video_token_id": int(adapter.video_token_id),
                         "eos_token_id": tokenizer.eos_token_id, "embeddings_dtype": embeddings,
                         "special_tokens": sorted(tokenizer.all_special_tokens)},
                "files": {name: sha256_file(staging / name) for name in files},
                "refused_on": REFUSED_ON}
        (staging / BUNDLE).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return out
