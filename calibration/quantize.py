"""INT8 encoders: explicit quantisation (Q/DQ nodes) calibrated on person crops.

Place in the flow: ``encoder.onnx`` (fp32, from ``export``) -> ``encoder.int8.onnx`` (for TensorRT)
or ``encoder.int8-cpu.onnx`` (for ONNX Runtime on x86 CPUs) beside it.  TensorRT (10 and 11) builds
``encoder.int8.onnx`` into an INT8 engine without any precision flag or calibrator (DESIGN.md
section 3: precision lives in the ONNX file); ONNX Runtime runs both.

The work is ONNX Runtime's ``quantize_static`` in QDQ format.  ``encoder.int8.onnx`` (precision
``int8``) has the settings TensorRT's explicit quantisation requires:

* INT8 activations, **symmetric** (zero point 0), one scale per tensor, from calibrated ranges
  (entropy, percentile or min-max: ``METHODS``);
* INT8 weights, symmetric, **per output channel** (axis 0 of Conv and of Gemm with transB=1);
* biases left in float (``QuantizeBias=False``): TensorRT's ONNX parser rejects a DequantizeLinear
  of an int32 bias, while ONNX Runtime quantises a float bias of a Q/DQ Conv itself when it fuses
  the node, so one file serves both;
* no Q/DQ on the encoder's output (``embeddings`` stays a float tensor, as the contract says).

``encoder.int8-cpu.onnx`` (precision ``int8-cpu``) is the format ONNX Runtime recommends for x86
CPUs, which its CPU provider fuses into integer kernels (``QLinearConv``, ``QLinearAdd``, ``QGemm``:
VNNI or AMX where the CPU has them, AVX2 otherwise).  With symmetric int8 activations the provider
fuses only part of the convolutions and the TensorRT file runs no faster than fp32 (BENCHMARKS.md):

* **uint8 asymmetric** activations, one scale and zero point per tensor, from the same calibration
  methods, crops and cache as the TensorRT file (the ranges differ: they are not made symmetric);
* int8 symmetric weights per output channel, **7-bit** (``reduce_range``, values within [-64, 64]):
  x86 CPUs without VNNI multiply uint8 x int8 pairs with ``vpmaddubsw``, whose int16 sums saturate
  for full 8-bit weights (ONNX Runtime's advice for AVX2 / AVX-512 without VNNI); with 7 bits no sum
  saturates, so a file calibrated and checked on one x86 CPU keeps its accuracy on another, at the
  cost of one bit of weight resolution (measured: BENCHMARKS.md);
* int32 biases (ONNX Runtime's default), ``Relu`` folded into the preceding node's output range
  (zero point 0 clips the negatives), no Q/DQ on ``embeddings``.

The refinement is never quantised: its neighbour ranking is fp32 in every variant (DESIGN.md 1).

Calibration ranges are cached (``calibration.cache``): a second build with the same model, method,
options and images reads only the ``CHECK_CROPS`` crops of the accuracy check.  Ranges are checked
before the file is written or the ranges cached: the quantised file embeds ``CHECK_CROPS`` held-out
crops (the next ones of the seeded order, not calibrated on; the calibration crops themselves, with a
note, when the folder holds no others) with a mean cosine to the fp32 encoder's of at least
``MIN_COSINE`` (``check_accuracy``), or the build stops with what it found.  Cached ranges take the
same check (the cache is a file on disk, so untrusted): an entry that does not validate, whose image
list is not the seeded selection, or that fails the check is recomputed.  Imports no torch.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
from pathlib import Path
from typing import Callable

import onnx

from export.contract.errors import InputError
from export.contract.files import sha256_file, work_dir
from export.contract.variants import CALIBRATED_PRECISIONS

from calibration import cache as calib_cache
from calibration.images import is_seeded_selection, list_candidates, read_calibration_images, read_held_out

METHODS = ("entropy", "percentile", "minmax")
DEFAULT_METHOD = "entropy"
DEFAULT_IMAGES = 512
DEFAULT_PERCENTILE = 99.999
#: operators that get Q/DQ on their inputs (all of the encoder's compute; Reshape/ReduceMean follow)
OP_TYPES = ("Conv", "Gemm", "MatMul", "Add", "MaxPool")
#: the CPU file also lists Relu: with asymmetric activations the quantiser folds it into the output
#: range of the node before it, so a Conv (+ Relu) becomes one QLinearConv
CPU_OP_TYPES = OP_TYPES + ("Relu",)
#: the CPU file's weights are 7-bit (module docstring: no saturation on x86 CPUs without VNNI)
CPU_REDUCE_RANGE = True
INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
#: the accuracy check of ranges (fresh or cached): crops it embeds and the least mean cosine to the
#: fp32 embeddings it accepts: below what INT8 gives (0.997-0.999 on the shipped model, BENCHMARKS.md;
#: `runtime parity` holds DESIGN.md 3's gate of 0.99 on a whole split), above what ranges that clip,
#: invert or are scaled 50x give (~0 to 0.95)
CHECK_CROPS = 8
MIN_COSINE = 0.98


def _ort_method(method: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile,
            "minmax": CalibrationMethod.MinMax}[method]


def quantization_options(method: str, percentile: float = DEFAULT_PERCENTILE, precision: str = "int8") -> dict:
    """Everything besides the images that the Q/DQ file of ``precision`` ("int8": TensorRT's,
    "int8-cpu": ONNX Runtime's x86 format) depends on (part of the cache key)."""
    if method not in METHODS:
        raise InputError(f"unknown calibration method {method!r}; expected one of {', '.join(METHODS)}")
    if precision not in CALIBRATED_PRECISIONS:
        raise InputError(f"no INT8 encoder format for precision {precision!r}; expected one of "
                         f"{', '.join(CALIBRATED_PRECISIONS)}")
    if precision == "int8":
        options = {"activations": "int8-symmetric-per-tensor", "weights": "int8-symmetric-per-channel",
                   "quantize_bias": False, "op_types": list(OP_TYPES), "output_quantized": False}
    else:
        options = {"activations": "uint8-asymmetric-per-tensor",
                   "weights": "int8-symmetric-per-channel" + ("-7bit" if CPU_REDUCE_RANGE else ""),
                   "quantize_bias": True, "op_types": list(CPU_OP_TYPES), "output_quantized": False}
    if method == "percentile":
        options["percentile"] = float(percentile)
    return options


def _quantize_settings(precision: str, method: str, percentile: float) -> tuple[dict, dict]:
    """(``quantize_static`` keyword arguments, its ``extra_options``) of one format."""
    from onnxruntime.quantization import QuantType

    if precision == "int8":
        kwargs = {"op_types_to_quantize": list(OP_TYPES), "reduce_range": False,
                  "activation_type": QuantType.QInt8, "weight_type": QuantType.QInt8}
        extra = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                 "OpTypesToExcludeOutputQuantization": ["Gemm"], "CalibStridedMinMax": 1,
                 "CalibTensorRangeSymmetric": True}
    else:
        kwargs = {"op_types_to_quantize": list(CPU_OP_TYPES), "reduce_range": CPU_REDUCE_RANGE,
                  "activation_type": QuantType.QUInt8, "weight_type": QuantType.QInt8}
        extra = {"ActivationSymmetric": False, "WeightSymmetric": True, "QuantizeBias": True,
                 "OpTypesToExcludeOutputQuantization": ["Gemm"], "CalibStridedMinMax": 1,
                 "CalibTensorRangeSymmetric": False}
    if method == "percentile":
        extra["CalibPercentile"] = float(percentile)
    return kwargs, extra


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
                     batch_size: int = 16, precision: str = "int8", log: Callable[[str], None] = print) -> dict:
    """Write the Q/DQ INT8 version of the fp32 encoder ``src`` to ``dst``; return its calibration record.

    ``precision``: "int8" (TensorRT's format) or "int8-cpu" (ONNX Runtime's x86 format; module
    docstring).  Both read the same crops (same selection for the same data, count and seed) and keep
    their ranges in the same cache, one entry per format.  ``cache_dir`` (default: ``dst``'s
    directory) holds ``calibration_cache/``.  The record says which images were used, what was
    skipped, whether the ranges came from the cache, and the accuracy check they passed.

    Freshly calibrated ranges are checked before anything is written (:func:`check_accuracy`: the
    quantised file against ``src`` on a few of the crops already in memory); ranges that fail it
    raise :class:`InputError` and are not cached.  A cache entry that does not validate, or whose
    ranges do not quantise the encoder, is recomputed with a note (``calibration.cache``).
    """
    from calibration.images import ImageBatches

    src, dst = Path(src), Path(dst)
    options = quantization_options(method, percentile, precision)
    candidates = list_candidates(calib_data)
    if count < 1:
        raise InputError(f"--calib-images must be >= 1, got {count}")
    # fewer crops than asked for: all of them (read_calibration_images says so when it reads them)
    key = calib_cache.cache_key(sha256_file(src), method, options, candidates.digest(),
                                min(count, len(candidates.files)), seed)
    # the TensorRT file's entries keep their name ("encoder.<method>.<digest>"); version 1 entries are recomputed
    path = calib_cache.cache_path(cache_dir or dst.parent, "encoder" if precision == "int8" else "encoder.cpu", key)
    entry = calib_cache.load(path, key, tensors=_tensor_names(src), log=log)
    if entry is not None and not is_seeded_selection(candidates, entry["images"],
                                                     [s["path"] for s in entry["skipped"]], key["count"], seed):
        log(f"calibration: note: the calibration cache {path} is not usable (its image list is not the seeded "
            "selection of the folder's crops); recomputing the ranges from the crops")
        entry = None
    # a flocked work folder: removed whatever ends the block; a SIGKILLed run's is swept by the next one
    with work_dir(dst.parent, ".quantize-") as work:
        if entry is not None:
            try:
                _quantize(src, work / "model.onnx", None, calib_cache.ranges_file(entry, work), precision, method,
                          percentile)
            except Exception as err:  # noqa: BLE001  (ranges that validate but do not quantise: damaged)
                reason = " ".join(f"{type(err).__name__}: {err}".split())[:160]
                log(f"calibration: note: the cached ranges in {path} do not quantise the encoder ({reason}); "
                    "recomputing them from the crops")
                entry = None
            else:
                # the ranges passed the accuracy check when they were made; the file is untrusted, so
                # the check runs again (only its crops are read)
                from calibration.images import read_check_crops

                # on held-out crops chosen here as for fresh ranges (not the ones the entry lists); with
                # none in the folder, on the first calibration crops the entry lists
                _, crops = read_held_out(candidates, set(entry["images"]), size_hw, mean, std, CHECK_CROPS, seed)
                held_out = len(crops) > 0
                if not held_out:
                    crops = read_check_crops(candidates, entry["images"], size_hw, mean, std, CHECK_CROPS)
                check = check_accuracy(src, work / "model.onnx", crops) if crops is not None else None
                if check is not None:
                    check["held_out"] = held_out
                if check is None or not check["cosine_mean"] >= MIN_COSINE:
                    why = ("the crops it lists are not in the folder any more" if check is None else
                           f"its ranges give embeddings of mean cosine {check['cosine_mean']:.3f} to fp32")
                    log(f"calibration: note: the calibration cache {path} is not usable ({why}); recomputing the "
                        "ranges from the crops")
                    entry = None
                else:
                    log(f"calibration: ranges from cache {path} ({check['crops']} check crops read)")
                    used, skipped = entry["images"], entry["skipped"]
        if entry is None:
            crops = read_calibration_images(candidates, count, size_hw, mean, std, seed, log)
            log(f"calibration: {method} ranges from {len(crops.files)} crops of {candidates.root} ({candidates.layout})")
            ranges = work / "ranges.json"
            _quantize(src, work / "model.onnx", ImageBatches(crops.images, INPUT_NAME, batch_size), ranges, precision,
                      method, percentile)
            # the check embeds crops the ranges never saw, where the folder holds more than were calibrated on
            used = [str(p.relative_to(candidates.root)) for p in crops.files]
            check_files, held = read_held_out(candidates, set(used), size_hw, mean, std, CHECK_CROPS, seed)
            held_out = len(check_files) > 0
            check = check_accuracy(src, work / "model.onnx", held if held_out else crops.images)
            check["held_out"] = held_out
            if not held_out:
                log(f"calibration: note: {candidates.root} holds no readable crop beyond the {len(crops.files)} "
                    "calibrated on, so the accuracy check embeds calibration crops (optimistic); leave some crops "
                    "out (a smaller --calib-images) for a held-out check, and run `runtime parity`")
            if not check["cosine_mean"] >= MIN_COSINE:  # NaN fails too
                where = "held-out crops (not calibrated on)" if held_out else "the calibration crops"
                raise InputError(
                    f"the {precision} encoder is not written: on {check['crops']} {where} its "
                    f"embeddings have mean cosine {check['cosine_mean']:.3f} (min {check['cosine_min']:.3f}) to the "
                    f"fp32 encoder's, expected >= {MIN_COSINE} (INT8 usually gives about 0.997); nothing was written "
                    f"or cached. Calibrate on crops like the ones served (--calib-data {candidates.root}), on more of "
                    "them (--calib-images) or with another --calib-method, or build --precision fp16")
            skipped = crops.summary()["skipped"]
            calib_cache.save(path, key, json.loads(ranges.read_text()), used, skipped, check,
                             [str(p.relative_to(candidates.root)) for p in check_files])
        # copied into dst (the staged name the caller holds a lock on), not moved: a rename would put
        # an unlocked inode under that name, which another build's sweep could take for a killed one's
        shutil.copyfile(work / "model.onnx", dst)
    return {"method": method, "options": options, "images": len(used), "seed": seed,
            "source": str(candidates.root), "layout": candidates.layout, "skipped": len(skipped),
            "cache": str(path), "cache_hit": entry is not None, "check": check}


def _tensor_names(path: Path) -> set[str]:
    """Names of the tensors of an ONNX file's graph (inputs and node outputs): what can have a range."""
    model = onnx.load(path, load_external_data=False)
    return {i.name for i in model.graph.input} | {o for n in model.graph.node for o in n.output}


def _quantize(src: Path, out: Path, reader, ranges: Path, precision: str, method: str, percentile: float) -> None:
    """``quantize_static`` of ``src`` into ``out`` (ranges from ``reader``'s crops into ``ranges``, or
    from ``ranges`` when there is no reader), then the format's graph checks."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    settings, extra = _quantize_settings(precision, method, percentile)
    with _quiet_ort():
        quantize_static(str(src), str(out), reader, quant_format=QuantFormat.QDQ,
                        per_channel=True, calibrate_method=_ort_method(method), extra_options=extra,
                        calibration_cache_path=str(ranges), **settings)
    model = onnx.load(out)
    check_qdq_encoder(model) if precision == "int8" else check_cpu_encoder(model)
    onnx.checker.check_model(model, full_check=True)


def check_accuracy(src: str | Path, quantized: str | Path, images) -> dict:
    """Embed the first ``CHECK_CROPS`` of ``images`` (preprocessed crops, NCHW float32) with the fp32
    encoder ``src`` and the quantised file in ONNX Runtime (CPU); the cosines of the two embeddings:
    ``{"crops", "cosine_mean", "cosine_min"}`` (``quantize_encoder`` refuses a mean below ``MIN_COSINE``)."""
    import numpy as np
    import onnxruntime as ort

    from export.contract.parity import cosine_rows

    batch = np.ascontiguousarray(images[:CHECK_CROPS], dtype=np.float32)

    def embed(path):
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]

    cos = cosine_rows(embed(quantized), embed(src))
    return {"crops": int(len(batch)), "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}


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


def check_cpu_encoder(model: onnx.ModelProto) -> None:
    """What ONNX Runtime's x86 provider needs of ``encoder.int8-cpu.onnx`` to run every Conv/Gemm in
    integer kernels: each reads a dequantised uint8 activation and dequantised int8 weights (per
    output channel, zero point 0, 7-bit when ``CPU_REDUCE_RANGE``); ``embeddings`` is a float output
    of the Gemm (never rounded to 8 bits); graph input and output stay float32."""
    import numpy as np
    from onnx import numpy_helper

    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    compute = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    if not compute:
        raise RuntimeError("the quantised encoder has no Conv/Gemm nodes")
    limit = 64 if CPU_REDUCE_RANGE else 127
    for node in compute:
        act, weight = (producers.get(name) for name in node.input[:2])
        for role, dq, dtype in (("activation", act, onnx.TensorProto.UINT8), ("weight", weight, onnx.TensorProto.INT8)):
            if dq is None or dq.op_type != "DequantizeLinear":
                raise RuntimeError(f"{node.op_type} {node.name}: its {role} is not dequantised")
            zp = inits.get(dq.input[2]) if len(dq.input) > 2 else None
            if zp is None or zp.data_type != dtype:
                raise RuntimeError(f"{node.op_type} {node.name}: {role} zero point is not "
                                   f"{onnx.TensorProto.DataType.Name(dtype).lower()}")
        w = inits.get(weight.input[0])
        if w is None or numpy_helper.to_array(inits[weight.input[2]]).any():
            raise RuntimeError(f"{node.op_type} {node.name}: weights are not constant symmetric int8")
        values = numpy_helper.to_array(w)
        if np.abs(values.astype(np.int32)).max(initial=0) > limit:
            raise RuntimeError(f"{node.op_type} {node.name}: int8 weights exceed +-{limit}")
        if numpy_helper.to_array(inits[weight.input[1]]).size != values.shape[0]:
            raise RuntimeError(f"{node.op_type} {node.name}: weights are not quantised per output channel")
    for value in (*model.graph.input, *model.graph.output):
        if value.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            raise RuntimeError(f"graph input/output {value.name} is not float32")
    for value in model.graph.output:
        if value.name in producers and producers[value.name].op_type == "DequantizeLinear":
            raise RuntimeError(f"graph output {value.name} is rounded to 8 bits (DequantizeLinear)")
