"""Vision backends behind one interface: preprocessed frames [T, 3, S, S] → (tokens [n, H], index [n, 3]).

- `torch`: the checkpoint's tower + projector + `AOTReducer` in PyTorch (the exported module, eager).
- `onnxruntime`: an export directory's graph; CUDA provider when available.
- `tensorrt`: an engine directory (`tensorrt` or `tensorrt_rtx`), refused unless its sidecar fits the export
  and this machine; runs where a GPU exists.
The backend is chosen from the artifact (engine dir → tensorrt, export dir → onnxruntime, model → torch) and can
be overridden.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from aot_export import AOTConfig
from aot_export.errors import InputError
from aot_export.manifest import MANIFEST, Manifest, read_manifest

BACKENDS = ("torch", "onnxruntime", "tensorrt")


class VisionBackend(Protocol):
    name: str

    def run(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass
class TorchVision:
    adapter: Any
    cfg: AOTConfig
    name: str = "torch"
    module: Any = field(init=False)

    def __post_init__(self) -> None:
        self.module = self.adapter.vision_aot(self.cfg)

    @torch.inference_mode()
    def run(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        tokens, index = self.module(torch.from_numpy(pixels))
        return tokens.numpy(), index.numpy()


@dataclass
class OnnxRuntimeVision:
    directory: Path
    manifest: Manifest
    device: str = "auto"
    name: str = field(init=False)

    def __post_init__(self) -> None:
        import onnxruntime as ort

        from .validate import onnxruntime_providers

        providers = onnxruntime_providers(self.device)
        self.session = ort.InferenceSession(str(Path(self.directory) / self.manifest.graph), providers=providers)
        self.name = "onnxruntime-" + providers[0].replace("ExecutionProvider", "").lower()

    def run(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        tokens, index = self.session.run(["tokens", "index"], {self.manifest.inputs[0].name: pixels})
        return tokens, index


@dataclass
class TensorRTVision:
    """Executes an engine with device buffers owned by torch (CUDA); the engine's I/O names are the graph's."""

    engine_dir: Path
    export_dir: Path | None
    name: str = "tensorrt"

    def __post_init__(self) -> None:
        from engines.sidecar import load_engine

        self.sidecar, self.engine = load_engine(self.engine_dir, self.export_dir)
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()

    def run(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        engine, context = self.engine, self.context
        buffers = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            shape = tuple(engine.get_tensor_shape(name))
            dtype = {"FLOAT": torch.float32, "INT32": torch.int32, "HALF": torch.float16}[
                str(engine.get_tensor_dtype(name)).split(".")[-1]]
            buffers[name] = (torch.from_numpy(pixels).cuda() if name == "frames"
                             else torch.empty(shape, dtype=dtype, device="cuda"))
            context.set_tensor_address(name, buffers[name].data_ptr())
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        self.stream.synchronize()
        return buffers["tokens"].float().cpu().numpy(), buffers["index"].cpu().numpy()


def artifact_kind(path: str) -> str:
    """'engine', 'export' or 'model' (a built-in name or a checkpoint directory)."""
    directory = Path(path)
    if (directory / "engine.json").is_file():
        return "engine"
    if (directory / MANIFEST).is_file():
        return "export"
    return "model"


def open_vision(model: str, backend: str | None = None, device: str = "auto",
                adapter: Any = None) -> tuple[VisionBackend, Manifest | None]:
    """The vision backend for an artifact (engine dir, export dir, or model), `backend` overriding the choice."""
    kind = artifact_kind(model)
    default = {"engine": "tensorrt", "export": "onnxruntime", "model": "torch"}[kind]
    backend = backend or default
    if backend not in BACKENDS:
        raise InputError(f"backend {backend!r} is unknown; choose from {', '.join(BACKENDS)}")
    if kind == "engine":
        from engines.sidecar import read_sidecar

        sidecar = read_sidecar(model)
        manifest = Manifest.from_dict(sidecar.manifest)
        export_dir = None
    elif kind == "export":
        manifest, export_dir = read_manifest(model), Path(model)
    else:
        manifest, export_dir = None, None
    if backend == "tensorrt":
        if kind != "engine":
            raise InputError(f"{model} is not an engine directory; build one with `aot-export build`, or choose "
                             "--backend onnxruntime/torch")
        return TensorRTVision(Path(model), export_dir), manifest
    if backend == "onnxruntime":
        if kind != "export":
            raise InputError(f"{model} is not an export directory; export one with `aot-export export`, or choose "
                             "--backend torch")
        return OnnxRuntimeVision(Path(model), manifest, device), manifest
    if adapter is None:
        raise InputError("the torch backend needs the model; pass --model with a model or an export directory")
    cfg = manifest.aot if manifest is not None else AOTConfig(grid=adapter.info.grid)
    return TorchVision(adapter, cfg), manifest
