"""Qwen2.5-VL and Cosmos3-Edge on the device: their bundles (int4 decoder with 3-D position_ids; genai's builder for
Qwen2.5-VL, runtime/decoder_export.py for Cosmos3-Edge) run without torch, transformers or onnx and give the
reference chain's prompt ids, 3-D positions and greedy tokens; a decoder without 3-D positions, a decoder of another
family and an edited frame count are refused in one line before any weights load."""

import json
import shutil

import numpy as np
import pytest

from aot_export import AOTConfig
from aot_export.adapters import load_model
from aot_export.errors import InputError
from aot_export.export import export_vision_aot
from runtime.bundle import write_bundle
from runtime.cli import EXIT_BAD_INPUT, EXIT_OK, main
from runtime.device.bundle import BUNDLE, read_bundle
from runtime.llm import build_onnx_decoder
from test_device import PROMPT, device_check, reference_run
from test_live import window_checks

VIDEO_FRAMES = 4


def family_cfg(adapter) -> AOTConfig:
    frames = adapter.aot_frames(VIDEO_FRAMES)
    return AOTConfig(frames=frames, clip_len=frames, anchors=24, pooled_anchors=16, keep=5, sinkhorn="fixed",
                     **adapter.aot_fields())


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from aot_export.video import synthesize_clip

    return synthesize_clip(tmp_path_factory.mktemp("v") / "clip.mp4", frames=24, size=160)


def build_family(model: str, root):
    """(adapter, export, int4 LLM, bundle) of one family."""
    adapter = load_model(model)
    export = export_vision_aot(adapter, family_cfg(adapter), root / "export", progress=False).directory
    llm = build_onnx_decoder(adapter, root / "llm", progress=False)
    return adapter, export, llm, write_bundle(export, llm, root / "bundle", adapter=adapter)


# Both families end to end in the heavy tier (CI's device check in the runtime-only venv runs both as well); the
# refusals are the same code for either family, so the default tier checks them on Qwen2.5-VL's bundle.
@pytest.fixture(scope="module", params=[pytest.param("tiny-qwen2.5-vl", marks=pytest.mark.heavy),
                                        pytest.param("tiny-cosmos3-edge", marks=pytest.mark.heavy)])
def family(request, tmp_path_factory):
    return build_family(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def qwen_family(tmp_path_factory):
    return build_family("tiny-qwen2.5-vl", tmp_path_factory.mktemp("qwen"))


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_family_bundle_runs_without_torch_as_the_reference_chain(family, clip, tmp_path):
    adapter, export, llm, bundle = family
    data = json.loads((bundle / BUNDLE).read_text())
    assert data["llm"]["position_axes"] == 3 and data["text"]["prompt"]["layout"] is not None
    assert not (bundle / "text/image_newline.npy").exists()
    reference = reference_run(export, llm, adapter, clip, tmp_path / "ref.json")
    assert np.asarray(reference["position_ids"]).shape[0] == 3
    result = device_check(bundle, clip, tmp_path / "ref.json")
    assert result["position_axes"] == 3 and result["forbidden_modules_loaded"] == []
    assert result["tokens"] == reference["tokens"] and len(result["tokens"]) == 16
    assert result["first_token_kl"] <= 1e-5 and all(result["checks"].values()), result


def test_cli_run_family_bundle(family, clip, tmp_path, capsys):
    adapter, _, _, bundle = family
    out = tmp_path / "run.json"
    code = main(["run", "--model", str(bundle), "--video", str(clip), "--prompt", PROMPT, "--max-new-tokens", "4",
                 "--warmup", "1", "--repeat", "2", "--json", str(out)])
    assert code == EXIT_OK, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["visual_tokens"] == family_cfg(adapter).output_tokens and report["generated_tokens"] >= 1
    assert {"vision + AOT", "prompt assembly", "LLM prefill"} <= set(report["latency"])


def test_bundle_refuses_a_decoder_without_3d_positions(qwen_family, tmp_path, capsys):
    """A decoder of the same text model whose positions are derived 1-D (the route's own export, told the family
    has none): `bundle` refuses it, naming the cause and the fix, before the model loads."""
    adapter, export, _, _ = qwen_family
    flat = load_model(adapter.info.model_id)
    flat.position_axes, flat.genai_builder = 1, False               # this instance only: a 1-D decoder
    llm = build_onnx_decoder(flat, tmp_path / "llm-1d", progress=False)
    code = main(["bundle", "--model", str(export), "--llm", str(llm), "--out", str(tmp_path / "b")])
    err = one_line_error(capsys)
    assert code == EXIT_BAD_INPUT and "takes no 3-D position_ids" in err and "quantize-llm" in err
    assert not (tmp_path / "b").exists()


def test_bundle_refuses_a_decoder_of_another_family(qwen_family, tiny_llm, tmp_path, capsys):
    _, export, _, _ = qwen_family
    code = main(["bundle", "--model", str(export), "--llm", str(tiny_llm), "--out", str(tmp_path / "b")])
    err = one_line_error(capsys)
    assert code == EXIT_BAD_INPUT and "tiny-llava-ov" in err and "quantize-llm" in err


def test_edited_frame_count_refused_before_the_graph_runs(qwen_family, clip, tmp_path, capsys):
    _, _, _, bundle = qwen_family
    edited = tmp_path / "edited"
    shutil.copytree(bundle, edited)
    data = json.loads((edited / BUNDLE).read_text())
    data["frames"] *= 2
    (edited / BUNDLE).write_text(json.dumps(data))
    with pytest.raises(InputError, match="frame count is fixed at export"):
        read_bundle(edited)
    code = main(["run", "--model", str(edited), "--video", str(clip), "--prompt", PROMPT])
    assert code == EXIT_BAD_INPUT and "--frames" in one_line_error(capsys)


def test_live_window_of_a_3d_family(qwen_family, clip):
    """Clips prefilled one by one at their 3-D positions answer as the whole prompt; shift eviction turns each kept
    key by its own (t, h, w) difference."""
    window_checks(qwen_family[3], clip)


@pytest.mark.heavy
def test_live_window_of_every_3d_family(family, clip):
    window_checks(family[3], clip)
