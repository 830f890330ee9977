"""ONNX Runtime's explicit (Q/DQ) quantization: calibrated ranges, then `quantize_static`.

`quantize_static` in QDQ format: symmetric activations and weights (zero point 0, what TensorRT requires), weights
per output channel (Conv axis 0, MatMul axis 1), biases left in float (TensorRT fuses them), no Q/DQ on op outputs.
The tensor ranges come from ONNX Runtime's own calibrators (`CALIBRATION_METHODS`; MinMax by default for both
precisions), run one sample at a time over only the activations that get quantized (so memory stays bounded on a
full-size tower), and are handed to `quantize_static` as its calibration cache.

Scales: int8 is ORT's symmetric rule, range / 127. For float8 ORT derives every scale from the tensor's standard
deviation (its Distribution calibration; weights too), which saturates everything beyond ~4.5 σ — DINOv2's outlier
channels and peaked weights: on the trained fixture 51.5 % anchor agreement, matched cosine 0.54 (issue #21). fp8
here uses the amax rule TensorRT's own fp8 recipes use (`float8_overrides`): scale = amax / 448 per weight output
channel and per activation (amax from the calibrated range), handed to `quantize_static` as tensor overrides.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx

from aot_export.onnx_io import topologically_sorted

from .data import CalibrationData
from .qdq_graph import OP_TYPES, QuantPlan, restore_float_inputs, restore_metadata


@dataclass(frozen=True)
class Precision:
    name: str
    quant_type: str           # onnxruntime.quantization.QuantType member, for activations and weights
    calibration: str          # default onnxruntime.quantization.CalibrationMethod member (`CALIBRATION_METHODS`)
    scale_rule: str           # "range": ORT's scale from the calibrated range; "amax": `float8_overrides`
    note: str


FLOAT8_MAX = 448.0            # largest finite float8 e4m3fn value
QUANTIZATIONS = {
    "int8": Precision("int8", "QInt8", "MinMax", "range",
                      "symmetric int8 (zero point 0), per-channel weights"),
    "fp8": Precision("fp8", "QFLOAT8E4M3FN", "MinMax", "amax",
                     "float8 e4m3fn (zero point 0), scale amax/448 per weight channel and per activation; "
                     "TensorRT runs it on SM 8.9+"),
}
# ORT's calibrators. Measured on the trained fixture (issue #21, int8, everything quantized): MinMax 80.8 % anchor
# agreement, a 99.99th-percentile range 76.1 %. Distribution with fp8 is ORT's own std-based float8 scale.
CALIBRATION_METHODS = ("MinMax", "Percentile", "Entropy", "Distribution")


def calibration_method(precision: Precision, method: str | None) -> str:
    """`method` (any case) as ORT spells it, or the precision's default; ValueError for one that does not apply."""
    if method is None:
        return precision.calibration
    spelled = {name.lower(): name for name in CALIBRATION_METHODS}.get(method.lower())
    if spelled is None:
        raise ValueError(f"calibration method {method!r}: choose one of {', '.join(CALIBRATION_METHODS)}")
    if spelled == "Distribution" and precision.name != "fp8":
        raise ValueError("the Distribution calibration gives a float8 scale only; use it with fp8")
    return spelled


def _calibrator(method: str, model_path: Path, work: Path, tensors: Iterable[str]):
    """ORT's calibrator `method`, restricted to `tensors` (one range per quantized activation)."""
    from onnxruntime.quantization.calibrate import (DistributionCalibrater, EntropyCalibrater, MinMaxCalibrater,
                                                    PercentileCalibrater)

    only = set(tensors)
    base = {"MinMax": MinMaxCalibrater, "Percentile": PercentileCalibrater, "Entropy": EntropyCalibrater,
            "Distribution": DistributionCalibrater}[method]

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
    options = {"MinMax": {}, "Percentile": {"num_bins": 2048, "percentile": 99.999},
               "Entropy": {"num_bins": 128, "num_quantized_bins": 128},
               "Distribution": {"num_bins": 2048, "scenario": "same"}}[method]
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
                     input_name: str, method: str | None = None) -> Path:
    """Run ORT's calibrator `method` (the precision's default if None) over every sample, one at a time; write
    ORT's calibration cache, return its path."""
    from onnxruntime.quantization.calibrate import save_tensors_data

    calibrator = _calibrator(method or precision.calibration, model_path, work, plan.activations)
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


def channel_axis(node: onnx.NodeProto, weight: np.ndarray) -> int:
    """The output-channel axis of a Conv/MatMul/Gemm weight, as ORT's per-channel quantizer takes it."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if any(a.name == "transB" and a.i for a in node.attribute) else 1
    return weight.ndim - 1


def float8_overrides(model_path: Path, plan: QuantPlan, cache: Path) -> tuple[dict, Path]:
    """The amax rule for float8: `quantize_static` tensor overrides with scale = amax / FLOAT8_MAX for every
    calibrated activation (amax = max |range|) and every output channel of every quantized weight, and the cache
    relabelled as ORT's float8 calibration requires (the overrides set every scale it would derive)."""
    import ml_dtypes
    from onnxruntime.quantization.calibrate import (CalibrationMethod, TensorData, TensorsData, load_tensors_data,
                                                    save_tensors_data)

    zero = np.array(0, dtype=ml_dtypes.float8_e4m3fn)
    ranges = load_tensors_data(cache)
    overrides, relabelled = {}, {}
    for name in plan.activations:
        low, high = ranges.data[name].range_value
        amax = np.float32(max(np.abs(np.asarray([low, high], dtype=np.float64)).max(), 1e-12))
        overrides[name] = [{"scale": np.array(amax / FLOAT8_MAX, dtype=np.float32), "zero_point": zero}]
        relabelled[name] = TensorData(lowest=-amax, highest=amax, avg=np.float32(0.0), std=amax)
    model = onnx.load(str(model_path))
    weights = {init.name: init for init in model.graph.initializer}
    quantized = set(plan.nodes)
    for node in model.graph.node:
        if node.name in quantized:
            weight = onnx.numpy_helper.to_array(weights[node.input[1]])
            axis = channel_axis(node, weight)
            amax = np.abs(np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)).max(axis=1)
            overrides[node.input[1]] = [{"axis": axis, "scale": np.array(max(float(a), 1e-12) / FLOAT8_MAX,
                                                                         dtype=np.float32), "zero_point": zero}
                                        for a in amax]
    path = cache.with_name("ranges.float8.json")
    save_tensors_data(TensorsData(CalibrationMethod.Distribution, relabelled), path)
    return overrides, path


def quantize_graph(precision: Precision, model_path: Path, output: Path, plan: QuantPlan, cache: Path,
                   method: str | None = None) -> int:
    """quantize_static into `output` (+ `output`.data) with the ranges in `cache` (calibrated by `method`, the
    precision's default if None) and the precision's scale rule, then `restore_float_inputs`; returns inputs
    rewired."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quant_type = getattr(QuantType, precision.quant_type)
    method = method or precision.calibration
    overrides = {}
    if precision.scale_rule == "amax" and method != "Distribution":
        overrides, cache = float8_overrides(model_path, plan, cache)
        method = "Distribution"
    with _quiet_root_warnings():
        quantize_static(str(model_path), str(output), calibration_data_reader=None, quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(OP_TYPES), per_channel=True, reduce_range=False,
                    activation_type=quant_type, weight_type=quant_type, nodes_to_quantize=list(plan.nodes),
                    use_external_data_format=True,
                    calibrate_method=getattr(CalibrationMethod, method),
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                                   "OpTypesToExcludeOutputQuantization": list(OP_TYPES),
                                   "TensorQuantOverrides": overrides},
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
