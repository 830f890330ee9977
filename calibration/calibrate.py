"""`aot-export calibrate DIR --videos ... --precision int8|fp8 --out DIR2`: explicit (Q/DQ) quantization of the
vision encoder and projector of an fp32 export, calibrated on real video, with its fidelity on a held-out video.

What is quantized: `calibration.qdq_graph`; how: `calibration.ort_quantize`. Fidelity: the fp32 export and the
quantized graph run on ONNX Runtime CPU (`aot_export.runners.OnnxRuntimeRunner`) on the same preprocessed frames
of a held-out video, compared by `aot_export.fidelity.compare_outputs` and gated by
`aot_export.fidelity.VISION_GATES` for the precision (the same gates `validate` applies), the anchor floor lowered
to the fp32 graph's own noise floor on the held-out video where that is lower
(`aot_export.fidelity.input_noise_floor`).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import onnx

from aot_export.artifacts import atomic_dir, check_destination, default_mode, sha256_file
from aot_export.errors import InputError
from aot_export.fidelity import NOISE_DRAWS, VISION_GATES, Gates, NoiseFloor, compare_outputs, gate_checks, \
    input_noise_floor
from aot_export.manifest import GRAPH, MANIFEST, Manifest, hash_files, read_manifest
from aot_export.preprocess import preprocess_frames
from aot_export.progress import Stages
from aot_export.report import format_table
from aot_export.runners import OnnxRuntimeRunner
from aot_export.video import decode_frames

from .data import CalibrationData, expand_videos, manifest_calibration_data
from .ort_quantize import QUANTIZATIONS, Precision, calibrate_ranges, calibration_method, ort_version, \
    quantize_graph
from .qdq_graph import DEFAULT_FLOAT_LAYERS, OP_TYPES, QUANTIZED_SCOPES, graph_opset, plan_quantization, \
    raise_opset_for_float8, untie_shared_weights

STAGES = ["read export", "calibration data", "prepare graph", "calibrate", "quantize", "fidelity", "manifest"]


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
    # `gates` is what the run was held to: the precision's fixed gates (`fixed_gates`), the anchor floor lowered
    # to the fp32 noise floor measured on the held-out video where that is lower (`noise_floor`; None: not measured).
    fixed_gates: Gates | None = None
    noise_floor: NoiseFloor | None = None

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
                "seconds": self.seconds, "fixed_gates": (self.fixed_gates or self.gates).to_dict(),
                "noise_floor": self.noise_floor and self.noise_floor.to_dict(self.fixed_gates or self.gates)}

    def table(self) -> str:

        m, g, checks = self.metrics, self.gates, self.checks
        verdict = {True: "ok", False: "FAIL", None: ""}
        rows = [(label, value, g.describe(name), verdict[checks.get(name)]) for label, name, value in [
                ("arithmetic: token cosine min (selections agree)", "arithmetic_cosine_min",
                 f"{m['arithmetic_cosine_min']:.6f}"),
                ("arithmetic: token cosine mean", "arithmetic_cosine_mean", f"{m['arithmetic_cosine_mean']:.6f}"),
                ("arithmetic: share of tokens", "arithmetic_tokens", f"{m['arithmetic_tokens']:.2%}"),
                ("selection: anchor agreement", "anchor_agreement", f"{m['anchor_agreement']:.2%}"),
                ("selection: cell agreement (keys matched)", "cell_agreement", f"{m['cell_agreement']:.2%}"),
                ("token cosine min (matched)", "matched_cosine_min", f"{m['matched_cosine_min']:.6f}"),
                ("token cosine mean (matched)", "matched_cosine_mean", f"{m['matched_cosine_mean']:.6f}"),
                ("max abs error (matched)", "matched_max_abs", f"{m['matched_max_abs']:.6g}"),
                ("index agreement (position)", "index_agreement", f"{m['index_agreement']:.2%}"),
                ("token cosine min (position)", "cosine_min", f"{m['cosine_min']:.6f}"),
                ("token cosine mean (position)", "cosine_mean", f"{m['cosine_mean']:.6f}")]]
        floor = [self.noise_floor.describe(self.fixed_gates or g)] if self.noise_floor else []
        videos = ", ".join(v["name"] for v in self.calibration["videos"])
        head = (f"{self.source} -> {self.directory} ({self.precision}, {self.quantized_nodes} nodes quantized; "
                f"float: {', '.join(f'{k} {v}' for k, v in sorted(self.excluded_scopes.items()))})\n"
                f"calibrated on {videos} ({self.calibration['samples']} samples, seed "
                f"{self.calibration['seed']}); held out: {self.holdout} (ONNX Runtime CPU)")
        sizes = (f"graph + weights: {self.sizes['source_bytes'] / 1e6:.1f} MB fp32 -> "
                 f"{self.sizes['quantized_bytes'] / 1e6:.1f} MB {self.precision}")
        timing = "time: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())
        return "\n".join([head, format_table(rows, ("metric", "value", "gate", "")), *floor, sizes, timing, "",
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


def _source_checks(manifest: Manifest, directory: Path, precision: str, method: str | None) -> tuple[Precision, str]:
    if precision not in QUANTIZATIONS:
        raise InputError(f"precision {precision!r} is not supported; choose one of {', '.join(QUANTIZATIONS)}")
    try:
        method = calibration_method(QUANTIZATIONS[precision], method)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    if manifest.precision != "fp32":
        raise InputError(f"{directory} is a {manifest.precision} export; calibrate from the fp32 export "
                         "(`aot-export export` output), not from a quantized one")
    if len(manifest.inputs) != 1:
        raise InputError(f"{directory}: the graph has {len(manifest.inputs)} inputs, calibration feeds one "
                         "(frames); re-export with `aot-export export`")
    return QUANTIZATIONS[precision], method


def calibrate_export(directory: str | os.PathLike, videos: str | os.PathLike | Iterable[str | os.PathLike],
                     precision: str, out_dir: str | os.PathLike, holdout: str | os.PathLike | None = None,
                     clips_per_video: int = 4, seed: int = 0, progress: bool = True,
                     weights_only: bool = True, noise_draws: int = NOISE_DRAWS, force: bool = False, *,
                     verify_hashes: bool = True, float_layers: Sequence[str] | None = None,
                     calibration_method: str | None = None) -> CalibrationReport:
    """Quantize the fp32 export in `directory` to `precision` ("int8" or "fp8") with ranges calibrated on
    `videos` (files and/or directories; `clips_per_video` clips each, see calibration.data; ranges by ORT's
    `calibration_method`, the precision's default if None), keeping float the nodes `float_layers` names
    (`calibration.qdq_graph.kept_float`; None: `DEFAULT_FLOAT_LAYERS` — the score path, so the anchors are
    chosen from fp32 scores, and the projector), write the Q/DQ export to `out_dir` (atomically), and measure it
    against the fp32 export on `holdout` (a video not used for calibration). `weights_only=False` also quantizes
    the tower's activation×activation MatMuls (attention; measured far less accurate). `noise_draws` (0: none) also measures the fp32 export
    against itself under sub-pixel input noise that many times (`input_noise_floor`): the anchor gate is then the
    fixed one or that floor's median where lower (`NoiseFloor.gates`). `verify_hashes`: the source export's
    sha256 checked against its manifest (sizes always). Refuses bad input with InputError; a failed fidelity gate
    is `report.passed == False`
    (the directory is still written, its manifest records the failed fidelity)."""
    from onnx.external_data_helper import load_external_data_for_model

    directory, out_dir = Path(directory), Path(out_dir)
    stages = Stages(STAGES, progress)
    with stages.step():
        manifest = read_manifest(directory, verify_hashes=verify_hashes)
        spec, method = _source_checks(manifest, directory, precision, calibration_method)
        float_layers = DEFAULT_FLOAT_LAYERS if float_layers is None else tuple(float_layers)
        paths = expand_videos(videos)
        check_destination(out_dir, "export", force, sum(manifest.sizes.values()), sources={"export": directory})
    with stages.step():
        data = manifest_calibration_data(paths, manifest, clips_per_video, seed)
        held = _resolve_holdout(holdout, data)
    input_name = manifest.inputs[0].name
    fixed_gates = VISION_GATES[precision]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Work files (a full-size graph is written twice more) go beside the output, not to a possibly small /tmp.
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.work.", dir=out_dir.parent) as tmp:
        work = Path(tmp)
        with stages.step():
            model = onnx.load(str(directory / manifest.graph), load_external_data=False)
            load_external_data_for_model(model, str(directory))
            plan = plan_quantization(model, weights_only, float_layers)
            layers = plan.summary(model)
            untied = untie_shared_weights(model, plan.nodes)
            if spec.name == "fp8":
                raise_opset_for_float8(model)
            prepared = work / "prepared.onnx"
            onnx.save(model, str(prepared), save_as_external_data=True, location="prepared.onnx.data")
            del model
        with stages.step():
            cache = calibrate_ranges(spec, prepared, work, plan, data, input_name, method)
        with atomic_dir(out_dir, "export", force) as staging:
            graph = staging / GRAPH
            with stages.step():
                try:
                    rewired = quantize_graph(spec, prepared, graph, plan, cache, method)
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
                    noise = input_noise_floor(fp32, pixels, reference, manifest, noise_draws, seed) \
                        if noise_draws else None
                with OnnxRuntimeRunner(graph, cpu, input_name=input_name) as quantized_runner:
                    actual = quantized_runner.run(pixels)
                metrics = compare_outputs(manifest.aot, reference, actual)
                gates = noise.gates(fixed_gates) if noise else fixed_gates
            with stages.step():
                quantized = onnx.load(str(graph), load_external_data=False)
                files = hash_files(staging, sorted(p.name for p in staging.iterdir() if p.is_file()))
                provenance = {
                    **data.provenance(), "method": f"onnxruntime quantize_static QDQ {spec.quant_type}, "
                    f"{method} calibration, {spec.note}",
                    "recipe": {"calibration_method": method, "scale_rule": spec.scale_rule,
                               "float_layers": list(float_layers), "kept_float": plan.kept_float,
                               "float_nodes": len(plan.float_nodes), "layers": layers},
                    "onnxruntime": ort_version(), "quantized_scopes": list(QUANTIZED_SCOPES),
                    "op_types": list(OP_TYPES), "weights_only": weights_only, "quantized_nodes": len(plan.nodes),
                    "excluded_scopes": plan.excluded_scopes, "untied_weights": len(untied),
                    "float_inputs_restored": rewired,
                    "source": {"directory": str(directory), "precision": manifest.precision,
                               "manifest_sha256": sha256_file(directory / MANIFEST), "files": manifest.files},
                    "holdout": {"name": held.name, "sha256": sha256_file(held), "metrics": metrics,
                                "gates": gates.to_dict(), "fixed_gates": fixed_gates.to_dict(),
                                "noise_floor": noise and noise.to_dict(fixed_gates),
                                "passed": all(gate_checks(metrics, gates).values())}}
                new = dataclasses.replace(manifest, precision=precision, files=files, opset=graph_opset(quantized),
                                          extra={**manifest.extra, "calibration": provenance})
                new.write(staging)
    stages.close()
    sizes = {"source_bytes": sum((directory / name).stat().st_size for name in manifest.files),
             "quantized_bytes": sum((out_dir / name).stat().st_size for name in files)}
    seconds = {**stages.seconds}
    return CalibrationReport(str(out_dir), str(directory), precision, held.name, data.provenance(), len(plan.nodes),
                             {**plan.excluded_scopes, **plan.kept_float}, gates, metrics, sizes, seconds,
                             fixed_gates, noise)
