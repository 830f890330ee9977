"""`aot-export demo`: the reduction chain on real footage with the built-in defaults, checked at every step.

Video → 32 uniformly sampled frames → per-frame token features → AOT in PyTorch → the reducer exported to ONNX →
ONNX Runtime on the same inputs (compared with PyTorch) → a TensorRT-RTX engine built from that ONNX when
`tensorrt_rtx` (or `tensorrt`) is importable.
"""

from __future__ import annotations

import importlib.util
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from aot_export import AOTConfig, AOTReducer
from aot_export.onnx_export import export_reducer

from .patch_features import patch_features
from .video import decode_frames, shared_videos, synthesize_clip

DEMO_HIDDEN = 896          # LLaVA-OneVision-0.5B's LLM width
MAX_ABS_GATE = 1e-5


@dataclass
class DemoReport:
    video: str
    config: AOTConfig
    stages: list[tuple[str, float, str]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    passed: bool = True

    def table(self) -> str:
        from aot_export.cli import format_table

        cfg = self.config
        summary = format_table(
            [("video", self.video),
             ("visual tokens without AOT", cfg.input_tokens),
             ("visual tokens with AOT", cfg.output_tokens),
             ("retention", f"{cfg.retention:.2%}"),
             *[(name, value) for name, value in self.metrics.items()],
             ("result", "PASS" if self.passed else "FAIL")], ("", "value"))
        stages = format_table([(name, f"{seconds:.2f}", detail) for name, seconds, detail in self.stages],
                              ("stage", "seconds", "detail"))
        return summary + "\n\n" + stages

    def to_dict(self) -> dict:
        return {"video": self.video, "config": self.config.to_dict(), "output_tokens": self.config.output_tokens,
                "input_tokens": self.config.input_tokens, "retention": self.config.retention,
                "stages": [{"name": n, "seconds": s, "detail": d} for n, s, d in self.stages],
                "metrics": self.metrics, "passed": self.passed}


@contextmanager
def timed(report: DemoReport, name: str, detail: list[str]) -> Iterator[None]:
    start = time.perf_counter()
    yield
    report.stages.append((name, time.perf_counter() - start, " ".join(detail)))


def demo_video(workdir: Path, video: str | None) -> Path:
    if video is not None:
        return Path(video)
    videos = shared_videos()
    return videos[0] if videos else synthesize_clip(workdir / "synthetic.mp4")


@torch.inference_mode()
def run_demo(workdir: Path, video: str | None = None, progress: bool = True) -> DemoReport:
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = AOTConfig()
    path = demo_video(workdir, video)
    report = DemoReport(path.name, cfg)

    detail: list[str] = []
    with timed(report, "decode + features", detail):
        frames = decode_frames(path, cfg.frames, size=384)
        features, shallow, deep = patch_features(frames, cfg.grid, 14, DEMO_HIDDEN)
        detail.append(f"{cfg.frames} frames, {tuple(features.shape)}")
    detail = []
    with timed(report, "AOT (PyTorch)", detail):
        tokens, index = AOTReducer(cfg)(features, shallow, deep)
        detail.append(f"{tuple(tokens.shape)}")
    detail = []
    with timed(report, "export ONNX", detail):
        onnx_path = export_reducer(cfg, DEMO_HIDDEN, workdir / "reducer.onnx")
        detail.append(str(onnx_path))
    detail = []
    with timed(report, "ONNX Runtime", detail):
        import onnxruntime as ort

        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        ort_tokens, ort_index = session.run(None, {"features": features.numpy(), "score_shallow": shallow.numpy(),
                                                   "score_deep": deep.numpy()})
        max_abs = float(np.abs(ort_tokens - tokens.numpy()).max())
        index_agreement = float((ort_index == index.numpy()).all(-1).mean())
        report.metrics.update({"ORT vs PyTorch max abs": max_abs, "ORT vs PyTorch index agreement": index_agreement})
        report.passed &= max_abs <= MAX_ABS_GATE and index_agreement == 1.0
        detail.append(f"gate max abs <= {MAX_ABS_GATE:g}, index 100 %")
    if importlib.util.find_spec("tensorrt_rtx") or importlib.util.find_spec("tensorrt"):
        detail = []
        with timed(report, "TensorRT build", detail):
            from engines import build_engine, builder_config, parse_onnx

            parsed = parse_onnx(onnx_path)
            engine = build_engine(parsed, builder_config(parsed, workspace_bytes=1 << 30))
            detail.append(f"{engine.flavour} {engine.version}: {parsed.num_layers} layers, "
                          f"{len(engine.plan) / 1e6:.1f} MB plan")
    return report
