"""The trained fixture (issue #21, bench/trained_fixture.py): the DINOv2 → SigLIP mapping on small random towers
(default tier: no download), and the built fixture itself (heavy tier: skips without it)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import trained_fixture  # noqa: E402


def small_dinov2(layers=2, hidden=32, heads=2):
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, mlp_ratio=4,
                          patch_size=14, image_size=14 * 5, hidden_act="gelu", layer_norm_eps=1e-6)
    torch.manual_seed(0)
    model = Dinov2Model(config).eval()
    with torch.no_grad():       # LayerScale away from its init of 1, so that the fold is seen
        for layer in model.encoder.layer:
            layer.layer_scale1.lambda1.uniform_(0.05, 2.0)
            layer.layer_scale2.lambda1.uniform_(0.05, 2.0)
    return model


def siglip_tower(layers, hidden, heads, grid):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                                num_attention_heads=heads, image_size=grid * 14, patch_size=14, hidden_act="gelu",
                                layer_norm_eps=1e-6, vision_use_head=False)
    return SiglipVisionModel(config).eval()


def test_mapped_layers_equal_the_dinov2_layers():
    dinov2 = small_dinov2()
    tower = siglip_tower(2, 32, 2, grid=3)
    tower.load_state_dict(trained_fixture.map_dinov2_to_siglip(dinov2.state_dict(), 2, grid=3), strict=True)
    assert trained_fixture.check_layers(dinov2, tower, tokens=9) < 1e-5
    # Without the LayerScale fold the layers differ: the check can fail.
    state = trained_fixture.map_dinov2_to_siglip(dinov2.state_dict(), 2, grid=3)
    state["encoder.layers.0.mlp.fc2.weight"] = dinov2.encoder.layer[0].mlp.fc2.weight.detach().clone()
    tower.load_state_dict(state, strict=True)
    assert trained_fixture.check_layers(dinov2, tower, tokens=9) > 1e-3


def test_position_table_resized_without_the_cls_row():
    side, hidden = 5, 4
    table = torch.randn(1, 1 + side * side, hidden)
    same = trained_fixture.resized_positions(table, side)
    torch.testing.assert_close(same, table[0, 1:])               # same size: the patch rows, [CLS] dropped
    smaller = trained_fixture.resized_positions(table, 3)
    assert smaller.shape == (9, hidden)
    # the centre of an odd grid lands on the centre of the table
    torch.testing.assert_close(smaller[4], table[0, 1 + 12], atol=0.5, rtol=0)


def test_placeholders_renamed_only_over_padding_entries(tmp_path):
    vocab = {"a": 0, "b": 1, "[PAD2]": 2, "[PAD3]": 3}
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"vocab": vocab}, "added_tokens": []}))
    trained_fixture.name_placeholders(tmp_path, {"<image>": 2, "<video>": 3})
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    assert data["model"]["vocab"] == {"a": 0, "b": 1, "<image>": 2, "<video>": 3}
    assert [t["content"] for t in data["added_tokens"] if t["special"]] == ["<image>", "<video>"]
    with pytest.raises(SystemExit, match="not a padding entry"):
        trained_fixture.name_placeholders(tmp_path, {"<x>": 0})


# ---- the built fixture --------------------------------------------------------------------------------------------
@pytest.mark.heavy
def test_fixture_is_what_it_says(trained_checkpoint):
    from aot_export.adapters import load_model

    record = json.loads((trained_checkpoint / "fixture.json").read_text())
    assert max(record["checks"]["extraction_max_abs"], record["checks"]["layers_max_abs"]) \
        <= record["checks"]["tolerance"]
    adapter = load_model(str(trained_checkpoint))
    tokenizer = adapter.tokenizer
    assert tokenizer.convert_tokens_to_ids(["<image>", "<video>"]) == [151665, 151666]
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is the capital of France? "
                                                                       "Answer in one sentence."}]}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = adapter.model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer                       # a trained LLM, its own tokenizer, the checkpoint's template


@pytest.mark.heavy
def test_trained_tower_attention_is_peaked(trained_checkpoint, shared_videos):
    """What makes the fixture worth having: its score layers' attention is peaked (a random tower's rows are flat,
    mean row-max ≈ 1/N), so anchors hang on real score gaps."""
    from aot_export.adapters import load_model
    from aot_export.preprocess import preprocess_frames
    from aot_export.video import decode_frames

    adapter = load_model(str(trained_checkpoint))
    pixels = preprocess_frames(decode_frames(shared_videos[0], 2), adapter.preprocessing)
    tower = adapter._eager()
    with torch.inference_mode():
        out = tower(torch.from_numpy(pixels), output_attentions=True)
    row_max = [float(out.attentions[layer].amax(-1).mean()) for layer in adapter.score_layers]
    tokens = out.attentions[0].shape[-1]
    assert min(row_max) > 20 / tokens, row_max


@pytest.mark.heavy
def test_trained_export_validates_exactly(trained_export, shared_videos):
    from runtime.validate import validate_export

    report = validate_export(trained_export, shared_videos[-1], progress=False)
    assert report.passed, report.table()
    assert report.metrics["index_agreement"] == 1.0
    assert np.isfinite(report.metrics["cosine_min"])
