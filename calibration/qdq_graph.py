"""Which nodes of an exported graph are quantized, and the graph surgery that keeps everything else float.

Only nodes whose dynamo name scope (`pkg.torch.onnx.name_scopes`, second entry = top-level submodule of the
exported module) is `tower` or `projector`, of op types Conv / MatMul / Gemm, and by default only those with a
constant weight (the Linear layers and the patch Conv). The attention products q·kᵀ and softmax·v stay in float
(quantizing them too dropped the tiny model's matched token cosine from 0.998 to 0.96), as do the two score layers
(`scores.0`, `scores.1`) and the AOT block (`reducer`): selection, Sinkhorn transport and pooling lose accuracy in
low precision (DESIGN.md: cos 0.90–0.96 with the reducer quantized).

The score layers share tensors with the tower: their q/k weights are the tower layers' initializers, and the
exporter merges their LayerNorm with the tower's identical one. ONNX Runtime points *every* consumer of a
quantized tensor at its DequantizeLinear output, so shared weights are duplicated before quantization
(`untie_shared_weights`) and float nodes are rewired to the original activations after it
(`restore_float_inputs`): the score layers and the reducer read exactly what they read in the fp32 graph.

Mixed precision (`float_layers`, rules applied by `kept_float`): `score-path` keeps float every candidate node the
score layers depend on (upstream of a `scores.*` node in the graph: the patch embedding and every tower layer up to
the deepest score layer), so the attention scores that choose the anchors are computed as in fp32 (fp16 in a
TensorRT engine); a glob (`*.fc2`, `*.layers.0.*`) keeps the nodes whose module path (their last name scope, e.g.
`tower.encoder.layers.0.mlp.fc2`) matches. On a trained tower (issue #21) each single quantized layer on the score
path moved the scores 1.5–8 % (relative L2; fp32 under ¼-step pixel noise: 0.6 %) and 3–17 % of the anchors.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import onnx

from aot_export.errors import InputError
from aot_export.onnx_scopes import ENCODER_SCOPES, NAME_SCOPES, module_path, submodule

QUANTIZED_SCOPES = ENCODER_SCOPES
OP_TYPES = ("Conv", "MatMul", "Gemm")
SCORE_SCOPE = "scores"
SCORE_PATH = "score-path"                     # `float_layers` rule: every candidate the score layers depend on
# The measured recipe (issue #21): the scores that choose the anchors computed as in fp32, and the projector float —
# int8 or fp8 in the projector alone, with the scores bit-identical, moved 1 % of the anchors on the trained fixture.
DEFAULT_FLOAT_LAYERS = (SCORE_PATH, "projector.*")


@dataclass(frozen=True)
class QuantPlan:
    nodes: tuple[str, ...]                    # node names handed to quantize_static
    activations: tuple[str, ...]              # non-constant float inputs of those nodes: the tensors calibrated
    excluded_scopes: dict[str, int]           # scope → number of Conv/MatMul/Gemm nodes left in float there
    float_in_scope: int                       # activation×activation MatMuls inside tower/projector left in float
    float_nodes: tuple[str, ...] = ()         # candidates kept float by the `float_layers` rules
    kept_float: dict[str, int] = field(default_factory=dict)   # rule → candidates it keeps float

    def summary(self, model: onnx.ModelProto) -> dict[str, dict[str, int]]:
        """Per module group ('tower.embeddings', 'tower.encoder.layers.3', 'projector'): candidates and how many
        of them are quantized — how much of the tower stays 8-bit."""
        quantized, floated, groups = set(self.nodes), set(self.float_nodes), {}
        for node in model.graph.node:
            if node.name in quantized or node.name in floated:
                group = groups.setdefault(module_group(node), {"candidates": 0, "quantized": 0})
                group["candidates"] += 1
                group["quantized"] += node.name in quantized
        return groups


def module_group(node: onnx.NodeProto) -> str:
    """`module_path` cut after a numbered layer ('tower.encoder.layers.3') or at its first two parts."""
    parts = module_path(node).split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i + 1])
    return ".".join(parts[:2])


def score_path(model: onnx.ModelProto, candidates: Iterable[str]) -> set[str]:
    """The `candidates` upstream of any node of a score layer (`scores.*` scope): what the anchors depend on."""
    candidates = set(candidates)
    producer = {out: node for node in model.graph.node for out in node.output}
    stack = [name for node in model.graph.node if (submodule(node) or "").split(".")[0] == SCORE_SCOPE
             for name in node.input]
    seen, found = set(), set()
    while stack:
        name = stack.pop()
        node = producer.get(name)
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.name in candidates:
            found.add(node.name)
        stack.extend(node.input)
    return found


def kept_float(model: onnx.ModelProto, candidates: Sequence[str], rules: Sequence[str]) -> dict[str, set[str]]:
    """rule → the candidates it keeps float: `score-path` (`score_path`) or a glob over `module_path`."""
    by_name = {node.name: node for node in model.graph.node}
    kept = {}
    for rule in rules:
        if rule == SCORE_PATH:
            kept[rule] = score_path(model, candidates)
        else:
            kept[rule] = {name for name in candidates if fnmatch.fnmatchcase(module_path(by_name[name]), rule)}
    return kept


def plan_quantization(model: onnx.ModelProto, weights_only: bool = True,
                      float_layers: Sequence[str] = DEFAULT_FLOAT_LAYERS) -> QuantPlan:
    """Conv/MatMul/Gemm nodes of the tower and projector to quantize (only those with a constant weight when
    `weights_only`) less those `float_layers` keeps float (`kept_float`), and the activations that need a
    calibrated range."""
    graph = model.graph
    constants = {init.name for init in graph.initializer}
    constants.update(out for node in graph.node if node.op_type == "Constant" for out in node.output)
    nodes, activations, excluded, float_in_scope = [], [], {}, 0
    unscoped = 0
    for node in graph.node:
        if node.op_type not in OP_TYPES:
            continue
        scope = submodule(node)
        if scope is None:
            unscoped += 1
            continue
        if scope not in QUANTIZED_SCOPES:
            excluded[scope] = excluded.get(scope, 0) + 1
            continue
        if weights_only and (len(node.input) < 2 or node.input[1] not in constants):
            float_in_scope += 1
            continue
        if not node.name:
            raise InputError(f"a {node.op_type} node of scope {scope!r} has no name; re-export with "
                             "`aot-export export` (ONNX Runtime's quantizer selects nodes by name)")
        nodes.append(node.name)
    if not nodes:
        raise InputError("the graph has no Conv/MatMul/Gemm node with name-scope metadata "
                         f"({NAME_SCOPES}) in {'/'.join(QUANTIZED_SCOPES)}"
                         f"{f' ({unscoped} without metadata)' if unscoped else ''}; re-export with "
                         "`aot-export export` (dynamo exporter), which records it")
    kept = kept_float(model, nodes, float_layers)
    floated = set().union(*kept.values())
    chosen = [name for name in nodes if name not in floated]
    if not chosen:
        raise InputError(f"--float-layers {' '.join(float_layers)} keeps every one of the {len(nodes)} "
                         "quantizable nodes float: nothing left to quantize")
    by_name = {node.name: node for node in graph.node}
    activations = [name for node_name in chosen for name in by_name[node_name].input[:2]
                   if name and name not in constants]
    return QuantPlan(tuple(chosen), tuple(dict.fromkeys(activations)), excluded, float_in_scope,
                     tuple(name for name in nodes if name in floated),
                     {rule: len(names) for rule, names in kept.items()})


def untie_shared_weights(model: onnx.ModelProto, quantized: Iterable[str]) -> list[str]:
    """Give the float consumers of a weight that quantized nodes also read their own copy of it (in place);
    returns the copied initializer names. Without this, ONNX Runtime rewires every consumer of a quantized weight
    to its DequantizeLinear output, and the fp32 score layers would compute with int8-rounded q/k weights."""
    quantized = set(quantized)
    inits = {init.name: init for init in model.graph.initializer}
    readers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            if name in inits:
                readers.setdefault(name, set()).add("q" if node.name in quantized else "f")
    shared = sorted(name for name, kinds in readers.items() if kinds == {"q", "f"})
    for name in shared:
        copy = onnx.TensorProto()
        copy.CopyFrom(inits[name])
        copy.name = f"{name}__float"
        model.graph.initializer.append(copy)
        for node in model.graph.node:
            if node.name not in quantized:
                for i, value in enumerate(node.input):
                    if value == name:
                        node.input[i] = copy.name
    return shared


def graph_opset(model: onnx.ModelProto) -> int:
    return next(op.version for op in model.opset_import if op.domain in ("", "ai.onnx"))


def raise_opset_for_float8(model: onnx.ModelProto) -> bool:
    """float8 Q/DQ needs opset 19. ONNX Runtime would run `onnx.version_converter`, which drops every node's
    metadata (the name scopes that say which nodes are fp32 on purpose). From 18, the exporter's opset, to 19 every
    operator change is additive (float8 types; Cast's `saturate`, which applies to float8 only; AveragePool
    dilations; Pad's wrap mode; strings in Equal), so the import is raised in place. True if it was raised."""
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version == 18:
            opset.version = 19
            return True
    return False


def restore_metadata(model: onnx.ModelProto, source: onnx.ModelProto) -> int:
    """Give each node of `model` without metadata the metadata of `source`'s node of the same name (in place);
    returns how many. ONNX Runtime makes a node with a subgraph (the reducer's Scans) anew to walk its body, and
    drops the name scopes that say which nodes are fp32 on purpose."""
    recorded = {node.name: node.metadata_props for node in source.graph.node if node.metadata_props}
    restored = 0
    for node in model.graph.node:
        if not node.metadata_props and node.name in recorded:
            node.metadata_props.extend(recorded[node.name])
            restored += 1
    return restored


def restore_float_inputs(model: onnx.ModelProto, quantized: Iterable[str]) -> int:
    """Rewire float nodes (not quantized, not Q/DQ) that ONNX Runtime pointed at a DequantizeLinear output back
    to the original activation: ORT replaces the input of *every* consumer of a quantized activation, so a score
    layer that shares the tower's LayerNorm output (the exporter merges the identical computation) would read
    int8-rounded values. Returns the number of inputs rewired; raises if a float node still reads a quantized
    weight (see `untie_shared_weights`)."""
    quantized = set(quantized)
    producer = {out: node for node in model.graph.node for out in node.output}
    original = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in producer \
                and producer[node.input[0]].op_type == "QuantizeLinear":
            original[node.output[0]] = producer[node.input[0]].input[0]
    rewired = 0
    for node in model.graph.node:
        if node.name in quantized or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, name in enumerate(node.input):
            if name in original:
                node.input[i] = original[name]
                rewired += 1
            elif name in producer and producer[name].op_type == "DequantizeLinear":
                raise RuntimeError(f"float node {node.name} ({submodule(node)}) reads the quantized weight {name}")
    return rewired
