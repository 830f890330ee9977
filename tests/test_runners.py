"""One runner interface for every backend (Polygraphy's BaseRunner: activate / infer / deactivate): ONNX Runtime
with its session options recorded, the PyTorch reference, TensorRT (refused before any GPU work where the engine
does not fit; run where a GPU exists), the backend table, and the one resolver behind run, validate and
visualize."""

import importlib.util
import json
import shutil

import numpy as np
import pytest
from polygraphy.backend.base import BaseRunner

from conftest import TINY_CFG
from aot_export.errors import InputError
from aot_export.fidelity import VISION_GATES, compare_outputs, gate_checks
from aot_export.manifest import Manifest, read_manifest
from aot_export.reference_runner import TorchReferenceRunner
from aot_export.runners import OnnxRuntimeRunner
from aot_export.video import synthesize_clip
from engines.runner import TensorRTRunner
from engines.sidecar import EngineMismatch, gpu_compute_capability
from runtime.cli import EXIT_BAD_INPUT, EXIT_OK, main
from runtime.vision import RUNNERS, model_adapter, open_runner, resolve_artifact

NO_GPU = "this machine has no CUDA GPU"


@pytest.fixture(scope="module")
def frames(tiny):
    return tiny.example_frames(TINY_CFG.frames, seed=7).numpy()


@pytest.fixture(scope="module")
def engine_dir(tiny_export, tmp_path_factory):
    """An fp32 TensorRT-RTX engine under the name `aot-export build` gives it, beside a copy of its export."""
    if importlib.util.find_spec("tensorrt_rtx") is None:
        pytest.skip("tensorrt_rtx is not installed")
    from engines.build import build_engine_dir, settings_for
    from engines.targets import get_target

    folder = tmp_path_factory.mktemp("engine")
    shutil.copytree(tiny_export, folder / "tiny")
    return build_engine_dir(folder / "tiny", settings_for(get_target("rtx"), "fp32"), folder / "tiny-rtx-fp32",
                            progress=False).directory


def test_every_backend_is_a_polygraphy_runner():
    assert set(RUNNERS) == {"torch", "onnxruntime", "tensorrt"}
    assert all(issubclass(runner, BaseRunner) for runner in RUNNERS.values())
    assert {name: runner.backend for name, runner in RUNNERS.items()} == {name: name for name in RUNNERS}


def test_onnxruntime_runner_records_and_applies_its_session_options(tiny_export, tiny, frames):
    runner = OnnxRuntimeRunner.from_export(tiny_export, "cpu", intra_op_threads=1, allow_spinning=True,
                                           memory_arena=False)
    assert runner.settings == {"backend": "onnxruntime", "graph": str(tiny_export / "vision_aot.onnx"),
                               "providers": ["CPUExecutionProvider"], "intra_op_threads": 1,
                               "allow_spinning": True, "memory_arena": False}
    assert not runner.is_active and runner.name == "onnxruntime-cpu"
    with runner:
        options = runner.session.get_session_options()
        assert options.intra_op_num_threads == 1
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
        assert options.enable_cpu_mem_arena is False
        meta = runner.get_input_metadata()
        assert list(meta) == ["frames"] and tuple(meta["frames"].shape) == frames.shape
        outputs = runner.run(frames)
        assert runner.last_inference_time() > 0
    assert not runner.is_active
    import torch

    with torch.inference_mode():
        want_tokens, want_index = tiny.vision_aot(TINY_CFG)(torch.from_numpy(frames))
    np.testing.assert_array_equal(outputs["index"], want_index.numpy())
    assert np.abs(outputs["tokens"] - want_tokens.numpy()).max() <= 1e-5
    with OnnxRuntimeRunner.from_export(tiny_export, "cpu") as default:
        # Spinning is off unless asked for (docs/benchmarks.md: it slowed the LLM prefill after the vision graph).
        assert default.session.get_session_options().get_session_config_entry(
            "session.intra_op.allow_spinning") == "0"


def test_onnxruntime_against_the_reference_runner(tiny_export, tiny, frames):
    with TorchReferenceRunner(tiny, TINY_CFG) as reference, OnnxRuntimeRunner.from_export(tiny_export, "cpu") as ort:
        metrics = compare_outputs(TINY_CFG, reference.run(frames), ort.run(frames), VISION_GATES["fp32"])
    assert all(gate_checks(metrics, VISION_GATES["fp32"]).values()), metrics
    assert metrics["polygraphy_index_pass"] == 1.0 and metrics["max_abs"] < 1e-4


def test_backend_table_refusals(tiny_export, tiny):
    export = resolve_artifact(tiny_export)
    assert export.kind == "export" and export.manifest == read_manifest(tiny_export)
    with pytest.raises(InputError, match="not an engine directory"):
        open_runner(export, "tensorrt")
    with pytest.raises(InputError, match="unknown"):
        open_runner(export, "tvm")
    with pytest.raises(InputError, match="needs the model"):
        open_runner(export, "torch")
    model = resolve_artifact("tiny-llava-ov")
    assert model.kind == "model" and model.manifest is None
    with pytest.raises(InputError, match="not an export directory"):
        open_runner(model, "onnxruntime")
    assert isinstance(open_runner(model, adapter=tiny), TorchReferenceRunner)
    with pytest.raises(InputError, match="--export"):
        resolve_artifact(tiny_export, export=tiny_export)


def test_tensorrt_runner_checks_the_engine_before_the_gpu(engine_dir, tiny_export, tiny, frames):
    """The engine against its export first (a copy with another AOT config is refused, naming the field), then
    this machine. Without a GPU the refusal is the one line below; with one, the engine runs and is compared with
    the reference."""
    from export_copies import edited_export

    other = edited_export(tiny_export, engine_dir.parent / "other", manifest=lambda m: m["aot"].update(sigma_t=2.0))
    with pytest.raises(EngineMismatch, match="aot_hash"):
        TensorRTRunner(engine_dir, other)
    if gpu_compute_capability() is None:
        with pytest.raises(EngineMismatch) as refused:
            TensorRTRunner(engine_dir, tiny_export)
        assert refused.value.field == "compute_capability" and NO_GPU in str(refused.value)
        pytest.skip(f"TensorRT runs where a GPU exists: {refused.value}")
    with TensorRTRunner(engine_dir, tiny_export) as runner, TorchReferenceRunner(tiny, TINY_CFG) as reference:
        metrics = compare_outputs(TINY_CFG, reference.run(frames), runner.run(frames), VISION_GATES["fp32"])
    assert all(gate_checks(metrics, VISION_GATES["fp32"]).values()), metrics


def test_run_and_validate_check_an_engine_against_the_export_beside_it(engine_dir, tmp_path, capsys):
    """`run --model ENGINE_DIR` finds the export `aot-export build` named it after; one whose AOT config differs
    is refused, naming the field, before any GPU is needed. `--export` names another export to check against."""
    clip = synthesize_clip(tmp_path / "clip.mp4", frames=10, size=96)
    beside = engine_dir.parent / "tiny"
    manifest = json.loads((beside / "manifest.json").read_text())
    saved = json.dumps(manifest)
    manifest["aot"]["sigma_t"] = 2.0
    Manifest.from_dict(manifest).write(beside)             # a consistent export of another AOT config
    try:
        run = ["run", "--model", str(engine_dir), "--video", str(clip), "--prompt", "What?", "--llm", "transformers"]
        assert main(run) == EXIT_BAD_INPUT
        assert main(["validate", str(engine_dir), "--video", str(clip), "--quiet"]) == EXIT_BAD_INPUT
        err = capsys.readouterr().err
        assert err.count("engine aot_hash is") == 2, err
    finally:
        (beside / "manifest.json").write_text(saved)
    status = main(["validate", str(engine_dir), "--video", str(clip), "--export", str(beside), "--quiet"])
    assert status == (EXIT_OK if gpu_compute_capability() else EXIT_BAD_INPUT)
    if gpu_compute_capability() is None:
        assert NO_GPU in capsys.readouterr().err


def test_one_resolver_for_run_validate_and_visualize(tiny_export, engine_dir, tiny, tmp_path, capsys):
    engine = resolve_artifact(engine_dir)
    assert engine.kind == "engine" and engine.export_dir == (engine_dir.parent / "tiny").resolve()
    assert engine.manifest.aot == TINY_CFG and model_adapter(engine) is not None
    clip = synthesize_clip(tmp_path / "clip.mp4", frames=10, size=96)
    for model in (tiny_export, engine_dir):
        out = tmp_path / f"{model.name}.png"
        assert main(["visualize", "--model", str(model), "--video", str(clip), "--out", str(out),
                     "--json", str(tmp_path / "v.json"), "--quiet"]) == EXIT_OK
        info = json.loads((tmp_path / "v.json").read_text())
        assert info["output_tokens"] == TINY_CFG.output_tokens and out.stat().st_size > 0


def test_validate_any_backend_through_the_one_comparator(tiny_export, tmp_path):
    """`validate --backend torch` runs the reference runner against itself (identical to the bit); the default
    backend of an export directory is ONNX Runtime. Both reports carry the runner and its settings."""
    clip = synthesize_clip(tmp_path / "clip.mp4", frames=10, size=96)
    for backend, name in (("torch", "torch-reference"), (None, "onnxruntime-cpu")):
        out = tmp_path / f"{backend}.json"
        argv = ["validate", str(tiny_export), "--video", str(clip), "--device", "cpu", "--json", str(out), "--quiet"]
        assert main(argv + (["--backend", backend] if backend else [])) == EXIT_OK
        report = json.loads(out.read_text())
        assert report["backend"] == name and report["runner"]["backend"] == (backend or "onnxruntime")
        assert report["gates"] == VISION_GATES["fp32"].to_dict() and report["passed"]
        if backend == "torch":
            assert report["metrics"]["max_abs"] == 0.0 and report["metrics"]["index_agreement"] == 1.0
