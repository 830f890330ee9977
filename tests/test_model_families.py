"""Qwen2.5-VL and Cosmos3-Edge: preprocessing against the Hugging Face processors, the static towers against Hugging
Face's packed forward and eager attention, one static graph each through check and validate, checkpoints and bad
input. Tiny built-ins with seeded random weights: the figures say nothing about trained models."""

import importlib.util
import json

import numpy as np
import onnx
import pytest
import torch

from aot_export import AOTConfig
from aot_export.adapters import ADAPTERS, load_model
from aot_export.export import export_vision_aot
from aot_export.manifest import GRAPH, read_manifest
from aot_export.onnx_scopes import node_scope
from aot_export.preprocess import preprocess_frames
from aot_export.video import decode_frames
from runtime.cli import EXIT_BAD_INPUT, EXIT_OK, main

HAS_TENSORRT = bool(importlib.util.find_spec("tensorrt_rtx") or importlib.util.find_spec("tensorrt"))
FAMILIES = ["tiny-qwen2.5-vl", "tiny-cosmos3-edge"]
# AOT frames are temporal patches: 4 video frames are 2 grids for Qwen2.5-VL, 4 for Cosmos3-Edge.
VIDEO_FRAMES = 4


def family_cfg(adapter):
    frames = adapter.aot_frames(VIDEO_FRAMES)
    return AOTConfig(frames=frames, clip_len=frames, anchors=24, pooled_anchors=16, keep=5, sinkhorn="fixed",
                     **adapter.aot_fields())


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return load_model(request.param)


@pytest.fixture(scope="module")
def family_export(family, tmp_path_factory):
    out = tmp_path_factory.mktemp("family-export") / family.info.model_id
    return export_vision_aot(family, family_cfg(family), out, progress=False).directory


def bad_input(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == EXIT_BAD_INPUT, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


# ---- preprocessing as the Hugging Face processors do it -----------------------------------------------------------
def hf_patches(adapter, frame):
    """One frame through the model family's Hugging Face PIL image processor, after Hugging Face's own PIL resize to
    the export's fixed size (the video processors need torchvision, which is not installed here; per frame, the
    image processor does the same resize, rescale, normalisation and patch order, repeating the frame over the
    temporal patch)."""
    from transformers.image_processing_backends import PilBackend
    from transformers.image_utils import PILImageResampling, SizeDict
    from transformers.models.cosmos3_edge.image_processing_pil_cosmos3_edge import Cosmos3EdgeImageProcessorPil
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    prep = adapter.preprocessing
    processor_class = {"qwen2_5_vl": Qwen2VLImageProcessorPil, "cosmos3_edge": Cosmos3EdgeImageProcessorPil}
    processor = processor_class[adapter.model_type](image_mean=list(prep.mean), image_std=list(prep.std),
                                                    patch_size=adapter.grid.patch, merge_size=adapter.grid.merge,
                                                    temporal_patch_size=adapter.grid.temporal)
    resized = PilBackend.resize(processor, frame.transpose(2, 0, 1), SizeDict(height=prep.size, width=prep.size),
                                resample=PILImageResampling.BICUBIC)
    out = processor(images=[resized], return_tensors="np", input_data_format="channels_first")
    grid = adapter.grid.patches_per_side
    assert out["image_grid_thw"].tolist() == [[1, grid, grid]]
    return out["pixel_values"]


def test_preprocessing_matches_the_hf_processor(family, shared_videos):
    grid = family.grid
    for video in shared_videos:
        frames = decode_frames(video, VIDEO_FRAMES)
        pixels, grid_thw = family.pixel_values(torch.from_numpy(preprocess_frames(frames, family.preprocessing)))
        assert grid_thw.tolist() == [[VIDEO_FRAMES // grid.temporal, grid.patches_per_side, grid.patches_per_side]]
        p = grid.patch
        # Each patch row's values: (channel, time, row, col) for Qwen2.5-VL's Conv3d, (row, col, channel, time) for
        # Cosmos3-Edge's linear embedding; time is the frame's slot in its temporal patch.
        layout = (3, grid.temporal, p, p) if family.model_type == "qwen2_5_vl" else (p, p, 3, grid.temporal)
        time_axis = 1 if family.model_type == "qwen2_5_vl" else 3
        ours = pixels.numpy().reshape(VIDEO_FRAMES // grid.temporal, grid.patches, *layout)
        for index, frame in enumerate(frames):
            theirs = hf_patches(family, frame).reshape(grid.patches, *layout)
            slot = index % grid.temporal
            np.testing.assert_allclose(ours[index // grid.temporal].take(slot, axis=time_axis + 1),
                                       theirs.take(slot, axis=time_axis + 1), atol=1e-6, rtol=0)


# ---- the static tower against Hugging Face --------------------------------------------------------------------
def test_static_tower_matches_hf(family):
    """Features from the static tower + merger equal Hugging Face's packed video path; scores equal the attention
    Hugging Face's eager attention gives on the hidden states of its own forward."""
    frames = family.example_frames(VIDEO_FRAMES, seed=1)
    module = family.vision_aot(family_cfg(family))
    with torch.inference_mode():
        features, shallow, deep = module.encode(frames)
        ref_features, ref_shallow, ref_deep = family.reference_encode(frames)
        hf_features = family.full_video_features(frames)
    torch.testing.assert_close(features.flatten(0, 1), hf_features, rtol=0, atol=1e-6)
    torch.testing.assert_close(features, ref_features, rtol=0, atol=1e-6)
    for mine, theirs in ((shallow, ref_shallow), (deep, ref_deep)):
        assert mine.shape == (VIDEO_FRAMES // family.grid.temporal, family.info.grid ** 2)
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    # Attention received sums to the token count over a step (each query's row sums to one).
    patches = family.grid.patches
    torch.testing.assert_close(shallow.sum(-1), torch.full_like(shallow[:, 0], float(patches)), rtol=1e-5, atol=0)


def test_score_layers():
    assert load_model("tiny-qwen2.5-vl").score_layers == (3, 7)        # its fullatt_block_indexes
    assert load_model("tiny-cosmos3-edge").score_layers == (5, 6)      # shallow 5, deep −2 of 8 layers


# ---- one static graph: export, check, validate ------------------------------------------------------------------
def test_export_directory(family_export, family):
    manifest = read_manifest(family_export)
    cfg = family_cfg(family)
    model = onnx.load(str(family_export / GRAPH), load_external_data=False)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*model.graph.input, *model.graph.output]}
    size, hidden = family.info.image_size, family.info.hidden
    assert shapes == {"frames": [VIDEO_FRAMES, 3, size, size], "tokens": [cfg.output_tokens, hidden],
                      "index": [cfg.output_tokens, 3]}
    assert manifest.video_frames == VIDEO_FRAMES and manifest.aot == cfg and (cfg.pool, cfg.pool_mode) == (1, "average")
    assert manifest.model["temporal_patch"] == family.grid.temporal and manifest.preprocessing.size == size
    assert {node_scope(node) for node in model.graph.node} >= {"tower", "projector", "scores", "reducer"}


def test_export_matches_pytorch_module(family_export, family):
    import onnxruntime as ort

    frames = family.example_frames(VIDEO_FRAMES, seed=7)
    session = ort.InferenceSession(str(family_export / GRAPH), providers=["CPUExecutionProvider"])
    tokens, index = session.run(None, {"frames": frames.numpy()})
    with torch.inference_mode():
        want_tokens, want_index = family.vision_aot(family_cfg(family))(frames)
    np.testing.assert_array_equal(index, want_index.numpy())
    assert np.abs(tokens - want_tokens.numpy()).max() <= 1e-5


def test_check_passes(family_export, tmp_path):
    report = tmp_path / "check.json"
    assert main(["check", str(family_export), "--json", str(report), "--quiet"]) == 0
    rows = {r["check"]: r["status"] for r in json.loads(report.read_text())["rows"]}
    assert rows["onnx checker"] == rows["static graph"] == rows["interface"] == "ok"
    if HAS_TENSORRT:
        assert any(k.endswith("build") and v == "ok" for k, v in rows.items()), rows


def test_validate_on_shared_footage(family_export, shared_videos):
    from runtime.validate import validate_export

    report = validate_export(family_export, shared_videos[0], progress=False)
    assert report.passed, report.table()
    assert report.metrics["index_agreement"] == 1.0 and report.metrics["cosine_min"] >= 0.99999


# ---- checkpoints and bad input -------------------------------------------------------------------------------------
def save_checkpoint(adapter, directory, processor):
    adapter.model.save_pretrained(directory)
    adapter.tokenizer.save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(processor))
    return directory


def test_local_checkpoint_loads(family, tmp_path):
    prep = family.preprocessing
    directory = save_checkpoint(family, tmp_path / "ckpt", {
        "size": {"height": prep.size, "width": prep.size}, "image_mean": list(prep.mean),
        "image_std": list(prep.std), "resample": 3})
    loaded = load_model(str(directory))
    assert type(loaded) is type(family) and loaded.preprocessing == prep and loaded.info.grid == family.info.grid
    frames = family.example_frames(VIDEO_FRAMES, seed=2)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.vision_aot(family_cfg(loaded)).encode(frames)[0],
                                   family.vision_aot(family_cfg(family)).encode(frames)[0], rtol=0, atol=0)
    assert loaded.tokenizer.convert_tokens_to_ids("<|video_pad|>") == family.video_token_id


@pytest.mark.parametrize("processor, why", [
    ({"size": {"height": 250, "width": 250}}, "does not fit the static grid"),
    ({"min_pixels": 3136, "max_pixels": 448 * 224}, "outside the processor's pixel range"),   # default 448² too many
])
def test_resolution_that_does_not_fit(tmp_path, capsys, processor, why):
    """Refused from config.json and the processor config alone, before any weights are read."""
    from aot_export.adapters.qwen2_5_vl import tiny_config

    directory = tmp_path / "ckpt"
    directory.mkdir()
    tiny_config().save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(processor))
    err = bad_input(capsys, ["export", "--model", str(directory), "--frames", "4", "--out", str(tmp_path / "out")])
    assert why in err and "processor config" in err
    assert not (tmp_path / "out").exists()


def test_frame_count_the_temporal_patch_does_not_divide(tmp_path, capsys):
    err = bad_input(capsys, ["export", "--model", "tiny-qwen2.5-vl", "--frames", "7", "--retention", "0.25",
                             "--out", str(tmp_path / "out")])
    assert "7 frames" in err and "multiple of 2" in err
    assert not (tmp_path / "out").exists()


def test_model_type_not_in_the_table(tmp_path, capsys):
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    err = bad_input(capsys, ["export", "--model", str(checkpoint), "--out", str(tmp_path / "out")])
    assert "'qwen2_vl' is not supported" in err
    assert {"qwen2_5_vl", "cosmos3_edge", "llava_onevision"} <= set(ADAPTERS) and all(t in err for t in ADAPTERS)


def test_full_size_builtins_name_their_tokenizers_placeholders():
    """The full-size built-ins carry the tiny tokenizer, so their configs take its placeholder ids: with the published
    checkpoints' (151656, 18, …) every prompt rendered 0 video placeholders and `run` refused after minutes of
    building weights. Checked on the configs alone, without the 3B / 2B weights."""
    from aot_export.adapters.cosmos3_edge import cosmos3_edge_config
    from aot_export.adapters.merged_grid import PLACEHOLDERS, builtin_tokenizer
    from aot_export.adapters.qwen2_5_vl import qwen2_5_vl_3b_config

    tokenizer = builtin_tokenizer()
    expected = {field: tokenizer.convert_tokens_to_ids(token) for field, token in PLACEHOLDERS.items()}
    for config in (qwen2_5_vl_3b_config(), cosmos3_edge_config()):
        assert {field: getattr(config, field) for field in PLACEHOLDERS} == expected


def test_tokenizer_config_mismatch_refused_before_weights(tmp_path, capsys):
    """A config whose placeholder ids are not its tokenizer's is refused from config.json and the tokenizer files,
    naming both ids (no weights in the directory: none are read)."""
    from aot_export.adapters.merged_grid import builtin_tokenizer
    from aot_export.adapters.qwen2_5_vl import tiny_config

    directory = tmp_path / "ckpt"
    config = tiny_config()
    config.video_token_id = 151656
    config.save_pretrained(directory)
    builtin_tokenizer().save_pretrained(directory)
    err = bad_input(capsys, ["export", "--model", str(directory), "--frames", "4", "--out", str(tmp_path / "out")])
    assert "<|video_pad|> is id 6" in err and "video_token_id is 151656" in err
    assert not (tmp_path / "out").exists()


# ---- 3-D positions for the LLM ---------------------------------------------------------------------------------------
PROMPT = "What happens in the video?"


def test_positions_match_hf_with_reduction_off(family):
    """All merged tokens at the positions of the full grid: the logits equal Hugging Face's own forward on the same
    frames and ids, and the positions equal its get_rope_index."""
    from aot_export.prompt_assembly import full_index
    from runtime.prompt import assemble, prefill_logits

    frames = family.example_frames(VIDEO_FRAMES, seed=5)
    steps = family.aot_frames(VIDEO_FRAMES)
    prompt = assemble(family, PROMPT, family.full_video_features(frames), full_index(steps, family.info.grid))
    assert prompt.visual_tokens == steps * family.info.grid ** 2
    ours = prefill_logits(family, prompt)
    pixels, grid_thw = family.pixel_values(frames)
    types = (prompt.input_ids == family.video_token_id).int() * 2
    with torch.inference_mode():
        theirs = family.model(input_ids=prompt.input_ids, pixel_values_videos=pixels, video_grid_thw=grid_thw,
                              mm_token_type_ids=types).logits[0]
        positions, _ = family.model.model.get_rope_index(prompt.input_ids, types, video_grid_thw=grid_thw)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert torch.equal(prompt.position_ids, positions)


def test_positions_of_a_long_video_match_hf(family):
    """Where a video's time axis outgrows its grid (many frames), every position still equals Hugging Face's
    get_rope_index (which continues text after a video at start + G, not past the largest t)."""
    from aot_export.prompt_assembly import full_index
    from runtime.prompt import assemble

    steps = 4 * family.info.grid                     # (steps - 1) · interval > G - 1 for every layout
    index = full_index(steps, family.info.grid)
    prompt = assemble(family, PROMPT, torch.zeros(len(index), family.info.hidden), index, steps)
    grid_thw = torch.tensor([[steps, family.grid.patches_per_side, family.grid.patches_per_side]])
    types = (prompt.input_ids == family.video_token_id).int() * 2
    positions, _ = family.model.model.get_rope_index(prompt.input_ids, types, video_grid_thw=grid_thw)
    assert torch.equal(prompt.position_ids, positions)


def test_reduced_tokens_keep_their_original_positions(family):
    from aot_export.prompt_assembly import full_index
    from runtime.prompt import assemble

    frames = family.example_frames(VIDEO_FRAMES, seed=6)
    cfg = family_cfg(family)
    with torch.inference_mode():
        tokens, index = family.vision_aot(cfg)(frames)
    full = assemble(family, PROMPT, family.full_video_features(frames), full_index(cfg.frames, cfg.grid))
    reduced = assemble(family, PROMPT, tokens, index, cfg.frames)
    assert reduced.visual_tokens == cfg.output_tokens < full.visual_tokens
    # The text after the video continues where it does after the full video.
    assert torch.equal(reduced.position_ids[:, 0, -1], full.position_ids[:, 0, -1])
    video = family.video_token_id

    def visual_positions(prompt):
        return prompt.position_ids[:, 0, prompt.input_ids[0] == video].T

    full_at = {tuple(key): tuple(pos) for key, pos in zip(full_index(cfg.frames, cfg.grid).tolist(),
                                                         visual_positions(full).tolist())}
    # In prompt order: Qwen2.5-VL keeps the reducer's order, Cosmos3-Edge groups it by frame.
    order = torch.arange(len(index)) if family.model_type == "qwen2_5_vl" else torch.argsort(index[:, 0], stable=True)
    assert [full_at[tuple(key)] for key in index[order].tolist()] == [tuple(p) for p in visual_positions(reduced).tolist()]
    # Updated keyframe anchors (the last A tokens of a clip) sit at their keyframe cells' positions.
    assert (index[-cfg.pooled_anchors:, 0] == 0).all()
    # Text after the video continues where the model's own rule puts it, whatever the reduction kept.
    def after_video(prompt):
        last = int((prompt.input_ids[0] == family.model.config.vision_end_token_id).nonzero().max())
        return prompt.position_ids[..., last:]

    assert after_video(full).shape[-1] > 5 and torch.equal(after_video(full), after_video(reduced))


def test_run_with_and_without_aot(family_export, family, shared_videos):
    """`aot-export run` on a family's export: the reduced video takes output_tokens prompt positions, the full one
    every merged token; the LLM (transformers fp32) decodes from the 3-D positions either way."""
    from runtime.pipeline import Pipeline

    cfg = family_cfg(family)
    reports = {reduce: Pipeline(str(family_export), llm="transformers", reduce=reduce, adapter=family).answer(
        shared_videos[0], PROMPT, max_new_tokens=3) for reduce in (True, False)}
    assert reports[True].visual_tokens == cfg.output_tokens
    assert reports[False].visual_tokens == cfg.frames * cfg.grid ** 2
    assert reports[False].prompt_tokens - reports[True].prompt_tokens == cfg.frames * cfg.grid ** 2 - cfg.output_tokens
    assert all(report.generated_tokens == 3 for report in reports.values())


def test_onnx_decoder_takes_3d_positions(tmp_path):
    """Qwen2.5-VL's text model through onnxruntime-genai's builder (fp32 here, to compare exactly; int4 is the same
    graph with 4-bit weights): prefill and decode logits equal the transformers decoder's on 3-D positions."""
    from runtime.llm import OnnxDecoder, TransformersDecoder, build_onnx_decoder
    from aot_export.prompt_assembly import full_index
    from runtime.prompt import assemble

    adapter = load_model("tiny-qwen2.5-vl")
    directory = build_onnx_decoder(adapter, tmp_path / "llm", precision="fp32", progress=False)
    frames = adapter.example_frames(VIDEO_FRAMES, seed=8)
    prompt = assemble(adapter, PROMPT, adapter.full_video_features(frames),
                      full_index(adapter.aot_frames(VIDEO_FRAMES), adapter.info.grid))
    want = TransformersDecoder(adapter).generate(prompt.embeds, 4, position_ids=prompt.position_ids)
    got = OnnxDecoder(directory, adapter).generate(prompt.embeds, 4, forced=want.tokens,
                                                   position_ids=prompt.position_ids)
    assert max(np.abs(a - b).max() for a, b in zip(want.step_logits, got.step_logits)) < 1e-4


def test_cosmos_int4_decoder_meets_the_chain_gates(tmp_path, capsys):
    """`quantize-llm` builds Cosmos3-Edge's text model, which onnxruntime-genai's builder lacks, with torch.onnx:
    every Linear's weight (lm_head included) as 4-bit MatMulNBits blocks; its first token and 16 teacher-forced
    tokens against the fp32 LLM, on 3-D positions, within the int4 chain gates."""
    from collections import Counter

    from torch import nn

    from aot_export.fidelity import CHAIN_GATES, gate_checks
    from runtime.chain import kl_divergence, top1_agreement
    from runtime.llm import OnnxDecoder, TransformersDecoder
    from aot_export.prompt_assembly import full_index
    from runtime.prompt import assemble

    out = tmp_path / "llm"
    assert main(["quantize-llm", "--model", "tiny-cosmos3-edge", "--out", str(out), "--quiet"]) == EXIT_OK, \
        capsys.readouterr().err
    manifest = json.loads((out / "llm.json").read_text())
    assert manifest["builder"] == "runtime.decoder_export" and manifest["precision"] == "int4"
    adapter = load_model("tiny-cosmos3-edge")
    linears = sum(isinstance(m, nn.Linear) for part in adapter.decoder() for m in part.modules())
    types = Counter(node.op_type for node in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node)
    assert types["MatMulNBits"] == linears and "MatMul" not in types
    frames = adapter.example_frames(VIDEO_FRAMES, seed=8)
    prompt = assemble(adapter, PROMPT, adapter.full_video_features(frames),
                      full_index(adapter.aot_frames(VIDEO_FRAMES), adapter.info.grid))
    want = TransformersDecoder(adapter).generate(prompt.embeds, 16, position_ids=prompt.position_ids)
    got = OnnxDecoder(out, adapter).generate(prompt.embeds, 16, forced=want.tokens, position_ids=prompt.position_ids)
    metrics = {"first_token_kl": kl_divergence(want.step_logits[0], got.step_logits[0]),
               **top1_agreement(want.step_logits, got.step_logits, CHAIN_GATES["int4"].decidable_margin)}
    assert all(gate_checks(metrics, CHAIN_GATES["int4"]).values()), metrics
    assert metrics["max_logit_error"] > 1e-3           # 4-bit weights: not the fp32 graph under another name


def test_chain_validation(family_export, shared_videos):
    """`validate --llm`: both sides' prompts carry their own 3-D positions; int8 against the fp32 reference."""
    from runtime.chain import validate_chain

    report = validate_chain(family_export, shared_videos[0], "transformers-int8", tokens=4, progress=False)
    assert report.passed, report.table()
    assert report.metrics["first_token_top1"] == 1.0


def test_visualize_draws_one_picture_per_temporal_patch(tmp_path, shared_videos):
    from runtime.visualize import visualize

    adapter = load_model("tiny-qwen2.5-vl")
    cfg = family_cfg(adapter)
    info = visualize(adapter, shared_videos[0], tmp_path / "overlay.png", cfg, frames_shown=None, progress=False)
    assert info["frames_shown"] == list(range(cfg.frames)) and info["random_weights"]
    assert (tmp_path / "overlay.png").stat().st_size == info["png_bytes"] > 0
