"""runtime/decoder_export.py: a family's text model with its KV cache through torch.onnx (GroupQueryAttention, the
cache bound in place) — Cosmos3-Edge, whose text model onnxruntime-genai's builder lacks, and any other family's
text model by the same route. Tiny built-ins with seeded random weights: the fp32 graphs must equal Hugging Face's
decoder; the int4 figures (tests/test_model_families.py) say nothing about trained models."""

import json
from collections import Counter

import numpy as np
import onnx
import pytest
import torch

from aot_export.adapters import load_model
from aot_export.errors import InputError
from aot_export.prompt_assembly import full_index
from runtime.decoder_export import (ATTENTION, DecoderShape, KVCacheDecoder, attention_implementation,
                                    register_attention)
from runtime.device.decoder import OrtDecoder
from runtime.llm import OnnxDecoder, TransformersDecoder, build_onnx_decoder
from runtime.prompt import assemble

PROMPT = "What is happening in this video?"
VIDEO_FRAMES = 4


def family_prompt(adapter, seed: int = 8):
    """Every visual token of a random clip in the family's prompt, and the positions `generate` takes with it."""
    frames = adapter.example_frames(VIDEO_FRAMES, seed=seed)
    visual = adapter.full_video_features(frames)
    if adapter.video_layout is None:
        visual = visual[:-1]                                        # the newline is appended by assemble
    prompt = assemble(adapter, PROMPT, visual, full_index(adapter.aot_frames(VIDEO_FRAMES), adapter.info.grid))
    return prompt, prompt.generate_kwargs


def op_types(directory) -> Counter:
    graph = onnx.load(str(directory / "model.onnx"), load_external_data=False).graph
    return Counter(node.op_type for node in graph.node)


def max_logit_difference(adapter, directory, tokens: int) -> float:
    """Prefill and `tokens` − 1 decode steps of the ONNX decoder against the transformers fp32 decoder, teacher
    forced on the reference's tokens."""
    prompt, kwargs = family_prompt(adapter)
    want = TransformersDecoder(adapter).generate(prompt.embeds, tokens, **kwargs)
    got = OnnxDecoder(directory, adapter).generate(prompt.embeds, tokens, forced=want.tokens, **kwargs)
    assert len(got.step_logits) == len(want.step_logits) == tokens
    return max(float(np.abs(a - b).max()) for a, b in zip(want.step_logits, got.step_logits))


@pytest.fixture(scope="module")
def cosmos():
    return load_model("tiny-cosmos3-edge")


@pytest.fixture(scope="module")
def cosmos_fp32(cosmos, tmp_path_factory):
    return build_onnx_decoder(cosmos, tmp_path_factory.mktemp("llm") / "fp32", precision="fp32", progress=False)


def test_cosmos_fp32_decoder_equals_transformers(cosmos, cosmos_fp32):
    """3-D positions on the prompt, then decode steps: the exported graph computes Hugging Face's text model."""
    manifest = json.loads((cosmos_fp32 / "llm.json").read_text())
    assert manifest["builder"] == "runtime.decoder_export" and manifest["precision"] == "fp32"
    types = op_types(cosmos_fp32)
    layers = cosmos.decoder()[0].config.num_hidden_layers
    assert types["GroupQueryAttention"] == layers and "MatMulNBits" not in types
    assert max_logit_difference(cosmos, cosmos_fp32, tokens=5) < 1e-4


def test_cosmos_kv_bound_in_place_equals_the_numpy_loop(cosmos, cosmos_fp32):
    """One preallocated buffer per layer and side, bound as past and present, written in place by the kernel: the
    same logits as feeding the grown cache back every step."""
    prompt, _ = family_prompt(cosmos)
    positions = prompt.position_ids.numpy()

    def embed(token):
        return cosmos.embed_tokens(torch.tensor([[token]])).detach().float().numpy()

    numpy_kv, bound = (OrtDecoder(cosmos_fp32, kv=kv) for kv in ("numpy", "bound"))
    a = numpy_kv.generate(prompt.embeds.numpy(), 12, embed, position_ids=positions)
    b = bound.generate(prompt.embeds.numpy(), 12, embed, forced=a.tokens, position_ids=positions)
    assert len(a.tokens) == 12 and b.tokens == a.tokens
    np.testing.assert_allclose(np.stack(b.step_logits), np.stack(a.step_logits), atol=1e-5, rtol=0)


def test_the_traced_module_runs_in_pytorch_as_hugging_face_does(cosmos):
    """What the exporter traces, run eagerly (the custom op's own body): a prefill, then a decode step fed its
    presents, gives the transformers decoder's logits — the wrapper, the attention function and the op agree with
    Hugging Face before any ONNX is involved."""
    stack, lm_head = cosmos.decoder()
    shape = DecoderShape.of(stack, position_axes=3)
    prompt, kwargs = family_prompt(cosmos)
    want = TransformersDecoder(cosmos).generate(prompt.embeds, 2, **kwargs)
    module = KVCacheDecoder(stack, lm_head).eval()
    register_attention()
    empty = tuple(torch.zeros(1, shape.kv_heads, 0, shape.head_size) for _ in range(2 * shape.layers))
    length = prompt.embeds.shape[1]
    with attention_implementation(stack, ATTENTION), torch.inference_mode():
        first, *present = module(prompt.embeds, torch.ones(1, length, dtype=torch.int64), empty,
                                 prompt.position_ids)
        step = torch.full((3, 1, 1), int(prompt.position_ids.max()) + 1)
        token = cosmos.embed_tokens(torch.tensor([[want.tokens[0]]])).float()
        second, *_ = module(token, torch.ones(1, length + 1, dtype=torch.int64), tuple(present), step)
    assert stack.config._attn_implementation != ATTENTION          # the model's own attention again
    for got, expected in zip((first, second), want.step_logits):
        np.testing.assert_allclose(got[0, -1].numpy(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model", ["tiny-llava-ov", "tiny-qwen2.5-vl"])
def test_any_family_text_model_exports(model, tmp_path):
    """The route is not Cosmos3-Edge's own: LLaVA-OneVision's Qwen2 text model (1-D positions derived from the
    mask in the graph) and Qwen2.5-VL's (3-D positions), declared as families genai's builder does not take."""
    adapter = load_model(model)
    adapter.genai_builder = False
    directory = build_onnx_decoder(adapter, tmp_path / "llm", precision="fp32", progress=False)
    assert json.loads((directory / "llm.json").read_text())["builder"] == "runtime.decoder_export"
    has_positions = "position_ids" in {i.name for i in onnx.load(str(directory / "model.onnx"),
                                                                   load_external_data=False).graph.input}
    assert has_positions == (adapter.video_layout is not None)
    assert max_logit_difference(adapter, directory, tokens=3) < 1e-4


@pytest.mark.parametrize("precision, ep, message", [("fp16", "cpu", "int4, int8 or fp32"), ("int4", "cuda", "--ep cpu")])
def test_unsupported_settings_are_refused_before_any_work(cosmos, tmp_path, precision, ep, message):
    with pytest.raises(InputError, match=message):
        build_onnx_decoder(cosmos, tmp_path / "llm", precision=precision, execution_provider=ep, progress=False)
    assert not (tmp_path / "llm").exists()


def test_attention_the_op_cannot_reproduce_is_refused(tmp_path):
    """A sliding-window layer (Qwen2's option) would attend differently through GroupQueryAttention's full causal
    mask: the export refuses it with the exporter's wrapping removed, and writes nothing."""
    adapter = load_model("tiny-llava-ov")
    adapter.genai_builder = False
    for layer in adapter.decoder()[0].layers:
        layer.self_attn.sliding_window = 16          # what Qwen2 sets on a layer of type "sliding_attention"
    with pytest.raises(InputError, match="sliding_window"):
        build_onnx_decoder(adapter, tmp_path / "llm", precision="fp32", progress=False)
    assert not (tmp_path / "llm").exists()
