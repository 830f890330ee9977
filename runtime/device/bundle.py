"""A bundle directory (`aot-export bundle`): everything the device runtime needs, each file hashed in
`bundle.json`, read and verified here before anything heavy loads. Its id is the sha256 of bundle.json (which
holds every other file's sha256): `read_bundle(..., expect_id=ID)` runs only that bundle.

Layout: `vision/` (the export directory, or the engine directory with the export's manifest recorded in
bundle.json), `llm/` (the int4 ONNX decoder with its llm.json and genai_config.json), `text/tokenizer.json`,
`text/embeddings.npy` (the LLM's input table [V, H]), `text/image_newline.npy` [H] for a family that closes a video
with it (LLaVA-OneVision), `bundle.json` (with the prompt description, `aot_export.prompt_assembly.PromptSpec`).

Refused, each with one line naming the problem and the fix (`InputError`, exit 2): a bundle.json that is not the
shape this version writes; a file that is not inside the bundle (an absolute name, `..`, a symlink leading out),
present but not listed, listed but missing, or whose sha256 differs (unless `verify_hashes=False`, the CLI's
--skip-hash) — in bundle.json and in each part's own manifest, whose sha256 must be bundle.json's; parts whose model
config hash differs from the bundle's (vision manifest or engine sidecar, llm.json) or whose width differs from the
LLM's; an engine whose sidecar does not name the bundle's export graph; a runtime dependency the bundle needs that
is not installed; a decoder without the 3-D positions its family's prompt needs; a frame count other than the
vision graph's; an embedding table that is not [vocabulary, width]; a part whose gates failed (recorded verdicts;
a bundle made with --allow-failed) unless `allow_failed`; another bundle than `expect_id`.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aot_export.artifacts import sha256_file
from aot_export.errors import InputError
from aot_export.manifest import (MANIFEST, Manifest, consistency_findings, failed_gates, file_findings,
                                 read_manifest, read_manifest_file, refuse_failed_gates)
from aot_export.preprocess import Preprocessing
from aot_export.prompt_assembly import PromptSpec

from .decoder import LLM_MANIFEST, read_genai_config, read_llm_manifest

BUNDLE = "bundle.json"
BUNDLE_SCHEMA = 2                      # 2: the prompt description (every family), the decoder's position axes
VISION_DIR, LLM_DIR = "vision", "llm"
TOKENIZER, EMBEDDINGS, NEWLINE = "text/tokenizer.json", "text/embeddings.npy", "text/image_newline.npy"
REFUSED_ON = {
    "files": "a file outside the bundle (absolute, '..', a symlink leading out), not listed, missing, or whose "
             "sha256 differs from bundle.json or from its part's own manifest",
    "model": "vision manifest / engine sidecar or llm.json from a model whose config hash differs from the bundle's",
    "engine": "an engine sidecar that does not record the bundle's export graph, AOT config and model config",
    "positions": "a decoder without 3-D position_ids for a family whose prompt places visual tokens by (t, h, w)",
    "frames": "a frame count other than the one the vision graph takes",
    "runtime": "a dependency of this bundle missing here (onnxruntime, tokenizers; tensorrt for an engine bundle)",
    "gates": "a part whose recorded verdict failed (calibrate, validate), unless run with --allow-failed",
}
FIX = "rebuild the bundle with `aot-export bundle`"
# The Python module each vision flavour needs (engines.flavours; named here so the check needs no import of it).
VISION_MODULES = {"onnxruntime": "onnxruntime", "tensorrt": "tensorrt", "tensorrt_rtx": "tensorrt_rtx"}
# The flavours each vision kind runs on.
VISION_KINDS = {"export": ("onnxruntime",), "engine": ("tensorrt", "tensorrt_rtx")}


@dataclass(frozen=True)
class Bundle:
    directory: Path
    data: dict[str, Any]
    id: str = ""                           # the sha256 of bundle.json
    warning: str | None = None             # a failed part run anyway (allow_failed)

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


def bundle_id(directory: str | os.PathLike) -> str:
    """What pins a bundle (`--expect-id`): the sha256 of bundle.json, which records every other file's sha256."""
    return sha256_file(Path(directory) / BUNDLE)


def read_bundle(directory: str | os.PathLike, *, verify_hashes: bool = True, expect_id: str | None = None,
                allow_failed: bool = False) -> Bundle:
    """bundle.json, refused unless it has the shape this version writes, the bundle is the one `expect_id` names,
    every file is inside, listed and (with `verify_hashes`) has its sha256, the parts agree with their own manifests
    and with each other, and no part failed its gates (unless `allow_failed`; then `Bundle.warning` says so)."""
    directory = Path(directory)
    path = directory / BUNDLE
    if not path.is_file():
        raise InputError(f"{directory}: no {BUNDLE}; this is not a bundle (make one with `aot-export bundle`)")
    data = read_manifest_file(directory, BUNDLE, FIX)
    identity = check_id(directory, expect_id, verify_hashes)
    if data.get("schema_version") != BUNDLE_SCHEMA:
        raise InputError(f"{path}: schema_version {data.get('schema_version')!r} is not {BUNDLE_SCHEMA}; rebuild "
                         "the bundle with this version of aot-export")
    check_shape(path, data)
    bundle = Bundle(directory, data, identity)
    check_runtime(bundle)
    check_files(bundle, verify_hashes)
    check_parts(bundle)
    check_prompt(bundle)
    check_embeddings(bundle)
    return Bundle(directory, data, identity, check_gates(bundle, allow_failed))


def check_id(directory: Path, expect_id: str | None, verify_hashes: bool) -> str:
    """The bundle's id, refused unless it is `expect_id` (when given): pinning needs the sha256 of every file."""
    identity = bundle_id(directory)
    if expect_id is None:
        return identity
    if not verify_hashes:
        raise InputError("--expect-id pins a bundle through the sha256 of its files, which --skip-hash leaves out; "
                         "drop one of them")
    if identity != expect_id.lower():
        raise InputError(f"{directory}: bundle id {identity} is not the expected {expect_id} (--expect-id); this is "
                         "not the bundle you were given: run that one")
    return identity


def _json_kind(value: Any) -> str:
    return "missing" if value is None else f"a JSON {type(value).__name__}"


def check_shape(path: Path, data: dict[str, Any]) -> None:
    """Every section the device reads has the type this version writes, and the export manifest it records is
    consistent in itself: a hand-edited or truncated bundle.json is one line here, not a crash after loading."""
    sections = {"model": dict, "vision": dict, "llm": dict, "text": dict, "export_manifest": dict,
                "preprocessing": dict, "frames": int}
    for key, kind in sections.items():
        if not isinstance(data.get(key), kind) or isinstance(data.get(key), bool):
            raise InputError(f"{path}: its {key!r} is {_json_kind(data.get(key))}, not a JSON "
                             f"{'object' if kind is dict else 'number'}; {FIX}")
    kind, flavour = data["vision"].get("kind"), data["vision"].get("flavour")
    if flavour not in VISION_KINDS.get(kind, ()):
        raise InputError(f"{path}: vision {kind!r} on {flavour!r} is not a vision part this version runs (an export "
                         f"on onnxruntime, an engine on tensorrt or tensorrt_rtx); {FIX}")
    model = data["model"]
    if not all(isinstance(model.get(key), str) for key in ("model_id", "config_hash")) or not all(
            isinstance(model.get(key), int) and model[key] > 0 for key in ("hidden", "vocab")):
        raise InputError(f"{path}: its model section lacks model_id, config_hash, hidden or vocab; {FIX}")
    eos = data["text"].get("eos_token_id")
    if eos is not None and (not isinstance(eos, int) or isinstance(eos, bool)):
        raise InputError(f"{path}: its text eos_token_id is {_json_kind(eos)}, not a token id; {FIX}")
    if not isinstance(data.get("failed_gates", []), list):
        raise InputError(f"{path}: its 'failed_gates' is {_json_kind(data['failed_gates'])}, not a list; {FIX}")
    try:
        manifest = Manifest.from_dict(data["export_manifest"])
        PromptSpec.from_dict(data["text"].get("prompt"))
        Preprocessing.from_dict(data["preprocessing"])
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise InputError(f"{path}: {exc}") from exc
        raise InputError(f"{path}: unreadable ({exc.__class__.__name__}: {exc}); {FIX}") from exc
    findings = consistency_findings(manifest, data["export_manifest"])
    if findings:
        raise InputError(f"{path}: its export_manifest {findings[0].removeprefix('manifest ')}; {FIX}")


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
    """The one rule (`aot_export.manifest.file_findings`): every file inside the bundle, listed, present and (with
    `hashes`) with its sha256 — checked before any listed file is read."""
    findings = file_findings(bundle.directory, bundle.data.get("files"), {}, hashes, BUNDLE)
    if findings:
        raise InputError(f"{bundle.directory}: {findings[0]}; restore it or {FIX}")


def check_parts(bundle: Bundle) -> None:
    """vision/ and llm/ are artifacts in their own right: each is held to its own manifest (the same rule, sizes),
    the sha256 that manifest records are bundle.json's (so they are checked too), and every part names the
    bundle's model (config hash), whatever bundle.json's own hashes say."""
    vision_dir, llm_dir = bundle.path(VISION_DIR), bundle.path(LLM_DIR)
    if bundle.vision_kind == "engine":
        from engines.sidecar import PLAN, SIDECAR, read_sidecar

        sidecar = read_sidecar(vision_dir, verify_hashes=False)
        recorded, vision_model = {PLAN: sidecar.plan_sha256}, sidecar.manifest.get("model", {})
        vision_name = f"{VISION_DIR}/{SIDECAR}"
    else:
        manifest = read_manifest(vision_dir, verify_hashes=False)
        recorded, vision_model, vision_name = manifest.files, manifest.model, f"{VISION_DIR}/{MANIFEST}"
    llm = read_llm_manifest(llm_dir, verify_hashes=False)
    parts = {VISION_DIR: (vision_name, recorded), LLM_DIR: (f"{LLM_DIR}/{LLM_MANIFEST}", llm["files"])}
    for folder, (name, files) in parts.items():
        differs = next((f for f, digest in files.items() if bundle.data["files"].get(f"{folder}/{f}") != digest), None)
        if differs is not None:
            raise InputError(f"{bundle.directory}: {folder}/{differs} has another sha256 in {name} than in bundle.json;"
                             f" restore it or {FIX}")
    if bundle.vision_kind == "export" and manifest != bundle.export_manifest:
        raise InputError(f"{bundle.directory}: {vision_name} is not the export manifest bundle.json records; {FIX}")
    models = {vision_name: vision_model, f"{LLM_DIR}/{LLM_MANIFEST}": llm,
              "bundle.json export_manifest": bundle.data["export_manifest"]["model"]}
    model = bundle.data["model"]
    for name, part in models.items():
        if not isinstance(part, dict) or part.get("config_hash") != model["config_hash"]:
            part = part if isinstance(part, dict) else {}
            raise InputError(f"{bundle.directory}: {name} is from model {part.get('model_id')} (config "
                             f"{part.get('config_hash')}), not the bundle's {model['model_id']} (config "
                             f"{model['config_hash']}); rebuild the bundle from one model's export and LLM")
    vocab = read_genai_config(llm_dir, llm["files"])["vocab_size"]
    if vocab != model["vocab"]:
        raise InputError(f"{bundle.directory}: bundle.json records a vocabulary of {model['vocab']} tokens, the "
                         f"decoder's genai_config.json {vocab}; {FIX}")


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


def check_embeddings(bundle: Bundle) -> None:
    """The embedding table is [vocabulary, width] as bundle.json records them (every token the LLM can emit has a
    row), and LLaVA's newline vector is [width]: read from the .npy headers, no rows loaded."""
    model = bundle.data["model"]
    expected = {EMBEDDINGS: (model["vocab"], model["hidden"])}
    if bundle.path(NEWLINE).exists():
        expected[NEWLINE] = (model["hidden"],)
    for name, shape in expected.items():
        try:
            found = np.load(bundle.path(name), mmap_mode="r", allow_pickle=False).shape
        except (ValueError, OSError) as exc:
            raise InputError(f"{bundle.directory}: {name} is not a .npy array ({exc}); {FIX}") from exc
        if found != shape:
            raise InputError(f"{bundle.directory}: {name} is {list(found)}, bundle.json records {list(shape)} "
                             f"(vocabulary, width); {FIX}")


def check_gates(bundle: Bundle, allow_failed: bool) -> str | None:
    """A part whose recorded verdict failed (the export's calibration or validation, the engine's validation), or a
    bundle made with --allow-failed, is refused unless `allow_failed`; then the warning to print is returned."""
    failures = [*bundle.data.get("failed_gates", []), *failed_gates(bundle.export_manifest.extra)]
    if bundle.vision_kind == "engine":
        from engines.sidecar import read_sidecar

        failures += failed_gates(read_sidecar(bundle.path(VISION_DIR), verify_hashes=False).extra)
    return refuse_failed_gates(bundle.directory, [str(failure) for failure in failures], allow_failed)
