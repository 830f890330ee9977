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
from .artifacts import atomic_dir, check_destination
from .config import AOTConfig
from .errors import InputError
from .manifest import GRAPH, Manifest, TensorSpec, hash_files
from .onnx_export import OPSET, save_onnx, trace_onnx, verify_static
from .progress import Stages

INPUTS = ("frames",)
OUTPUTS = ("tokens", "index")


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
                      progress: bool = True, force: bool = False) -> ExportResult:
    """`force` replaces an existing export at `out_dir`; anything else there is refused, never touched."""
    out_dir = Path(out_dir)
    check_destination(out_dir, "export", force)
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
    with atomic_dir(out_dir, "export", force) as staging:
        with stages.step():
            files = save_onnx(program, staging / GRAPH, external_data=True)
            del program
        with stages.step():
            verify_static(staging / GRAPH)
        with stages.step():
            inputs, outputs = tensor_specs(cfg, adapter)
            manifest = Manifest(model=adapter.info.to_dict(), aot=cfg, preprocessing=adapter.preprocessing,
                                inputs=inputs, outputs=outputs, opset=OPSET,
                                files=hash_files(staging, [f.name for f in files]), versions=library_versions())
            manifest.write(staging)
    stages.close()
    return ExportResult(out_dir, manifest, stages.seconds)


def solve_config(frames: int, retention: float | None, anchors: int | None, pooled_anchors: int | None,
                 keep: int | None, grid: int, clip_len: int | None = None, **model_fields) -> AOTConfig:
    """The CLI's budget options → a config on the model's grid (and pooling: `model_fields`, from
    `ModelAdapter.aot_fields`): a target retention, explicit budgets, or the reference defaults."""
    if retention is not None:
        if pooled_anchors is not None or keep is not None:
            raise ValueError("give either --retention or --pooled-anchors/--keep, not both")
    if clip_len is None:
        if frames % AOTConfig.clip_len:
            raise InputError(f"--frames {frames} is not a multiple of the clip length {AOTConfig.clip_len}, so "
                             "inter-frame merging would be off; pass --frames "
                             f"{-(-frames // AOTConfig.clip_len) * AOTConfig.clip_len}, or "
                             "--clip-len 1 to export without inter-frame merging")
        clip_len = AOTConfig.clip_len
    if retention is not None:
        return AOTConfig.from_retention(frames, retention, anchors=anchors, grid=grid, clip_len=clip_len,
                                        **model_fields)
    budget = {k: v for k, v in (("anchors", anchors), ("pooled_anchors", pooled_anchors), ("keep", keep))
              if v is not None}
    return AOTConfig(frames=frames, grid=grid, clip_len=clip_len, **model_fields, **budget)

