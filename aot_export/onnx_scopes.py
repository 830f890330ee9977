"""Which part of the exported module an ONNX node came from, read from the dynamo exporter's node metadata."""

from __future__ import annotations

import ast

import onnx

NAME_SCOPES = "pkg.torch.onnx.name_scopes"


def node_scope(node: onnx.NodeProto) -> str:
    """The top-level submodule of `node` ('tower', 'projector', 'scores', 'reducer'; '' for the module itself),
    with ModuleList indices dropped ('scores.0' → 'scores')."""
    for prop in node.metadata_props:
        if prop.key == NAME_SCOPES:
            scopes = ast.literal_eval(prop.value)
            return scopes[1].split(".")[0] if len(scopes) > 2 else ""
    return ""


def nodes_in_scopes(model: onnx.ModelProto, scopes: tuple[str, ...]) -> list[str]:
    return [node.name for node in model.graph.node if node_scope(node) in scopes]
