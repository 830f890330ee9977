"""engines/: targets and refusals, the builder stages one by one, fp16 exports, engine sidecars and the
refusal of an engine that does not fit its export or the machine. Builds run on TensorRT-RTX, on this CPU."""

import dataclasses
import importlib.util
import json
import shutil

import numpy as np
import onnx
import pytest

from runtime.cli import EXIT_BAD_INPUT, EXIT_OK, main
from aot_export.errors import InputError
from aot_export.manifest import read_manifest
from aot_export.onnx_io import read_values
from aot_export.onnx_scopes import node_scope
from engines.build import build_engine_dir, settings_for, trtexec_command
from engines.loaders import BuildSettings, fp32_layers, network_flags, parse_onnx
from engines.flavours import FLAVOURS, load_tensorrt
from engines.precision import body_nodes, export_fp16, fp32_nodes
from engines.sidecar import PLAN, SIDECAR, EngineMismatch, Machine, load_engine, read_sidecar
from engines.targets import TARGETS, get_target

needs_rtx = pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None,
                               reason="tensorrt_rtx is not installed")
needs_tensorrt = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None,
                                    reason="tensorrt (JetPack / datacenter) is not installed")


@pytest.fixture(scope="module")
def fp16_dir(tiny_export, tmp_path_factory):
    return export_fp16(tiny_export, tmp_path_factory.mktemp("h") / "tiny-fp16")


# ---- targets ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target, precision, words", [
    ("orin-nano", "fp8", "8.9"), ("orin-agx", "fp8", "8.9"), ("a100", "fp8", "8.9"), ("rtx", "bf16", "unknown")])
def test_precision_a_target_cannot_run_is_refused(target, precision, words):
    with pytest.raises(InputError, match=words):
        settings_for(get_target(target), precision)


def test_dla_only_where_the_target_has_it():
    settings = settings_for(get_target("orin-agx"), "fp16", typing="weak", dla=True)
    assert settings.dla_core == 0
    with pytest.raises(InputError, match="no DLA"):
        settings_for(get_target("orin-nano"), "fp16", dla=True)
    with pytest.raises(InputError, match="DLA runs fp16 or int8"):
        settings_for(get_target("orin-agx"), "fp32", dla=True)


def test_targets_table():
    assert {t.compute_capabilities for t in TARGETS.values() if t.name.startswith("orin")} == {("8.7",)}
    assert all("fp8" not in TARGETS[name].precisions for name in ("orin-agx", "orin-nx", "orin-nano", "a100"))
    assert all("fp8" in TARGETS[name].precisions for name in ("l4", "h100"))
    assert TARGETS["orin-nano"].workspace_bytes < TARGETS["orin-agx"].workspace_bytes
    with pytest.raises(InputError, match="workspace"):
        settings_for(get_target("orin-nano"), "fp16", workspace_bytes=8 << 30)
    with pytest.raises(InputError, match="strongly typed only"):
        settings_for(get_target("rtx"), "fp16", typing="weak")
    with pytest.raises(InputError, match="9.0"):
        settings_for(get_target("rtx"), "fp16", compute_capabilities=("9.0",))


def test_trtexec_lines(tiny_export):
    agx = trtexec_command(tiny_export, settings_for(get_target("orin-agx"), "fp16", typing="weak", dla=True))
    assert agx.startswith("trtexec ") and "--fp16" in agx and "--precisionConstraints=obey" in agx
    assert "--useDLACore=0 --allowGPUFallback" in agx and "--memPoolSize=workspace:4096M" in agx
    h100 = trtexec_command(tiny_export, settings_for(get_target("h100"), "fp16")).splitlines()
    assert "export_fp16" in h100[0] and "--stronglyTyped" in h100[1] and "-fp16/vision_aot.onnx" in h100[1]
    rtx = trtexec_command(tiny_export, settings_for(get_target("rtx"), "fp32"))
    assert rtx.startswith("tensorrt_rtx ") and "--stronglyTyped" not in rtx
    with pytest.raises(InputError, match="calibrate"):
        trtexec_command(tiny_export, settings_for(get_target("h100"), "int8"))


# ---- fp16 exports -------------------------------------------------------------------------------------------------
def test_fp16_export_keeps_the_aot_block_fp32(tiny_export, fp16_dir):
    from engines.check import check_export

    assert check_export(fp16_dir, tensorrt=False).passed        # incl. the ONNX checker's topological order
    manifest = read_manifest(fp16_dir)
    assert manifest.precision == "fp16" and manifest.extra["fp16"]["fp32_scopes"] == ["scores", "reducer"]
    model = onnx.load(str(fp16_dir / manifest.graph))
    inferred = onnx.shape_inference.infer_shapes(model)
    dtypes = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.input,
                                                            *inferred.graph.output]}
    dtypes.update({init.name: init.data_type for init in model.graph.initializer})
    half = onnx.TensorProto.FLOAT16
    kept = set(fp32_nodes(onnx.load(str(tiny_export / manifest.graph), load_external_data=False)))
    touched = [n.name for n in model.graph.node if n.name in kept
               and any(dtypes.get(t) == half for t in [*n.input, *n.output])]
    assert touched == []
    # Nor through a cast to fp16 and back between fp32 nodes (the converter made 3,442 such round trips in the
    # 32-frame graph), nor in the Sinkhorn's Scans, whose bodies read the outer graph's tensors by name. (Outputs
    # are the converter's: the tokens are cast to fp16 and back to fp32 at the interface.)
    to = {n.output[0]: next(a.i for a in n.attribute if a.name == "to")
          for n in model.graph.node if n.op_type == "Cast"}
    readers = {}
    for node in model.graph.node:
        for name in read_values(node):
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in model.graph.output}
    round_trips = [name for name, kind in to.items() if kind == half and readers.get(name)
                   and all(to.get(r.output[0]) == onnx.TensorProto.FLOAT and r.output[0] not in outputs
                           for r in readers[name])]
    assert round_trips == []
    scans = [n for n in model.graph.node if n.op_type == "Scan"]
    outer = {name for scan in scans for name in read_values(scan)} & set(dtypes)
    assert scans and outer and all(dtypes[name] != half for name in outer)
    assert sum(dtypes.get(init.name) == half for init in model.graph.initializer) > 10
    assert {o.name: o.type.tensor_type.elem_type for o in model.graph.output}["tokens"] == onnx.TensorProto.FLOAT


def test_fp16_export_on_onnxruntime_against_fp32(tiny_export, fp16_dir, shared_videos):
    from runtime.validate import validate_export

    fp32 = validate_export(tiny_export, shared_videos[0], progress=False)
    fp16 = validate_export(fp16_dir, shared_videos[0], progress=False, noise_draws=0)     # the fixed gates
    assert fp32.passed and fp16.passed, fp16.table()
    assert fp16.metrics["max_abs"] > fp32.metrics["max_abs"]      # the fp16 graph really computes in fp16


@pytest.mark.heavy
def test_fp16_holds_its_gates_on_the_trained_fixture(trained_export, shared_videos, tmp_path):
    """Issue #21: on a trained tower the fp16 arithmetic stays within 0.999 and its selection within the fixed
    anchor gate on both videos (docs/benchmarks.md: 100 % / 99.0 %, arithmetic cosine min 0.999997)."""
    from runtime.validate import validate_export

    fp16_dir = export_fp16(trained_export, tmp_path / "fp16")
    for video in shared_videos:
        report = validate_export(fp16_dir, video, progress=False, noise_draws=0)     # the fixed gates
        assert report.passed, report.table()
        assert report.metrics["arithmetic_cosine_min"] >= 0.9999, report.table()


# ---- builder stages -------------------------------------------------------------------------------------------------
@needs_rtx
def test_network_flags_come_from_the_flavour_table():
    trt, flavour = load_tensorrt("tensorrt_rtx")
    assert network_flags(trt, flavour, "strong") == 0             # strongly typed already
    with pytest.raises(InputError, match="strongly typed"):
        network_flags(trt, flavour, "weak")
    assert FLAVOURS["tensorrt"].strongly_typed_flag == "STRONGLY_TYPED"


@needs_rtx
def test_fp32_layers_are_the_aot_and_score_layers(tiny_export):
    parsed = parse_onnx(tiny_export / "vision_aot.onnx", "tensorrt_rtx")
    model = onnx.load(str(tiny_export / "vision_aot.onnx"), load_external_data=False)
    scope = {n.name: node_scope(n) for n in model.graph.node}
    layers = fp32_layers(parsed, set(fp32_nodes(model)))
    names = {layer.name for layer in layers}
    reducer_nodes = [n for n, s in scope.items() if s == "reducer"]
    assert len(layers) >= len(reducer_nodes) * 0.9
    # The Sinkhorn iterations' layers, inside the Scans' loops, are named after the bodies' nodes (no scope)
    body = {name for n in model.graph.node if n.op_type == "Scan" for name in body_nodes(n)}
    assert body and body <= names
    assert not names & {n for n, s in scope.items() if s == "tower" and "layer_norm" not in n and "Softmax" not in n
                        and "Pow" not in n}


@needs_rtx
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_rtx_builds_and_writes_a_sidecar(tiny_export, tmp_path, precision):
    result = build_engine_dir(tiny_export, settings_for(get_target("rtx"), precision), tmp_path / "e",
                              progress=False)
    sidecar = read_sidecar(result.directory)
    manifest = read_manifest(tiny_export)
    assert sidecar.flavour == "tensorrt_rtx" and sidecar.precision == precision
    assert sidecar.compute_capabilities == ["8.0", "8.6", "8.9", "12.0"]
    assert sidecar.manifest["aot_hash"] == manifest.aot.hash
    assert (sidecar.onnx_sha256 == manifest.files["vision_aot.onnx"]) == (precision == "fp32")
    assert (result.directory / PLAN).stat().st_size == result.plan_bytes > 0
    if precision == "fp16":
        assert sidecar.network["output_dtypes"].get("HALF", 0) > 0
        assert read_manifest(result.directory / "onnx").precision == "fp16"


@needs_rtx
def test_cli_build_and_refusals(tiny_export, tmp_path, capsys):
    out = tmp_path / "engine"
    assert main(["build", str(tiny_export), "--target", "rtx", "--precision", "fp32", "--out", str(out),
                 "--quiet"]) == EXIT_OK
    assert json.loads((out / SIDECAR).read_text())["target"] == "rtx"
    assert main(["build", str(tiny_export), "--target", "orin-nano", "--precision", "fp8"]) == EXIT_BAD_INPUT
    assert main(["build", str(tiny_export), "--target", "rtx", "--precision", "int8"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "cannot run fp8" in err and "calibrate" in err


# ---- sidecar refusals -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine_dir(tiny_export, tmp_path_factory):
    if importlib.util.find_spec("tensorrt_rtx") is None:
        pytest.skip("tensorrt_rtx is not installed")
    return build_engine_dir(tiny_export, settings_for(get_target("rtx"), "fp32"),
                            tmp_path_factory.mktemp("eng") / "e", progress=False).directory


def deserialized(sidecar, plan):
    return ("engine", len(plan))


def test_engine_loads_where_everything_matches(engine_dir, tiny_export):
    sidecar = read_sidecar(engine_dir)
    machine = Machine({"tensorrt_rtx": sidecar.tensorrt_version}, "8.6")
    loaded, engine = load_engine(engine_dir, tiny_export, machine, deserialize=deserialized)
    assert loaded == sidecar and engine == ("engine", (engine_dir / PLAN).stat().st_size)


@pytest.mark.parametrize("machine, field", [
    (Machine({"tensorrt_rtx": "0.0.1"}, "8.6"), "tensorrt_version"),
    (Machine({"tensorrt": "10.3.0"}, "8.7"), "flavour"),
    (Machine({"tensorrt_rtx": None}, "9.0"), "compute_capability"),
    (Machine({"tensorrt_rtx": None}, None), "compute_capability"),
])
def test_engine_refused_on_a_machine_it_does_not_fit(engine_dir, machine, field):
    version = read_sidecar(engine_dir).tensorrt_version
    machine = dataclasses.replace(machine, versions={k: v or version for k, v in machine.versions.items()})
    with pytest.raises(EngineMismatch) as refused:
        load_engine(engine_dir, machine=machine, deserialize=deserialized)
    assert refused.value.field == field and field in str(refused.value)


@pytest.mark.parametrize("field, weight, edit", [
    ("onnx_sha256", ("tower.embeddings.patch_embedding.weight", 1.5), None),
    ("aot_hash", None, lambda m: m["aot"].update(sigma_t=2.0)),
    ("config_hash", None, lambda m: m["model"].update(config_hash="0" * 16)),
])
def test_engine_refused_for_another_export(engine_dir, tiny_export, tmp_path, field, weight, edit):
    """A copy of the export with one thing changed: other weights, another AOT config (same graph bytes), another
    model config. Refused before anything needs a GPU, naming the field."""
    from export_copies import edited_export

    other = edited_export(tiny_export, tmp_path / "other", manifest=edit, weight=weight)
    read_manifest(other)                                    # a consistent export in itself
    with pytest.raises(EngineMismatch) as refused:
        load_engine(engine_dir, other, Machine({"tensorrt_rtx": "x"}, "8.6"), deserialize=deserialized)
    assert refused.value.field == field and field in str(refused.value)


def test_export_is_found_beside_an_engine_built_with_the_default_name(engine_dir, tiny_export, tmp_path):
    from engines.sidecar import find_export

    shutil.copytree(engine_dir, tmp_path / "tiny-rtx-fp32")
    assert find_export(tmp_path / "tiny-rtx-fp32", read_sidecar(engine_dir)) is None     # no export beside it
    shutil.copytree(tiny_export, tmp_path / "tiny")
    assert find_export(tmp_path / "tiny-rtx-fp32", read_sidecar(engine_dir)) == (tmp_path / "tiny").resolve()
    assert find_export(engine_dir, read_sidecar(engine_dir)) is None                     # not the default name


def test_tampered_plan_is_refused(engine_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(engine_dir, copy)
    with open(copy / PLAN, "r+b") as handle:
        handle.seek(64)
        handle.write(b"\x00\x01\x02\x03")
    with pytest.raises(EngineMismatch, match="plan_sha256"):
        read_sidecar(copy)


def test_build_settings_round_trip():
    settings = BuildSettings(target="rtx", precision="fp16", compute_capabilities=("8.6",))
    assert BuildSettings(**{**settings.to_dict(), "compute_capabilities": ("8.6",)}) == settings
    with pytest.raises(InputError, match="optimization level"):
        BuildSettings(target="rtx", precision="fp16", optimization_level=9)
    int8 = BuildSettings(target="rtx", precision="int8", float_part="fp16")
    assert BuildSettings(**{**int8.to_dict(), "compute_capabilities": ()}) == int8 and int8.to_dict()["float_part"] == "fp16"
    for precision in ("fp16", "fp32"):
        with pytest.raises(InputError, match="applies to int8 and fp8"):
            BuildSettings(target="rtx", precision=precision, float_part="fp16")


@needs_rtx
def test_int8_engine_with_its_float_part_in_fp16(tiny_export, shared_videos, tmp_path):
    """`--float-part fp16`: the calibrated export's float layers in fp16, its Q/DQ pairs, AOT block, scores,
    LayerNorm and Softmax fp32; the converted graph keeps the precision (and gates) of its export, runs on ONNX
    Runtime, and TensorRT-RTX builds it with int8 and half layers."""
    from aot_export.fidelity import compare_outputs
    from aot_export.preprocess import preprocess_frames
    from aot_export.runners import OnnxRuntimeRunner
    from aot_export.video import decode_frames
    from calibration import calibrate_export

    int8 = tmp_path / "int8"
    calibrate_export(tiny_export, [shared_videos[0]], "int8", int8, holdout=shared_videos[-1], clips_per_video=1,
                     noise_draws=0, progress=False)
    result = build_engine_dir(int8, settings_for(get_target("rtx"), "int8", float_part="fp16"), tmp_path / "e",
                              progress=False, allow_failed=True)
    sidecar = read_sidecar(result.directory)
    assert sidecar.builder["float_part"] == "fp16" and sidecar.precision == "int8"
    assert sidecar.network["output_dtypes"].get("HALF", 0) > 0 and sidecar.network["output_dtypes"].get("INT8", 0) > 0
    converted = read_manifest(result.directory / "onnx")
    assert converted.precision == "int8" and converted.extra["fp16"]["float_part_of"] == "int8"
    graph = onnx.load(str(result.directory / "onnx" / converted.graph), load_external_data=False).graph
    halves = {init.name for init in graph.initializer if init.data_type == onnx.TensorProto.FLOAT16}
    assert halves and not any(node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.input[1] in halves
                              for node in graph.node)          # Q/DQ scales stay fp32
    manifest = read_manifest(tiny_export)
    pixels = preprocess_frames(decode_frames(shared_videos[-1], manifest.aot.frames), manifest.preprocessing)
    outputs = {}
    for name, path in [("fp32", tiny_export / manifest.graph), ("int8", int8 / manifest.graph),
                       ("int8+fp16", result.directory / "onnx" / converted.graph)]:
        with OnnxRuntimeRunner(path, ["CPUExecutionProvider"], input_name=manifest.inputs[0].name) as runner:
            outputs[name] = runner.run(pixels)
    as_calibrated = compare_outputs(manifest.aot, outputs["fp32"], outputs["int8"])
    half = compare_outputs(manifest.aot, outputs["fp32"], outputs["int8+fp16"])
    assert half["matched_cosine_mean"] >= 0.99, half
    assert half["max_abs"] != as_calibrated["max_abs"]           # the float part really computes in fp16
    assert "--fp16" in trtexec_command(int8, settings_for(get_target("orin-nano"), "int8", typing="weak",
                                                          float_part="fp16"))


# ---- datacenter / Jetson TensorRT: the same code path, where installed ---------------------------------------------
@needs_tensorrt
@pytest.mark.parametrize("typing", ["strong", "weak"])
def test_tensorrt_builds_fp16(tiny_export, tmp_path, typing):
    from engines.sidecar import gpu_compute_capability

    capability = gpu_compute_capability()
    target = next((t for t in TARGETS.values() if t.flavour == "tensorrt" and capability in t.compute_capabilities),
                  None)
    if target is None:
        pytest.skip(f"no tensorrt target for this GPU (SM {capability})")
    result = build_engine_dir(tiny_export, settings_for(target, "fp16", typing=typing), tmp_path / "e",
                              progress=False)
    assert result.plan_bytes > 0
    if typing == "weak":
        assert result.sidecar.network["fp32_constrained_layers"] > 0
    np.testing.assert_equal(read_sidecar(result.directory).precision, "fp16")


def test_fp8_builds_only_for_sm89_and_newer():
    assert settings_for(get_target("rtx"), "fp8").compute_capabilities == ("8.9", "12.0")
    assert settings_for(get_target("rtx"), "fp16").compute_capabilities == ("8.0", "8.6", "8.9", "12.0")
    with pytest.raises(InputError, match="8.9"):
        settings_for(get_target("rtx"), "fp8", compute_capabilities=("8.6",))
