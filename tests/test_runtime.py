"""runtime/: prompt assembly against Hugging Face's own forward, LLM backends (fp32, int8, int4 ONNX), the
pipeline with and without AOT, chain validation, streaming clips and bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime.cli import EXIT_BAD_INPUT, EXIT_OK, main
from aot_export.errors import InputError
from conftest import TINY_CFG
from runtime.chain import kl_divergence, validate_chain
from runtime.llm import LLM_MANIFEST, OnnxDecoder, TransformersDecoder
from runtime.pipeline import Pipeline
from runtime.prompt import assemble
from aot_export.video import rolling_clips, synthesize_clip

PROMPT = "What is happening in this video?"
CFG = TINY_CFG


@pytest.fixture(scope="module")
def onnx_llm(tiny_llm):
    return tiny_llm


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return synthesize_clip(tmp_path_factory.mktemp("v") / "clip.mp4", frames=24, size=160)


def test_prompt_assembly_matches_hf_forward(tiny):
    """All visual tokens through our assembly and decoder give the logits of Hugging Face's own forward with
    pixel_values_videos (its video path, newline and placeholder expansion)."""
    frames = tiny.example_frames(4, seed=3)
    visual = tiny.full_video_features(frames)[:-1]
    inputs = assemble(tiny, PROMPT, visual)
    assert inputs.visual_tokens == 4 * 196 + 1
    assert (inputs.input_ids == tiny.video_token_id).sum() == inputs.visual_tokens
    with torch.inference_mode():
        theirs = tiny.model(input_ids=inputs.input_ids, pixel_values_videos=frames.unsqueeze(0)).logits[0, -1]
    ours = TransformersDecoder(tiny).generate(inputs.embeds, 1).step_logits[0]
    np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("prompt, words", [("", "empty"), ("   ", "empty")])
def test_bad_prompts(tiny, prompt, words):
    with pytest.raises(InputError, match=words):
        assemble(tiny, prompt, torch.zeros(3, 64))


def test_a_typed_video_token_is_text(tiny):
    """`<video>` typed by the user is ordinary text: the video goes where the template puts it, once."""
    inputs = assemble(tiny, "<video> twice?", torch.zeros(3, 64))
    assert (inputs.input_ids == tiny.video_token_id).sum() == 3 + 1


def test_vision_width_must_match_the_llm(tiny):
    with pytest.raises(InputError, match="hidden size"):
        assemble(tiny, PROMPT, torch.zeros(3, 32))


def test_int8_decoder_is_quantized_and_close(tiny):
    embeds = assemble(tiny, PROMPT, tiny.full_video_features(tiny.example_frames(2))[:-1]).embeds
    reference = TransformersDecoder(tiny).generate(embeds, 4)
    int8 = TransformersDecoder(tiny, int8=True)
    assert any(type(m).__module__.startswith("torch.ao.nn.quantized.dynamic") for m in int8.decoder.modules())
    quantized = int8.generate(embeds, 4, forced=reference.tokens)
    assert 0 < np.abs(quantized.step_logits[0] - reference.step_logits[0]).max() < 0.1
    assert kl_divergence(reference.step_logits[0], quantized.step_logits[0]) < 0.01


def test_onnx_int4_decoder(tiny, onnx_llm):
    manifest = json.loads((onnx_llm / LLM_MANIFEST).read_text())
    assert manifest["precision"] == "int4" and manifest["inputs_embeds"]
    import onnx

    model = onnx.load(str(onnx_llm / "model.onnx"), load_external_data=False)
    assert any(node.op_type == "MatMulNBits" for node in model.graph.node)
    assert "inputs_embeds" in {i.name for i in model.graph.input}
    embeds = assemble(tiny, PROMPT, tiny.full_video_features(tiny.example_frames(2))[:-1]).embeds
    reference = TransformersDecoder(tiny).generate(embeds, 6)
    deployed = OnnxDecoder(onnx_llm, tiny).generate(embeds, 6, forced=reference.tokens)
    # the KV-cache loop: every step's logits track the fp32 model on the same prefix
    for ours, theirs in zip(deployed.step_logits, reference.step_logits):
        assert kl_divergence(theirs, ours) < 0.05


def test_onnx_llm_from_another_model_is_refused(tiny, onnx_llm, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(onnx_llm, other)
    manifest = json.loads((other / LLM_MANIFEST).read_text())
    manifest["config_hash"] = "0" * 16
    (other / LLM_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="quantize-llm"):
        OnnxDecoder(other, tiny)


@pytest.mark.parametrize("reduce", [True, False])
def test_pipeline_with_and_without_aot(tiny_export, tiny, clip, reduce):
    with Pipeline(str(tiny_export), llm="transformers", reduce=reduce, adapter=tiny) as pipeline:
        report = pipeline.answer(clip, PROMPT, max_new_tokens=4)
        assert (pipeline.vision is not None and pipeline.vision.is_active) == reduce
    assert pipeline.vision is None or not pipeline.vision.is_active
    expected = (CFG.output_tokens if reduce else CFG.frames * CFG.cells_per_frame) + 1
    assert report.visual_tokens == expected
    assert report.generated_tokens >= 1 and report.seconds["LLM prefill"] > 0
    assert report.vision_backend.startswith("onnxruntime") == reduce


def test_torch_backend_equals_onnxruntime(tiny_export, tiny, clip):
    from aot_export.fidelity import cosine_rows
    from aot_export.preprocess import preprocess_frames
    from aot_export.video import decode_frames

    with Pipeline(str(tiny_export), llm="transformers", adapter=tiny) as ort_run, \
            Pipeline(str(tiny_export), backend="torch", llm="transformers", adapter=tiny) as torch_run:
        assert (ort_run.vision.backend, torch_run.vision.backend) == ("onnxruntime", "torch")
        pixels = preprocess_frames(decode_frames(clip, CFG.frames), ort_run.preprocessing)
        # The synthetic clip's flat colours make exact ties in the hard-merge argmax, which rounding may break
        # either way: held to cosine, not to the last bit.
        ours, reference = ort_run.visual_tokens(pixels).numpy(), torch_run.visual_tokens(pixels).numpy()
    assert cosine_rows(ours, reference).min() > 0.9999


def test_chain_validation_fp32_and_int4(tiny_export, tiny, clip, onnx_llm):
    fp32 = validate_chain(tiny_export, clip, "transformers", tokens=6, model=tiny, progress=False)
    assert fp32.passed, fp32.table()
    assert fp32.metrics["first_token_kl"] < 1e-9 and fp32.metrics["teacher_forced_top1_all"] == 1.0
    assert fp32.metrics["decidable_positions"] == 6            # fp32 logits agree to ~1e-7: every position counts
    int4 = validate_chain(tiny_export, clip, str(onnx_llm), tokens=6, model=tiny, progress=False)
    assert int4.precision == "int4" and 0 < int4.metrics["first_token_kl"] < 0.1, int4.table()
    # Measured: the int4 chain passes with the top-1 rule that ignores positions whose reference top-two logits
    # are within the deployed error; at least one position must be decidable or the top-1 gate says nothing.
    assert int4.passed, int4.table()
    assert int4.metrics["decidable_positions"] >= 1, int4.table()


def test_top1_counts_only_decidable_disagreements():
    from runtime.chain import top1_agreement

    reference = [np.array([0.0, 1.0, 5.0]), np.array([0.0, 2.0, 2.05]), np.array([3.0, 0.0, 0.0])]
    # errors 0.1 at every position: the median bound is 0.2, so position 1 (margin 0.05) is undecidable
    flipped_tie = [reference[0] + [0, 0, 0.1], reference[1] + [0, 0.1, -0.1], reference[2] - [0.1, 0, 0]]
    m = top1_agreement(reference, flipped_tie)
    assert m["decidable_positions"] == 2 and m["teacher_forced_top1"] == 1.0
    assert m["teacher_forced_top1_all"] == pytest.approx(2 / 3) and m["decidable_margin"] == pytest.approx(0.2)
    # one decisive flip where the error is larger than the chain's typical one is counted
    decisive = [reference[0] + [0, 0, 0.1], reference[1] + [0, 0, 0.1], reference[2] + [-3.0, 0.1, 0]]
    m = top1_agreement(reference, decisive)
    assert m["teacher_forced_top1"] == pytest.approx(2 / 3) and m["first_token_top1"] == 1.0


def test_rolling_clips():
    feed = (np.full((4, 4, 3), i, dtype=np.uint8) for i in range(20))
    clips = list(rolling_clips(feed, frames=4, window=8, stride=4))
    assert len(clips) == 4                       # after frames 8, 12, 16, 20
    assert [int(c[0, 0, 0, 0]) for c in clips] == [0, 4, 8, 12]
    assert [int(c[-1, 0, 0, 0]) for c in clips] == [6, 10, 14, 18]
    with pytest.raises(InputError, match="window"):
        list(rolling_clips(iter([]), frames=8, window=4, stride=1))


def test_cli_run_and_bad_input(tiny_export, clip, tmp_path, capsys):
    report = tmp_path / "run.json"
    assert main(["run", "--model", str(tiny_export), "--video", str(clip), "--prompt", PROMPT, "--llm",
                 "transformers", "--max-new-tokens", "3", "--json", str(report)]) == EXIT_OK
    assert json.loads(report.read_text())["visual_tokens"] == CFG.output_tokens + 1
    assert main(["run", "--model", str(tiny_export), "--video", str(clip), "--prompt", " "]) == EXIT_BAD_INPUT
    assert main(["run", "--model", str(tiny_export), "--video", str(tmp_path / "none.mp4"), "--prompt", PROMPT,
                 "--llm", "transformers"]) == EXIT_BAD_INPUT
    assert main(["run", "--model", str(tiny_export), "--video", str(clip), "--prompt", PROMPT,
                 "--backend", "tensorrt"]) == EXIT_BAD_INPUT
    assert main(["run", "--model", str(tiny_export), "--video", str(clip), "--prompt", PROMPT,
                 "--llm", str(tmp_path)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "prompt is empty" in err and "no such video" in err and "engine directory" in err and "llm.json" in err


def test_onnx_llm_is_verified_on_load(tiny, onnx_llm, tmp_path, clip, capsys):
    """Sizes always, sha256 unless skipped; a missing file, a JSON list, a CUDA build on CPU: one line each."""
    import shutil

    def copy(name):
        return Path(shutil.copytree(onnx_llm, tmp_path / name))

    manifest = json.loads((onnx_llm / LLM_MANIFEST).read_text())
    weights = max(manifest["files"], key=lambda name: (onnx_llm / name).stat().st_size)
    tampered = copy("tampered")
    data = bytearray((tampered / weights).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tampered / weights).write_bytes(bytes(data))
    with pytest.raises(InputError, match="sha256 differs"):
        OnnxDecoder(tampered, tiny)
    assert main(["run", "--model", "tiny-llava-ov", "--video", str(clip), "--prompt", PROMPT, "--llm",
                 str(tampered), "--max-new-tokens", "2"]) == EXIT_BAD_INPUT
    assert "changed after it was built" in capsys.readouterr().err
    OnnxDecoder(tampered, tiny, verify_hashes=False)  # --skip-hash: sizes only, as the user asked
    assert main(["run", "--model", "tiny-llava-ov", "--video", str(clip), "--prompt", PROMPT, "--llm",
                 str(tampered), "--max-new-tokens", "2", "--skip-hash"]) == EXIT_OK, capsys.readouterr().err
    missing = copy("missing")
    (missing / weights).unlink()
    with pytest.raises(InputError, match=f"{weights} is missing \\(llm.json lists it\\)"):
        OnnxDecoder(missing, tiny)
    cuda = copy("cuda")
    (cuda / LLM_MANIFEST).write_text(json.dumps({**manifest, "execution_provider": "cuda"}))
    with pytest.raises(InputError, match="built for the cuda execution provider"):
        OnnxDecoder(cuda, tiny)
    listed = copy("listed")
    (listed / LLM_MANIFEST).write_text("[]")
    with pytest.raises(InputError, match="JSON list, not an object"):
        OnnxDecoder(listed, tiny)
