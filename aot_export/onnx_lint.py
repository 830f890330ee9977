"""What an exported graph must satisfy to build as a static TensorRT engine."""

from __future__ import annotations

from dataclasses import dataclass

import onnx

# Control flow and data-dependent shapes: TensorRT either rejects them or builds them with dynamic shapes.
FORBIDDEN_OPS = frozenset({"Loop", "If", "NonZero", "Unique", "SequenceAt", "SequenceConstruct",
                           "SequenceEmpty", "SequenceErase", "SequenceInsert", "SequenceLength", "SplitToSequence",
                           "ConcatFromSequence"})
# A Scan whose scanned inputs are constants runs a fixed number of times on static shapes: TensorRT builds it as
# an ILoop with a constant trip count. The reference Sinkhorn's iterations are one (`reducer.repeat`); its body is
# held to the same rules as the graph.
FIXED_COUNT_OPS = frozenset({"Scan"})


@dataclass(frozen=True)
class Finding:
    rule: str
    node: str
    detail: str

    def __str__(self) -> str:
        return f"{self.rule}: {self.node}: {self.detail}"


def _constant_names(graph: onnx.GraphProto) -> set[str]:
    names = {init.name for init in graph.initializer}
    names.update(out for node in graph.node if node.op_type == "Constant" for out in node.output)
    return names


def graph_findings(model: onnx.ModelProto) -> list[Finding]:
    """Forbidden ops, TopK nodes whose k is not a constant and Scans over a tensor that is not a constant, in the
    graph and in every Scan's body."""
    return _findings(model.graph, set())


def _findings(graph: onnx.GraphProto, outer_constants: set[str]) -> list[Finding]:
    constants = outer_constants | _constant_names(graph)
    findings = [Finding("forbidden-op", node.name or node.op_type, f"{node.op_type} is not allowed in a static graph")
                for node in graph.node if node.op_type in FORBIDDEN_OPS]
    findings += [Finding("topk-k-not-constant", node.name or "TopK", f"k comes from {node.input[1]!r}")
                 for node in graph.node if node.op_type == "TopK" and node.input[1] not in constants]
    for node in graph.node:
        if node.op_type in FIXED_COUNT_OPS:
            findings += _scan_findings(node, constants)
    return findings


def _scan_findings(node: onnx.NodeProto, constants: set[str]) -> list[Finding]:
    """A Scan's trip count is the length of its scanned inputs (the last `num_scan_inputs`): constants only."""
    attributes = {a.name: a for a in node.attribute}
    scanned = node.input[len(node.input) - attributes["num_scan_inputs"].i:]
    findings = [Finding("scan-count-not-constant", node.name or "Scan", f"scans over {name!r}, not a constant")
                for name in scanned if name not in constants]
    return findings + _findings(attributes["body"].g, constants)


ONNX_DTYPES = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16,
               "int32": onnx.TensorProto.INT32, "int64": onnx.TensorProto.INT64}
# `index` may be any integer type; every other interface tensor must avoid int64, which TensorRT narrows.
INT64_ALLOWED = frozenset({"index"})


def interface_findings(model: onnx.ModelProto, declared: dict[str, tuple[tuple[int, ...], str]]) -> list[Finding]:
    """Graph inputs/outputs against the declared `name → (shape, dtype)`: missing or extra tensors, dynamic or
    different dims, dtypes, int64 tensors other than `index`."""
    findings = []
    actual = {v.name: v for v in [*model.graph.input, *model.graph.output]}
    for name in sorted(set(declared) ^ set(actual)):
        where = "declared but not in the graph" if name in declared else "in the graph but not declared"
        findings.append(Finding("interface", name, where))
    for name in sorted(set(declared) & set(actual)):
        tensor_type = actual[name].type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor_type.shape.dim]
        shape, dtype = declared[name]
        if any(not isinstance(d, int) for d in dims):
            findings.append(Finding("dynamic-dim", name, f"shape {dims} has a dynamic dimension"))
        elif tuple(dims) != tuple(shape):
            findings.append(Finding("shape", name, f"graph shape {dims} != declared {list(shape)}"))
        if tensor_type.elem_type != ONNX_DTYPES[dtype]:
            findings.append(Finding("dtype", name, f"graph dtype {onnx.TensorProto.DataType.Name(tensor_type.elem_type)}"
                                                   f" != declared {dtype}"))
        if tensor_type.elem_type == onnx.TensorProto.INT64 and name not in INT64_ALLOWED:
            findings.append(Finding("int64", name, "int64 interface tensor; TensorRT wants int32"))
    return findings
