"""Precision variants of the exported files: their names, files and the refinement each encoder pairs with.

Place in the flow: the contract (no torch).  ``calibration`` writes the variants; the runtime and
the evaluation tools find them by these names.

Two INT8 encoders exist because the two engines want different files (DESIGN.md 3):

* ``int8``     -- ``encoder.int8.onnx``: Q/DQ with symmetric int8 activations, what TensorRT's explicit
  quantisation builds (ONNX Runtime runs it too, to measure INT8 accuracy on a CPU, but not faster);
* ``int8-cpu`` -- ``encoder.int8-cpu.onnx``: Q/DQ with asymmetric uint8 activations, the format ONNX
  Runtime's x86 CPU provider fuses into integer kernels; TensorRT cannot build it (non-zero zero
  points), so no engine is ever made from it.
"""
from __future__ import annotations

from collections.abc import Collection

#: manifest section listing the variant files
VARIANTS_KEY = "variants"
PRECISIONS = ("fp32", "fp16", "int8", "int8-cpu")
#: the refinement is never int8; its neighbour ranking is exact in every variant
REFINE_PRECISIONS = ("fp32", "fp16")
#: precisions whose encoder is calibrated on crops (``runtime build --calib-data``)
CALIBRATED_PRECISIONS = ("int8", "int8-cpu")
#: precisions whose files are for ONNX Runtime on x86 CPUs only: TensorRT builds no engine of them
CPU_PRECISIONS = ("int8-cpu",)
NETWORKS = ("encoder", "nformer")


def variant_name(network: str, precision: str) -> str:
    return f"{network}.{precision}"


def variant_file(network: str, precision: str) -> str:
    return f"{network}.onnx" if precision == "fp32" else f"{network}.{precision}.onnx"


def refinement_precision(encoder_precision: str, available: Collection[str] = REFINE_PRECISIONS) -> str:
    """The refinement's precision for a build whose encoder runs at ``encoder_precision``.

    fp32 encoder -> fp32 refinement; fp16 or int8 encoder -> fp16 refinement when ``"fp16"`` is in
    ``available`` (the refinement precisions present: files or engines), else fp32.  A CPU variant
    (``int8-cpu``) -> fp32: ONNX Runtime's CPU provider has few fp16 kernels and runs an FP16 file
    through inserted casts, slower than fp32 and no more exact.
    """
    if encoder_precision == "fp32" or encoder_precision in CPU_PRECISIONS:
        return "fp32"
    return "fp16" if "fp16" in available else "fp32"
