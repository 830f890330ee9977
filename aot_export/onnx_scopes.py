"""Which part of the exported module an ONNX node came from, read from the dynamo exporter's node metadata."""

from __future__ import annotations

import ast

import onnx

NAME_SCOPES = "pkg.torch.onnx.name_scopes"

# Top-level submodules of every adapter's exported module, as the dynamo exporter records them in each node's
# name scopes: the encoder may be quantized or run in fp16; the scores and AOT stay fp32.
ENCODER_SCOPES = ("tower", "projector")
FP32_SCOPES = ("scores", "reducer")


def name_scopes(node: onnx.NodeProto) -> tuple[str, ...]:
    """The module names the dynamo exporter recorded for `node`, outermost first ('', 'tower', 'tower.encoder',
    …, 'tower.encoder.layers.0.mlp.fc2', then the op's own); () for a node without the metadata."""
    for prop in node.metadata_props:
        if prop.key == NAME_SCOPES:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return ()
            return tuple(map(str, scopes)) if isinstance(scopes, (list, tuple)) else ()
    return ()


def submodule(node: onnx.NodeProto) -> str | None:
    """The top-level submodule `node` was traced in, as named ('tower', 'projector', 'scores.0', 'reducer');
    None for a node of the module itself or one without the metadata (e.g. inserted by a tool)."""
    scopes = name_scopes(node)
    return scopes[1] if len(scopes) > 2 else None


def module_path(node: onnx.NodeProto) -> str:
    """The innermost module `node` was traced in ('tower.encoder.layers.0.mlp.fc2'); '' where there is none."""
    scopes = name_scopes(node)
    return scopes[-2] if len(scopes) > 2 else ""


def node_scope(node: onnx.NodeProto) -> str:
    """`submodule` with ModuleList indices dropped ('scores.0' → 'scores'); '' where there is none."""
    return (submodule(node) or "").split(".")[0]


def nodes_in_scopes(model: onnx.ModelProto, scopes: tuple[str, ...]) -> list[str]:
    return [node.name for node in model.graph.node if node_scope(node) in scopes]
