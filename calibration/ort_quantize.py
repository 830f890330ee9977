"""ONNX Runtime's explicit (Q/DQ) quantization: calibrated ranges, then `quantize_static`.

`quantize_static` in QDQ format: symmetric activations and weights (zero point 0, what TensorRT requires), weights
per output channel (Conv axis 0, MatMul axis 1), biases left in float (TensorRT fuses them), no Q/DQ on op outputs.
The tensor ranges come from ONNX Runtime's own calibrators (MinMax for int8, Distribution — the only one ORT
accepts for float8 — for fp8), run one sample at a time over only the activations that get quantized (so memory
stays bounded on a full-size tower), and are handed to `quantize_static` as its calibration cache.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import onnx

from aot_export.onnx_io import topologically_sorted

from .data import CalibrationData
from .qdq_graph import OP_TYPES, QuantPlan, restore_float_inputs, restore_metadata


@dataclass(frozen=True)
class Precision:
    name: str
    quant_type: str           # onnxruntime.quantization.QuantType member, for activations and weights
    calibration: str          # onnxruntime.quantization.CalibrationMethod member
    note: str


QUANTIZATIONS = {
    "int8": Precision("int8", "QInt8", "MinMax", "symmetric int8 (zero point 0), per-channel weights"),
    "fp8": Precision("fp8", "QFLOAT8E4M3FN", "Distribution",
                     "float8 e4m3fn (zero point 0), per-channel weights; TensorRT runs it on SM 8.9+"),
}


def _calibrator(precision: Precision, model_path: Path, work: Path, tensors: Iterable[str]):
    """ORT's calibrator for `precision`, restricted to `tensors` (one range per quantized activation)."""
    from onnxruntime.quantization.calibrate import DistributionCalibrater, MinMaxCalibrater

    only = set(tensors)
    base = MinMaxCalibrater if precision.calibration == "MinMax" else DistributionCalibrater

    class Restricted(base):  # type: ignore[misc, valid-type]
        def select_tensors_to_calibrate(self, model):
            selected, value_infos = super().select_tensors_to_calibrate(model)
            return selected & only, value_infos

        def create_inference_session(self):
            # As ORT's (no graph optimisation, so every calibrated tensor exists as named), but without the CPU
            # arena: unoptimised attention allocates large transient tensors, and the arena kept them (a
            # full-size tower at 8 frames peaked at 8.9 GB for one sample with it).
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
            options.enable_cpu_mem_arena = False
            self.infer_session = onnxruntime.InferenceSession(self.augmented_model_path, sess_options=options,
                                                              providers=self.execution_providers)

    # DistributionCalibrater's own default (1 bin per value) is below its own floor of 512: use create_calibrator's.
    options = {} if base is MinMaxCalibrater else {"num_bins": 2048, "scenario": "same"}
    calibrator = Restricted(model_path, list(OP_TYPES), str(work / "augmented.onnx"), use_external_data_format=True,
                            **options)
    calibrator.augment_graph()
    # From here on the calibrator reads only its session and the output names it noted; its copy of the model's
    # weights (1.6 GB for a full-size tower) is dead weight while the session holds its own.
    for init in calibrator.model.graph.initializer:
        init.ClearField("raw_data")
    calibrator.create_inference_session()
    return calibrator


def calibrate_ranges(precision: Precision, model_path: Path, work: Path, plan: QuantPlan, data: CalibrationData,
                     input_name: str) -> Path:
    """Run the calibrator over every sample, one at a time; write ORT's calibration cache, return its path."""
    from onnxruntime.quantization.calibrate import save_tensors_data

    calibrator = _calibrator(precision, model_path, work, plan.activations)
    reader = data.reader(input_name)
    # ORT's histogram calibrators print progress lines to stdout, which belongs to the CLI's table.
    with contextlib.redirect_stdout(io.StringIO()):
        for start in range(len(data)):
            reader.set_range(start, start + 1)
            calibrator.collect_data(reader)
        ranges = calibrator.compute_data()
    missing = sorted(set(plan.activations) - set(ranges.data))
    if missing:
        raise RuntimeError(f"calibration produced no range for {len(missing)} tensor(s), e.g. {missing[0]}")
    del calibrator
    cache = work / "ranges.json"
    save_tensors_data(ranges, cache)
    return cache


def quantize_graph(precision: Precision, model_path: Path, output: Path, plan: QuantPlan, cache: Path) -> int:
    """quantize_static into `output` (+ `output`.data), then `restore_float_inputs`; returns inputs rewired."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quant_type = getattr(QuantType, precision.quant_type)
    with _quiet_root_warnings():
        quantize_static(str(model_path), str(output), calibration_data_reader=None, quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(OP_TYPES), per_channel=True, reduce_range=False,
                    activation_type=quant_type, weight_type=quant_type, nodes_to_quantize=list(plan.nodes),
                    use_external_data_format=True,
                    calibrate_method=getattr(CalibrationMethod, precision.calibration),
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                                   "OpTypesToExcludeOutputQuantization": list(OP_TYPES)},
                    calibration_cache_path=str(cache))
    # quantize_static sorts the nodes by their inputs alone, which can put a Scan before what its body reads.
    model = topologically_sorted(onnx.load(str(output), load_external_data=False))
    restore_metadata(model, onnx.load(str(model_path), load_external_data=False))
    rewired = restore_float_inputs(model, plan.nodes)
    onnx.save(model, str(output))               # the graph only: its external weights are unchanged
    return rewired


@contextlib.contextmanager
def _quiet_root_warnings():
    """quantize_static logs advice ("consider pre-processing ...") on the root logger at WARNING for every call."""
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)



def ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
