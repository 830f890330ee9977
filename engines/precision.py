"""FP16 export directories for strongly typed engines, and the fp32 layer set for weakly typed ones.

The AOT block (`reducer`), the score layers (`scores`), every LayerNormalization and Softmax stay fp32: the anchor
choice hangs on small score differences and the Sinkhorn on exp(−C/ε). The conversion is ONNX Runtime's maintained
float16 converter (`onnxruntime.transformers.float16`), which inserts the Casts at the block boundaries.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import onnx

from aot_export.onnx_scopes import FP32_SCOPES
from aot_export.artifacts import atomic_dir
from aot_export.errors import InputError
from aot_export.manifest import hash_files, read_manifest
from aot_export.onnx_io import save_graph
from aot_export.onnx_scopes import node_scope

FP32_OPS = ("LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt", "Erf")


def fp32_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes that must compute in fp32: the AOT block, the score layers, normalisation and softmax."""
    return [node.name for node in model.graph.node
            if node_scope(node) in FP32_SCOPES or node.op_type in FP32_OPS]


def convert_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    converted = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True,
                                         op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(FP32_OPS)),
                                         node_block_list=fp32_nodes(model))
    # The exporter's value_info still carries fp32 types for tensors that are fp16 now; checkers and TensorRT
    # infer them afresh.
    del converted.graph.value_info[:]
    return topologically_sorted(converted)


def topologically_sorted(model: onnx.ModelProto) -> onnx.ModelProto:
    """Nodes reordered so that each comes after the producers of its inputs (the converter appends the Casts of
    graph inputs at the end; the ONNX checker requires the order), otherwise keeping their order."""
    nodes = list(model.graph.node)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output}
    placed, ordered = [False] * len(nodes), []
    for root in range(len(nodes)):
        stack = [(root, False)]
        while stack:
            i, inputs_placed = stack.pop()
            if placed[i]:
                continue
            if inputs_placed:
                placed[i] = True
                ordered.append(nodes[i])
                continue
            stack.append((i, True))
            stack.extend((producer[name], False) for name in reversed(nodes[i].input)
                         if name in producer and not placed[producer[name]])
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    return model


def export_fp16(source: str | os.PathLike, out_dir: str | os.PathLike, *, verify_hashes: bool = True) -> Path:
    """A new export directory whose graph computes the encoder in fp16 (inputs and outputs stay fp32)."""
    source, out_dir = Path(source), Path(out_dir)
    manifest = read_manifest(source, verify_hashes=verify_hashes)
    if manifest.precision != "fp32":
        raise InputError(f"{source} is a {manifest.precision} export; fp16 is made from an fp32 export")
    model = onnx.load(str(source / manifest.graph))
    converted = convert_fp16(model)
    with atomic_dir(out_dir) as staging:
        names = [f.name for f in save_graph(converted, staging / manifest.graph)]
        extra = {**manifest.extra, "fp16": {"converter": "onnxruntime.transformers.float16",
                                            "fp32_scopes": list(FP32_SCOPES), "fp32_ops": list(FP32_OPS),
                                            "source_sha256": manifest.files[manifest.graph]}}
        dataclasses.replace(manifest, precision="fp16", files=hash_files(staging, names), extra=extra).write(staging)
    return out_dir
