"""Weight-only int8 for ONNX Runtime: `aot-export quantize-weights EXPORT --out DIR`.

Every constant MatMul weight of the tower and the projector becomes ONNX Runtime's `MatMulNBits` (com.microsoft):
symmetric 8-bit blocks of `block_size` input rows, one fp32 scale per block, dequantized inside the kernel, so the
activations and the arithmetic stay fp32 and no calibration data is needed. The AOT block and the score layers
(`aot_export.onnx_scopes.FP32_SCOPES`) keep fp32 weights, as in the fp16 export: the anchors hang on small score
differences. The weights shrink ~3.4× (a 4-byte scale per 32 one-byte weights), and so does the memory a device
holds for them (docs/benchmarks.md: 2423 → 1397 MiB peak for the full-size LLaVA-OneVision tower at 8 frames).

The tower's first `float_blocks` encoder blocks (default 1) keep fp32 weights too. Measured on the trained fixture
(docs/benchmarks.md, "Weight-only 8-bit on the trained fixture"): 8-bit rounding of any one block moves the deep
score layer's scores by 3–6e-3 (relative RMS) — each about what a quarter-pixel-step of input noise does to the
fp32 graph — and the first block the most (6.3e-3); all blocks together 1.3e-2. Keeping block 0 float took the
anchor agreement from 98.4 % / 97.4 % to 98.0 % / 99.0 % (bikes / bigbuckbunny) for ~8 % of the tower's weights.

`MatMulNBits` is ONNX Runtime's own operator: TensorRT cannot build it, so engines come from the fp32 export.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import onnx

from aot_export.artifacts import atomic_dir, check_destination
from aot_export.errors import InputError
from aot_export.manifest import hash_files, read_manifest
from aot_export.onnx_io import save_graph
from aot_export.onnx_scopes import FP32_SCOPES, name_scopes, node_scope

from .qdq_graph import restore_metadata

PRECISION = "int8-weights"
BITS = 8
BLOCK_SIZES = (16, 32, 64, 128, 256)
FLOAT_BLOCKS = 1


def quantizable_nodes(model: onnx.ModelProto) -> list[str]:
    """MatMuls outside the fp32 scopes whose weight (second input) is an initializer."""
    weights = {init.name for init in model.graph.initializer}
    return [node.name for node in model.graph.node
            if node.op_type == "MatMul" and node.input[1] in weights and node_scope(node) not in FP32_SCOPES]


def tower_block(node: onnx.NodeProto) -> int | None:
    """The index of the tower's encoder block a node was traced in — the first name scope under `tower` that is a
    ModuleList entry ('tower.encoder.layers.3', 'tower.blocks.3' → 3) — or None (not in a block; no metadata)."""
    block = next((parts[-1] for parts in (scope.split(".") for scope in name_scopes(node))
                  if parts[0] == "tower" and len(parts) > 1 and parts[-1].isdigit()), None)
    return None if block is None else int(block)


def float_block_nodes(model: onnx.ModelProto, nodes: list[str], float_blocks: int) -> list[str]:
    """Those of `nodes` in the tower's first `float_blocks` encoder blocks (they keep fp32 weights)."""
    chosen = set(nodes)
    return [node.name for node in model.graph.node if node.name in chosen
            and (block := tower_block(node)) is not None and block < float_blocks]


def quantize_graph(model: onnx.ModelProto, nodes: list[str], block_size: int, bits: int = BITS) -> onnx.ModelProto:
    """`model` with the weights of the MatMul `nodes` as symmetric `bits`-bit blocks (MatMulNBits; 8 here, 4 for
    the ONNX decoder of runtime/decoder_export.py)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # The quantizer takes every MatMul with a constant weight unless excluded (`nodes_to_include` only adds).
    chosen = set(nodes)
    excluded = [node.name for node in model.graph.node if node.op_type == "MatMul" and node.name not in chosen]
    source = onnx.ModelProto()
    source.graph.node.extend(model.graph.node)     # the nodes' metadata, before the quantizer rebuilds any
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True,
                                     nodes_to_exclude=excluded)
    # the quantizer logs two INFO lines per weight
    logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        quantizer.process()
    finally:
        logger.setLevel(level)
    quantized = quantizer.model.model
    restore_metadata(quantized, source)
    return quantized


def quantize_weights(source: str | os.PathLike, out_dir: str | os.PathLike, block_size: int = 32,
                     force: bool = False, float_blocks: int = FLOAT_BLOCKS, *, verify_hashes: bool = True) -> Path:
    """A new export directory whose tower and projector weights are 8-bit blocks (`MatMulNBits`), but those of the
    tower's first `float_blocks` encoder blocks; the manifest's precision is "int8-weights" and
    `extra.weight_only` records how it was made."""
    source, out_dir = Path(source), Path(out_dir)
    if block_size not in BLOCK_SIZES:
        raise InputError(f"--block-size {block_size}: choose one of {', '.join(map(str, BLOCK_SIZES))}")
    if float_blocks < 0:
        raise InputError(f"--float-blocks {float_blocks}: give 0 or more")
    manifest = read_manifest(source, verify_hashes=verify_hashes)
    if manifest.precision != "fp32":
        raise InputError(f"{source} is a {manifest.precision} export; weight-only int8 is made from an fp32 export")
    check_destination(out_dir, "export", force, sum(manifest.sizes.values()) // 3, sources={"export": source})
    model = onnx.load(str(source / manifest.graph))
    nodes = quantizable_nodes(model)
    if not nodes:
        raise InputError(f"{source}: the graph has no constant MatMul weight outside the AOT block; nothing to "
                         "quantize")
    kept_float = float_block_nodes(model, nodes, float_blocks)
    nodes = [name for name in nodes if name not in frozenset(kept_float)]
    model = quantize_graph(model, nodes, block_size)
    with atomic_dir(out_dir, "export", force) as staging:
        names = [f.name for f in save_graph(model, staging / manifest.graph)]
        extra = {**manifest.extra, "weight_only": {
            "op": "com.microsoft.MatMulNBits", "bits": BITS, "block_size": block_size, "symmetric": True,
            "fp32_scopes": list(FP32_SCOPES), "quantized_matmuls": len(nodes),
            "float_blocks": float_blocks, "float_block_matmuls": len(kept_float),
            "source_sha256": manifest.files[manifest.graph]}}
        dataclasses.replace(manifest, precision=PRECISION, files=hash_files(staging, names),
                            extra=extra).write(staging)
    return out_dir
