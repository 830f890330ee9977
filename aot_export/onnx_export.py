"""Export AOT graphs with the dynamo exporter at opset 18 (static shapes, TopK k constants)."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path
from typing import Iterator

import onnx
import torch

from .artifacts import atomic_file
from .config import AOTConfig
from .onnx_lint import graph_findings
from .reducer import AOTReducer

OPSET = 18
REDUCER_INPUTS = ("features", "score_shallow", "score_deep")
OUTPUTS = ("tokens", "index")


def reducer_example_inputs(cfg: AOTConfig, hidden: int, dtype: torch.dtype = torch.float32,
                           seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = cfg.tokens_per_frame
    return (torch.randn(cfg.frames, n, hidden, generator=g).to(dtype),
            torch.rand(cfg.frames, n, generator=g), torch.rand(cfg.frames, n, generator=g))


# Logger → the level it is raised to while exporting. The optimizer passes (onnxscript, onnx_ir) log every rewrite at
# INFO, which shows once anything sets the root logger to INFO (ONNX Runtime's MatMulNBits quantizer does on import).
QUIET_LOGGERS = {"torch.onnx._internal.exporter._registration": logging.ERROR, "onnxscript": logging.WARNING,
                 "onnx_ir": logging.WARNING}


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """The dynamo exporter logs a warning per optional torchvision op and deprecation notices from torch
    internals; none of it is about the graph being exported."""
    loggers = {logging.getLogger(name): level for name, level in QUIET_LOGGERS.items()}
    previous = {logger: logger.level for logger in loggers}
    for logger, level in loggers.items():
        logger.setLevel(level)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for logger, level in previous.items():
            logger.setLevel(level)


def trace_onnx(module: torch.nn.Module, example_inputs: tuple, input_names: tuple[str, ...],
               output_names: tuple[str, ...]) -> torch.onnx.ONNXProgram:
    """Trace `module` once with the dynamo exporter at opset 18; every shape is static. Without autograd: the
    graph is for inference, and a Scan (`reducer.repeat`) cannot be traced over tensors that require grad."""
    with quiet_exporter(), torch.no_grad():
        return torch.onnx.export(module.eval(), example_inputs, dynamo=True, opset_version=OPSET,
                                 input_names=list(input_names), output_names=list(output_names), verbose=False)


def save_onnx(program: torch.onnx.ONNXProgram, path: Path, external_data: bool) -> list[Path]:
    """Write the graph (and its weights beside it as `<name>.data` when `external_data`); the files written."""
    program.save(path, external_data=external_data)
    return [p for p in (path, path.with_name(path.name + ".data")) if p.is_file()]


def verify_static(path: Path) -> None:
    """The ONNX checker with strict shape inference, then the static-graph lint; raise on any finding."""
    onnx.checker.check_model(str(path), full_check=True)
    findings = graph_findings(onnx.load(str(path), load_external_data=False))
    if findings:
        raise RuntimeError("exported graph is not static: " + "; ".join(map(str, findings)))


def export_module(module: torch.nn.Module, example_inputs: tuple, input_names: tuple[str, ...],
                  output_names: tuple[str, ...], out_path: str | os.PathLike) -> Path:
    """Trace, save (weights inline) atomically and verify a small module."""
    program = trace_onnx(module, example_inputs, input_names, output_names)
    with atomic_file(out_path) as staging:
        save_onnx(program, staging, external_data=False)
        verify_static(staging)
    return Path(out_path)


def export_reducer(cfg: AOTConfig, hidden: int, out_path: str | os.PathLike,
                   dtype: torch.dtype = torch.float32) -> Path:
    """The reducer alone as `features [T,N,H], score_shallow [T,N], score_deep [T,N] -> tokens, index`."""
    export_module(AOTReducer(cfg), reducer_example_inputs(cfg, hidden, dtype), REDUCER_INPUTS, OUTPUTS, out_path)
    return Path(out_path)
