"""Precision variants of the exported files: their names, files and the refinement each encoder pairs with.

Place in the flow: the contract (no torch).  ``calibration`` writes the variants; the runtime and
the evaluation tools find them by these names.
"""
from __future__ import annotations

from collections.abc import Collection

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


def refinement_precision(encoder_precision: str, available: Collection[str] = REFINE_PRECISIONS) -> str:
    """The refinement's precision for a build whose encoder runs at ``encoder_precision``.

    fp32 encoder -> fp32 refinement; fp16 or int8 encoder -> fp16 refinement when ``"fp16"`` is in
    ``available`` (the refinement precisions present: files or engines), else fp32.
    """
    if encoder_precision == "fp32":
        return "fp32"
    return "fp16" if "fp16" in available else "fp32"
