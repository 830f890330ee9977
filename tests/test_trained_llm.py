"""The LLM side on real weights: which int8 LLM `run` and `validate` may trust, and the answer on a bundle.

Cheap tests hold the defaults; the heavy ones need the trained fixture (`trained_checkpoint` skips without it) and
take minutes: an int8 ONNX LLM (`quantize-llm --precision int8`) passes the int8 chain gates where torch's dynamic
int8 (`transformers-int8`) does not, and a bundle with the trained LLM answers a text question in English.
"""

from __future__ import annotations

import inspect
import json

import pytest

from runtime.cli import EXIT_OK, main

QUESTION = "What is the capital of France? Answer in one sentence."


def bikes(shared_videos):
    return next((v for v in shared_videos if v.name == "bikes.mp4"), shared_videos[0])


def test_run_defaults_to_the_fp32_llm_not_dynamic_int8(tiny):
    from runtime.device.decoder import DEFAULT_LLM
    from runtime.llm import load_llm
    from runtime.pipeline import Pipeline

    assert DEFAULT_LLM == "transformers"
    assert inspect.signature(Pipeline).parameters["llm"].default == DEFAULT_LLM
    assert load_llm(DEFAULT_LLM, tiny).name == "transformers-fp32"


def test_transformers_int8_quantizes_lm_head_too(tiny):
    from runtime.llm import TransformersDecoder

    int8 = TransformersDecoder(tiny, int8=True)
    # quantize_dynamic swaps children only: a bare Linear lm_head used to stay fp32
    assert type(int8.lm_head).__module__.startswith("torch.ao.nn.quantized.dynamic")


def test_gguf_quantization_config_is_dropped_for_the_builder(tmp_path):
    from runtime.llm import drop_stale_gguf_config

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "qwen2", "quantization_config": {"quant_method": "gguf"}}))
    drop_stale_gguf_config(tmp_path)
    assert json.loads(path.read_text()) == {"model_type": "qwen2"}
    kept = {"model_type": "qwen2", "quantization_config": {"quant_method": "awq"}}
    path.write_text(json.dumps(kept))
    drop_stale_gguf_config(tmp_path)
    assert json.loads(path.read_text()) == kept


def test_int8_is_a_quantize_llm_precision():
    from runtime.decoder_export import check_settings
    from runtime.llm import ONNX_PRECISIONS

    assert "int8" in ONNX_PRECISIONS
    check_settings("int8", "cpu")                            # the torch.onnx route builds it too


@pytest.mark.heavy
def test_trained_int8_llm_passes_where_dynamic_int8_does_not(trained_checkpoint, trained_export, shared_videos,
                                                            tmp_path):
    from runtime.chain import validate_chain

    llm = tmp_path / "llm-int8"
    assert main(["quantize-llm", "--model", str(trained_checkpoint), "--precision", "int8", "--out", str(llm),
                 "--quiet"]) == EXIT_OK
    video = bikes(shared_videos)
    # measured on bikes: KL 0.0012, 7 of the 8 positions to EOS decidable, all agreeing
    onnx = validate_chain(trained_export, video, str(llm), prompt=QUESTION, tokens=16, progress=False, noise_draws=0)
    assert onnx.precision == "int8" and all(onnx.checks.values()), onnx.table()
    assert onnx.metrics["decidable_positions"] >= 1, onnx.table()
    # measured: first-token KL 4.1 on this prompt, 1.7 mean over four text prompts (gate 0.05)
    dynamic = validate_chain(trained_export, video, "transformers-int8", prompt=QUESTION, tokens=16, progress=False,
                             noise_draws=0)
    assert not dynamic.checks["first_token_kl"], dynamic.table()


@pytest.mark.heavy
def test_trained_bundle_answers_a_text_question(trained_checkpoint, trained_export, shared_videos, tmp_path):
    llm, bundle, out = tmp_path / "llm", tmp_path / "bundle", tmp_path / "run.json"
    assert main(["quantize-llm", "--model", str(trained_checkpoint), "--out", str(llm), "--quiet"]) == EXIT_OK
    assert main(["bundle", "--model", str(trained_export), "--llm", str(llm), "--out", str(bundle),
                 "--quiet"]) == EXIT_OK
    assert main(["run", "--model", str(bundle), "--video", str(bikes(shared_videos)), "--prompt", QUESTION,
                 "--quiet", "--json", str(out)]) == EXIT_OK
    report = json.loads(out.read_text())
    # measured: 'Paris is the capital of France.' (8 tokens, ended at <|im_end|>)
    assert "Paris" in report["answer"] and report["generated_tokens"] < 32, report["answer"]
    assert "<|" not in report["answer"]
