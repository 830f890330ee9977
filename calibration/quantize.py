"""`aot-export calibrate DIR --videos ... --precision int8|fp8 --out DIR2`: explicit (Q/DQ) quantization of the
vision encoder and projector of an fp32 export, calibrated on real video, with its fidelity on a held-out video.

What is quantized. Only nodes whose dynamo name scope (`pkg.torch.onnx.name_scopes`, second entry = top-level
submodule of `VisionAOT`) is `tower` or `projector`, of op types Conv / MatMul / Gemm, and by default only those
with a constant weight (the Linear layers and the patch Conv). The attention products q·kᵀ and softmax·v stay in
float (quantizing them too dropped the tiny model's matched token cosine from 0.998 to 0.96), as do the two
score layers (`scores.0`, `scores.1`) and the AOT block (`reducer`): selection, Sinkhorn transport and pooling
lose accuracy in low precision (DESIGN.md: cos 0.90–0.96 with the reducer quantized).

The score layers share tensors with the tower: their q/k weights are the tower layers' initializers, and the
exporter merges their LayerNorm with the tower's identical one. ONNX Runtime points *every* consumer of a
quantized tensor at its DequantizeLinear output, so shared weights are duplicated before quantization
(`untie_shared_weights`) and float nodes are rewired to the original activations after it
(`restore_float_inputs`): the score layers and the reducer read exactly what they read in the fp32 graph.

How. ONNX Runtime's `quantize_static` in QDQ format: symmetric activations and weights (zero point 0, what
TensorRT requires), weights per output channel (Conv axis 0, MatMul axis 1), biases left in float (TensorRT fuses
them), no Q/DQ on op outputs. The tensor ranges come from ONNX Runtime's own calibrators (MinMax for int8,
Distribution — the only one ORT accepts for float8 — for fp8), run one sample at a time over only the
activations that get quantized (so memory stays bounded on a full-size tower), and are handed to
`quantize_static` as its calibration cache.

Fidelity. The fp32 export and the quantized graph run on ONNX Runtime CPU on the same preprocessed frames of a
held-out video; see `fidelity_metrics` for the exact metric definitions and `GATES` for the floors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import onnx

from aot_export.adapters.base import ENCODER_SCOPES
from aot_export.artifacts import atomic_dir, sha256_file
from aot_export.config import AOTConfig
from aot_export.errors import InputError
from aot_export.fidelity import compare_tokens
from aot_export.manifest import GRAPH, MANIFEST, Manifest, hash_files, read_manifest
from aot_export.onnx_scopes import NAME_SCOPES, submodule
from aot_export.progress import Stages

from .data import CalibrationData, expand_videos, manifest_calibration_data

QUANTIZED_SCOPES = ENCODER_SCOPES
OP_TYPES = ("Conv", "MatMul", "Gemm")
STAGES = ["read export", "calibration data", "prepare graph", "calibrate", "quantize", "fidelity", "manifest"]


@dataclass(frozen=True)
class Precision:
    name: str
    quant_type: str           # onnxruntime.quantization.QuantType member, for activations and weights
    calibration: str          # onnxruntime.quantization.CalibrationMethod member
    note: str


PRECISIONS = {
    "int8": Precision("int8", "QInt8", "MinMax", "symmetric int8 (zero point 0), per-channel weights"),
    "fp8": Precision("fp8", "QFLOAT8E4M3FN", "Distribution",
                     "float8 e4m3fn (zero point 0), per-channel weights; TensorRT runs it on SM 8.9+"),
}


@dataclass(frozen=True)
class Gates:
    """The floors a calibrated export must meet on its held-out video (the same as runtime.validate's int8/fp8)."""

    matched_cosine_min: float = 0.995
    anchor_agreement: float = 0.98


GATES = Gates()


# ---- which nodes ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantPlan:
    nodes: tuple[str, ...]                    # node names handed to quantize_static
    activations: tuple[str, ...]              # non-constant float inputs of those nodes: the tensors calibrated
    excluded_scopes: dict[str, int]           # scope → number of Conv/MatMul/Gemm nodes left in float there
    float_in_scope: int                       # activation×activation MatMuls inside tower/projector left in float


def plan_quantization(model: onnx.ModelProto, weights_only: bool = True) -> QuantPlan:
    """Conv/MatMul/Gemm nodes of the tower and projector to quantize (only those with a constant weight when
    `weights_only`), and the activations that need a calibrated range."""
    graph = model.graph
    constants = {init.name for init in graph.initializer}
    constants.update(out for node in graph.node if node.op_type == "Constant" for out in node.output)
    nodes, activations, excluded, float_in_scope = [], [], {}, 0
    unscoped = 0
    for node in graph.node:
        if node.op_type not in OP_TYPES:
            continue
        scope = submodule(node)
        if scope is None:
            unscoped += 1
            continue
        if scope not in QUANTIZED_SCOPES:
            excluded[scope] = excluded.get(scope, 0) + 1
            continue
        if weights_only and (len(node.input) < 2 or node.input[1] not in constants):
            float_in_scope += 1
            continue
        if not node.name:
            raise InputError(f"a {node.op_type} node of scope {scope!r} has no name; re-export with "
                             "`aot-export export` (ONNX Runtime's quantizer selects nodes by name)")
        nodes.append(node.name)
        activations.extend(name for name in node.input[:2] if name and name not in constants)
    if not nodes:
        raise InputError("the graph has no Conv/MatMul/Gemm node with name-scope metadata "
                         f"({NAME_SCOPES}) in {'/'.join(QUANTIZED_SCOPES)}"
                         f"{f' ({unscoped} without metadata)' if unscoped else ''}; re-export with "
                         "`aot-export export` (dynamo exporter), which records it")
    return QuantPlan(tuple(nodes), tuple(dict.fromkeys(activations)), excluded, float_in_scope)


def untie_shared_weights(model: onnx.ModelProto, quantized: Iterable[str]) -> list[str]:
    """Give the float consumers of a weight that quantized nodes also read their own copy of it (in place);
    returns the copied initializer names. Without this, ONNX Runtime rewires every consumer of a quantized weight
    to its DequantizeLinear output, and the fp32 score layers would compute with int8-rounded q/k weights."""
    quantized = set(quantized)
    inits = {init.name: init for init in model.graph.initializer}
    readers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            if name in inits:
                readers.setdefault(name, set()).add("q" if node.name in quantized else "f")
    shared = sorted(name for name, kinds in readers.items() if kinds == {"q", "f"})
    for name in shared:
        copy = onnx.TensorProto()
        copy.CopyFrom(inits[name])
        copy.name = f"{name}__float"
        model.graph.initializer.append(copy)
        for node in model.graph.node:
            if node.name not in quantized:
                for i, value in enumerate(node.input):
                    if value == name:
                        node.input[i] = copy.name
    return shared


def graph_opset(model: onnx.ModelProto) -> int:
    return next(op.version for op in model.opset_import if op.domain in ("", "ai.onnx"))


def raise_opset_for_float8(model: onnx.ModelProto) -> bool:
    """float8 Q/DQ needs opset 19. ONNX Runtime would run `onnx.version_converter`, which drops every node's
    metadata (the name scopes that say which nodes are fp32 on purpose). From 18, the exporter's opset, to 19 every
    operator change is additive (float8 types; Cast's `saturate`, which applies to float8 only; AveragePool
    dilations; Pad's wrap mode; strings in Equal), so the import is raised in place. True if it was raised."""
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version == 18:
            opset.version = 19
            return True
    return False


def restore_float_inputs(model: onnx.ModelProto, quantized: Iterable[str]) -> int:
    """Rewire float nodes (not quantized, not Q/DQ) that ONNX Runtime pointed at a DequantizeLinear output back
    to the original activation: ORT replaces the input of *every* consumer of a quantized activation, so a score
    layer that shares the tower's LayerNorm output (the exporter merges the identical computation) would read
    int8-rounded values. Returns the number of inputs rewired; raises if a float node still reads a quantized
    weight (see `untie_shared_weights`)."""
    quantized = set(quantized)
    producer = {out: node for node in model.graph.node for out in node.output}
    original = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in producer \
                and producer[node.input[0]].op_type == "QuantizeLinear":
            original[node.output[0]] = producer[node.input[0]].input[0]
    rewired = 0
    for node in model.graph.node:
        if node.name in quantized or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, name in enumerate(node.input):
            if name in original:
                node.input[i] = original[name]
                rewired += 1
            elif name in producer and producer[name].op_type == "DequantizeLinear":
                raise RuntimeError(f"float node {node.name} ({submodule(node)}) reads the quantized weight {name}")
    return rewired


# ---- calibration and quantization -------------------------------------------------------------------------------
def _calibrator(precision: Precision, model_path: Path, work: Path, tensors: Iterable[str]):
    """ORT's calibrator for `precision`, restricted to `tensors` (one range per quantized activation)."""
    from onnxruntime.quantization.calibrate import DistributionCalibrater, MinMaxCalibrater

    only = set(tensors)
    base = MinMaxCalibrater if precision.calibration == "MinMax" else DistributionCalibrater

    class Restricted(base):  # type: ignore[misc, valid-type]
        def select_tensors_to_calibrate(self, model):
            selected, value_infos = super().select_tensors_to_calibrate(model)
            return selected & only, value_infos

        def create_inference_session(self):
            # As ORT's (no graph optimisation, so every calibrated tensor exists as named), but without the CPU
            # arena: unoptimised attention allocates large transient tensors, and the arena kept them (a
            # full-size tower at 8 frames peaked at 8.9 GB for one sample with it).
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
            options.enable_cpu_mem_arena = False
            self.infer_session = onnxruntime.InferenceSession(self.augmented_model_path, sess_options=options,
                                                              providers=self.execution_providers)

    # DistributionCalibrater's own default (1 bin per value) is below its own floor of 512: use create_calibrator's.
    options = {} if base is MinMaxCalibrater else {"num_bins": 2048, "scenario": "same"}
    calibrator = Restricted(model_path, list(OP_TYPES), str(work / "augmented.onnx"), use_external_data_format=True,
                            **options)
    calibrator.augment_graph()
    # From here on the calibrator reads only its session and the output names it noted; its copy of the model's
    # weights (1.6 GB for a full-size tower) is dead weight while the session holds its own.
    for init in calibrator.model.graph.initializer:
        init.ClearField("raw_data")
    calibrator.create_inference_session()
    return calibrator


def calibrate_ranges(precision: Precision, model_path: Path, work: Path, plan: QuantPlan, data: CalibrationData,
                     input_name: str) -> Path:
    """Run the calibrator over every sample, one at a time; write ORT's calibration cache, return its path."""
    from onnxruntime.quantization.calibrate import save_tensors_data

    calibrator = _calibrator(precision, model_path, work, plan.activations)
    reader = data.reader(input_name)
    # ORT's histogram calibrators print progress lines to stdout, which belongs to the CLI's table.
    with contextlib.redirect_stdout(io.StringIO()):
        for start in range(len(data)):
            reader.set_range(start, start + 1)
            calibrator.collect_data(reader)
        ranges = calibrator.compute_data()
    missing = sorted(set(plan.activations) - set(ranges.data))
    if missing:
        raise RuntimeError(f"calibration produced no range for {len(missing)} tensor(s), e.g. {missing[0]}")
    del calibrator
    cache = work / "ranges.json"
    save_tensors_data(ranges, cache)
    return cache


def quantize_graph(precision: Precision, model_path: Path, output: Path, plan: QuantPlan, cache: Path) -> int:
    """quantize_static into `output` (+ `output`.data), then `restore_float_inputs`; returns inputs rewired."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quant_type = getattr(QuantType, precision.quant_type)
    with _quiet_root_warnings():
        quantize_static(str(model_path), str(output), calibration_data_reader=None, quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(OP_TYPES), per_channel=True, reduce_range=False,
                    activation_type=quant_type, weight_type=quant_type, nodes_to_quantize=list(plan.nodes),
                    use_external_data_format=True,
                    calibrate_method=getattr(CalibrationMethod, precision.calibration),
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                                   "OpTypesToExcludeOutputQuantization": list(OP_TYPES)},
                    calibration_cache_path=str(cache))
    model = onnx.load(str(output), load_external_data=False)
    rewired = restore_float_inputs(model, plan.nodes)
    if rewired:
        onnx.save(model, str(output))           # the graph only: its external weights are unchanged
    return rewired


@contextlib.contextmanager
def _quiet_root_warnings():
    """quantize_static logs advice ("consider pre-processing ...") on the root logger at WARNING for every call."""
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


# ---- fidelity ---------------------------------------------------------------------------------------------------
def fidelity_metrics(reference: dict[str, np.ndarray], actual: dict[str, np.ndarray], cfg: AOTConfig) -> dict:
    """Quantized outputs (`actual`) against the fp32 export's (`reference`) on the same frames: the figures of
    `aot_export.fidelity.compare_tokens` (tokens matched by (role, frame, row, col), so a swapped cell that
    shifts the raster order of later tokens does not pair unrelated cells; anchor agreement set-based per
    (role, frame) group), refused when the two outputs do not belong to the same graph."""
    tokens_ref, tokens_act = reference["tokens"], actual["tokens"]
    index_ref, index_act = reference["index"].astype(np.int64), actual["index"].astype(np.int64)
    if tokens_ref.shape != tokens_act.shape or index_ref.shape != index_act.shape:
        raise InputError(f"quantized outputs {tokens_act.shape}/{index_act.shape} differ from fp32 "
                         f"{tokens_ref.shape}/{index_ref.shape}; the graphs do not belong together")
    if cfg.output_tokens != len(index_ref):
        raise InputError(f"the export has {len(index_ref)} output tokens, its config says {cfg.output_tokens}; "
                         "re-export")
    return compare_tokens(cfg, tokens_ref, index_ref, tokens_act, index_act)


NOISE_STEP_FRACTION = 0.25


def input_noise_floor(graph: Path, input_name: str, pixels: np.ndarray, reference: dict[str, np.ndarray],
                      manifest: Manifest, seed: int = 0) -> dict[str, float]:
    """How stable the fp32 export's own selection is: fp32 outputs on the same frames plus Gaussian noise of
    σ = ¼ of one 8-bit pixel step after normalisation (far below what re-encoding a video does), compared with
    `fidelity_metrics`. A quantized graph cannot be expected to agree with fp32 better than fp32 agrees with
    itself under such noise; a model whose attention scores are nearly flat (random weights) shows it here."""
    prep = manifest.preprocessing
    sigma = NOISE_STEP_FRACTION * prep.rescale_factor / max(prep.std)
    noisy = (pixels + np.random.default_rng(seed).normal(0.0, sigma, pixels.shape)).astype(np.float32)
    metrics = fidelity_metrics(reference, run_cpu(graph, {input_name: noisy}), manifest.aot)
    return {"noise_sigma": float(sigma), "noise_matched_cosine_min": metrics["matched_cosine_min"],
            "noise_anchor_agreement": metrics["anchor_agreement"]}


def run_cpu(graph: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One inference on ONNX Runtime's CPU provider (default optimisations: Q/DQ pairs run as int8 kernels where
    ORT fuses them)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds)))


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
        return {"matched_cosine_min": self.metrics["matched_cosine_min"] >= self.gates.matched_cosine_min,
                "anchor_agreement": self.metrics["anchor_agreement"] >= self.gates.anchor_agreement}

    @property
    def passed(self) -> bool:
        return all(self.checks.values())

    def to_dict(self) -> dict[str, Any]:
        return {"directory": self.directory, "source": self.source, "precision": self.precision,
                "holdout": self.holdout, "calibration": self.calibration, "quantized_nodes": self.quantized_nodes,
                "excluded_scopes": self.excluded_scopes, "gates": dataclasses.asdict(self.gates),
                "metrics": self.metrics, "checks": self.checks, "passed": self.passed, "sizes": self.sizes,
                "seconds": self.seconds}

    def table(self) -> str:
        from aot_export.cli import format_table

        m, g, checks = self.metrics, self.gates, self.checks
        verdict = {True: "ok", False: "FAIL"}
        rows = [("token cosine min (matched)", f"{m['matched_cosine_min']:.6f}", f">= {g.matched_cosine_min}",
                 verdict[checks["matched_cosine_min"]]),
                ("token cosine mean (matched)", f"{m['matched_cosine_mean']:.6f}", "", ""),
                ("max abs error (matched)", m["matched_max_abs"], "", ""),
                ("anchor agreement", f"{m['anchor_agreement']:.2%}", f">= {g.anchor_agreement:.0%}",
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
    from aot_export.video import shared_videos

    used = {source.sha256 for source in calibration.sources}
    if holdout is not None:
        path = Path(holdout)
        if not path.is_file():
            raise InputError(f"{path}: no such held-out video; pass an existing video not used for calibration")
        if sha256_file(path) in used:
            raise InputError(f"{path}: the held-out video is also a calibration video; hold out a different one")
        return path
    for path in shared_videos():
        if sha256_file(path) not in used:
            return path
    raise InputError("no held-out video: every shared video (../shared/data/videos) is a calibration video or "
                     "there are none; pass holdout=PATH (--holdout) with a video not used for calibration")


def _source_checks(manifest: Manifest, directory: Path, precision: str) -> Precision:
    if precision not in PRECISIONS:
        raise InputError(f"precision {precision!r} is not supported; choose one of {', '.join(PRECISIONS)}")
    if manifest.precision != "fp32":
        raise InputError(f"{directory} is a {manifest.precision} export; calibrate from the fp32 export "
                         "(`aot-export export` output), not from a quantized one")
    if len(manifest.inputs) != 1:
        raise InputError(f"{directory}: the graph has {len(manifest.inputs)} inputs, calibration feeds one "
                         "(frames); re-export with `aot-export export`")
    return PRECISIONS[precision]


def calibrate_export(directory: str | os.PathLike, videos: str | os.PathLike | Iterable[str | os.PathLike],
                     precision: str, out_dir: str | os.PathLike, holdout: str | os.PathLike | None = None,
                     clips_per_video: int = 4, seed: int = 0, progress: bool = True,
                     weights_only: bool = True, noise_floor: bool = True) -> CalibrationReport:
    """Quantize the fp32 export in `directory` to `precision` ("int8" or "fp8") with ranges calibrated on
    `videos` (files and/or directories; `clips_per_video` clips each, see calibration.data), write the Q/DQ
    export to `out_dir` (atomically), and measure it against the fp32 export on `holdout` (default: a shared
    video not used for calibration). `weights_only=False` also quantizes the tower's activation×activation
    MatMuls (attention; measured far less accurate). `noise_floor` also measures the fp32 export against itself
    under sub-pixel input noise (`input_noise_floor`), to tell quantization error from an ill-conditioned
    selection. Refuses bad input with InputError; a failed fidelity gate is `report.passed == False`
    (the directory is still written, its manifest records the failed fidelity)."""
    from onnx.external_data_helper import load_external_data_for_model

    directory, out_dir = Path(directory), Path(out_dir)
    stages = Stages(STAGES, progress)
    with stages.step():
        manifest = read_manifest(directory)
        spec = _source_checks(manifest, directory, precision)
        paths = expand_videos(videos)
        if directory.resolve() == out_dir.resolve():
            raise InputError(f"--out {out_dir} is the source export; write the {precision} export elsewhere")
    with stages.step():
        data = manifest_calibration_data(paths, manifest, clips_per_video, seed)
        held = _resolve_holdout(holdout, data)
    input_name = manifest.inputs[0].name
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
        with atomic_dir(out_dir) as staging:
            graph = staging / GRAPH
            with stages.step():
                try:
                    rewired = quantize_graph(spec, prepared, graph, plan, cache)
                except (ValueError, NotImplementedError, TypeError) as exc:
                    raise InputError(f"ONNX Runtime cannot quantize this graph to {precision}: "
                                     f"{' '.join(str(exc).split())[:300]}; use another precision") from exc
                for path in staging.iterdir():
                    path.chmod(0o644)
            with stages.step():
                from aot_export.video import decode_frames
                from aot_export.preprocess import preprocess_frames

                pixels = preprocess_frames(decode_frames(held, manifest.aot.frames), manifest.preprocessing)
                reference = run_cpu(directory / manifest.graph, {input_name: pixels})
                actual = run_cpu(graph, {input_name: pixels})
                metrics = fidelity_metrics(reference, actual, manifest.aot)
                if noise_floor:
                    metrics.update(input_noise_floor(directory / manifest.graph, input_name, pixels, reference,
                                                     manifest, seed))
            with stages.step():
                quantized = onnx.load(str(graph), load_external_data=False)
                files = hash_files(staging, sorted(p.name for p in staging.iterdir() if p.is_file()))
                provenance = {
                    **data.provenance(), "method": f"onnxruntime quantize_static QDQ {spec.quant_type}, "
                    f"{spec.calibration} calibration, {spec.note}",
                    "onnxruntime": _ort_version(), "quantized_scopes": list(QUANTIZED_SCOPES),
                    "op_types": list(OP_TYPES), "weights_only": weights_only, "quantized_nodes": len(plan.nodes),
                    "excluded_scopes": plan.excluded_scopes, "untied_weights": len(untied),
                    "float_inputs_restored": rewired,
                    "source": {"directory": str(directory), "precision": manifest.precision,
                               "manifest_sha256": sha256_file(directory / MANIFEST), "files": manifest.files},
                    "holdout": {"name": held.name, "sha256": sha256_file(held), "metrics": metrics,
                                "gates": dataclasses.asdict(GATES)}}
                new = dataclasses.replace(manifest, precision=precision, files=files, opset=graph_opset(quantized),
                                          extra={**manifest.extra, "calibration": provenance})
                new.write(staging)
    stages.close()
    sizes = {"source_bytes": sum((directory / name).stat().st_size for name in manifest.files),
             "quantized_bytes": sum((out_dir / name).stat().st_size for name in files)}
    seconds = {**stages.seconds}
    return CalibrationReport(str(out_dir), str(directory), precision, held.name, data.provenance(), len(plan.nodes),
                             plan.excluded_scopes, GATES, metrics, sizes, seconds)


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
