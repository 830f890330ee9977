"""`aot-export check DIR`: is this export directory what its manifest says, and will TensorRT build it?

ONNX checker with strict shape inference → static-graph lint (forbidden ops, TopK k, interface shapes and dtypes
against the manifest) → TensorRT parse and build with whichever of `tensorrt` / `tensorrt_rtx` is importable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from aot_export.manifest import MANIFEST, consistency_findings, file_findings, load_manifest
from aot_export.onnx_lint import graph_findings, interface_findings
from aot_export.report import format_table

from .loaders import build_engine, builder_config, parse_onnx
from .flavours import TensorRTUnavailable, load_tensorrt
from .targets import PRECISIONS

OK, FINDING, SKIPPED = "ok", "finding", "skipped"


@dataclass(frozen=True)
class CheckRow:
    check: str
    status: str
    detail: str


@dataclass
class CheckReport:
    directory: str
    rows: list[CheckRow] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(row.status != FINDING for row in self.rows)

    def add(self, check: str, findings: list, ok_detail: str = "") -> None:
        if findings:
            self.rows.extend(CheckRow(check, FINDING, str(f)) for f in findings)
        else:
            self.rows.append(CheckRow(check, OK, ok_detail))

    def to_dict(self) -> dict:
        return {"directory": self.directory, "passed": self.passed,
                "rows": [row.__dict__ for row in self.rows]}

    def table(self) -> str:

        return format_table([(r.check, r.status, r.detail) for r in self.rows], ("check", "status", "detail")) + \
            f"\n\n{'PASS' if self.passed else 'FAIL'}: {sum(r.status == FINDING for r in self.rows)} finding(s)"


def check_export(directory: str | os.PathLike, tensorrt: bool = True, workspace_bytes: int = 2 << 30, *,
                 verify_hashes: bool = True) -> CheckReport:
    """`verify_hashes`: compare the files' sha256 with the manifest too (sizes always; False: --skip-hash)."""
    directory = Path(directory)
    manifest, data = load_manifest(directory)
    report = CheckReport(str(directory))
    report.add("manifest", consistency_findings(manifest, data), "counts and shapes follow from its aot config")
    files = file_findings(directory, manifest.files, manifest.sizes, verify_hashes, MANIFEST)
    report.add("files", files, f"{'sizes and sha256' if verify_hashes else 'sizes (sha256 skipped)'} of "
                               f"{', '.join(manifest.files)} match")
    if files:
        return report        # the graph is not what was exported: what follows would describe another graph
    graph = directory / manifest.graph
    try:
        onnx.checker.check_model(str(graph), full_check=True)
        report.rows.append(CheckRow("onnx checker", OK, f"opset {manifest.opset}, strict shape inference"))
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        report.rows.append(CheckRow("onnx checker", FINDING, " ".join(str(exc).split())[:300]))
    model = onnx.load(str(graph), load_external_data=False)
    lint = graph_findings(model)
    scans = sum(node.op_type == "Scan" for node in model.graph.node)
    flow = f"{scans} Scan(s) of a constant count, no other control flow" if scans else "no control flow"
    report.add("static graph", lint, f"{len(model.graph.node)} nodes; {flow}, every TopK k constant")
    declared = {t.name: (t.shape, t.dtype) for t in [*manifest.inputs, *manifest.outputs]}
    report.add("interface", interface_findings(model, declared),
               "; ".join(f"{t.name} {list(t.shape)} {t.dtype}" for t in [*manifest.inputs, *manifest.outputs]))
    if tensorrt and manifest.precision not in PRECISIONS:
        report.rows.append(CheckRow("tensorrt", SKIPPED, f"an {manifest.precision} export runs on ONNX Runtime only "
                                                         "(engines are built from the fp32 export)"))
    elif tensorrt:
        check_tensorrt(report, graph, workspace_bytes)
    return report


def check_tensorrt(report: CheckReport, graph: Path, workspace_bytes: int) -> None:
    try:
        trt, flavour = load_tensorrt()
    except TensorRTUnavailable as exc:
        report.rows.append(CheckRow("tensorrt", SKIPPED, str(exc)))
        return
    try:
        parsed = parse_onnx(graph, flavour.name)
    except RuntimeError as exc:
        report.rows.append(CheckRow(f"{flavour.name} parse", FINDING, " ".join(str(exc).split())[:300]))
        return
    report.rows.append(CheckRow(f"{flavour.name} parse", OK, f"{trt.__version__}: {parsed.num_layers} layers"))
    try:
        engine = build_engine(parsed, builder_config(parsed, workspace_bytes=workspace_bytes))
    except RuntimeError as exc:
        report.rows.append(CheckRow(f"{flavour.name} build", FINDING, str(exc)))
        return
    report.rows.append(CheckRow(f"{flavour.name} build", OK,
                                f"{len(engine.plan) / 1e6:.1f} MB plan in {engine.build_seconds:.1f} s"))
