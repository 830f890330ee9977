"""One runner interface for every backend, in Polygraphy's style: construct (nothing heavy), `activate()` (load
the session / engine / model), `infer(feed_dict)` → outputs by name, `deactivate()`; or `with Runner(...) as r`.

Every runner subclasses `polygraphy.backend.base.BaseRunner`, so Polygraphy's own tools (Comparator, input
checks, `last_inference_time`) work on it. A vision runner maps frames [T, 3, S, S] to {"tokens", "index"};
`run(frames)` is `infer({input_name: frames})`.

Here: the base and ONNX Runtime (no torch). The PyTorch reference is `aot_export.reference_runner`, TensorRT is
`engines.runner`; runtime/vision.py holds the table backend name → runner class.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from .errors import InputError
from .manifest import Manifest, read_manifest

ONNX_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int32)": np.int32,
              "tensor(int64)": np.int64}


class VisionRunner(BaseRunner):
    """The base: `backend` names the kind, `settings` records what the runner was constructed with (reports and
    JSON carry it, so a later measurement can tell two configurations apart)."""

    backend = "base"

    def __init__(self, input_name: str = "frames", name: str | None = None, settings: dict[str, Any] | None = None):
        super().__init__(name=name or self.backend)
        self.input_name = input_name
        self.settings = {"backend": self.backend, **(settings or {})}

    def run(self, frames: np.ndarray) -> dict[str, np.ndarray]:
        """One inference on preprocessed frames; the runner must be active."""
        return dict(self.infer({self.input_name: frames}, check_inputs=False))

    def _timed(self, start: float) -> None:
        self.inference_time = time.perf_counter() - start


def onnxruntime_providers(device: str = "auto") -> list[str]:
    """Execution providers for `device` ("auto": CUDA when this onnxruntime has it, else CPU)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda" and "CUDAExecutionProvider" not in available:
        raise InputError("--device cuda: ONNX Runtime has no CUDA provider here; install onnxruntime-gpu or use "
                         "--device cpu")
    if device not in ("auto", "cuda"):
        raise InputError(f"device {device!r} is unknown; choose auto, cpu or cuda")
    return (["CUDAExecutionProvider", "CPUExecutionProvider"] if "CUDAExecutionProvider" in available
            else ["CPUExecutionProvider"])


def session_options(intra_op_threads: int | None, allow_spinning: bool) -> Any:
    """ONNX Runtime session options every session of the project uses (vision graphs and the LLM decoder)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if intra_op_threads is not None:
        options.intra_op_num_threads = intra_op_threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    return options


class OnnxRuntimeRunner(VisionRunner):
    """An ONNX graph on ONNX Runtime. Session options are explicit arguments, recorded in `settings`:
    `intra_op_threads` (None: ORT's default, one per core) and `allow_spinning` (ORT's
    `session.intra_op.allow_spinning`, off by default: spinning threads slowed an LLM prefill that ran right after the vision
    graph 3–6× on 2 cores, DESIGN.md) and `memory_arena` (ORT's CPU arena keeps the graph's peak activation
    memory after a run; off, it is returned, so a session that runs next — the LLM — does not stack on it)."""

    backend = "onnxruntime"

    def __init__(self, graph: str | os.PathLike, providers: tuple[str, ...] | list[str] = ("CPUExecutionProvider",),
                 intra_op_threads: int | None = None, allow_spinning: bool = False, input_name: str = "frames",
                 name: str | None = None, memory_arena: bool = True):
        self.graph = Path(graph)
        self.providers = tuple(providers)
        self.intra_op_threads = intra_op_threads
        self.allow_spinning = allow_spinning
        self.memory_arena = memory_arena
        provider = self.providers[0].replace("ExecutionProvider", "").lower()
        super().__init__(input_name, name or f"onnxruntime-{provider}",
                         {"graph": str(self.graph), "providers": list(self.providers),
                          "intra_op_threads": intra_op_threads, "allow_spinning": allow_spinning,
                          "memory_arena": memory_arena})

    @classmethod
    def from_export(cls, directory: str | os.PathLike, device: str = "auto", manifest: Manifest | None = None, *,
                    verify_hashes: bool = True, **options: Any) -> "OnnxRuntimeRunner":
        """The graph of an export directory (its manifest verified unless given: sizes, and sha256 with
        `verify_hashes`)."""
        manifest = manifest or read_manifest(directory, verify_hashes=verify_hashes)
        return cls(Path(directory) / manifest.graph, onnxruntime_providers(device),
                   input_name=manifest.inputs[0].name, **options)

    def activate_impl(self) -> None:
        import onnxruntime as ort

        options = session_options(self.intra_op_threads, self.allow_spinning)
        options.enable_cpu_mem_arena = self.memory_arena
        self.session = ort.InferenceSession(str(self.graph), sess_options=options, providers=list(self.providers))
        self.output_names = [output.name for output in self.session.get_outputs()]

    def get_input_metadata_impl(self) -> TensorMetadata:
        meta = TensorMetadata()
        for tensor in self.session.get_inputs():
            meta.add(tensor.name, ONNX_TYPES[tensor.type], tensor.shape)
        return meta

    def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> OrderedDict:
        start = time.perf_counter()
        outputs = self.session.run(self.output_names, feed_dict)
        self._timed(start)
        return OrderedDict(zip(self.output_names, outputs))

    def deactivate_impl(self) -> None:
        del self.session, self.output_names
