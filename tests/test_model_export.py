"""The LLaVA-OneVision adapter and the one-graph export: preprocessing against Hugging Face, scores against
Hugging Face's eager attention, the exported graph through check and validate, and every bad input."""

import importlib.util
import json
from pathlib import Path

import av
import numpy as np
import onnx
import pytest
import torch

from aot_export import AOTConfig
from aot_export.adapters import load_model
from aot_export.adapters.llava_onevision import layer_attention_received
from conftest import TINY_CFG
from runtime.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, main
from aot_export.export import export_vision_aot
from aot_export.manifest import GRAPH, WEIGHTS, read_manifest
from aot_export.onnx_lint import FORBIDDEN_OPS, graph_findings
from aot_export.preprocess import Preprocessing, preprocess_frames, resize_frames, sample_indices
from aot_export.video import decode_frames, synthesize_clip

HAS_TENSORRT = bool(importlib.util.find_spec("tensorrt_rtx") or importlib.util.find_spec("tensorrt"))
CFG = TINY_CFG


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return synthesize_clip(tmp_path_factory.mktemp("video") / "clip.mp4", frames=30, size=200)


# ---- preprocessing and sampling as Hugging Face does them ------------------------------------------------------
def test_preprocessing_matches_the_hf_processor(tiny):
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)

    prep = tiny.preprocessing
    processor = LlavaOnevisionImageProcessorPil(image_mean=list(prep.mean), image_std=list(prep.std),
                                                size={"height": prep.size, "width": prep.size})
    frames = np.random.default_rng(0).integers(0, 256, (2, 240, 320, 3), dtype=np.uint8)
    ours = preprocess_frames(frames, prep)
    for frame, mine in zip(frames, ours):
        # LLaVA-OneVision's first "patch" is the whole frame resized to size × size.
        theirs = processor(images=[frame], return_tensors="np")["pixel_values"][0][0]
        np.testing.assert_allclose(mine, theirs, atol=1e-6, rtol=0)


def test_frames_resized_ahead_preprocess_to_the_same_pixels(tiny):
    """bench/gpu_check.py ships frames resized to the model's size and normalises them on the GPU machine."""
    frames = np.random.default_rng(1).integers(0, 256, (2, 240, 320, 3), dtype=np.uint8)
    resized = resize_frames(frames, tiny.preprocessing)
    assert resized.shape == (2, tiny.preprocessing.size, tiny.preprocessing.size, 3) and resized.dtype == np.uint8
    np.testing.assert_array_equal(preprocess_frames(resized, tiny.preprocessing),
                                  preprocess_frames(frames, tiny.preprocessing))


@pytest.mark.parametrize("total, frames", [(250, 32), (132, 32), (33, 32), (32, 32), (100, 7)])
def test_sampling_matches_hf(total, frames):
    from transformers.video_utils import VideoMetadata, default_sample_indices_fn

    want = default_sample_indices_fn(VideoMetadata(total_num_frames=total, fps=25.0), num_frames=frames)
    np.testing.assert_array_equal(sample_indices(total, frames), want)


def test_short_video_repeats_frames(tmp_path):
    assert sample_indices(3, 8).tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    video = synthesize_clip(tmp_path / "short.mp4", frames=3, size=64)
    frames = decode_frames(video, 8)
    assert frames.shape == (8, 64, 64, 3)
    np.testing.assert_array_equal(frames[0], frames[2])
    assert not np.array_equal(frames[2], frames[3])


def test_preprocessing_from_processor_config(tmp_path):
    prep = Preprocessing.from_processor_config({"size": {"height": 384, "width": 384}, "image_mean": [0.5] * 3,
                                                "image_std": [0.5] * 3, "resample": 3}, default_size=384)
    assert prep == Preprocessing(384, (0.5,) * 3, (0.5,) * 3)
    assert Preprocessing.from_dict(json.loads(json.dumps(prep.to_dict()))) == prep


# ---- scores ---------------------------------------------------------------------------------------------------
def test_scores_match_hf_eager_attention(tiny):
    """layer_attention_received from q·k equals the attention weights Hugging Face's eager path returns."""
    frames = tiny.example_frames(2, seed=1)
    tower = tiny._eager()
    with torch.inference_mode():
        out = tower(frames, output_hidden_states=True, output_attentions=True)
        for layer in tiny.score_layers:
            mine = layer_attention_received(tiny.model.model.vision_tower.encoder.layers[layer], out.hidden_states[layer])
            theirs = out.attentions[layer].sum(-2).mean(1)
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    assert tiny.score_layers == (5, 6)      # shallow 5; deep −2 of the 8-layer tower the LLM sees


# ---- the exported graph -----------------------------------------------------------------------------------------
def test_export_directory(tiny_export, tiny):
    manifest = read_manifest(tiny_export)
    assert sorted(p.name for p in tiny_export.iterdir()) == sorted([GRAPH, WEIGHTS, "manifest.json"])
    model = onnx.load(str(tiny_export / GRAPH), load_external_data=False)
    assert model.opset_import[0].version == 18
    assert graph_findings(model) == []
    assert not {n.op_type for n in model.graph.node} & FORBIDDEN_OPS
    assert any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in [*model.graph.input,
                                                                                   *model.graph.output]}
    assert shapes == {"frames": [8, 3, 384, 384], "tokens": [CFG.output_tokens, 64], "index": [CFG.output_tokens, 3]}
    assert manifest.aot == CFG and manifest.preprocessing == tiny.preprocessing
    assert manifest.model["config_hash"] == tiny.info.config_hash and manifest.opset == 18
    assert {"torch", "transformers", "onnx"} <= set(manifest.versions)


def test_export_matches_pytorch_module(tiny_export, tiny):
    import onnxruntime as ort

    frames = tiny.example_frames(CFG.frames, seed=7)
    session = ort.InferenceSession(str(tiny_export / GRAPH), providers=["CPUExecutionProvider"])
    tokens, index = session.run(None, {"frames": frames.numpy()})
    with torch.inference_mode():
        want_tokens, want_index = tiny.vision_aot(CFG)(frames)
    np.testing.assert_array_equal(index, want_index.numpy())
    assert np.abs(tokens - want_tokens.numpy()).max() <= 1e-5


def test_check_passes(tiny_export, tmp_path, capsys):
    report = tmp_path / "check.json"
    assert main(["check", str(tiny_export), "--json", str(report)]) == EXIT_OK
    rows = {r["check"]: r["status"] for r in json.loads(report.read_text())["rows"]}
    assert rows["onnx checker"] == rows["static graph"] == rows["interface"] == "ok"
    if HAS_TENSORRT:
        assert any(k.endswith("build") and v == "ok" for k, v in rows.items()), rows
    assert "PASS" in capsys.readouterr().out


def test_validate_passes_on_a_clip(tiny_export, clip, tmp_path):
    report = tmp_path / "validate.json"
    assert main(["validate", str(tiny_export), "--video", str(clip), "--json", str(report), "--quiet"]) == EXIT_OK
    result = json.loads(report.read_text())
    assert result["passed"] and result["metrics"]["cosine_min"] >= 0.99999
    assert result["metrics"]["index_agreement"] == 1.0


def test_validate_on_shared_footage(tiny_export, shared_videos):
    from runtime.validate import validate_export

    report = validate_export(tiny_export, shared_videos[0], progress=False)
    assert report.passed, report.table()


def test_validate_detects_a_wrong_graph(tiny_export, clip, tmp_path):
    """A graph of other weights (the patch embedding scaled by 1.5), under a manifest that claims this model:
    validate must fail."""
    from export_copies import edited_export

    wrong = edited_export(tiny_export, tmp_path / "wrong", weight=("tower.embeddings.patch_embedding.weight", 1.5))
    assert main(["validate", str(wrong), "--video", str(clip), "--quiet"]) == EXIT_FAILED


def test_check_flags_a_dynamic_interface(tiny_export, tmp_path):
    """A graph whose frames dim is made dynamic is a finding (exit 1), not bad input."""
    import shutil

    from aot_export.artifacts import sha256_file

    copy_dir = tmp_path / "dynamic"
    shutil.copytree(tiny_export, copy_dir)
    model = onnx.load(str(copy_dir / GRAPH), load_external_data=False)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "T"
    onnx.save(model, str(copy_dir / GRAPH))
    manifest = json.loads((copy_dir / "manifest.json").read_text())
    manifest["files"][GRAPH] = sha256_file(copy_dir / GRAPH)
    (copy_dir / "manifest.json").write_text(json.dumps(manifest))
    assert main(["check", str(copy_dir), "--no-tensorrt"]) == EXIT_FAILED


# ---- bad input ----------------------------------------------------------------------------------------------------
def bad_input(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == EXIT_BAD_INPUT, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def audio_only(path):
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    return path


@pytest.mark.parametrize("kind", ["missing", "empty", "corrupt", "audio-only"])
def test_bad_videos(tiny_export, tmp_path, capsys, kind):
    path = tmp_path / ("audio.m4a" if kind == "audio-only" else "video.mp4")
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "corrupt":
        path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    elif kind == "audio-only":
        audio_only(path)
    err = bad_input(capsys, ["validate", str(tiny_export), "--video", str(path)])
    assert str(path) in err


def test_unsupported_model_type(tmp_path, capsys):
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "bert"}))
    err = bad_input(capsys, ["export", "--model", str(checkpoint), "--out", str(tmp_path / "out")])
    assert "'bert' is not supported" in err and "llava_onevision" in err
    assert not (tmp_path / "out").exists()


def test_unknown_model_name(tmp_path, capsys):
    err = bad_input(capsys, ["export", "--model", "no-such-model", "--out", str(tmp_path / "out")])
    assert "tiny-llava-ov" in err


def test_config_that_does_not_fit_the_grid(tmp_path, capsys):
    config = tmp_path / "aot.json"
    config.write_text(AOTConfig(frames=8, grid=24, pooled_anchors=24, keep=8).to_json())
    err = bad_input(capsys, ["export", "--config", str(config), "--out", str(tmp_path / "out")])
    assert "grid=24" in err and "27" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_invalid_budget_names_the_field(tmp_path, capsys):
    err = bad_input(capsys, ["export", "--frames", "8", "--pooled-anchors", "500", "--out", str(tmp_path / "out")])
    assert "pooled_anchors" in err


@pytest.mark.parametrize("target", [GRAPH, WEIGHTS])
def test_manifest_hash_mismatch(tiny_export, tmp_path, capsys, target):
    import shutil

    tampered = tmp_path / "tampered"
    shutil.copytree(tiny_export, tampered)
    with open(tampered / target, "r+b") as handle:
        handle.seek(100)
        byte = handle.read(1)
        handle.seek(100)
        handle.write(bytes([byte[0] ^ 0xFF]))
    assert main(["check", str(tampered), "--no-tensorrt"]) == EXIT_FAILED      # check: a finding, exit 1
    out = capsys.readouterr().out
    assert target in out and "sha256" in out
    err = bad_input(capsys, ["validate", str(tampered), "--video", "unused.mp4"])   # loading it: refused
    assert target in err and "sha256" in err


def test_not_an_export_dir(tmp_path, capsys):
    err = bad_input(capsys, ["check", str(tmp_path)])
    assert "manifest.json" in err


def test_interrupted_export_keeps_the_old_one(tiny_export, tmp_path, tiny, monkeypatch):
    """Interrupted after the graph is written (Ctrl-C during the check): the previous export stays as it was and
    no staging directory is left behind."""
    import shutil

    import aot_export.export

    target = tmp_path / "keep"
    shutil.copytree(tiny_export, target)
    before = sorted((p.name, p.stat().st_size) for p in target.iterdir())

    def interrupted(path):
        assert path.is_file()
        raise KeyboardInterrupt

    class Traced:
        """Stands in for the traced graph (tracing is seconds; what replacing the export leaves is the point)."""

        def save(self, path, external_data):
            Path(path).write_bytes(b"graph")

    monkeypatch.setattr(aot_export.export, "trace_onnx", lambda *args: Traced())
    monkeypatch.setattr(aot_export.export, "verify_static", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_vision_aot(tiny, CFG, target, progress=False, force=True)
    assert sorted((p.name, p.stat().st_size) for p in target.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep"]


# ---- full size ----------------------------------------------------------------------------------------------------
@pytest.mark.heavy
def test_full_size_export_check_validate(tmp_path, shared_videos):
    """LLaVA-OneVision-0.5B's architecture (SigLIP-so400m, Qwen2-0.5B width), random weights, 8 frames."""
    from engines.check import check_export
    from runtime.validate import validate_export

    adapter = load_model("llava-ov-0.5b-random")
    cfg = AOTConfig(frames=8)
    directory = export_vision_aot(adapter, cfg, tmp_path / "full", progress=False).directory
    report = check_export(directory)
    assert report.passed, report.table()
    validation = validate_export(directory, shared_videos[0], model=adapter, progress=False)
    assert validation.passed, validation.table()
