"""Writing a graph into an artifact directory: its weights beside it as external data, with the file modes a plain
`open` gives (ONNX's external-data writer creates the weights file private, 0600, so that another account on the
device could not read an artifact it can see); and its nodes in an order the ONNX checker accepts, a Scan after
every tensor its body reads from the outer graph (tools that rewrite a graph sort it by node inputs only)."""

from __future__ import annotations

from pathlib import Path

import onnx

from .artifacts import default_mode


def save_graph(model: onnx.ModelProto, path: Path) -> list[Path]:
    """`path` and `<path>.data` (every initializer of 1 KiB or more); the files written."""
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=1024)
    files = [p for p in (path, path.with_name(path.name + ".data")) if p.is_file()]
    for file in files:
        file.chmod(default_mode(0o666))
    return files


def read_values(node: onnx.NodeProto) -> set[str]:
    """The tensors `node` reads: its inputs and those of every node in its subgraphs (a Scan body reads the outer
    graph's tensors by name)."""
    names = set(node.input)
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            for inner in attr.g.node:
                names |= read_values(inner)
    return names


def topologically_sorted(model: onnx.ModelProto) -> onnx.ModelProto:
    """Nodes reordered so that each comes after the producers of what it reads (`read_values`; the fp16 converter
    appends the Casts of graph inputs at the end, ONNX Runtime's quantizer sorts a Scan by its inputs alone; the
    ONNX checker requires the order), otherwise keeping their order."""
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
            reads = [*nodes[i].input, *sorted(read_values(nodes[i]) - set(nodes[i].input))]
            stack.extend((producer[name], False) for name in reversed(reads)
                         if name in producer and not placed[producer[name]])
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    return model
