"""A bundle directory (`aot-export bundle`): everything the device runtime needs, each file hashed in
`bundle.json`, read and verified here before anything heavy loads.

Layout: `vision/` (the export directory, or the engine directory with the export's manifest recorded in
bundle.json), `llm/` (the int4 ONNX decoder with its llm.json and genai_config.json), `text/tokenizer.json`,
`text/embeddings.npy` (the LLM's input table [V, H]), `text/image_newline.npy` [H] for a family that closes a video
with it (LLaVA-OneVision), `bundle.json` (with the prompt description, `aot_export.prompt_assembly.PromptSpec`).

Refused, each with one line naming the problem and the fix (`InputError`, exit 2): a file listed in bundle.json
that is missing or whose sha256 differs (unless `verify_hashes=False`, the CLI's --skip-hash); parts whose model
config hash differs from the bundle's (vision manifest or engine sidecar, llm.json) or whose width differs from the
LLM's; an engine whose sidecar does not name the bundle's export graph; a runtime dependency the bundle needs that
is not installed; a decoder without the 3-D positions its family's prompt needs; a frame count other than the
vision graph's.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aot_export.artifacts import sha256_file
from aot_export.errors import InputError
from aot_export.manifest import Manifest
from aot_export.prompt_assembly import PromptSpec

BUNDLE = "bundle.json"
BUNDLE_SCHEMA = 2                      # 2: the prompt description (every family), the decoder's position axes
VISION_DIR, LLM_DIR = "vision", "llm"
TOKENIZER, EMBEDDINGS, NEWLINE = "text/tokenizer.json", "text/embeddings.npy", "text/image_newline.npy"
REFUSED_ON = {
    "files": "a listed file missing, or its sha256 differs from bundle.json",
    "model": "vision manifest / engine sidecar or llm.json from a model whose config hash differs from the bundle's",
    "engine": "an engine sidecar that does not record the bundle's export graph, AOT config and model config",
    "positions": "a decoder without 3-D position_ids for a family whose prompt places visual tokens by (t, h, w)",
    "frames": "a frame count other than the one the vision graph takes",
    "runtime": "a dependency of this bundle missing here (onnxruntime, tokenizers; tensorrt for an engine bundle)",
}
# The Python module each vision flavour needs (engines.flavours; named here so the check needs no import of it).
VISION_MODULES = {"onnxruntime": "onnxruntime", "tensorrt": "tensorrt", "tensorrt_rtx": "tensorrt_rtx"}


@dataclass(frozen=True)
class Bundle:
    directory: Path
    data: dict[str, Any]

    @property
    def export_manifest(self) -> Manifest:
        return Manifest.from_dict(self.data["export_manifest"])

    @property
    def prompt_spec(self) -> PromptSpec:
        return PromptSpec.from_dict(self.data["text"]["prompt"])

    @property
    def vision_kind(self) -> str:
        return self.data["vision"]["kind"]

    def path(self, name: str) -> Path:
        return self.directory / name


def is_bundle(path: str | os.PathLike) -> bool:
    return (Path(path) / BUNDLE).is_file()


def read_bundle(directory: str | os.PathLike, *, verify_hashes: bool = True) -> Bundle:
    """bundle.json, refused unless every file it lists is there and (with `verify_hashes`) has its sha256."""
    directory = Path(directory)
    path = directory / BUNDLE
    if not path.is_file():
        raise InputError(f"{directory}: no {BUNDLE}; this is not a bundle (make one with `aot-export bundle`)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: unreadable ({exc.msg}); rebuild the bundle with `aot-export bundle`") from exc
    if data.get("schema_version") != BUNDLE_SCHEMA:
        raise InputError(f"{path}: schema_version {data.get('schema_version')!r} is not {BUNDLE_SCHEMA}; rebuild "
                         "the bundle with this version of aot-export")
    bundle = Bundle(directory, data)
    check_runtime(bundle)
    check_files(bundle, verify_hashes)
    check_model(bundle)
    check_prompt(bundle)
    return bundle


def check_runtime(bundle: Bundle) -> None:
    needed = {"onnxruntime": "onnxruntime (onnxruntime-gpu on Jetson)", "tokenizers": "tokenizers"}
    flavour = bundle.data["vision"]["flavour"]
    needed[VISION_MODULES[flavour]] = {"tensorrt": "TensorRT (JetPack's python3-libnvinfer, or the tensorrt wheel)",
                                       "tensorrt_rtx": "tensorrt-rtx-cu12"}.get(flavour, flavour)
    for module, package in needed.items():
        if importlib.util.find_spec(module) is None:
            raise InputError(f"{bundle.directory}: this bundle needs {module} (its {bundle.vision_kind} runs on "
                             f"{flavour}), which is not installed; install {package}, or bundle the export "
                             "instead of an engine")


def check_files(bundle: Bundle, hashes: bool) -> None:
    for name, digest in bundle.data["files"].items():
        file = bundle.path(name)
        if not file.is_file():
            raise InputError(f"{bundle.directory}: {name} is missing; restore it or rebuild the bundle with "
                             "`aot-export bundle`")
        if hashes and sha256_file(file) != digest:
            raise InputError(f"{bundle.directory}: {name} was altered (sha256 differs from bundle.json); restore it "
                             "or rebuild the bundle with `aot-export bundle`")


def check_model(bundle: Bundle) -> None:
    """Every part names the bundle's model (config hash) — whatever bundle.json's own hashes say."""
    model = bundle.data["model"]
    vision_dir = bundle.path(VISION_DIR)
    if bundle.vision_kind == "engine":
        parts = {"vision/engine.json": json.loads((vision_dir / "engine.json").read_text())["manifest"]["model"]}
    else:
        parts = {"vision/manifest.json": json.loads((vision_dir / "manifest.json").read_text())["model"]}
    parts["llm/llm.json"] = json.loads(bundle.path(f"{LLM_DIR}/llm.json").read_text())
    parts["bundle.json export_manifest"] = bundle.data["export_manifest"]["model"]
    for name, part in parts.items():
        if part.get("config_hash") != model["config_hash"]:
            raise InputError(f"{bundle.directory}: {name} is from model {part.get('model_id')} (config "
                             f"{part.get('config_hash')}), not the bundle's {model['model_id']} (config "
                             f"{model['config_hash']}); rebuild the bundle from one model's export and LLM")


def check_prompt(bundle: Bundle) -> None:
    """The decoder takes the positions the family's prompt needs, and the frame count is the vision graph's —
    refused before any weights load."""
    spec, manifest = bundle.prompt_spec, bundle.export_manifest
    axes = bundle.data["llm"].get("position_axes")
    if spec.layout is not None and axes != 3:
        raise InputError(f"{bundle.directory}: {manifest.model['model_id']} places visual tokens at 3-D (t, h, w) "
                         "positions but the bundle's decoder takes no 3-D position_ids; rebuild the LLM with "
                         "`aot-export quantize-llm --model` the exported model, then the bundle")
    if spec.layout is None and axes != 1:
        raise InputError(f"{bundle.directory}: the decoder takes 3-D position_ids, which "
                         f"{manifest.model['model_id']} does not give; rebuild the LLM with `aot-export "
                         "quantize-llm --model` the exported model, then the bundle")
    if bundle.data["frames"] != manifest.video_frames:
        raise InputError(f"{bundle.directory}: bundle.json says {bundle.data['frames']} frames but its vision graph "
                         f"takes {manifest.video_frames}; a frame count is fixed at export: export again with "
                         "--frames N and rebuild the bundle")
