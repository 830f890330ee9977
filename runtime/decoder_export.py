"""An ONNX decoder for a text model onnxruntime-genai's builder does not take (Cosmos3-Edge): the Hugging Face text
model with its KV cache through the dynamo exporter, its MatMul weights then 4-bit (`int4`) or 8-bit (`int8`) blocks
of 32 rows (ONNX Runtime's `MatMulNBits`; the weights are what is quantized).

The graph is the one `runtime.device.decoder.OrtDecoder` runs for a genai-built decoder: `inputs_embeds [1, S, H]`,
`attention_mask [1, total]`, `position_ids [3, 1, S]` (families with 3-D rotary positions; the others derive 1-D
positions from the mask, as genai's graphs do), `past_key_values.{i}.key/value [1, kv_heads, past, head]` →
`logits [1, 1, V]` (the last position: the only one decoding reads) and `present.{i}.key/value`.

Attention is ONNX Runtime's `com.microsoft::GroupQueryAttention`, as in genai's graphs: it masks causally from the
valid length (`seqlens_k` = sum(mask) − 1, `total_sequence_length` = the mask's width) and, when past and present
are one buffer, writes each step's key/value into it in place, so the runtime's bound cache works unchanged. Hugging
Face applies the rotary embedding (3-D sections included) before attention, so the op gets `do_rotary` 0.

How it is traced: an attention function registered with transformers' `AttentionInterface` (its extension point)
calls a torch custom op that the exporter translates into the ONNX Runtime op; the past tensors reach it, and the
presents leave it, through a `LayerCache` the wrapper passes down the text model's forward kwargs. With an
implementation the mask interface does not know, transformers builds no mask. The text model keeps its own
attention implementation outside `attention_implementation(...)`.
"""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import onnx
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aot_export.errors import InputError
from aot_export.onnx_export import OPSET, quiet_exporter
from aot_export.onnx_io import save_graph
from aot_export.progress import Stages
from calibration.weight_only import quantizable_nodes, quantize_graph

from .device.decoder import GENAI_CONFIG

GRAPH = "model.onnx"
BUILDER = "runtime.decoder_export"
PRECISIONS = ("int4", "int8", "fp32")
EXECUTION_PROVIDERS = ("cpu",)
BLOCK_SIZE = 32                        # MatMulNBits: rows per scale, at 4 and at 8 bits
# The name the attention function is registered under in transformers' AttentionInterface.
ATTENTION = "onnx_group_query_attention"


# ---- the op: com.microsoft::GroupQueryAttention -------------------------------------------------------------------
def group_query_attention_schema() -> onnx.defs.OpSchema:
    """The part of ONNX Runtime's GroupQueryAttention schema the decoder uses (onnx carries no com.microsoft
    schemas, and the exporter builds a node only from one): q/k/v [B, S, heads·d], the past, the valid lengths."""
    Param, Attr = onnx.defs.OpSchema.FormalParameter, onnx.defs.OpSchema.Attribute
    return onnx.defs.OpSchema(
        "GroupQueryAttention", "com.microsoft", 1,
        inputs=[Param(name, "T") for name in ("query", "key", "value", "past_key", "past_value")]
        + [Param("seqlens_k", "M"), Param("total_sequence_length", "M")],
        outputs=[Param(name, "T") for name in ("output", "present_key", "present_value")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "activations and cache"),
                          ("M", ["tensor(int32)"], "lengths")],
        attributes=[Attr("num_heads", onnx.defs.OpSchema.AttrType.INT, "query heads"),
                    Attr("kv_num_heads", onnx.defs.OpSchema.AttrType.INT, "key/value heads"),
                    Attr("scale", onnx.defs.OpSchema.AttrType.FLOAT, "softmax scale")])


@torch.library.custom_op("aot_decoder::group_query_attention", mutates_args=())
def group_query_attention(query: Tensor, key: Tensor, value: Tensor, past_key: Tensor, past_value: Tensor,
                          seqlens_k: Tensor, total_sequence_length: Tensor, num_heads: int, kv_num_heads: int,
                          scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """What the ONNX Runtime kernel computes when the past is a separate buffer whose every position is valid
    (so `seqlens_k` and `total_sequence_length` add nothing): causal attention of the S new queries over past + new
    keys; presents [B, kv_heads, past + S, d]."""
    batch, length, _ = query.shape
    head = past_key.shape[-1]

    def heads(x: Tensor, count: int) -> Tensor:
        return x.view(batch, length, count, head).transpose(1, 2)

    present_key = torch.cat([past_key, heads(key, kv_num_heads)], dim=2)
    present_value = torch.cat([past_value, heads(value, kv_num_heads)], dim=2)
    total = present_key.shape[2]
    causal = torch.ones(length, total, dtype=torch.bool).tril(total - length)
    groups = num_heads // kv_num_heads
    out = F.scaled_dot_product_attention(heads(query, num_heads), present_key.repeat_interleave(groups, 1),
                                         present_value.repeat_interleave(groups, 1), attn_mask=causal, scale=scale)
    return out.transpose(1, 2).reshape(batch, length, -1), present_key, present_value


@group_query_attention.register_fake
def _group_query_attention_shapes(query, key, value, past_key, past_value, seqlens_k, total_sequence_length,
                                  num_heads, kv_num_heads, scale):
    batch, length, _ = query.shape
    present = (batch, kv_num_heads, past_key.shape[2] + length, past_key.shape[3])
    return query.new_empty(query.shape), past_key.new_empty(present), past_value.new_empty(present)


def group_query_attention_onnx(query, key, value, past_key, past_value, seqlens_k, total_sequence_length,
                               num_heads: int, kv_num_heads: int, scale: float):
    """The exporter's translation of the custom op: one com.microsoft GroupQueryAttention node."""
    import onnxscript

    op = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "GroupQueryAttention",
                              group_query_attention_schema())
    return op(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, num_heads=num_heads,
              kv_num_heads=kv_num_heads, scale=scale)


# ---- the attention function transformers calls -------------------------------------------------------------------
@dataclass
class LayerCache:
    """What the attention function of layer i reads (`past[2i]`, `past[2i + 1]`, the valid lengths) and leaves
    (`present[i]`) during one forward pass of the wrapper."""

    past: tuple[Tensor, ...]               # key, value of every layer, in layer order
    seqlens_k: Tensor                      # [B] int32: valid length − 1
    total_sequence_length: Tensor          # [] int32: the mask's width
    present: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)


# Features of Hugging Face attention layers GroupQueryAttention is not asked to reproduce here.
UNSUPPORTED_ATTENTION = ("sliding_window", "softcap", "s_aux")


def group_query_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                                  attention_mask: Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                                  layer_cache: LayerCache | None = None, **kwargs) -> tuple[Tensor, None]:
    """transformers' attention-function signature: query [B, heads, S, d], key/value [B, kv_heads, S, d] (rotary
    applied, no cache) → [B, S, heads·d]. `attention_mask` is None: the op masks causally itself."""
    if layer_cache is None:
        raise RuntimeError(f"the {ATTENTION!r} attention runs only inside KVCacheDecoder, which passes layer_cache")
    used = [name for name in UNSUPPORTED_ATTENTION if kwargs.get(name) is not None]
    if used:
        raise InputError(f"the text model's attention uses {', '.join(used)}, which the ONNX decoder export does not "
                         "map onto GroupQueryAttention; run this LLM with --llm transformers")
    batch, heads, length, head = query.shape
    kv_heads = key.shape[1]

    def flat(x: Tensor) -> Tensor:
        return x.transpose(1, 2).reshape(batch, length, -1)

    layer = module.layer_idx
    out, present_key, present_value = group_query_attention(
        flat(query), flat(key), flat(value), layer_cache.past[2 * layer], layer_cache.past[2 * layer + 1],
        layer_cache.seqlens_k, layer_cache.total_sequence_length, heads, kv_heads,
        float(head ** -0.5 if scaling is None else scaling))
    layer_cache.present[layer] = (present_key, present_value)
    return out, None


def register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, group_query_attention_forward)


@contextmanager
def attention_implementation(stack: nn.Module, name: str) -> Iterator[None]:
    """`stack` (a transformers model) runs attention `name` inside the block and its own one again after it."""
    previous = stack.config._attn_implementation
    stack.set_attn_implementation(name)
    try:
        yield
    finally:
        stack.set_attn_implementation(previous)


# ---- the exported module ----------------------------------------------------------------------------------------
def positions_from_mask(attention_mask: Tensor, length: int) -> Tensor:
    """[B, S] 1-D positions of the S newest tokens: their index among the valid ones (as genai's graphs derive
    them), for a text model that takes no explicit positions from the runtime."""
    return (attention_mask.cumsum(-1) - 1)[:, -length:]


class KVCacheDecoder(nn.Module):
    """The text model and its lm_head with the cache as inputs and outputs: (inputs_embeds [B, S, H],
    attention_mask [B, total], past (key, value of every layer)[, position_ids [3, B, S]]) → logits of the last
    position [B, 1, V], then every layer's present key and value. Run it inside
    `attention_implementation(stack, ATTENTION)`."""

    def __init__(self, stack: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.stack, self.lm_head = stack, lm_head
        self.layers = stack.config.num_hidden_layers

    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor, past: tuple[Tensor, ...],
                position_ids: Tensor | None = None) -> tuple[Tensor, ...]:
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, inputs_embeds.shape[1])
        cache = LayerCache(past, (attention_mask.sum(-1) - 1).to(torch.int32),
                           torch.tensor(attention_mask.shape[1], dtype=torch.int32))
        hidden = self.stack(inputs_embeds=inputs_embeds, position_ids=position_ids, use_cache=False,
                            layer_cache=cache).last_hidden_state
        logits = self.lm_head(hidden[:, -1:])
        return (logits, *(tensor for layer in range(self.layers) for tensor in cache.present[layer]))


# ---- the graph ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecoderShape:
    """The text model's dimensions the graph and genai_config.json carry."""

    layers: int
    heads: int
    kv_heads: int
    head_size: int
    hidden: int
    vocab: int
    position_axes: int          # as `ModelAdapter.position_axes`: 3, an explicit input; 1, derived from the mask

    @classmethod
    def of(cls, stack: nn.Module, position_axes: int) -> "DecoderShape":
        config = stack.config
        head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads, head,
                   config.hidden_size, config.vocab_size, position_axes)

    @property
    def explicit_positions(self) -> bool:
        return self.position_axes == 3

    @property
    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{side}" for i in range(self.layers) for side in ("key", "value")]

    @property
    def present_names(self) -> list[str]:
        return [name.replace("past_key_values", "present") for name in self.past_names]

    @property
    def input_names(self) -> list[str]:
        return ["inputs_embeds", "attention_mask", *self.past_names,
                *(["position_ids"] if self.explicit_positions else [])]


def example_inputs(shape: DecoderShape, past: int = 3, length: int = 4) -> tuple:
    """Inputs to trace with: lengths above 1 and unlike each other, so that no dimension is specialised."""
    g = torch.Generator().manual_seed(0)
    cache = tuple(torch.randn(1, shape.kv_heads, past, shape.head_size, generator=g)
                  for _ in range(2 * shape.layers))
    positions = torch.arange(past, past + length).expand(3, 1, length).clone()
    return (torch.randn(1, length, shape.hidden, generator=g), torch.ones(1, past + length, dtype=torch.int64),
            cache, *((positions,) if shape.explicit_positions else ()))


def dynamic_shapes(shape: DecoderShape) -> tuple:
    Dim = torch.export.Dim
    length, total, past = Dim("sequence_length"), Dim("total_sequence_length"), Dim("past_sequence_length")
    return ({1: length}, {1: total}, tuple({2: past} for _ in range(2 * shape.layers)),
            *(({2: length},) if shape.explicit_positions else ()))


def export_graph(stack: nn.Module, lm_head: nn.Module, shape: DecoderShape, path: Path) -> None:
    """`KVCacheDecoder` through the dynamo exporter, written to `path` (weights beside it)."""
    register_attention()
    module = KVCacheDecoder(stack, lm_head).eval()
    with attention_implementation(stack, ATTENTION), quiet_exporter(), torch.no_grad(), warnings.catch_warnings():
        # inputs_embeds and position_ids share the sequence axis; the exporter says so once per axis
        warnings.filterwarnings("ignore", message="# The axis name", category=UserWarning)
        try:
            program = torch.onnx.export(
                module, example_inputs(shape), dynamo=True, opset_version=OPSET, input_names=shape.input_names,
                output_names=["logits", *shape.present_names], dynamic_shapes=dynamic_shapes(shape), verbose=False,
                custom_translation_table={torch.ops.aot_decoder.group_query_attention.default:
                                          group_query_attention_onnx})
        except Exception as exc:
            refused = input_error_behind(exc)
            if refused is None:
                raise
            raise InputError(str(refused)) from exc
    program.save(path, external_data=True)


def input_error_behind(exc: BaseException | None) -> InputError | None:
    """The InputError the traced code raised, which the exporter reports wrapped in its own errors."""
    while exc is not None and not isinstance(exc, InputError):
        exc = exc.__cause__ or exc.__context__
    return exc


def nbit_weights(model: onnx.ModelProto, bits: int = 4) -> tuple[onnx.ModelProto, int]:
    """Every MatMul with a constant weight (lm_head included) as symmetric `bits`-bit blocks of `BLOCK_SIZE` rows;
    the graph and how many were quantized."""
    nodes = quantizable_nodes(model)
    return quantize_graph(model, nodes, BLOCK_SIZE, bits=bits), len(nodes)


def without_trace_metadata(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` without the exporter's per-node metadata (stack traces, fx nodes, module scopes): most of the graph
    file's bytes, read by nothing after quantization chose its MatMuls."""
    for node in model.graph.node:
        del node.metadata_props[:]
    return model


def genai_config(shape: DecoderShape, model_type: str, context_length: int) -> dict:
    """genai_config.json in onnxruntime-genai's layout, with what `OrtDecoder` and the bundle read."""
    past, present = "past_key_values.%d", "present.%d"
    return {"model": {
        "type": model_type, "vocab_size": shape.vocab, "context_length": context_length,
        "decoder": {"filename": GRAPH, "head_size": shape.head_size, "hidden_size": shape.hidden,
                    "num_attention_heads": shape.heads, "num_hidden_layers": shape.layers,
                    "num_key_value_heads": shape.kv_heads,
                    "inputs": {"inputs_embeds": "inputs_embeds", "attention_mask": "attention_mask",
                               **({"position_ids": "position_ids"} if shape.explicit_positions else {}),
                               "past_key_names": past + ".key", "past_value_names": past + ".value"},
                    "outputs": {"logits": "logits", "present_key_names": present + ".key",
                                "present_value_names": present + ".value"}}},
        "search": {"past_present_share_buffer": True, "max_length": context_length}}


def check_settings(precision: str, execution_provider: str) -> None:
    if precision not in PRECISIONS:
        raise InputError(f"precision {precision!r}: the torch.onnx decoder export builds {', '.join(PRECISIONS[:-1])} or {PRECISIONS[-1]}; "
                         "choose one of those")
    if execution_provider not in EXECUTION_PROVIDERS:
        raise InputError(f"--ep {execution_provider}: the torch.onnx decoder export builds for the CPU (its fp32 "
                         "GroupQueryAttention and cache; ONNX Runtime's CUDA kernel takes fp16); use --ep cpu")


def export_decoder(adapter, staging: Path, work: Path, precision: str = "int4", execution_provider: str = "cpu",
                   progress: bool = True, release_weights: bool = False) -> dict:
    """The adapter's text model (`decoder()`) → `staging`/model.onnx (+ .data) and genai_config.json; returns
    what llm.json records of how it was built. `work`: a scratch directory; `release_weights`: the adapter's weights
    are freed once the graph is traced (the graph holds its own copy)."""
    check_settings(precision, execution_provider)
    stack, lm_head = adapter.decoder()
    # A family that places video tokens by 3-D positions has a text model with 3-D rotary sections; the others'
    # positions are derived from the mask in the graph.
    shape = DecoderShape.of(stack, position_axes=adapter.position_axes)
    bits = {"int4": 4, "int8": 8}.get(precision)
    stages = Stages(["export (torch.onnx)", *([f"{precision} weights (MatMulNBits)"] if bits else []),
                     "write"], show=progress)
    try:
        with stages.step():
            export_graph(stack, lm_head, shape, work / GRAPH)
            if release_weights:
                del stack, lm_head
                adapter.release_weights()
            model = onnx.load(str(work / GRAPH))
        details = {"attention": "com.microsoft.GroupQueryAttention"}
        if bits:
            with stages.step():
                model, count = nbit_weights(model, bits)
            details["weights"] = {"op": "com.microsoft.MatMulNBits", "bits": bits, "block_size": BLOCK_SIZE,
                                  "symmetric": True, "quantized_matmuls": count}
        with stages.step():
            save_graph(without_trace_metadata(model), staging / GRAPH)
            config = genai_config(shape, adapter.info.model_type, adapter.context_length)
            (staging / GENAI_CONFIG).write_text(json.dumps(config, indent=4) + "\n")
    finally:
        stages.close()
    return details
