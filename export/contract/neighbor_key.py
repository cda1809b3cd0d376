"""The ranking key of the reciprocal-neighbour step, defined so that it has one value everywhere.

Place in the flow: the contract (no torch).  The torch reference (``export.reference.reciprocal_neighbors``),
the ONNX function body (``export.onnx_functions``), the numpy serving form (``runtime.neighbors``)
and the CUDA kernels (``plugins/reciprocal_neighbors``) all decide the neighbour lists by this key.

Definition (for float32 rows; float16 rows are first converted to float32, exactly):

* ``p_d = float64(a_d) * float64(b_d)`` -- exact: a product of two float32 values has at most
  48 significant bits and never under- or overflows in float64.  ``p`` is zero-padded to
  ``Dp = padded_dim(D)``, the next power of two.
* ``dot(a, b)`` sums ``p`` by a fixed pairwise tree in double-double arithmetic: level by level,
  with ``w`` halving from ``Dp / 2`` to 1, slot ``j < w`` combines itself with slot ``j + w``
  (the pattern of a warp's shuffle-down reduction), each slot a pair ``(hi, lo)``::

      s = h1 + h2;  v = s - h1;  e = (h1 - (s - v)) + (h2 - v)      # TwoSum: s + e == h1 + h2
      e = e + (l1 + l2);  h = s + e;  l = e - (h - s)               # renormalise (FastTwoSum)

  and ``dot = hi + lo`` of the root, rounded once.  Every step is one IEEE-754 binary64 addition
  or subtraction in a fixed order, so the value is the same on every CPU, BLAS and GPU, and for
  every position the rows take in a call (a GEMM promises neither).  Its error is about
  ``log2(Dp) * 2^-105 * sum|p|``: it equals the correctly rounded dot product (``math.fsum`` of
  the products) except when the exact sum lies within that distance of a rounding boundary.
* ``norm(b) = max(sqrt(dot(b, b)), NORM_EPS)`` (IEEE square root, correctly rounded).
* ``key[i, j] = dot(x_i, x_j) / norm(x_j)`` (one IEEE division); ``key[i, i] = +inf``.
* Row ``i`` lists itself, then the other rows by key descending, equal keys to the lower index.
  "Equal" means equal keys by this definition: bitwise-identical rows always have equal keys.

No implementation needs to evaluate the double-double sum for every pair.  A fast evaluation
``F`` of the key (a BLAS GEMM in float64 or float32, a fixed float64 tree, fp16 tensor cores) is
fine wherever it decides nothing that the error bound leaves open: :func:`key_error_bound` bounds
``|F - key|`` for any float64 summation order, and candidates whose fast keys lie within twice the
bound of each other, or of the last place of a list, are decided by :func:`exact_keys`.
"""
from __future__ import annotations

import numpy as np

#: clamp of a column's norm (a zero row gets keys 0, not NaN)
NORM_EPS = 1e-12
_U = 2.0 ** -53
#: absolute slack for results that land in float64's subnormal range
_TINY = 2.0 ** -1000


def padded_dim(dim: int) -> int:
    """``Dp``: the next power of two >= dim (the tree's width)."""
    if dim < 1:
        raise ValueError(f"dim must be >= 1, found {dim}")
    return 1 << (dim - 1).bit_length()


def dd_tree_sum(p: np.ndarray) -> np.ndarray:
    """The canonical sum of the last axis of ``p`` (float64, width a power of two), see above."""
    p = np.asarray(p, dtype=np.float64)
    w = p.shape[-1]
    if w & (w - 1):
        raise ValueError(f"the tree needs a power-of-two width, found {w}")
    h = p
    lo = np.zeros_like(p)
    while w > 1:
        w //= 2
        h1, h2 = h[..., :w], h[..., w:2 * w]
        l1, l2 = lo[..., :w], lo[..., w:2 * w]
        s = h1 + h2
        v = s - h1
        e = (h1 - (s - v)) + (h2 - v)
        e = e + (l1 + l2)
        h_new = s + e
        lo = e - (h_new - s)
        h = h_new
    return h[..., 0] + lo[..., 0]


def _padded64(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float16):
        raise ValueError(f"rows must be float32 or float16, found {x.dtype}")
    d = x.shape[-1]
    out = np.zeros((*x.shape[:-1], padded_dim(d)), np.float64)
    out[..., :d] = x.astype(np.float32)
    return out


def exact_dots(a: np.ndarray, b: np.ndarray, chunk: int = 1 << 12) -> np.ndarray:
    """``dot(a[m], b[m])`` for row pairs: a, b float32/float16 [M, D] -> float64 [M]."""
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"row pairs must be two [M, D] arrays of one shape, found {a.shape} and {b.shape}")
    out = np.empty(len(a))
    for s in range(0, len(a), chunk):
        out[s:s + chunk] = dd_tree_sum(_padded64(a[s:s + chunk]) * _padded64(b[s:s + chunk]))
    return out


def norms(x: np.ndarray) -> np.ndarray:
    """``norm(x_j)`` of every row: float32/float16 [N, D] -> float64 [N]."""
    x = np.asarray(x)
    return np.maximum(np.sqrt(exact_dots(x, x)), NORM_EPS)


def exact_keys(x: np.ndarray, rows: np.ndarray, cols: np.ndarray, col_norms: np.ndarray | None = None) -> np.ndarray:
    """``key[rows[m], cols[m]]`` for pairs of rows of ``x`` (float32/float16 [N, D]); +inf where
    ``rows == cols``.  ``col_norms`` (from :func:`norms`) saves recomputing them."""
    x = np.asarray(x)
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    cols = np.asarray(cols, dtype=np.int64).reshape(-1)
    nrm = norms(x[cols]) if col_norms is None else np.asarray(col_norms, dtype=np.float64)[cols]
    key = exact_dots(x[rows], x[cols]) / nrm
    key[rows == cols] = np.inf
    return key


def row_lengths(x: np.ndarray) -> np.ndarray:
    """``sqrt(dot(x_i, x_i))`` unclamped (0 exactly for an all-zero row): the scale of row i's keys."""
    x = np.asarray(x)
    return np.sqrt(exact_dots(x, x))


def key_error_bound(dim: int, lengths) -> np.ndarray:
    """``delta_i`` with ``|F - key[i, j]| <= delta_i`` for every ``j``, where ``F`` is the key
    computed with any float64 summation order (FMA or not) of the exact products and divided by
    the canonical :func:`norms` -- e.g. a float64 GEMM or a plain float64 tree.  ``lengths`` are
    :func:`row_lengths` of the rows i.

    From ``|F_dot - s| <= gamma_D sum|p|``, ``|dot - s| <= 2^-53 |s| + 2 log2(Dp) 2^-106 sum|p|``,
    ``sum|p| <= ||x_i|| ||x_j||``, ``||x_j|| <= norm(x_j) (1 + 2^-52)`` and two roundings of the
    division: ``delta_i = (D + 8) 2^-53 ||x_i||`` with a little slack, plus a subnormal floor; 0
    for an all-zero row (every product is 0, so every evaluation is exact).
    """
    r = np.asarray(lengths, dtype=np.float64)
    return np.where(r > 0, (dim + 8) * _U * 1.0001 * r + _TINY, 0.0)
