"""A TensorRT engine directory (`tensorrt` or `tensorrt_rtx`) as a runner (`aot_export.runners` interface).

Construction verifies the engine before any GPU work: the plan against its sidecar, the sidecar against the export
(when one is given or found) and against this machine (flavour, version, a GPU of a listed compute capability) —
each refusal an `EngineMismatch` naming the field. Device buffers and the stream come from Polygraphy's CUDA
binding (`polygraphy.cuda`, libcudart through ctypes), not torch; the engine's I/O names are the graph's.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
from polygraphy.common import TensorMetadata

from aot_export.runners import VisionRunner

from .sidecar import Machine, load_engine, read_sidecar

TRT_DTYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64, "INT8": np.int8,
              "BOOL": np.bool_}


class TensorRTRunner(VisionRunner):
    backend = "tensorrt"

    def __init__(self, engine_dir: str | os.PathLike, export_dir: str | os.PathLike | None = None,
                 machine: Machine | None = None, name: str | None = None, *, verify_hashes: bool = True):
        self.engine_dir = Path(engine_dir)
        sidecar = read_sidecar(self.engine_dir, verify_hashes=verify_hashes)
        super().__init__(sidecar.manifest["inputs"][0]["name"], name or sidecar.flavour,
                         {"engine_dir": str(self.engine_dir), "flavour": sidecar.flavour,
                          "tensorrt_version": sidecar.tensorrt_version, "precision": sidecar.precision,
                          "export_checked": export_dir is not None})
        self.sidecar, self.engine = load_engine(self.engine_dir, export_dir, machine, verify_hashes=verify_hashes)

    def _tensors(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        engine = self.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        return {name: (tuple(engine.get_tensor_shape(name)),
                       np.dtype(TRT_DTYPES[str(engine.get_tensor_dtype(name)).split(".")[-1]])) for name in names}

    def activate_impl(self) -> None:
        from polygraphy import cuda

        self.context = self.engine.create_execution_context()
        self.stream = cuda.Stream()
        self.specs = self._tensors()
        self.buffers = {name: cuda.DeviceArray(shape, dtype) for name, (shape, dtype) in self.specs.items()}
        for name, buffer in self.buffers.items():
            self.context.set_tensor_address(name, buffer.ptr)

    def get_input_metadata_impl(self) -> TensorMetadata:
        meta = TensorMetadata()
        for name, (shape, dtype) in self._tensors().items():
            if name == self.input_name:
                meta.add(name, dtype, shape)
        return meta

    def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> OrderedDict:
        start = time.perf_counter()
        self.buffers[self.input_name].copy_from(np.ascontiguousarray(feed_dict[self.input_name]), self.stream)
        if not self.context.execute_async_v3(self.stream.ptr):
            raise RuntimeError(f"{self.sidecar.flavour} execution failed on {self.engine_dir}")
        outputs = OrderedDict()
        for name, buffer in self.buffers.items():
            if name != self.input_name:
                outputs[name] = buffer.copy_to(np.empty(*self.specs[name]), self.stream)
        self.stream.synchronize()
        if "tokens" in outputs:
            outputs["tokens"] = outputs["tokens"].astype(np.float32)
        self._timed(start)
        return outputs

    def deactivate_impl(self) -> None:
        for buffer in self.buffers.values():
            buffer.free()
        self.stream.free()
        del self.context, self.stream, self.buffers, self.specs
