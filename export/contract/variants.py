"""Precision variants of the exported files: their names, files and the refinement each encoder pairs with.

Place in the flow: the contract (no torch).  ``calibration`` writes the variants; the runtime and
the evaluation tools find them by these names.
"""
from __future__ import annotations

#: manifest section listing the variant files
VARIANTS_KEY = "variants"
PRECISIONS = ("fp32", "fp16", "int8")
#: the refinement is never int8; its neighbour ranking is exact in every variant
REFINE_PRECISIONS = ("fp32", "fp16")
NETWORKS = ("encoder", "nformer")


def variant_name(network: str, precision: str) -> str:
    return f"{network}.{precision}"


def variant_file(network: str, precision: str) -> str:
    return f"{network}.onnx" if precision == "fp32" else f"{network}.{precision}.onnx"


def default_refine_precision(precision: str) -> str:
    """The refinement's precision for a build at ``precision``: fp32 for fp32, fp16 for fp16 and int8."""
    return "fp32" if precision == "fp32" else "fp16"
