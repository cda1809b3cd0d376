"""Names and limits of the custom operation, one source for every stage (no torch).

The ONNX node ``nformer::ReciprocalNeighbors``, the TensorRT plugin creator, the CUDA kernels and
the reference function share the name :data:`OP_TYPE`.  The ranking key and ``NORM_EPS`` are in
:mod:`export.contract.neighbor_key`.
"""
from __future__ import annotations

from export.contract.errors import InputError
from export.contract.neighbor_key import NORM_EPS  # noqa: F401  (re-exported: one contract module to import)

#: Op type of the custom ONNX node and name of the TensorRT plugin creator (one name for both).
OP_TYPE = "ReciprocalNeighbors"
#: Custom ONNX domain of that node (TensorRT matches on op type + version + namespace, not domain).
OP_DOMAIN = "nformer"
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = ""
#: Largest k the kernels and the plugin accept.
MAX_K = 128
#: Rows of the similarity computed at once: at most ROW_BLOCK, and fewer for large N so that a
#: block holds at most BLOCK_ELEMENTS keys (256 MB of float64): memory stays O(N) at any N.
ROW_BLOCK = 1024
BLOCK_ELEMENTS = 1 << 25
#: candidates per row beyond k_eff that the reference and the ONNX body rescore with the canonical key
EXTRA_CANDIDATES = 16


def row_block(n: int, block_elements: int = BLOCK_ELEMENTS) -> int:
    """Rows per similarity block for a set of N rows: ``clip(block_elements // N, 1, ROW_BLOCK)``."""
    return max(1, min(ROW_BLOCK, block_elements // max(n, 1)))


def effective_k(k: int, n: int) -> int:
    """``min(k, N)``: every N >= 1 works; k must be in 1..MAX_K."""
    if not 1 <= k <= MAX_K:
        raise InputError(f"k (neighbours per row) must be in 1..{MAX_K}, found {k}")
    return min(k, n)
