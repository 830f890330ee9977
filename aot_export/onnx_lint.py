"""What an exported graph must satisfy to build as a static TensorRT engine."""

from __future__ import annotations

from dataclasses import dataclass

import onnx

# Control flow and data-dependent shapes: TensorRT either rejects them or builds them with dynamic shapes.
FORBIDDEN_OPS = frozenset({"Loop", "If", "Scan", "NonZero", "Unique", "SequenceAt", "SequenceConstruct",
                           "SequenceEmpty", "SequenceErase", "SequenceInsert", "SequenceLength", "SplitToSequence",
                           "ConcatFromSequence"})


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
    """Forbidden ops and TopK nodes whose k is not a constant."""
    graph = model.graph
    constants = _constant_names(graph)
    findings = [Finding("forbidden-op", node.name or node.op_type, f"{node.op_type} is not allowed in a static graph")
                for node in graph.node if node.op_type in FORBIDDEN_OPS]
    findings += [Finding("topk-k-not-constant", node.name or "TopK", f"k comes from {node.input[1]!r}")
                 for node in graph.node if node.op_type == "TopK" and node.input[1] not in constants]
    return findings
