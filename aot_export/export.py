"""`aot-export export`: vision tower + projector + AOT as one static ONNX graph, with its manifest.

frames [T, 3, S, S] float32 → tokens [n, H] float32, index [n, 3] int32; opset 18, dynamo exporter, weights as
external data, every TopK's k a constant. The directory is assembled under a temporary name and renamed into
place, so an interrupted export leaves nothing behind.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapters import ModelAdapter, load_model
from .artifacts import atomic_dir, check_destination, destination_lock
from .config import AUTHORS_CLIP_LENGTHS, CLIPS_PER_VIDEO, SHORTEST_CLIP, AOTConfig, clip_len_for
from .errors import InputError
from .manifest import GRAPH, Manifest, TensorSpec, hash_files
from .onnx_export import OPSET, save_onnx, trace_onnx, verify_static
from .progress import Stages

INPUTS = ("frames",)
OUTPUTS = ("tokens", "index")
BUDGET_FIELDS = ("anchors", "pooled_anchors", "keep")


def library_versions() -> dict[str, str]:
    import onnx
    import transformers

    from . import __version__

    return {"aot_export": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "python": platform.python_version()}


def tensor_specs(cfg: AOTConfig, adapter: ModelAdapter) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    size = adapter.info.image_size
    video_frames = cfg.frames * adapter.info.temporal_patch
    return ((TensorSpec("frames", (video_frames, 3, size, size), "float32"),),
            (TensorSpec("tokens", (cfg.output_tokens, adapter.info.hidden), "float32"),
             TensorSpec("index", (cfg.output_tokens, 3), "int32")))


@dataclass(frozen=True)
class ExportResult:
    directory: Path
    manifest: Manifest
    seconds: dict[str, float]


def export_vision_aot(model: str | ModelAdapter, cfg: AOTConfig, out_dir: str | os.PathLike,
                      progress: bool = True, force: bool = False, extra: dict | None = None) -> ExportResult:
    """`force` replaces an existing export at `out_dir`; anything else there is refused, never touched. `extra`: what
    the manifest records besides (`{"stream": {"clips_per_call": 1}}`: a streaming export, `export --stream`)."""
    out_dir = Path(out_dir)
    # Locked before the work, so that a second export to the same place is refused now, not after its export.
    with destination_lock(check_destination(out_dir, "export", force)):
        stages = Stages(["load model", "trace + export", "save", "check", "manifest"], progress)
        with stages.step():
            adapter = load_model(model) if isinstance(model, str) else model
            adapter.check_fits(cfg)
            module = adapter.vision_aot(cfg)
            # the graph carries the module's weights as fp32 external data
            check_destination(out_dir, "export", force, sum(p.numel() * 4 for p in module.parameters()))
        with stages.step():
            program = trace_onnx(module, (adapter.example_frames(cfg.frames * adapter.info.temporal_patch),),
                                 INPUTS, OUTPUTS)
        with atomic_dir(out_dir, "export", force, locked=True) as staging:
            with stages.step():
                files = save_onnx(program, staging / GRAPH, external_data=True)
                del program
            with stages.step():
                verify_static(staging / GRAPH)
            with stages.step():
                inputs, outputs = tensor_specs(cfg, adapter)
                manifest = Manifest(model=adapter.info.to_dict(), aot=cfg, preprocessing=adapter.preprocessing,
                                    inputs=inputs, outputs=outputs, opset=OPSET,
                                    files=hash_files(staging, [f.name for f in files]),
                                    versions=library_versions(), extra=dict(extra or {}))
                manifest.write(staging)
    stages.close()
    return ExportResult(out_dir, manifest, stages.seconds)


def solve_config(frames: int, retention: float | None, anchors: int | None, pooled_anchors: int | None,
                 keep: int | None, grid: int, clip_len: int | None = None, temporal_patch: int = 1,
                 **model_fields) -> AOTConfig:
    """The CLI's budget options → a config on the model's grid (and pooling: `model_fields`, from
    `ModelAdapter.aot_fields`): a target retention, explicit budgets, or the reference defaults. `frames` are AOT
    frames, `temporal_patch` video frames each (for the messages, which speak of --frames); `clip_len` left out
    follows them (`clip_len_for`)."""
    if retention is not None:
        if pooled_anchors is not None or keep is not None:
            raise ValueError("give either --retention or --pooled-anchors/--keep, not both")
    given = described_frames(frames, temporal_patch)
    if clip_len is None:
        clip_len = clip_len_for(frames)
        if frames % clip_len:
            whole = -(-frames // clip_len) * clip_len * temporal_patch
            raise InputError(f"{given} is not a multiple of the clip length {clip_len}, so inter-frame merging "
                             f"would be off; pass --frames {whole}, or --clip-len 1 to export without inter-frame "
                             "merging")
    elif frames % clip_len:
        divisors = ", ".join(str(n) for n in range(1, frames + 1) if frames % n == 0)
        raise InputError(f"--clip-len {clip_len} does not cut {given} into whole clips; pass one of {divisors} "
                         "(1: no inter-frame merging), or leave --clip-len out")
    if retention is not None:
        return AOTConfig.from_retention(frames, retention, anchors=anchors, grid=grid, clip_len=clip_len,
                                        **model_fields)
    budget = {k: v for k, v in (("anchors", anchors), ("pooled_anchors", pooled_anchors), ("keep", keep))
              if v is not None}
    reference = AOTConfig(frames=frames, clip_len=clip_len)    # the authors' budget, for SigLIP's 27×27 grid
    if not budget and (grid, model_fields) != (reference.grid, {k: getattr(reference, k) for k in model_fields}):
        # Another grid (or pooling) gets the share of the visual tokens the authors' budget keeps.
        return AOTConfig.from_retention(frames, reference.retention, grid=grid, clip_len=clip_len, **model_fields)
    try:
        return AOTConfig(frames=frames, grid=grid, clip_len=clip_len, **model_fields, **budget)
    except ValueError as exc:
        if not any(f"AOTConfig.{name}=" in str(exc) for name in BUDGET_FIELDS):
            raise
        raise InputError(f"{exc}; pass --retention R (a share of the visual tokens, e.g. 0.15) to solve a budget "
                         f"for this model's {grid}×{grid} grid, or --anchors/--pooled-anchors/--keep that fit it"
                         ) from exc


def described_frames(frames: int, temporal_patch: int) -> str:
    """`frames` AOT frames as the user counted them: --frames N, and the temporal patches where they differ."""
    if temporal_patch == 1:
        return f"--frames {frames}"
    return f"--frames {frames * temporal_patch} ({frames} temporal patches of {temporal_patch})"


def clip_len_notice(frames: int, temporal_patch: int = 1) -> str | None:
    """One line naming the clip length `frames` AOT frames get by default, for a count the authors do not define
    or a tower that folds `temporal_patch` video frames into one AOT frame (the authors' rule counts AOT frames);
    None for the authors' own cases."""
    if frames in AUTHORS_CLIP_LENGTHS and temporal_patch == 1:
        return None
    unit, count = ("frames", "frames") if temporal_patch == 1 else ("temporal patches", "patches")
    folded = "" if temporal_patch == 1 else "AOT counts temporal patches as frames; "
    if frames in AUTHORS_CLIP_LENGTHS:
        why = f"{folded}the authors use {clip_len_for(frames)} for {frames}"
    else:
        authors = " and ".join(f"{n} → {length}" for n, length in AUTHORS_CLIP_LENGTHS.items())
        why = (f"{folded}the authors define only {authors} ({CLIPS_PER_VIDEO} clips each); other counts get the "
               f"longest length from {SHORTEST_CLIP} to {count}/{CLIPS_PER_VIDEO} that divides the {unit}")
    clips = f"clips of {clip_len_for(frames)}" + ("" if temporal_patch == 1 else f" {unit}")
    option = "--clip-len" + ("" if temporal_patch == 1 else f" (in {unit})")
    return f"note: {described_frames(frames, temporal_patch)} → {clips}: {why}; {option} sets another"
