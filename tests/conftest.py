import sys
from pathlib import Path

import pytest
import torch

from aot_export import AOTConfig
from aot_export.adapters import load_model
from aot_export.export import export_vision_aot

sys.path.insert(0, str(Path(__file__).parent))

# The built-in tiny model and its 8-frame export, built once per test session and shared by every file that needs
# them (tests copy the export before changing anything in it).
# The default ("reference") solver, whose iterations are one ONNX Scan per call: every path the suite takes (check,
# TensorRT-RTX, fp16, calibration, bundles, the device runtime) meets the graph users export. The legacy "fixed"
# solver is covered by the model families' exports and tests/test_export_reducer.py.
TINY_CFG = AOTConfig(frames=8)


@pytest.fixture(scope="session")
def tiny():
    return load_model("tiny-llava-ov")


@pytest.fixture(scope="session")
def tiny_export(tiny, tmp_path_factory):
    return export_vision_aot(tiny, TINY_CFG, tmp_path_factory.mktemp("tiny-export") / "tiny", progress=False).directory


@pytest.fixture(scope="session")
def tiny_llm(tiny, tmp_path_factory):
    """The tiny model's int4 ONNX LLM (onnxruntime-genai's builder), built once per session."""
    from runtime.llm import build_onnx_decoder

    return build_onnx_decoder(tiny, tmp_path_factory.mktemp("llm") / "int4", progress=False)


@pytest.fixture(scope="session")
def tiny_bundle(tiny, tiny_export, tiny_llm, tmp_path_factory):
    """A bundle of the tiny export and its int4 LLM (tests copy it before changing anything in it)."""
    from runtime.bundle import write_bundle

    return write_bundle(tiny_export, tiny_llm, tmp_path_factory.mktemp("bundle") / "b", adapter=tiny)


SHARED_VIDEOS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "videos"
# The trained fixture (issue #21): `python bench/trained_fixture.py --out build/trained` makes it; `.ci/run` does
# before the heavy tier. Tests that need it skip without it.
TRAINED_CHECKPOINT = Path(__file__).resolve().parents[1] / "build" / "trained" / "llava-ov-trained"


def pytest_addoption(parser):
    parser.addoption("--trained-checkpoint", default=str(TRAINED_CHECKPOINT),
                     help="the trained fixture's checkpoint directory (bench/trained_fixture.py)")


@pytest.fixture(scope="session")
def trained_checkpoint(request):
    """The trained LLaVA-OneVision fixture (DINOv2 ViT-S tower, Qwen2.5-0.5B LLM); skips where it is not built."""
    path = Path(request.config.getoption("--trained-checkpoint"))
    if not (path / "fixture.json").is_file():
        pytest.skip(f"no trained fixture at {path}: python bench/trained_fixture.py --out {path.parent}")
    return path


@pytest.fixture(scope="session")
def trained_export(trained_checkpoint, tmp_path_factory):
    """The trained fixture's fp32 export at 8 frames (the default budgets), built once per session."""
    adapter = load_model(str(trained_checkpoint))
    return export_vision_aot(adapter, AOTConfig(frames=8), tmp_path_factory.mktemp("trained") / "export",
                             progress=False).directory


def random_inputs(cfg, hidden, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    n = cfg.grid * cfg.grid
    features = torch.randn(cfg.frames, n, hidden, generator=g)
    shallow = torch.rand(cfg.frames, n, generator=g)
    deep = torch.rand(cfg.frames, n, generator=g)
    return features.to(dtype), shallow, deep


@pytest.fixture
def shared_videos():
    videos = sorted(SHARED_VIDEOS.glob("*.mp4"))
    if not videos:
        pytest.skip(f"no shared videos at {SHARED_VIDEOS}")
    return videos
