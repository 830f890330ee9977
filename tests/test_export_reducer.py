"""The reducer alone exports to a static opset-18 graph that ONNX Runtime and TensorRT-RTX accept."""

import importlib.util
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import random_inputs

from aot_export import AOTConfig, AOTReducer
from aot_export.onnx_export import OPSET, export_module, export_reducer
from aot_export.onnx_lint import graph_findings
from aot_export.reducer import NO_MASS, stopping_sinkhorn

CONFIGS = {
    "small-bilinear": (AOTConfig(frames=8, grid=9, anchors=18, pooled_anchors=8, keep=2, sinkhorn="fixed"), 32),
    "small-average-no-keep": (AOTConfig(frames=4, clip_len=2, grid=10, windows=2, pool_mode="average", anchors=20,
                                        pooled_anchors=10, keep=0, sinkhorn="reference"), 16),
    # The fixed solver on SigLIP's grid: small-bilinear covers the solver, the suite's tiny export (conftest) the
    # grid and its pooling, exported, built and run against PyTorch (tests/test_model_export.py, test_engines.py).
    "siglip-grid": (AOTConfig(frames=8, sinkhorn="fixed"), 64),
    # The default solver on SigLIP's grid, 4 calls (small-average-no-keep covers the same solver in the default tier
    # with 2 calls, and the suite's tiny export on SigLIP's grid).
    "siglip-grid-reference": (AOTConfig(frames=8, sinkhorn="reference"), 64),
}
HEAVY = {"siglip-grid", "siglip-grid-reference"}


@pytest.fixture(scope="module", params=[pytest.param(name, marks=[pytest.mark.heavy] if name in HEAVY else [])
                                        for name in CONFIGS])
def exported(request, tmp_path_factory):
    cfg, hidden = CONFIGS[request.param]
    path = export_reducer(cfg, hidden, tmp_path_factory.mktemp(request.param) / "reducer.onnx")
    return cfg, hidden, path


def test_graph_is_static(exported):
    cfg, hidden, path = exported
    model = onnx.load(path)
    assert model.opset_import[0].version == OPSET
    assert graph_findings(model) == []
    assert any(node.op_type == "TopK" for node in model.graph.node)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.output}
    assert shapes == {"tokens": [cfg.output_tokens, hidden], "index": [cfg.output_tokens, 3]}
    assert {v.name: v.type.tensor_type.elem_type for v in model.graph.output}["index"] == onnx.TensorProto.INT32


@pytest.mark.parametrize("seed", [11, 12])
def test_onnxruntime_matches_pytorch(exported, seed):
    cfg, hidden, path = exported
    features, shallow, deep = random_inputs(cfg, hidden, seed=seed)
    want_tokens, want_index = AOTReducer(cfg)(features, shallow, deep)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    tokens, index = session.run(None, {"features": features.numpy(), "score_shallow": shallow.numpy(),
                                       "score_deep": deep.numpy()})
    np.testing.assert_array_equal(index, want_index.numpy())
    assert np.abs(tokens - want_tokens.numpy()).max() <= 1e-5


def test_the_reference_solver_is_one_scan_per_call(exported):
    """Its iterations are traced once: a Scan per Sinkhorn call (the intra-frame one, then one per inter-frame step)
    over a constant of `sinkhorn_max_iters`, not that many unrolled copies."""
    cfg, _, path = exported
    model = onnx.load(path)
    scans = [node for node in model.graph.node if node.op_type == "Scan"]
    if cfg.sinkhorn == "fixed":
        assert scans == []
        return
    constants = {init.name: init for init in model.graph.initializer}
    assert len(scans) == cfg.clip_len and all(constants[s.input[-1]].dims == [cfg.sinkhorn_max_iters] for s in scans)
    assert sum(node.op_type == "MatMul" for node in model.graph.node) < cfg.sinkhorn_max_iters


class Solvers(torch.nn.Module):
    """The reference solver as the reducer calls it: one joint call (the intra-frame stage) and one per problem (an
    inter-frame step), at most 14 iterations. On `solver_inputs` the authors' rule stops the joint call after 13 and
    the problems after 13, 9, 11 and 11 while two run all 14, so frozen and running flags both occur."""

    def forward(self, cost, log_mu, log_nu):
        return (stopping_sinkhorn(cost, log_mu, log_nu, 0.1, 1e-2, 14, joint=True),
                stopping_sinkhorn(cost, log_mu, log_nu, 0.1, 1e-2, 14, joint=False))


def solver_inputs():
    """6 problems of 40 rows (about 30 % without mass) and 9 columns, uniform marginals."""
    g = torch.Generator().manual_seed(4)
    cost = torch.rand(6, 40, 9, generator=g) * 2
    sources = torch.rand(6, 40, generator=g) > 0.3
    log_mu = torch.where(sources, -sources.sum(1, keepdim=True).float().log().expand(6, 40), NO_MASS)
    return cost, log_mu, torch.full((6, 9), -math.log(9))


def test_scan_gives_the_unrolled_graph_s_outputs(tmp_path, monkeypatch):
    """The iterations as one Scan compute what they computed unrolled into the graph (before the Scan): bit for bit
    where ONNX Runtime fuses nothing, within 1e-6 with its fusions (which differ between a Scan body and the main
    graph) — and as PyTorch does."""
    import aot_export.reducer as reducer

    def unrolled(step, state, count):
        for _ in range(count):
            state = step(state)
        return state

    inputs = solver_inputs()
    names = ("cost", "log_mu", "log_nu")
    scan = export_module(Solvers(), inputs, names, ("joint", "each"), tmp_path / "scan.onnx")
    with monkeypatch.context() as patch:
        patch.setattr(reducer, "repeat", unrolled)
        flat = export_module(Solvers(), inputs, names, ("joint", "each"), tmp_path / "unrolled.onnx")
    assert [sum(n.op_type == "Scan" for n in onnx.load(path).graph.node) for path in (scan, flat)] == [2, 0]
    feeds = dict(zip(names, (x.numpy() for x in inputs)))
    want = [x.numpy() for x in Solvers()(*inputs)]
    for level, exact in ((ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, True),
                         (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, False)):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        got, unrolled_got = (ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)
                             for path in (scan, flat))
        for a, b, torch_plan in zip(got, unrolled_got, want):
            assert (a == b).all() if exact else np.abs(a - b).max() <= 1e-6
            assert np.abs(a - torch_plan).max() <= 1e-6


def scan_graph(scanned: str, body_nodes: list, constants: list) -> onnx.ModelProto:
    """A Scan carrying `x` [2] over `scanned` [3] (an input, or one of `constants`), its body made of `body_nodes`
    (`s` is the carried state inside, `t` the scanned element; it yields `s2` and `y`)."""
    f = onnx.TensorProto.FLOAT
    body = onnx.helper.make_graph(
        body_nodes, "body",
        [onnx.helper.make_tensor_value_info("s", f, [2]), onnx.helper.make_tensor_value_info("t", f, [])],
        [onnx.helper.make_tensor_value_info("s2", f, [2]), onnx.helper.make_tensor_value_info("y", f, [])])
    scan = onnx.helper.make_node("Scan", ["x", scanned], ["final", "ys"], body=body, num_scan_inputs=1)
    graph = onnx.helper.make_graph(
        [scan], "g", [onnx.helper.make_tensor_value_info("x", f, [2]), onnx.helper.make_tensor_value_info("n", f, [3])],
        [onnx.helper.make_tensor_value_info("final", f, [2])], initializer=constants)
    return onnx.helper.make_model(graph)


def test_lint_takes_a_scan_only_over_a_constant_and_checks_its_body():
    count = onnx.numpy_helper.from_array(np.zeros(3, np.float32), "count")
    step = [onnx.helper.make_node("Add", ["s", "t"], ["s2"]), onnx.helper.make_node("Identity", ["t"], ["y"])]
    assert graph_findings(scan_graph("count", step, [count])) == []
    assert [f.rule for f in graph_findings(scan_graph("n", step, [count]))] == ["scan-count-not-constant"]
    dynamic = [*step, onnx.helper.make_node("NonZero", ["s"], ["nz"]),
               onnx.helper.make_node("TopK", ["s", "k"], ["v", "i"])]
    rules = sorted(f.rule for f in graph_findings(scan_graph("count", dynamic, [count])))
    assert rules == ["forbidden-op", "topk-k-not-constant"]


def test_lint_flags_a_dynamic_topk():
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])
    k = onnx.helper.make_tensor_value_info("k", onnx.TensorProto.INT64, [1])
    outs = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in ("v",)]
    graph = onnx.helper.make_graph([onnx.helper.make_node("TopK", ["x", "k"], ["v", "i"]),
                                    onnx.helper.make_node("NonZero", ["x"], ["nz"])], "g", [x, k], outs)
    rules = sorted(f.rule for f in graph_findings(onnx.helper.make_model(graph)))
    assert rules == ["forbidden-op", "topk-k-not-constant"]


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None and importlib.util.find_spec("tensorrt") is None,
                    reason="neither tensorrt nor tensorrt_rtx is installed")
def test_tensorrt_parses_and_builds(exported, tmp_path):
    from engines import build_engine, builder_config, parse_onnx, save_plan

    _, _, path = exported
    parsed = parse_onnx(path)
    assert parsed.num_layers > 0
    engine = build_engine(parsed, builder_config(parsed, workspace_bytes=1 << 30))
    plan = save_plan(engine, tmp_path / "engine.plan")
    assert plan.stat().st_size == len(engine.plan) > 0
