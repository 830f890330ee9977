"""FP16 export directories for strongly typed engines, and the fp32 layer set for weakly typed ones.

The AOT block (`reducer`), the score layers (`scores`), every LayerNormalization and Softmax stay fp32: the anchor
choice hangs on small score differences and the Sinkhorn on exp(−C/ε). The conversion is ONNX Runtime's maintained
float16 converter (`onnxruntime.transformers.float16`), which inserts the Casts at the block boundaries.

Measured on the trained fixture (docs/benchmarks.md, "FP16 on the trained fixture"): these islands are what the
selection needs, no more. The fp16 scores alone keep every anchor on both shared videos (the score layers' own
LayerNorm, q/k and softmax are recomputed in the fp32 `scores` scope from the residual stream); with the tower's
LayerNorm and Softmax in fp16 too, the deep score's error grows ~1.5× and a keyframe cell flips on bikes.mp4. The
one flip left (a distinct token of bigbuckbunny.mp4 frame 3, an inter-frame confidence tie 3e-5 apart) comes from
the features and stays with the projector or the last block in fp32 as well, so neither is kept fp32.

A calibrated Q/DQ export (int8, fp8) converts the same way for an engine whose layers left float run in fp16
(`aot-export build --float-part fp16`): its Q/DQ pairs stay fp32 (the quantized layers are TensorRT's int8 / fp8
kernels either way), and it keeps its precision's name and gates. Measured on the trained fixture: anchors 100 % /
98 % (int8), 99 % / 98 % (fp8) on the two shared videos held out in turn, against 99 / 99 % and 98 / 98 % with the
float part fp32 (docs/benchmarks.md, "The float part in fp16").
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable, Iterable

import onnx

from aot_export.onnx_scopes import FP32_SCOPES
from aot_export.artifacts import atomic_dir
from aot_export.errors import InputError
from aot_export.manifest import hash_files, read_manifest
from aot_export.onnx_io import read_values, save_graph, topologically_sorted
from aot_export.onnx_scopes import node_scope

FP32_OPS = ("LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt", "Erf")


def fp32_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes that must compute in fp32: the AOT block (with the bodies of its Scans: the Sinkhorn iterations),
    the score layers, normalisation and softmax."""
    return [name for node in model.graph.node if node_scope(node) in FP32_SCOPES or node.op_type in FP32_OPS
            for name in (node.name, *body_nodes(node))]


def body_nodes(node: onnx.NodeProto) -> list[str]:
    """Names of the nodes inside `node`'s subgraphs, at every depth: TensorRT names a loop body's layers after
    them, and the exporter gives them no name scope of their own."""
    return [name for attr in node.attribute if attr.type == onnx.AttributeProto.GRAPH for inner in attr.g.node
            for name in (inner.name, *body_nodes(inner))]


def convert_fp16(model: onnx.ModelProto, fp32_ops: Iterable[str] = ()) -> onnx.ModelProto:
    """`model` computing in fp16 but for `fp32_nodes`, and nodes of the op types `fp32_ops` (QuantizeLinear and
    DequantizeLinear for the float part of a Q/DQ graph, whose value_info must then be inferred first)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    op_block_list = set(DEFAULT_OP_BLOCK_LIST) | set(FP32_OPS) | set(fp32_ops)
    node_block_list = fp32_nodes(model)
    # The converter takes every float tensor in value_info for fp16: between two fp32 nodes it inserted a cast to
    # fp16 and back (3,442 of them in the 32-frame graph with the unrolled Sinkhorn), and a Scan body's reads of
    # the outer graph, which it does not see, got the fp16 copy. A tensor only fp32 nodes produce and read is left
    # out of value_info, so it stays fp32.
    fp32_only = fp32_only_values(model, lambda node: node.op_type in op_block_list or node.name in node_block_list)
    kept = [v for v in model.graph.value_info if v.name not in fp32_only]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    converted = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True,
                                         op_block_list=sorted(op_block_list), node_block_list=node_block_list)
    # The exporter's value_info still carries fp32 types for tensors that are fp16 now; checkers and TensorRT
    # infer them afresh.
    del converted.graph.value_info[:]
    return topologically_sorted(converted)


def fp32_only_values(model: onnx.ModelProto, is_fp32: Callable[[onnx.NodeProto], bool]) -> set[str]:
    """Initializers and outputs of fp32 nodes that only fp32 nodes read (a node reads its inputs and whatever its
    subgraphs read); graph outputs excluded."""
    readers: dict[str, list[bool]] = {}
    for node in model.graph.node:
        for name in read_values(node):
            readers.setdefault(name, []).append(is_fp32(node))
    candidates = [init.name for init in model.graph.initializer]
    candidates += [name for node in model.graph.node if is_fp32(node) for name in node.output]
    outputs = {v.name for v in model.graph.output}
    return {name for name in candidates if name not in outputs and all(readers.get(name, ()))}


QDQ_PRECISIONS = ("int8", "fp8")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def with_inferred_types(source: Path, graph: str) -> onnx.ModelProto:
    """The graph with every tensor's type inferred (the converter casts only tensors whose float type it knows, and
    the quantizer records none for its own), inferred on the structure alone, then its weights loaded."""
    from onnx.external_data_helper import load_external_data_for_model

    model = onnx.shape_inference.infer_shapes(onnx.load(str(source / graph), load_external_data=False))
    load_external_data_for_model(model, str(source))
    return model


def export_fp16(source: str | os.PathLike, out_dir: str | os.PathLike, *, verify_hashes: bool = True) -> Path:
    """A new export directory whose graph computes the encoder in fp16 (inputs and outputs stay fp32): from an fp32
    export an fp16 one; from a Q/DQ export (int8, fp8) the same precision with the layers left float in fp16."""
    source, out_dir = Path(source), Path(out_dir)
    manifest = read_manifest(source, verify_hashes=verify_hashes)
    if manifest.precision not in ("fp32", *QDQ_PRECISIONS):
        raise InputError(f"{source} is a {manifest.precision} export; fp16 is made from an fp32 export or a "
                         f"calibrated one ({', '.join(QDQ_PRECISIONS)})")
    qdq = manifest.precision in QDQ_PRECISIONS
    model = with_inferred_types(source, manifest.graph) if qdq else onnx.load(str(source / manifest.graph))
    converted = convert_fp16(model, fp32_ops=QDQ_OPS if qdq else ())
    with atomic_dir(out_dir) as staging:
        names = [f.name for f in save_graph(converted, staging / manifest.graph)]
        extra = {**manifest.extra, "fp16": {"converter": "onnxruntime.transformers.float16",
                                            "fp32_scopes": list(FP32_SCOPES),
                                            "fp32_ops": list(FP32_OPS) + list(QDQ_OPS if qdq else ()),
                                            "float_part_of": manifest.precision if qdq else None,
                                            "source_sha256": manifest.files[manifest.graph]}}
        dataclasses.replace(manifest, precision=manifest.precision if qdq else "fp16",
                            files=hash_files(staging, names), extra=extra).write(staging)
    return out_dir
