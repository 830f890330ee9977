"""`aot-export calibrate DIR --videos ... --precision int8|fp8 --out DIR2`: explicit (Q/DQ) quantization of the
vision encoder and projector of an fp32 export, calibrated on real video, with its fidelity on a held-out video.

What is quantized: `calibration.qdq_graph`; how: `calibration.ort_quantize`. Fidelity: the fp32 export and the
quantized graph run on ONNX Runtime CPU (`aot_export.runners.OnnxRuntimeRunner`) on the same preprocessed frames
of a held-out video, compared by `aot_export.fidelity.compare_outputs` and gated by
`aot_export.fidelity.VISION_GATES` for the precision (the same gates `validate` applies).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import onnx

from aot_export.artifacts import atomic_dir, check_destination, default_mode, sha256_file
from aot_export.errors import InputError
from aot_export.fidelity import VISION_GATES, Gates, compare_outputs, gate_checks
from aot_export.manifest import GRAPH, MANIFEST, Manifest, hash_files, read_manifest
from aot_export.preprocess import preprocess_frames
from aot_export.progress import Stages
from aot_export.report import format_table
from aot_export.runners import OnnxRuntimeRunner
from aot_export.video import decode_frames

from .data import CalibrationData, expand_videos, manifest_calibration_data
from .ort_quantize import QUANTIZATIONS, Precision, calibrate_ranges, ort_version, quantize_graph
from .qdq_graph import OP_TYPES, QUANTIZED_SCOPES, graph_opset, plan_quantization, raise_opset_for_float8, \
    untie_shared_weights

STAGES = ["read export", "calibration data", "prepare graph", "calibrate", "quantize", "fidelity", "manifest"]


# ---- fidelity ---------------------------------------------------------------------------------------------------
NOISE_STEP_FRACTION = 0.25


def input_noise_floor(runner: OnnxRuntimeRunner, pixels: np.ndarray, reference: dict[str, np.ndarray],
                      manifest: Manifest, seed: int = 0) -> dict[str, float]:
    """How stable the fp32 export's own selection is: fp32 outputs on the same frames plus Gaussian noise of
    σ = ¼ of one 8-bit pixel step after normalisation (far below what re-encoding a video does), compared with
    `compare_outputs` (`runner`: the fp32 export's, active). A quantized graph cannot be expected to agree with
    fp32 better than fp32 agrees with itself under such noise; a model whose attention scores are nearly flat (random weights) shows it here."""
    prep = manifest.preprocessing
    sigma = NOISE_STEP_FRACTION * prep.rescale_factor / max(prep.std)
    noisy = (pixels + np.random.default_rng(seed).normal(0.0, sigma, pixels.shape)).astype(np.float32)
    metrics = compare_outputs(manifest.aot, reference, runner.run(noisy))
    return {"noise_sigma": float(sigma), "noise_matched_cosine_min": metrics["matched_cosine_min"],
            "noise_anchor_agreement": metrics["anchor_agreement"]}


# ---- the command ------------------------------------------------------------------------------------------------
@dataclass
class CalibrationReport:
    directory: str
    source: str
    precision: str
    holdout: str
    calibration: dict[str, Any]
    quantized_nodes: int
    excluded_scopes: dict[str, int]
    gates: Gates
    metrics: dict[str, float] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)      # bytes: source graph + weights, quantized ones
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def checks(self) -> dict[str, bool]:
        return gate_checks(self.metrics, self.gates)

    @property
    def passed(self) -> bool:
        return all(self.checks.values())

    def to_dict(self) -> dict[str, Any]:
        return {"directory": self.directory, "source": self.source, "precision": self.precision,
                "holdout": self.holdout, "calibration": self.calibration, "quantized_nodes": self.quantized_nodes,
                "excluded_scopes": self.excluded_scopes, "gates": self.gates.to_dict(),
                "metrics": self.metrics, "checks": self.checks, "passed": self.passed, "sizes": self.sizes,
                "seconds": self.seconds}

    def table(self) -> str:

        m, g, checks = self.metrics, self.gates, self.checks
        verdict = {True: "ok", False: "FAIL"}
        rows = [("token cosine min (matched)", f"{m['matched_cosine_min']:.6f}", g.describe("matched_cosine_min"),
                 verdict[checks["matched_cosine_min"]]),
                ("token cosine mean (matched)", f"{m['matched_cosine_mean']:.6f}", "", ""),
                ("max abs error (matched)", m["matched_max_abs"], "", ""),
                ("anchor agreement", f"{m['anchor_agreement']:.2%}", g.describe("anchor_agreement"),
                 verdict[checks["anchor_agreement"]]),
                ("cell agreement (keys matched)", f"{m['cell_agreement']:.2%}", "", ""),
                ("index agreement (position)", f"{m['index_agreement']:.2%}", "", ""),
                ("token cosine min (position)", f"{m['cosine_min']:.6f}", "", ""),
                ("token cosine mean (position)", f"{m['cosine_mean']:.6f}", "", "")]
        if "noise_anchor_agreement" in m:
            rows.append(("fp32 vs fp32 + 1/4-step noise: anchor", f"{m['noise_anchor_agreement']:.2%}",
                         "(reference)", ""))
        videos = ", ".join(v["name"] for v in self.calibration["videos"])
        head = (f"{self.source} -> {self.directory} ({self.precision}, {self.quantized_nodes} nodes quantized; "
                f"float: {', '.join(f'{k} {v}' for k, v in sorted(self.excluded_scopes.items()))})\n"
                f"calibrated on {videos} ({self.calibration['samples']} samples, seed "
                f"{self.calibration['seed']}); held out: {self.holdout} (ONNX Runtime CPU)")
        sizes = (f"graph + weights: {self.sizes['source_bytes'] / 1e6:.1f} MB fp32 -> "
                 f"{self.sizes['quantized_bytes'] / 1e6:.1f} MB {self.precision}")
        timing = "time: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())
        return "\n".join([head, format_table(rows, ("metric", "value", "gate", "")), sizes, timing, "",
                          "PASS" if self.passed else "FAIL"])


def _resolve_holdout(holdout: str | os.PathLike | None, calibration: CalibrationData) -> Path:
    if holdout is None:
        raise InputError("no held-out video: pass holdout=PATH (--holdout) with a video not used for calibration")
    path = Path(holdout)
    if not path.is_file():
        raise InputError(f"{path}: no such held-out video; pass an existing video not used for calibration")
    if sha256_file(path) in {source.sha256 for source in calibration.sources}:
        raise InputError(f"{path}: the held-out video is also a calibration video; hold out a different one")
    return path


def _source_checks(manifest: Manifest, directory: Path, precision: str) -> Precision:
    if precision not in QUANTIZATIONS:
        raise InputError(f"precision {precision!r} is not supported; choose one of {', '.join(QUANTIZATIONS)}")
    if manifest.precision != "fp32":
        raise InputError(f"{directory} is a {manifest.precision} export; calibrate from the fp32 export "
                         "(`aot-export export` output), not from a quantized one")
    if len(manifest.inputs) != 1:
        raise InputError(f"{directory}: the graph has {len(manifest.inputs)} inputs, calibration feeds one "
                         "(frames); re-export with `aot-export export`")
    return QUANTIZATIONS[precision]


def calibrate_export(directory: str | os.PathLike, videos: str | os.PathLike | Iterable[str | os.PathLike],
                     precision: str, out_dir: str | os.PathLike, holdout: str | os.PathLike | None = None,
                     clips_per_video: int = 4, seed: int = 0, progress: bool = True,
                     weights_only: bool = True, noise_floor: bool = True, force: bool = False, *,
                     verify_hashes: bool = True) -> CalibrationReport:
    """Quantize the fp32 export in `directory` to `precision` ("int8" or "fp8") with ranges calibrated on
    `videos` (files and/or directories; `clips_per_video` clips each, see calibration.data), write the Q/DQ
    export to `out_dir` (atomically), and measure it against the fp32 export on `holdout` (a video not used
    for calibration). `weights_only=False` also quantizes the tower's activation×activation
    MatMuls (attention; measured far less accurate). `noise_floor` also measures the fp32 export against itself
    under sub-pixel input noise (`input_noise_floor`), to tell quantization error from an ill-conditioned
    selection. `verify_hashes`: the source export's sha256 checked against its manifest (sizes always). Refuses
    bad input with InputError; a failed fidelity gate is `report.passed == False`
    (the directory is still written, its manifest records the failed fidelity)."""
    from onnx.external_data_helper import load_external_data_for_model

    directory, out_dir = Path(directory), Path(out_dir)
    stages = Stages(STAGES, progress)
    with stages.step():
        manifest = read_manifest(directory, verify_hashes=verify_hashes)
        spec = _source_checks(manifest, directory, precision)
        paths = expand_videos(videos)
        check_destination(out_dir, "export", force, sum(manifest.sizes.values()), sources={"export": directory})
    with stages.step():
        data = manifest_calibration_data(paths, manifest, clips_per_video, seed)
        held = _resolve_holdout(holdout, data)
    input_name = manifest.inputs[0].name
    gates = VISION_GATES[precision]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Work files (a full-size graph is written twice more) go beside the output, not to a possibly small /tmp.
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.work.", dir=out_dir.parent) as tmp:
        work = Path(tmp)
        with stages.step():
            model = onnx.load(str(directory / manifest.graph), load_external_data=False)
            load_external_data_for_model(model, str(directory))
            plan = plan_quantization(model, weights_only)
            untied = untie_shared_weights(model, plan.nodes)
            if spec.name == "fp8":
                raise_opset_for_float8(model)
            prepared = work / "prepared.onnx"
            onnx.save(model, str(prepared), save_as_external_data=True, location="prepared.onnx.data")
            del model
        with stages.step():
            cache = calibrate_ranges(spec, prepared, work, plan, data, input_name)
        with atomic_dir(out_dir, "export", force) as staging:
            graph = staging / GRAPH
            with stages.step():
                try:
                    rewired = quantize_graph(spec, prepared, graph, plan, cache)
                except (ValueError, NotImplementedError, TypeError) as exc:
                    raise InputError(f"ONNX Runtime cannot quantize this graph to {precision}: "
                                     f"{' '.join(str(exc).split())[:300]}; use another precision") from exc
                for path in staging.iterdir():
                    path.chmod(default_mode(0o666))      # ONNX writes external weights 0600
            with stages.step():
                pixels = preprocess_frames(decode_frames(held, manifest.aot.frames), manifest.preprocessing)
                cpu = ["CPUExecutionProvider"]
                with OnnxRuntimeRunner(directory / manifest.graph, cpu, input_name=input_name) as fp32:
                    reference = fp32.run(pixels)
                    if noise_floor:
                        noise = input_noise_floor(fp32, pixels, reference, manifest, seed)
                with OnnxRuntimeRunner(graph, cpu, input_name=input_name) as quantized_runner:
                    actual = quantized_runner.run(pixels)
                metrics = {**compare_outputs(manifest.aot, reference, actual), **(noise if noise_floor else {})}
            with stages.step():
                quantized = onnx.load(str(graph), load_external_data=False)
                files = hash_files(staging, sorted(p.name for p in staging.iterdir() if p.is_file()))
                provenance = {
                    **data.provenance(), "method": f"onnxruntime quantize_static QDQ {spec.quant_type}, "
                    f"{spec.calibration} calibration, {spec.note}",
                    "onnxruntime": ort_version(), "quantized_scopes": list(QUANTIZED_SCOPES),
                    "op_types": list(OP_TYPES), "weights_only": weights_only, "quantized_nodes": len(plan.nodes),
                    "excluded_scopes": plan.excluded_scopes, "untied_weights": len(untied),
                    "float_inputs_restored": rewired,
                    "source": {"directory": str(directory), "precision": manifest.precision,
                               "manifest_sha256": sha256_file(directory / MANIFEST), "files": manifest.files},
                    "holdout": {"name": held.name, "sha256": sha256_file(held), "metrics": metrics,
                                "gates": gates.to_dict(), "passed": all(gate_checks(metrics, gates).values())}}
                new = dataclasses.replace(manifest, precision=precision, files=files, opset=graph_opset(quantized),
                                          extra={**manifest.extra, "calibration": provenance})
                new.write(staging)
    stages.close()
    sizes = {"source_bytes": sum((directory / name).stat().st_size for name in manifest.files),
             "quantized_bytes": sum((out_dir / name).stat().st_size for name in files)}
    seconds = {**stages.seconds}
    return CalibrationReport(str(out_dir), str(directory), precision, held.name, data.provenance(), len(plan.nodes),
                             plan.excluded_scopes, gates, metrics, sizes, seconds)
