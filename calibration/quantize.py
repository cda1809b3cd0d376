"""INT8 encoder: explicit quantisation (Q/DQ nodes) calibrated on person crops.

Place in the flow: ``encoder.onnx`` (fp32, from ``export``) -> ``encoder.int8.onnx`` beside it, which
ONNX Runtime runs on a CPU as it is and TensorRT (10 and 11) builds into an INT8 engine without any
precision flag or calibrator (DESIGN.md section 3: precision lives in the ONNX file).

The work is ONNX Runtime's ``quantize_static`` in QDQ format with the settings TensorRT's explicit
quantisation requires:

* INT8 activations, **symmetric** (zero point 0), one scale per tensor, from calibrated ranges
  (entropy, percentile or min-max: ``METHODS``);
* INT8 weights, symmetric, **per output channel** (axis 0 of Conv and of Gemm with transB=1);
* biases left in float (``QuantizeBias=False``): TensorRT's ONNX parser rejects a DequantizeLinear
  of an int32 bias, while ONNX Runtime quantises a float bias of a Q/DQ Conv itself when it fuses
  the node, so one file serves both;
* no Q/DQ on the encoder's output (``embeddings`` stays a float tensor, as the contract says).

The refinement is never quantised: its neighbour ranking is fp32 in every variant (DESIGN.md 1).

Calibration ranges are cached (``calibration.cache``): a second build with the same model, method,
options and images reads no image.  Imports no torch.
"""
from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import onnx

from export.contract.errors import InputError
from export.contract.files import sha256_file

from calibration import cache as calib_cache
from calibration.images import list_candidates, read_calibration_images

METHODS = ("entropy", "percentile", "minmax")
DEFAULT_METHOD = "entropy"
DEFAULT_IMAGES = 512
DEFAULT_PERCENTILE = 99.999
#: operators that get Q/DQ on their inputs (all of the encoder's compute; Reshape/ReduceMean follow)
OP_TYPES = ("Conv", "Gemm", "MatMul", "Add", "MaxPool")
INPUT_NAME = "images"


def _ort_method(method: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile,
            "minmax": CalibrationMethod.MinMax}[method]


def quantization_options(method: str, percentile: float = DEFAULT_PERCENTILE) -> dict:
    """Everything besides the images that the Q/DQ file depends on (part of the cache key)."""
    if method not in METHODS:
        raise InputError(f"unknown calibration method {method!r}; expected one of {', '.join(METHODS)}")
    options = {"activations": "int8-symmetric-per-tensor", "weights": "int8-symmetric-per-channel",
               "quantize_bias": False, "op_types": list(OP_TYPES), "output_quantized": False}
    if method == "percentile":
        options["percentile"] = float(percentile)
    return options


@contextlib.contextmanager
def _quiet_ort():
    """ONNX Runtime's quantiser prints progress and advises pre-processing (the export already folds
    BatchNorm and runs the ONNX optimiser); keep the build's output to our own lines."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def quantize_encoder(src: str | Path, dst: str | Path, calib_data: str | Path, *, size_hw, mean, std,
                     method: str = DEFAULT_METHOD, count: int = DEFAULT_IMAGES, seed: int = 0,
                     percentile: float = DEFAULT_PERCENTILE, cache_dir: str | Path | None = None,
                     batch_size: int = 16, log: Callable[[str], None] = print) -> dict:
    """Write the Q/DQ INT8 version of the fp32 encoder ``src`` to ``dst``; return its calibration record.

    ``cache_dir`` (default: ``dst``'s directory) holds ``calibration_cache/``.  The record says which
    images were used, what was skipped, and whether the ranges came from the cache.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from calibration.images import ImageBatches

    src, dst = Path(src), Path(dst)
    options = quantization_options(method, percentile)
    candidates = list_candidates(calib_data)
    if count < 1:
        raise InputError(f"--calib-images must be >= 1, got {count}")
    if len(candidates.files) < count:
        raise InputError(f"{candidates.root} holds {len(candidates.files)} candidate image(s) but --calib-images "
                         f"asks for {count}; pass --calib-images {len(candidates.files)} or fewer, or add crops")
    key = calib_cache.cache_key(sha256_file(src), method, options, candidates.digest(), count, seed)
    path = calib_cache.cache_path(cache_dir or dst.parent, "encoder", key)
    entry = calib_cache.load(path, key)
    extra = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
             "OpTypesToExcludeOutputQuantization": ["Gemm"], "CalibStridedMinMax": 1,
             "CalibTensorRangeSymmetric": True}
    if method == "percentile":
        extra["CalibPercentile"] = float(percentile)
    work = Path(tempfile.mkdtemp(prefix=".quantize-", dir=dst.parent))
    try:
        if entry is not None:
            log(f"calibration: ranges from cache {path} (no image read)")
            reader, ranges = None, calib_cache.ranges_file(entry, work)
            used, skipped = entry["images"], entry["skipped"]
        else:
            crops = read_calibration_images(candidates, count, size_hw, mean, std, seed, log)
            log(f"calibration: {method} ranges from {count} crops of {candidates.root} ({candidates.layout})")
            reader, ranges = ImageBatches(crops.images, INPUT_NAME, batch_size), work / "ranges.json"
            summary = crops.summary()
            used, skipped = [str(p.relative_to(candidates.root)) for p in crops.files], summary["skipped"]
        with _quiet_ort():
            quantize_static(str(src), str(work / "model.onnx"), reader, quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(OP_TYPES), per_channel=True, reduce_range=False,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            calibrate_method=_ort_method(method), extra_options=extra,
                            calibration_cache_path=str(ranges))
        if entry is None:
            import json

            calib_cache.save(path, key, json.loads(ranges.read_text()), used, skipped)
        model = onnx.load(work / "model.onnx")
        check_qdq_encoder(model)
        onnx.checker.check_model(model, full_check=True)
        shutil.move(str(work / "model.onnx"), dst)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"method": method, "options": options, "images": count, "seed": seed,
            "source": str(candidates.root), "layout": candidates.layout, "skipped": len(skipped),
            "cache": str(path), "cache_hit": entry is not None}


def check_qdq_encoder(model: onnx.ModelProto) -> None:
    """What TensorRT needs of the file: every Conv/Gemm reads dequantised int8 activations and
    weights, zero points are 0 (symmetric), and the graph's input and output stay float32."""
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    compute = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    if not compute:
        raise RuntimeError("the quantised encoder has no Conv/Gemm nodes")
    for node in compute:
        for name in node.input[:2]:
            dq = producers.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                raise RuntimeError(f"{node.op_type} {node.name}: input {name} is not dequantised int8")
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            zp = inits.get(node.input[2])
            if zp is not None and any(onnx.numpy_helper.to_array(zp).ravel() != 0):
                raise RuntimeError(f"{node.name}: zero point is not 0 (TensorRT needs symmetric quantisation)")
    for value in (*model.graph.input, *model.graph.output):
        if value.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            raise RuntimeError(f"graph input/output {value.name} is not float32")
