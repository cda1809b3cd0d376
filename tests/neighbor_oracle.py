"""Brute-force oracles of the neighbour lists (tests only): every key of every pair, then a sort.

``fsum_lists`` knows nothing of the project's arithmetic: keys are ``math.fsum`` of the exact
float64 products (the correctly rounded dot product), divided by ``max(sqrt(fsum(x_j^2)), eps)``.
``canonical_lists`` uses the contract's double-double key (``export.contract.neighbor_key``).  On
the test sets both give the same lists; the first checks the second.
"""
from __future__ import annotations

import math

import numpy as np

from export.contract.neighbor_key import NORM_EPS, exact_keys, norms


def _lists_from_keys(key: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    n = key.shape[0]
    k_eff = min(k, n)
    np.fill_diagonal(key, np.inf)
    cols = np.broadcast_to(np.arange(n), key.shape)
    order = np.lexsort((cols, -key), axis=1)       # key desc, then index asc
    idx = order[:, :k_eff].astype(np.int32)
    lists = [set(r) for r in idx.tolist()]
    valid = np.array([[i in lists[j] for j in row] for i, row in enumerate(idx.tolist())],
                     dtype=np.int32).reshape(n, k_eff)
    return idx, valid


def fsum_lists(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(idx, valid) int32 [N, k_eff] from math.fsum keys (slow: N <= a few hundred)."""
    x64 = np.asarray(x, dtype=np.float32).astype(np.float64)
    n = len(x64)
    nrm = [max(math.sqrt(math.fsum(r * r)), NORM_EPS) for r in x64]
    key = np.empty((n, n))
    for i in range(n):
        for j in range(n):
            key[i, j] = math.fsum(x64[i] * x64[j]) / nrm[j]
    return _lists_from_keys(key, k)


def canonical_lists(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(idx, valid) int32 [N, k_eff] from the contract's key of every pair (N up to ~2,000)."""
    x = np.asarray(x)
    n = len(x)
    nrm = norms(x)
    rows, cols = np.divmod(np.arange(n * n), n)
    key = exact_keys(x, rows, cols, nrm).reshape(n, n)
    return _lists_from_keys(key, k)
