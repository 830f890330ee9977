"""Copies of the session's tiny export with one thing changed, for tests that need an export that is wrong in a
known way (cheaper than exporting again, and the change is exactly the one named)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from aot_export.artifacts import sha256_file
from aot_export.manifest import GRAPH, MANIFEST, WEIGHTS, Manifest


def edited_export(source: Path, dest: Path, manifest: Callable[[dict], None] | None = None,
                  weight: tuple[str, float] | None = None) -> Path:
    """`source` copied to `dest`; `weight` = (initializer name, factor) scales one weight of the graph (the
    manifest's file hashes follow it, so the copy is a consistent export of other weights); `manifest` edits
    the manifest dict in place afterwards."""
    shutil.copytree(source, dest)
    if weight is not None:
        name, factor = weight
        model = onnx.load(str(dest / GRAPH))
        tensor = next(t for t in model.graph.initializer if t.name == name)
        tensor.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(tensor) * np.float32(factor)), name))
        (dest / WEIGHTS).unlink()
        onnx.save(model, str(dest / GRAPH), save_as_external_data=True, location=WEIGHTS)
    data = json.loads((dest / MANIFEST).read_text())
    data["files"] = {name: sha256_file(dest / name) for name in data["files"]}
    if manifest is not None:
        manifest(data)
    # Written as `export` writes it: derived fields (aot_hash, token counts) and file sizes follow the edits.
    (dest / MANIFEST).unlink()
    Manifest.from_dict(data).write(dest)
    return dest
