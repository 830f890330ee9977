"""`aot-export demo`: the whole chain on the built-in model, no arguments.

tiny-llava-ov (the real LLaVA-OneVision architecture at tiny width, seeded random weights) → one static ONNX graph
of SigLIP + projector + AOT for 32 frames → `check` (ONNX checker, lint, TensorRT-RTX parse + build on this
machine) → `validate` on real footage (the CLI passes `../shared/data/videos`), or a clip synthesized with PyAV, against the
PyTorch reference → a summary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from aot_export import AOTConfig
from aot_export.adapters import load_model
from aot_export.export import export_vision_aot
from aot_export.report import format_table

from .validate import ValidationReport, validate_export
from aot_export.video import decode_frames, synthesize_clip

DEMO_MODEL = "tiny-llava-ov"


@dataclass
class DemoReport:
    config: AOTConfig
    check: "CheckReport"  # noqa: F821 - engines.check.CheckReport
    validations: list[ValidationReport]
    seconds: dict[str, dict[str, float]] = field(default_factory=dict)   # step → stage → seconds
    export_dir: Path | None = None
    video: Path | None = None              # the first video, for the suggested `run`

    @property
    def passed(self) -> bool:
        return self.check.passed and all(v.passed for v in self.validations)

    def table(self) -> str:

        cfg = self.config
        rows = [("model", DEMO_MODEL), ("frames", cfg.frames),
                ("visual tokens without AOT", cfg.input_tokens), ("visual tokens with AOT", cfg.output_tokens),
                ("retention", f"{cfg.retention:.2%}"),
                ("check", f"{'PASS' if self.check.passed else 'FAIL'}: "
                          + ", ".join(r.check for r in self.check.rows if r.status == "ok"))]
        for v in self.validations:
            m = v.metrics
            rows.append((f"validate {v.video}", f"{'PASS' if v.passed else 'FAIL'}: cosine min {m['cosine_min']:.8f}, "
                                                f"max abs {m['max_abs']:.2g}, index {m['index_agreement']:.0%}"))
        rows += [(f"time: {step}", f"{sum(stages.values()):.1f} s ("
                  + ", ".join(f"{stage} {s:.1f}" for stage, s in stages.items()) + ")")
                 for step, stages in self.seconds.items()]
        rows.append(("result", "PASS" if self.passed else "FAIL"))
        rows.append(("written", str(self.export_dir)))
        return format_table(rows, ("aot-export demo", "")) + "\n\n" + self.next_steps()

    def next_steps(self) -> str:
        return "\n".join([
            f"{DEMO_MODEL} has seeded random weights: the graph is checked against PyTorch, but `run` answers "
            "nonsense by design, and int8 calibration / int4-LLM top-1 gates can fail on it (near-tied logits).",
            "Next:",
            f"  aot-export build {self.export_dir} --target rtx --precision fp32 --out aot-demo/engine",
            f"  aot-export run --model {self.export_dir} --video {self.video} --prompt 'What happens?'",
            "  aot-export export --model CHECKPOINT_DIR --out DIR   (a real LLaVA-OneVision checkpoint)"])

    def to_dict(self) -> dict:
        return {"model": DEMO_MODEL, "config": self.config.to_dict(), "input_tokens": self.config.input_tokens,
                "output_tokens": self.config.output_tokens, "retention": self.config.retention,
                "check": self.check.to_dict(), "validations": [v.to_dict() for v in self.validations],
                "seconds": self.seconds, "passed": self.passed, "written": str(self.export_dir),
                "random_weights": True}


def run_demo(workdir: Path, videos: Sequence[str | Path] = (), progress: bool = True,
             force: bool = True, *, verify_hashes: bool = True) -> DemoReport:
    """Export, check and validate the built-in model on `videos` (a clip synthesized with PyAV when none).
    `force`: a rerun replaces the demo's own earlier export (anything else at `workdir/export` is refused);
    `verify_hashes`: check and validate compare the export's sha256 with its manifest (sizes always)."""
    from engines.check import check_export

    workdir.mkdir(parents=True, exist_ok=True)
    videos = [Path(v) for v in videos] or [synthesize_clip(workdir / "synthetic.mp4")]
    for path in videos:
        decode_frames(path, 1)          # a bad video is refused before minutes of export
    cfg = AOTConfig()
    adapter = load_model(DEMO_MODEL)
    export = export_vision_aot(adapter, cfg, workdir / "export", progress=progress, force=force)
    seconds = {"export": export.seconds}
    start = time.perf_counter()
    check = check_export(export.directory, verify_hashes=verify_hashes)
    seconds["check"] = {"onnx + lint + tensorrt": time.perf_counter() - start}
    validations = []
    for path in videos:
        report = validate_export(export.directory, path, model=adapter, progress=progress,
                                 verify_hashes=verify_hashes)
        seconds[f"validate {path.name}"] = report.seconds
        validations.append(report)
    return DemoReport(cfg, check, validations, seconds, export.directory, videos[0])
