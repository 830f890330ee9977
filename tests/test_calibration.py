"""calibration/: samples from video, the Q/DQ graph (only tower + projector quantized, symmetric, per-channel),
the calibrated export directory and its manifest, the fidelity figures, and every refusal."""

import importlib.util
import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import TINY_CFG
from aot_export.artifacts import sha256_file
from aot_export.errors import InputError
from aot_export.manifest import GRAPH, WEIGHTS, read_manifest
from aot_export.preprocess import preprocess_frames, sample_indices
from calibration import calibrate_export, calibration_data, expand_videos
from calibration.data import clip_indices
from aot_export.fidelity import VISION_GATES, compare_outputs, output_roles
from aot_export.onnx_scopes import submodule
from calibration.qdq_graph import QUANTIZED_SCOPES, plan_quantization
from aot_export.video import decode_frames, synthesize_clip

HAS_TENSORRT = bool(importlib.util.find_spec("tensorrt_rtx") or importlib.util.find_spec("tensorrt"))
CFG = TINY_CFG


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    return (synthesize_clip(folder / "calib.mp4", frames=40, size=160),
            synthesize_clip(folder / "holdout.mp4", frames=30, size=200))


@pytest.fixture(scope="module")
def int8(tiny_export, clips, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "tiny-int8"
    report = calibrate_export(tiny_export, [clips[0]], "int8", out, holdout=clips[1], clips_per_video=2, seed=3,
                              noise_draws=3, progress=False)
    return out, report


def consumers(model):
    found = {}
    for node in model.graph.node:
        for name in node.input:
            found.setdefault(name, []).append(node)
    return found


# ---- calibration data -------------------------------------------------------------------------------------------
def test_clip_sampling_is_deterministic_and_in_range():
    np.testing.assert_array_equal(clip_indices(250, 32, 1)[0], sample_indices(250, 32))
    first = clip_indices(250, 8, 4, np.random.default_rng([5, 0]))
    assert len(first) == 4
    again = clip_indices(250, 8, 4, np.random.default_rng([5, 0]))
    for a, b, k in zip(first, again, range(4)):
        np.testing.assert_array_equal(a, b)
        lo, hi = k * 250 // 4, (k + 1) * 250 // 4
        assert a.min() >= lo and a.max() < hi and (np.diff(a) > 0).all()
    other = clip_indices(250, 8, 4, np.random.default_rng([6, 0]))
    assert any(not np.array_equal(a, b) for a, b in zip(first, other))
    assert [len(c) for c in clip_indices(3, 8, 5)] == [8, 8, 8]          # never more clips than frames


def test_calibration_samples_match_the_runtime(tiny_export, clips):
    manifest = read_manifest(tiny_export)
    data = calibration_data([clips[0]], CFG.frames, manifest.preprocessing, clips_per_video=1)
    want = preprocess_frames(decode_frames(clips[0], CFG.frames), manifest.preprocessing)
    np.testing.assert_array_equal(data.samples[0], want)
    several = calibration_data(clips[0].parent, CFG.frames, manifest.preprocessing, clips_per_video=3, seed=1)
    assert len(several) == 6 and all(s.shape == (8, 3, 384, 384) and s.dtype == np.float32 for s in several.samples)
    provenance = several.provenance()
    assert [v["name"] for v in provenance["videos"]] == ["calib.mp4", "holdout.mp4"]
    assert provenance["videos"][0]["sha256"] == sha256_file(clips[0]) and provenance["seed"] == 1
    assert provenance["videos"][0]["total_frames"] == 40 and len(provenance["videos"][0]["clips"]) == 3
    reader = several.reader()
    fed = [reader.get_next() for _ in range(7)]
    assert fed[-1] is None and set(fed[0]) == {"frames"}
    reader.set_range(2, 3)
    assert reader.get_next()["frames"] is several.samples[2] and reader.get_next() is None


# ---- the Q/DQ graph ---------------------------------------------------------------------------------------------
def test_only_tower_and_projector_are_quantized(int8, tiny_export):
    out, report = int8
    model = onnx.load(str(out / GRAPH))
    source = onnx.load(str(tiny_export / GRAPH), load_external_data=False)
    users, inits = consumers(model), {i.name: i for i in model.graph.initializer}
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert dq and q
    # Every dequantized tensor feeds only Conv/MatMul/Gemm nodes of the tower and the projector.
    for node in dq:
        readers = users[node.output[0]]
        assert readers and all(submodule(r) in QUANTIZED_SCOPES and r.op_type in ("Conv", "MatMul", "Gemm")
                               for r in readers), [(r.op_type, submodule(r)) for r in readers]
    # The reducer and the score layers compute exactly as before: same nodes, same (float) inputs.
    for scope in ("reducer", "scores.0", "scores.1"):
        before = sorted((n.name, n.op_type, list(n.input)) for n in source.graph.node if submodule(n) == scope)
        after = sorted((n.name, n.op_type, [name.removesuffix("__float") for name in n.input])
                       for n in model.graph.node if submodule(n) == scope)
        assert before and after == before, scope
    quantized = {r.name for n in dq for r in users[n.output[0]]}
    assert quantized == set(plan_quantization(source).nodes) and len(quantized) == report.quantized_nodes
    # Symmetric (zero point 0, int8) and per-channel weights.
    weights = 0
    for node in [*q, *dq]:
        zero = numpy_helper.to_array(inits[node.input[2]])
        assert zero.dtype == np.int8 and not zero.any()
    for node in dq:
        if node.input[0] in inits:
            weights += 1
            axis = {a.name: a.i for a in node.attribute}.get("axis")
            weight, scale = (numpy_helper.to_array(inits[name]) for name in node.input[:2])
            assert weight.dtype == np.int8 and axis is not None
            assert scale.shape == (weight.shape[axis],) and (scale > 0).all()
    assert weights == len(quantized)


def _scoped(node, scope):
    node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=repr(["", scope, f"{scope}.linear"]))
    return node


def test_shared_weight_and_activation_stay_float_for_float_nodes(tmp_path):
    """A weight and an activation read both by a tower MatMul (quantized) and a score MatMul (float): ORT would
    point both readers at the dequantized copies; the score MatMul must keep the float originals."""
    from onnx import TensorProto, helper

    from calibration.data import CalibrationData
    from calibration.ort_quantize import QUANTIZATIONS as PRECISIONS, calibrate_ranges, quantize_graph
    from calibration.qdq_graph import untie_shared_weights

    weight = numpy_helper.from_array(np.random.default_rng(0).normal(size=(8, 8)).astype(np.float32), "W")
    nodes = [_scoped(helper.make_node("Relu", ["x"], ["h"], name="act"), "tower"),
             _scoped(helper.make_node("MatMul", ["h", "W"], ["y"], name="tower_mm"), "tower"),
             _scoped(helper.make_node("MatMul", ["h", "W"], ["z"], name="score_mm"), "scores.0")]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4, 8]) for n in "yz"], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    plan = plan_quantization(model)
    assert plan.nodes == ("tower_mm",) and plan.excluded_scopes == {"scores.0": 1}
    assert untie_shared_weights(model, plan.nodes) == ["W"]
    onnx.save(model, str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.onnx.data")
    samples = [np.random.default_rng(i).normal(size=(4, 8)).astype(np.float32) for i in range(2)]
    data = CalibrationData(samples, [], 4, 1, 0, None)
    cache = calibrate_ranges(PRECISIONS["int8"], tmp_path / "m.onnx", tmp_path, plan, data, "x")
    assert quantize_graph(PRECISIONS["int8"], tmp_path / "m.onnx", tmp_path / "q.onnx", plan, cache) == 1
    quantized = onnx.load(str(tmp_path / "q.onnx"))
    by_name = {n.name: n for n in quantized.graph.node}
    assert list(by_name["score_mm"].input) == ["h", "W__float"]
    producers = {o: n.op_type for n in quantized.graph.node for o in n.output}
    assert [producers.get(i) for i in by_name["tower_mm"].input] == ["DequantizeLinear"] * 2


def _layered_model():
    """tower layer 0 and 1 MatMuls, a score MatMul reading layer 0's output, layer 1 after it, a projector."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32) * (1 + 9 * (i == 1)), f"W{i}")
               for i in range(3)]

    def linear(name, x, y, w, path):
        node = helper.make_node("MatMul", [x, w], [y], name=name)
        node.metadata_props.add(key="pkg.torch.onnx.name_scopes",
                                value=repr(["", path.split(".")[0], path, f"{name}_op"]))
        return node

    nodes = [linear("l0", "x", "h0", "W0", "tower.encoder.layers.0.mlp.fc1"),
             linear("l1", "h0", "h1", "W1", "tower.encoder.layers.1.mlp.fc2"),
             linear("p", "h1", "y", "W2", "projector.linear_1"),
             _scoped(helper.make_node("MatMul", ["h0", "h0t"], ["s"], name="score_mm"), "scores.0"),
             _scoped(helper.make_node("Transpose", ["h0"], ["h0t"], name="score_t"), "scores.0")]
    graph = helper.make_graph(nodes, "layers", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8]),
                               helper.make_tensor_value_info("s", TensorProto.FLOAT, [4, 4])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def test_float_layers_rules():
    """`score-path` keeps float what the score layers depend on; globs match module paths; the plan says how
    much of each layer stays 8-bit."""
    from calibration.qdq_graph import SCORE_PATH

    model = _layered_model()
    assert plan_quantization(model).nodes == ("l1",)             # default: the score path and the projector float
    assert plan_quantization(model, float_layers=(SCORE_PATH,)).nodes == ("l1", "p")
    plan = plan_quantization(model, float_layers=(SCORE_PATH, "*.fc2"))
    assert plan.nodes == ("p",) and plan.float_nodes == ("l0", "l1")
    assert plan.kept_float == {SCORE_PATH: 1, "*.fc2": 1} and plan.activations == ("h1",)
    assert plan.summary(model) == {"tower.encoder.layers.0": {"candidates": 1, "quantized": 0},
                                   "tower.encoder.layers.1": {"candidates": 1, "quantized": 0},
                                   "projector.linear_1": {"candidates": 1, "quantized": 1}}
    assert plan_quantization(model, float_layers=()).nodes == ("l0", "l1", "p")
    with pytest.raises(InputError, match="nothing left to quantize"):
        plan_quantization(model, float_layers=("*",))


def test_float8_scales_are_amax_over_448(tmp_path):
    """fp8 weights per output channel and activations per tensor: scale = amax / 448 (ORT's own float8 rule,
    std-based, saturated everything beyond ~4.5 σ)."""
    from calibration.data import CalibrationData
    from calibration.ort_quantize import FLOAT8_MAX, QUANTIZATIONS as PRECISIONS, calibrate_ranges, quantize_graph

    model = _layered_model()
    plan = plan_quantization(model, float_layers=())
    onnx.save(model, str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.onnx.data")
    samples = [np.random.default_rng(i).normal(size=(4, 8)).astype(np.float32) for i in range(2)]
    data = CalibrationData(samples, [], 4, 1, 0, None)
    cache = calibrate_ranges(PRECISIONS["fp8"], tmp_path / "m.onnx", tmp_path, plan, data, "x")
    quantize_graph(PRECISIONS["fp8"], tmp_path / "m.onnx", tmp_path / "q.onnx", plan, cache)
    quantized = onnx.load(str(tmp_path / "q.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in quantized.graph.initializer}
    producer = {o: n for n in quantized.graph.node for o in n.output}
    matmul = next(n for n in quantized.graph.node if n.name == "l1")
    w_scale = inits[producer[matmul.input[1]].input[1]]
    np.testing.assert_allclose(w_scale, np.abs(numpy_helper.to_array(model.graph.initializer[1])).max(0) / FLOAT8_MAX,
                               rtol=1e-6)
    x_scale = inits[producer[next(n for n in quantized.graph.node if n.name == "l0").input[0]].input[1]]
    np.testing.assert_allclose(x_scale, max(np.abs(s).max() for s in samples) / FLOAT8_MAX, rtol=1e-6)


@pytest.mark.heavy
@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_trained_fixture_passes_the_fixed_8bit_gates(trained_export, shared_videos, precision, tmp_path):
    """Issue #21: on a trained tower (DINOv2 ViT-S in SigLIP shape), with everything quantized, INT8 kept 81–85 %
    of the anchors and FP8 (ORT's std-based scales) 51.5 %; the default recipe (score path and projector float, fp8
    amax scales) passes the fixed gates — 98 % anchors, 0.995 arithmetic cosine — with the two shared
    videos held out in turn (2 calibration clips, 8 frames; ~1.5 min per direction)."""
    videos = {video.name: video for video in shared_videos}
    pairs = [("bigbuckbunny.mp4", "bikes.mp4"), ("bikes.mp4", "bigbuckbunny.mp4")]
    if not all(name in videos for pair in pairs for name in pair):
        pytest.skip("needs bigbuckbunny.mp4 and bikes.mp4 in the shared videos")
    for calibration, holdout in pairs:
        report = calibrate_export(trained_export, [videos[calibration]], precision, tmp_path / calibration,
                                  holdout=videos[holdout], clips_per_video=2, noise_draws=0, progress=False)
        assert report.passed, report.table()
        assert report.metrics["matched_cosine_min"] >= 0.995, report.table()


def test_calibrated_export_directory(int8, tiny_export, clips):
    out, report = int8
    source = read_manifest(tiny_export)
    manifest = read_manifest(out)                 # verifies every sha256
    assert sorted(p.name for p in out.iterdir()) == sorted([GRAPH, WEIGHTS, "manifest.json"])
    assert not list(out.parent.glob(".*"))        # no staging or work directory left behind
    assert manifest.precision == "int8" and source.precision == "fp32"
    assert manifest.files == {name: sha256_file(out / name) for name in (GRAPH, WEIGHTS)}
    assert manifest.files != source.files
    assert (manifest.aot, manifest.preprocessing, manifest.inputs, manifest.outputs, manifest.model) == \
        (source.aot, source.preprocessing, source.inputs, source.outputs, source.model)
    calibration = manifest.extra["calibration"]
    assert [v["name"] for v in calibration["videos"]] == ["calib.mp4"]
    assert calibration["videos"][0]["sha256"] == sha256_file(clips[0])
    assert calibration["samples"] == 2 and calibration["seed"] == 3 and calibration["clips_per_video"] == 2
    assert set(calibration["excluded_scopes"]) == {"reducer", "scores.0", "scores.1"}
    assert "QInt8" in calibration["method"] and "MinMax" in calibration["method"]
    assert calibration["source"]["manifest_sha256"] == sha256_file(tiny_export / "manifest.json")
    assert calibration["source"]["files"] == source.files
    assert calibration["holdout"]["name"] == "holdout.mp4"
    assert calibration["holdout"]["metrics"] == pytest.approx(report.metrics)
    assert manifest.calibration_passed is report.passed             # the verdict travels with the export
    assert (tiny_export / GRAPH).stat().st_size and read_manifest(tiny_export) == source      # the source is untouched


def test_check_passes_on_the_int8_export(int8):
    from engines.check import check_export

    out, _ = int8
    report = check_export(out, tensorrt=HAS_TENSORRT)
    assert report.passed, report.table()
    rows = {row.check: row.status for row in report.rows}
    assert rows["onnx checker"] == rows["static graph"] == rows["interface"] == "ok"
    if HAS_TENSORRT:
        assert any(k.endswith("build") and v == "ok" for k, v in rows.items()), rows


# ---- fidelity -----------------------------------------------------------------------------------------------------
def test_fidelity_is_measured(int8):
    out, report = int8
    m = report.metrics
    assert report.holdout == "holdout.mp4" and m["tokens"] == CFG.output_tokens
    # int8 of the tower measured 0.998 mean cosine on the tokens both graphs kept; a broken scale would not.
    assert 0.99 <= m["matched_cosine_mean"] <= 1.0 and 0.9 <= m["matched_cosine_min"] <= m["matched_cosine_mean"]
    assert m["matched_cosine_min"] <= m["arithmetic_cosine_min"] and 0 < m["arithmetic_tokens"] <= 1
    assert 0.0 < m["matched_max_abs"] < 0.1 and m["max_abs"] > 0.0
    assert report.checks["arithmetic_cosine_min"], report.table()
    # The anchor gate on this video: the fixed one or the median of the fp32 noise draws, whichever is lower.
    noise, fixed = report.noise_floor, VISION_GATES["int8"]
    assert report.fixed_gates == fixed and len(noise.anchor_agreement) == 3
    assert report.gates.floors["anchor_agreement"] == min(fixed.floors["anchor_agreement"],
                                                          float(np.median(noise.anchor_agreement)))
    recorded = read_manifest(out).extra["calibration"]["holdout"]
    assert recorded["noise_floor"]["anchor_agreement"] == list(noise.anchor_agreement)
    assert recorded["noise_floor"]["effective_gate"] == recorded["gates"]["floors"]["anchor_agreement"]
    assert recorded["fixed_gates"] == fixed.to_dict() and "noise floor" in report.table()
    assert json.loads(json.dumps(report.to_dict()))["precision"] == "int8"


def test_int8_export_passes_its_gates(int8):
    """With every layer quantized the tiny model's int8 export agreed on 83.75 % of the fp32 anchors (its random
    weights leave near-tied scores); the default recipe keeps the score path and the projector float (issue #21),
    so the scores that choose the anchors are fp32's."""
    out, report = int8
    assert read_manifest(out).extra["calibration"]["recipe"]["float_layers"] == ["score-path", "projector.*"]
    assert report.checks["anchor_agreement"], report.table()
    assert report.passed and report.table().splitlines()[-1] == "PASS"


def _outputs(cfg, seed=0):
    """A plausible AOT output: per clip A keyframe cells, K distinct cells per later frame, A anchors."""
    rng = np.random.default_rng(seed)
    g, rows = cfg.pooled_grid, []
    for clip in range(cfg.clips):
        key = clip * cfg.clip_len
        cells = rng.choice(g * g, cfg.pooled_anchors, replace=False)
        later = [(f, rng.choice(g * g, cfg.keep, replace=False)) for f in range(key + 1, key + cfg.clip_len)]
        rows += [(key, c) for c in sorted(cells)] + [(f, c) for f, cs in later for c in sorted(cs)]
        rows += [(key, c) for c in sorted(cells)]
    index = np.array([(f, c // g, c % g) for f, c in rows], dtype=np.int32)
    return {"tokens": rng.normal(size=(len(rows), 16)).astype(np.float32), "index": index}


def test_fidelity_metric_definitions():
    cfg = CFG
    ref = _outputs(cfg)
    same = compare_outputs(cfg, ref, {k: v.copy() for k, v in ref.items()})
    assert same["matched_cosine_min"] == pytest.approx(1.0) and same["cosine_min"] == pytest.approx(1.0)
    assert same["anchor_agreement"] == 1.0 == same["cell_agreement"] and same["max_abs"] == 0.0
    groups = cfg.clips * (2 + cfg.clip_len - 1)
    assert same["anchor_groups"] == groups and len(output_roles(cfg)) == cfg.output_tokens

    # Frame 1 keeps another cell instead of its last one; the new cell comes first in raster order, so every
    # kept token of that frame moves one position on.
    swapped = {k: v.copy() for k, v in ref.items()}
    start, keep = cfg.pooled_anchors, cfg.keep
    old = [tuple(map(int, row[1:])) for row in ref["index"][start:start + keep]]
    free = next((r, c) for r in range(cfg.pooled_grid) for c in range(cfg.pooled_grid) if (r, c) not in old)
    assert free < old[0]
    swapped["index"][start:start + keep, 1:] = [free, *old[:-1]]
    swapped["tokens"][start + 1:start + keep] = ref["tokens"][start:start + keep - 1]
    swapped["tokens"][start] = np.random.default_rng(9).normal(size=ref["tokens"].shape[1])
    metrics = compare_outputs(cfg, ref, swapped)
    assert metrics["anchor_agreement"] == pytest.approx(1 - (1 / cfg.keep) / groups)
    assert metrics["matched_cosine_min"] == pytest.approx(1.0)      # matched by key, not by position
    assert metrics["cosine_min"] < 0.9                              # positions of that frame no longer pair up
    assert metrics["cell_agreement"] == pytest.approx(1 - 1 / cfg.output_tokens)


def test_arithmetic_is_gated_apart_from_selection():
    """One flipped cell changes what merges into its frame's and its clip's anchors: the matched cosine shows that
    as an arithmetic error, the arithmetic figure leaves out every token whose selections did not all agree."""
    cfg = CFG
    ref = _outputs(cfg)
    A, K, per_clip = cfg.pooled_anchors, cfg.keep, 2 * cfg.pooled_anchors + (cfg.clip_len - 1) * cfg.keep
    rng = np.random.default_rng(5)
    actual = {"tokens": ref["tokens"] + 1e-4 * rng.normal(size=ref["tokens"].shape).astype(np.float32),
              "index": ref["index"].copy()}
    # clip 0, frame 1: one distinct cell flips to a cell not kept; what it fed moves (the clip's anchors, the
    # frame's own tokens through its anchor transport)
    old = {tuple(map(int, r[1:])) for r in ref["index"][A:A + K]}
    actual["index"][A + K - 1, 1:] = next((r, c) for r in range(cfg.pooled_grid) for c in range(cfg.pooled_grid)
                                          if (r, c) not in old)
    moved = np.r_[A:A + K, per_clip - A:per_clip]                 # frame 1's distinct tokens, clip 0's anchors
    actual["tokens"][moved] = rng.normal(size=(len(moved), ref["tokens"].shape[1]))
    m = compare_outputs(cfg, ref, actual)
    assert m["anchor_agreement"] < 1.0 and m["matched_cosine_min"] < 0.9
    assert m["arithmetic_cosine_min"] > 0.9999
    assert m["arithmetic_tokens"] == pytest.approx(1 - len(moved) / cfg.output_tokens)
    # a token whose selections all agree is held to its arithmetic: clip 1's anchors moved alone fail it
    actual["tokens"][2 * per_clip - 1] = -ref["tokens"][2 * per_clip - 1]
    assert compare_outputs(cfg, ref, actual)["arithmetic_cosine_min"] < 0
    # a flipped keyframe cell takes the keyframe and the clip's anchors out, not the later frames' distinct tokens
    keyframe = {tuple(map(int, r[1:])) for r in ref["index"][:A]}
    flipped = ref["index"].copy()
    flipped[0, 1:] = next((r, c) for r in range(cfg.pooled_grid) for c in range(cfg.pooled_grid)
                          if (r, c) not in keyframe)
    key = compare_outputs(cfg, ref, {"tokens": ref["tokens"], "index": flipped})
    assert key["anchor_agreement_keyframe"] < 1.0 and key["anchor_agreement_distinct"] == 1.0
    assert key["arithmetic_tokens"] == pytest.approx(1 - 2 * A / cfg.output_tokens)


def test_noise_floor_gate_is_the_lower_of_fixed_and_median():
    from aot_export.fidelity import NoiseFloor

    fixed = VISION_GATES["int8"]
    low = NoiseFloor(0.004, (0.95, 0.93, 0.97, 0.99))               # median 0.96 < 0.98: the floor decides
    assert low.gates(fixed).floors == {**fixed.floors, "anchor_agreement": pytest.approx(0.96)}
    high = NoiseFloor(0.004, (1.0, 0.99, 1.0))                      # median 1.0: never stronger than the fixed gate
    assert high.gates(fixed) == fixed and NoiseFloor(0.004, ()).gates(fixed) == fixed
    assert low.gates(VISION_GATES["fp32"]) == VISION_GATES["fp32"]  # fp32 has no anchor floor to lower
    record = low.to_dict(fixed)
    assert (record["fixed_gate"], record["effective_gate"], record["draws"]) == (0.98, pytest.approx(0.96), 4)
    assert record["statistic"] == "median" and record["anchor_agreement"] == [0.95, 0.93, 0.97, 0.99]


# ---- fp8 ----------------------------------------------------------------------------------------------------------
def test_fp8_export(tiny_export, clips, tmp_path):
    out = tmp_path / "tiny-fp8"
    report = calibrate_export(tiny_export, [clips[0]], "fp8", out, holdout=clips[1], clips_per_video=1,
                              progress=False, noise_draws=0)
    manifest = read_manifest(out)
    model = onnx.load(str(out / GRAPH), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    zeros = [inits[n.input[2]] for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert zeros and all(z.data_type == onnx.TensorProto.FLOAT8E4M3FN for z in zeros)
    assert not any(numpy_helper.to_array(z).astype(np.float32).any() for z in zeros)
    assert manifest.precision == "fp8" and manifest.opset == 19 == model.opset_import[0].version
    assert "QFLOAT8E4M3FN" in manifest.extra["calibration"]["method"]
    # The opset was raised without dropping node metadata: the scopes are still readable.
    assert {submodule(n) for n in model.graph.node if n.op_type == "TopK"} == {"reducer"}
    assert 0.9 <= report.metrics["matched_cosine_mean"] <= 1.0


# ---- real footage ---------------------------------------------------------------------------------------------------
def test_real_footage(tiny_export, shared_videos, tmp_path):
    """Calibrate on one shared video, hold out another. The tiny model's random weights make its attention scores
    nearly flat: its own fp32 selection moves under ¼-pixel-step noise (measured 93–97 % anchor agreement over 12
    draws on bikes), so the anchor gate is not asserted here; the token cosine on matched cells is."""
    if len(shared_videos) < 2:
        pytest.skip("needs two shared videos")
    report = calibrate_export(tiny_export, [shared_videos[0]], "int8", tmp_path / "int8", holdout=shared_videos[1],
                              clips_per_video=2, noise_draws=1, progress=False)
    assert report.holdout == shared_videos[1].name
    m = report.metrics
    assert m["matched_cosine_mean"] >= 0.995 and m["matched_cosine_min"] >= 0.98, report.table()
    assert m["anchor_agreement"] >= 0.7, report.table()


# ---- refusals -------------------------------------------------------------------------------------------------------
def refused(tmp_path, *args, **kwargs):
    out = tmp_path / "out"
    with pytest.raises(InputError) as info:
        calibrate_export(*args, out_dir=out, progress=False, **kwargs)
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    return message


def test_refuses_bad_input(tiny_export, int8, clips, tmp_path):
    out, _ = int8
    assert "fp32" in refused(tmp_path, out, [clips[0]], "int8", holdout=clips[1])
    assert "'int4'" in refused(tmp_path, tiny_export, [clips[0]], "int4", holdout=clips[1])
    assert "no calibration videos" in refused(tmp_path, tiny_export, [], "int8", holdout=clips[1])
    (tmp_path / "empty").mkdir()
    assert "no calibration videos" in refused(tmp_path, tiny_export, tmp_path / "empty", "int8", holdout=clips[1])
    assert "no such video" in refused(tmp_path, tiny_export, [tmp_path / "missing.mp4"], "int8", holdout=clips[1])
    assert "also a calibration video" in refused(tmp_path, tiny_export, [clips[0]], "int8", holdout=clips[0])
    copy = shutil.copy(clips[0], tmp_path / "renamed.mp4")           # the same footage under another name
    assert "also a calibration video" in refused(tmp_path, tiny_export, [clips[0]], "int8", holdout=copy)
    assert "no such held-out" in refused(tmp_path, tiny_export, [clips[0]], "int8", holdout=tmp_path / "none.mp4")
    with pytest.raises(InputError, match="source export"):
        calibrate_export(tiny_export, [clips[0]], "int8", tiny_export, holdout=clips[1], progress=False)
    assert expand_videos([clips[0], clips[0].parent]) == [clips[0], clips[1]]


def test_no_holdout_is_refused(tiny_export, clips, tmp_path):
    assert "holdout" in refused(tmp_path, tiny_export, [clips[0]], "int8")


def test_interrupted_calibration_leaves_nothing(tiny_export, int8, clips, tmp_path, monkeypatch):
    """Interrupted while quantizing: an existing output stays as it was, no staging or work directory remains."""
    import calibration.calibrate

    target = tmp_path / "keep"
    shutil.copytree(int8[0], target)
    before = sorted((p.name, sha256_file(p)) for p in target.iterdir())

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(calibration.calibrate, "quantize_graph", interrupted)
    with pytest.raises(KeyboardInterrupt):
        calibrate_export(tiny_export, [clips[0]], "int8", target, holdout=clips[1], clips_per_video=1, progress=False,
                         force=True)
    assert sorted((p.name, sha256_file(p)) for p in target.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep"]


def test_comparator_refuses_outputs_of_another_config():
    ref = _outputs(CFG)
    short = {"tokens": ref["tokens"][:-1], "index": ref["index"][:-1]}
    with pytest.raises(InputError, match="differ from the reference"):
        compare_outputs(CFG, ref, short)
    with pytest.raises(InputError, match="the config says"):
        compare_outputs(CFG, short, short)


# ---- weight-only int8 (ONNX Runtime's MatMulNBits) -----------------------------------------------------------------
@pytest.fixture(scope="module")
def weights8(tiny_export, tmp_path_factory):
    from calibration.weight_only import quantize_weights

    return quantize_weights(tiny_export, tmp_path_factory.mktemp("w8") / "tiny-w8")


def test_weight_only_quantizes_tower_and_projector_only(tiny_export, weights8):
    from aot_export.onnx_scopes import FP32_SCOPES, node_scope

    manifest = read_manifest(weights8)
    assert manifest.precision == "int8-weights"
    assert manifest.extra["weight_only"]["bits"] == 8
    assert manifest.extra["weight_only"]["source_sha256"] == read_manifest(tiny_export).files[GRAPH]
    model = onnx.load(str(weights8 / GRAPH), load_external_data=False)
    quantized = [n.name.removesuffix("_Q8") for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(quantized) == manifest.extra["weight_only"]["quantized_matmuls"] > 0
    source = onnx.load(str(tiny_export / GRAPH), load_external_data=False)
    scopes = {n.name: node_scope(n) for n in source.graph.node}
    assert {scopes[name] for name in quantized} == {"tower", "projector"}
    weights = {i.name for i in source.graph.initializer}
    kept = [n.name for n in source.graph.node
            if n.op_type == "MatMul" and n.input[1] in weights and node_scope(n) in FP32_SCOPES]
    assert kept and set(kept) <= {n.name for n in model.graph.node if n.op_type == "MatMul"}
    # the tower's first encoder block keeps fp32 weights (weight_only.FLOAT_BLOCKS), every later block is 8-bit
    from calibration.weight_only import tower_block

    blocks = {n.name: tower_block(n) for n in source.graph.node}
    first = [name for name in blocks if blocks[name] == 0 and name not in kept
             and any(n.name == name and n.op_type == "MatMul" and n.input[1] in weights for n in source.graph.node)]
    assert first and set(first) <= {n.name for n in model.graph.node if n.op_type == "MatMul"}
    assert {blocks[name] for name in quantized} - {None} == set(range(1, max(filter(None.__ne__, blocks.values())) + 1))
    info = manifest.extra["weight_only"]
    assert info["float_blocks"] == 1 and info["float_block_matmuls"] == len(first)
    # another account can read what it can see (ONNX writes external data 0600)
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in weights8.iterdir())


def test_weight_only_output_against_the_reference(tiny, weights8, shared_videos):
    """ONNX Runtime runs the MatMulNBits graph; every token it shares with the reference is within the int8 gate.
    (The anchor-agreement gate is not asserted: on random weights it sits at the fp32 graph's own noise floor,
    docs/benchmarks.md.)"""
    from runtime.validate import validate_export

    report = validate_export(weights8, shared_videos[0], progress=False, noise_draws=1)
    fixed = VISION_GATES["int8-weights"]
    assert report.precision == "int8-weights" and report.fixed_gates == fixed
    assert report.metrics["arithmetic_cosine_min"] >= fixed.floors["arithmetic_cosine_min"]
    # the anchor gate on this video is grounded in the reference's own noise floor, recorded with the verdict
    assert report.gates == report.noise_floor.gates(fixed) and len(report.noise_floor.anchor_agreement) == 1
    recorded = read_manifest(weights8).extra["validation"]
    assert recorded["noise_floor"]["effective_gate"] == report.gates.floors["anchor_agreement"]
    assert report.metrics["cell_agreement"] > 0.8


@pytest.mark.heavy
def test_weight_only_holds_its_gates_on_the_trained_fixture(trained_export, shared_videos, tmp_path):
    """Issue #21: with the tower's first block fp32 (weight_only.FLOAT_BLOCKS) the 8-bit weights keep the anchors
    within the gate grounded in each video's fp32 noise floor, and the arithmetic within 0.995, on both videos
    (docs/benchmarks.md, "Weight-only 8-bit on the trained fixture")."""
    from calibration.weight_only import quantize_weights
    from runtime.validate import validate_export

    w8 = quantize_weights(trained_export, tmp_path / "w8")
    for video in shared_videos:
        report = validate_export(w8, video, progress=False)
        assert report.passed, report.table()


@pytest.mark.parametrize("args, words", [
    (["quantize-weights", "{w8}", "--out", "{tmp}/again"], "from an fp32 export"),
    (["quantize-weights", "{export}", "--out", "{tmp}/x", "--block-size", "7"], "--block-size 7"),
    (["build", "{w8}", "--target", "rtx", "--precision", "fp32", "--out", "{tmp}/engine"], "only ONNX Runtime runs"),
])
def test_weight_only_refusals(tiny_export, weights8, tmp_path, capsys, args, words):
    from runtime.cli import main

    args = [a.format(w8=weights8, export=tiny_export, tmp=tmp_path) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
