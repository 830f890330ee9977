"""Q/DQ recipe on one fp32 export (issue #21): per-layer sensitivity, and ONNX Runtime CPU time fp32 vs quantized.

`sensitivity`: calibrate (ORT MinMax, `--clips-per-video` clips of the calibration video) with every quantizable
layer float but one module group (`tower.embeddings`, `tower.encoder.layers.N`, `projector`), then each op kind
alone across all layers (q/k/v, out_proj, fc1, fc2), then everything quantized, and measure each graph on the
held-out video against the fp32 export: anchor agreement, matched token cosine min, and how far the two attention
scores that choose the anchors moved (relative L2 of the score layers' ReduceMean outputs, top-126 overlap per
frame). `timing`: alternating rounds of ONNX Runtime CPU runs of the given exports on one held-out clip.
`debug`: ONNX Runtime's QDQ debugging tools (`onnxruntime.quantization.qdq_loss_debug`) on a Q/DQ export (e.g.
`--float-layers none`) against its fp32 export on the held-out clip: per module group, the signal-to-quantization-noise
ratio (dB) that the Q/DQ pairs of its activations add there (`qdq`), of its activations against the fp32 graph's
(`xmodel`: the error accumulated up to that point), and of its weights; then the two score layers' outputs and
the graph's tokens against fp32.
`float16`: each Q/DQ export with its float part in fp16 (`engines.precision.export_fp16`, what `build --float-part
fp16` feeds a strongly typed engine: Q/DQ, LayerNorm, Softmax, the score layers and the AOT block fp32), measured
against the fp32 export on the held-out video beside the Q/DQ export as calibrated.

    python bench/qdq_recipe.py sensitivity build/trained/export8 --calibrate VIDEO --holdout VIDEO [--precision int8]
    python bench/qdq_recipe.py timing build/trained/export8 /tmp/q/int8-bbb /tmp/q/int8-all [--rounds 3]
    python bench/qdq_recipe.py debug build/trained/export8 /tmp/q/int8-all --holdout VIDEO
    python bench/qdq_recipe.py float16 build/trained/export8 /tmp/q/int8-bbb /tmp/q/fp8-bbb --holdout VIDEO
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from aot_export.fidelity import compare_outputs
from aot_export.manifest import read_manifest
from aot_export.preprocess import preprocess_frames
from aot_export.onnx_scopes import module_path, submodule
from aot_export.video import decode_frames
from calibration import calibrate_export
from calibration.qdq_graph import SCORE_SCOPE, module_group, plan_quantization
from engines.precision import export_fp16

KINDS = {"qkv": ("*.q_proj", "*.k_proj", "*.v_proj"), "out_proj": ("*.out_proj",), "fc1": ("*.fc1",),
         "fc2": ("*.fc2",)}


def session(path: Path, extra: tuple[str, ...] = ()) -> ort.InferenceSession:
    """A CPU session (spinning off, all cores); `extra` intermediate tensors added as outputs (the graph is
    handed over in memory, its weights read from beside it: the export is not touched)."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not extra:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    model = onnx.load(str(path), load_external_data=False)
    for name in extra:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def score_tensors(path: Path) -> tuple[str, ...]:
    """The outputs of the score layers' last nodes (one [T, G*G] score per layer)."""
    model = onnx.load(str(path), load_external_data=False)
    last = {}
    for node in model.graph.node:
        scope = submodule(node) or ""
        if scope.split(".")[0] == SCORE_SCOPE:
            last[scope] = node.output[0]
    return tuple(last[scope] for scope in sorted(last))


def run(path: Path, pixels: np.ndarray, extra: tuple[str, ...]) -> dict[str, np.ndarray]:
    sess = session(path / "vision_aot.onnx", extra)
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {sess.get_inputs()[0].name: pixels})))


def score_moves(ref: np.ndarray, out: np.ndarray, top: int = 126) -> tuple[float, float]:
    r, x = ref.reshape(ref.shape[0], -1), out.reshape(ref.shape[0], -1)
    overlap = np.mean([len(set(np.argsort(-a)[:top]) & set(np.argsort(-b)[:top])) / top for a, b in zip(r, x)])
    return float(np.linalg.norm(r - x) / np.linalg.norm(r)), float(overlap)


def sensitivity(args: argparse.Namespace) -> None:
    source = Path(args.export)
    manifest = read_manifest(source, verify_hashes=False)
    model = onnx.load(str(source / manifest.graph), load_external_data=False)
    candidates = plan_quantization(model, float_layers=()).nodes
    by_name = {node.name: node for node in model.graph.node}
    groups = sorted({module_group(by_name[n]) for n in candidates}, key=lambda g: (len(g), g))
    pixels = preprocess_frames(decode_frames(Path(args.holdout), manifest.aot.frames), manifest.preprocessing)
    scores = score_tensors(source / manifest.graph)
    reference = run(source, pixels, scores)
    variants = {f"only {g}": tuple(p for o in groups if o != g for p in (o, f"{o}.*")) for g in groups}
    kinds = {f"only {k}": tuple(sorted({module_path(by_name[n]) for n in candidates
                                        if not any(fnmatch.fnmatch(module_path(by_name[n]), p)
                                                   for p in pats)}))
             for k, pats in KINDS.items()}
    variants.update(kinds)
    variants["all quantized"] = ()
    variants["recipe default"] = None
    with tempfile.TemporaryDirectory() as tmp:
        for name, float_layers in list(variants.items())[args.skip:args.limit]:
            out = Path(tmp) / "q"
            report = calibrate_export(source, [args.calibrate], args.precision, out, holdout=args.holdout,
                                      clips_per_video=args.clips_per_video, progress=False, noise_draws=0,
                                      force=True, verify_hashes=False, float_layers=float_layers)
            actual = run(out, pixels, scores)
            metrics = compare_outputs(manifest.aot, reference, actual)
            moves = [score_moves(reference[s], actual[s]) for s in scores]
            row = {"variant": name, "quantized_nodes": report.quantized_nodes,
                   "anchor_agreement": metrics["anchor_agreement"],
                   "matched_cosine_min": metrics["matched_cosine_min"],
                   **{f"score{i}_relerr": m[0] for i, m in enumerate(moves)},
                   **{f"score{i}_top126": m[1] for i, m in enumerate(moves)}}
            print(json.dumps(row), flush=True)


def timing(args: argparse.Namespace) -> None:
    exports = [Path(p) for p in args.exports]
    manifest = read_manifest(exports[0], verify_hashes=False)
    pixels = np.random.default_rng(0).normal(size=manifest.inputs[0].shape).astype(np.float32)
    sessions = {path: session(path / "vision_aot.onnx") for path in exports}
    for sess in sessions.values():
        sess.run(None, {sess.get_inputs()[0].name: pixels})          # warm-up
    times = {path: [] for path in exports}
    for _ in range(args.rounds):
        for path, sess in sessions.items():
            start = time.perf_counter()
            sess.run(None, {sess.get_inputs()[0].name: pixels})
            times[path].append(time.perf_counter() - start)
    for path in exports:
        precision = read_manifest(path, verify_hashes=False).precision
        print(f"{str(path):40s} {precision:5s} " + " ".join(f"{t:6.2f}" for t in times[path])
              + f"  median {np.median(times[path]):.2f} s")


def snr_db(reference: np.ndarray, actual: np.ndarray) -> float:
    reference, actual = np.asarray(reference, np.float64), np.asarray(actual, np.float64)
    return float(10 * np.log10(np.sum(reference ** 2) / max(np.sum((reference - actual) ** 2), 1e-30)))


def debug(args: argparse.Namespace) -> None:
    from onnxruntime.quantization import qdq_loss_debug as qdq_debug

    source, quantized = Path(args.export), Path(args.quantized)
    manifest = read_manifest(source, verify_hashes=False)
    pixels = preprocess_frames(decode_frames(Path(args.holdout), manifest.aot.frames), manifest.preprocessing)
    model = onnx.load(str(quantized / manifest.graph), load_external_data=False)
    producer = {out: node for node in model.graph.node for out in node.output}
    readers = {value: node for node in model.graph.node for value in node.input}
    scores = score_tensors(source / manifest.graph)
    # Only what is compared is fetched (ORT's `modify_model_output_intermediate_tensors` saves every output of the
    # chosen op types: 14–21 GB for an 8-frame graph): the quantized activations before and after their Q/DQ pair,
    # and the score layers' outputs; ORT's tools then match and compare them.
    quantized_inputs = tuple(q.input[0] for q in model.graph.node if q.op_type == "QuantizeLinear"
                             and q.input[0] in producer)
    float_names = (*quantized_inputs, *scores)
    qdq_names = (*float_names, *(f"{name}_DequantizeLinear_Output" for name in quantized_inputs))
    activations = {label: {name: [value] for name, value in run(path, pixels, names).items()}
                   for label, path, names in (("float", source, float_names), ("qdq", quantized, qdq_names))}
    activations["qdq"] = {name: activations["qdq"][name] for name in qdq_names}
    activations["float"] = {name: activations["float"][name] for name in float_names}
    errors = qdq_debug.compute_activation_error(qdq_debug.create_activation_matching(activations["qdq"],
                                                                                     activations["float"]))
    weights = qdq_debug.compute_weight_error(qdq_debug.create_weight_matching(str(source / manifest.graph),
                                                                              str(quantized / manifest.graph)))
    # an activation or a weight belongs to the module group of the node that reads its DequantizeLinear output;
    # each group's figure is its worst tensor's, named by the module that reads it
    rows: dict[str, dict[str, tuple[float, str]]] = {}

    def record(reader: onnx.NodeProto, key: str, snr: float) -> None:
        group = rows.setdefault(module_group(reader), {})
        if key not in group or snr < group[key][0]:
            group[key] = (snr, module_path(reader).rsplit(".", 1)[-1])

    for tensor, error in errors.items():
        reader = readers.get(f"{tensor}_DequantizeLinear_Output")
        if reader is not None and "qdq_err" in error:
            record(reader, "qdq", error["qdq_err"])
            record(reader, "xmodel", error["xmodel_err"])
    dequantized = {node.input[0]: node.output[0] for node in model.graph.node if node.op_type == "DequantizeLinear"}
    for weight, error in weights.items():
        reader = readers.get(dequantized.get(f"{weight}_quantized", ""))
        if reader is not None:
            record(reader, "weight", error)
    for group in sorted(rows, key=lambda g: (g.split(".")[0] != "tower", len(g), g)):
        print(json.dumps({"group": group, **{f"{key}_snr_db_min": [round(snr, 1), where]
                                             for key, (snr, where) in rows[group].items()}}), flush=True)
    print(json.dumps({"score_layers_snr_db": [round(snr_db(activations["float"][s][0], activations["qdq"][s][0]), 1)
                                              for s in scores]}), flush=True)


def float16(args: argparse.Namespace) -> None:
    source = Path(args.export)
    manifest = read_manifest(source, verify_hashes=False)
    pixels = preprocess_frames(decode_frames(Path(args.holdout), manifest.aot.frames), manifest.preprocessing)
    reference = run(source, pixels, ())
    for quantized in map(Path, args.quantized):
        with tempfile.TemporaryDirectory() as tmp:
            half = export_fp16(quantized, Path(tmp) / "fp16", verify_hashes=False)
            graphs = {"fp32": run(quantized, pixels, ()), "fp16": run(half, pixels, ())}
        for float_part, actual in graphs.items():
            metrics = compare_outputs(manifest.aot, reference, actual)
            print(json.dumps({"export": str(quantized), "float_part": float_part, **{
                name: round(float(metrics[name]), 6) for name in ("anchor_agreement", "arithmetic_cosine_min",
                                                                   "arithmetic_tokens", "matched_cosine_min")}}),
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sens = sub.add_parser("sensitivity")
    sens.add_argument("export")
    sens.add_argument("--calibrate", required=True)
    sens.add_argument("--holdout", required=True)
    sens.add_argument("--precision", default="int8", choices=("int8", "fp8"))
    sens.add_argument("--clips-per-video", type=int, default=2)
    sens.add_argument("--limit", type=int, default=None, help="only the first N variants")
    sens.add_argument("--skip", type=int, default=0, help="leave out the first N variants")
    tim = sub.add_parser("timing")
    tim.add_argument("exports", nargs="+")
    tim.add_argument("--rounds", type=int, default=3)
    dbg = sub.add_parser("debug")
    dbg.add_argument("export", help="the fp32 export the Q/DQ export was calibrated from")
    dbg.add_argument("quantized", help="a Q/DQ export (`aot-export calibrate`)")
    dbg.add_argument("--holdout", required=True)
    half = sub.add_parser("float16")
    half.add_argument("export", help="the fp32 export the Q/DQ exports were calibrated from")
    half.add_argument("quantized", nargs="+", help="Q/DQ exports (`aot-export calibrate`)")
    half.add_argument("--holdout", required=True)
    args = parser.parse_args()
    {"sensitivity": sensitivity, "timing": timing, "debug": debug, "float16": float16}[args.command](args)


if __name__ == "__main__":
    main()
