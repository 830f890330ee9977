"""Writing a graph into an artifact directory: its weights beside it as external data, with the file modes a plain
`open` gives (ONNX's external-data writer creates the weights file private, 0600, so that another account on the
device could not read an artifact it can see)."""

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
