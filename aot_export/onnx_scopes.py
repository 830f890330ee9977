"""Which part of the exported module an ONNX node came from, read from the dynamo exporter's node metadata."""

from __future__ import annotations

import ast

import onnx

NAME_SCOPES = "pkg.torch.onnx.name_scopes"

# Top-level submodules of every adapter's exported module, as the dynamo exporter records them in each node's
# name scopes: the encoder may be quantized or run in fp16; the scores and AOT stay fp32.
ENCODER_SCOPES = ("tower", "projector")
FP32_SCOPES = ("scores", "reducer")


def submodule(node: onnx.NodeProto) -> str | None:
    """The top-level submodule `node` was traced in, as named ('tower', 'projector', 'scores.0', 'reducer');
    None for a node of the module itself or one without the metadata (e.g. inserted by a tool)."""
    for prop in node.metadata_props:
        if prop.key == NAME_SCOPES:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            return str(scopes[1]) if isinstance(scopes, (list, tuple)) and len(scopes) > 2 else None
    return None


def node_scope(node: onnx.NodeProto) -> str:
    """`submodule` with ModuleList indices dropped ('scores.0' → 'scores'); '' where there is none."""
    return (submodule(node) or "").split(".")[0]


def nodes_in_scopes(model: onnx.ModelProto, scopes: tuple[str, ...]) -> list[str]:
    return [node.name for node in model.graph.node if node_scope(node) in scopes]
