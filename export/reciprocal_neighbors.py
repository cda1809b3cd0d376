"""The reciprocal top-k neighbour step of NFormer: the one reference implementation.

Every other implementation (the ONNX function body written by ``export.onnx_functions``, the
TensorRT plugin in ``plugins/reciprocal_neighbors``) is tested against :func:`reciprocal_neighbors`.

Contract (DESIGN.md section 1, made exact):

* ``key[i, j] = (x_i . x_j) / max(||x_j||, eps)`` computed in float64 from the float32 (or float16)
  input.  This is the cosine ranking of the original (the row scale ``1/||x_i||`` does not change
  the order of row ``i``).  Products of two fp32 numbers are exact in fp64 and a 256-term fp64 sum
  is accurate to ~1e-14, so the neighbour sets are the same on every BLAS and GPU: an fp32
  accumulation flips near-tied neighbours between libraries (DESIGN.md "precision rule").
* Each row keeps itself first: ``idx[i, 0] = i``.  The original gets this from self-similarity
  being maximal; stating it makes exact duplicates and zero vectors safe (no empty softmax row).
* The remaining ``k_eff - 1`` slots hold the other rows by decreasing key; equal keys are broken by
  the lower index first (the ONNX ``TopK`` rule).  ``k_eff = min(k, N)``.
* ``valid[i, t] = i in idx[idx[i, t]]`` -- the reciprocal condition; ``valid[i, 0]`` is always true.

The dense mask of the original, ``M[i, j] = 1 iff j in idx[i] and i in idx[j]``, is
:func:`dense_reciprocal_mask` of these two arrays.
"""
from __future__ import annotations

import torch

#: Op type of the custom ONNX node and name of the TensorRT plugin creator (one name for both).
OP_TYPE = "ReciprocalNeighbors"
#: Custom ONNX domain of that node (TensorRT matches on op type + version + namespace, not domain).
OP_DOMAIN = "nformer"
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = ""
NORM_EPS = 1e-12
#: Rows of the similarity computed at once: at most ROW_BLOCK, and fewer for large N so that a
#: block holds at most BLOCK_ELEMENTS keys (256 MB of float64): memory stays O(N) at any N.
ROW_BLOCK = 1024
BLOCK_ELEMENTS = 1 << 25


def row_block(n: int, block_elements: int = BLOCK_ELEMENTS) -> int:
    """Rows per similarity block for a set of N rows: ``clip(block_elements // N, 1, ROW_BLOCK)``."""
    return max(1, min(ROW_BLOCK, block_elements // max(n, 1)))


def effective_k(k: int, n: int) -> int:
    """``min(k, N)``: every N >= 1 works."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return min(k, n)


def ranking_key(rows: torch.Tensor, features: torch.Tensor, norms: torch.Tensor, row_offset: int) -> torch.Tensor:
    """fp64 ranking key of a block of rows against all rows, self set to +inf.

    rows: [B, R, D] float64, features: [B, N, D] float64, norms: [B, N] float64 (clamped).
    """
    key = torch.matmul(rows, features.transpose(1, 2)) / norms[:, None, :]
    r = torch.arange(rows.shape[1], device=rows.device)
    key[:, r, r + row_offset] = float("inf")
    return key


def _top_k_lowest_index_ties(key: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries of each row, by value desc then index asc."""
    top_values = torch.topk(key, k, dim=-1, sorted=True).values
    threshold = top_values[..., -1:]
    above = key > threshold
    tied = key == threshold
    need = k - above.sum(-1, keepdim=True)
    take_tied = tied & (torch.cumsum(tied.to(torch.int64), dim=-1) <= need)
    chosen = above | take_tied
    # nonzero() walks rows in order and columns ascending: exactly k per row.
    cols = chosen.reshape(-1, key.shape[-1]).nonzero()[:, 1].reshape(*key.shape[:-1], k)
    vals = torch.gather(key, -1, cols)
    order = torch.sort(vals, dim=-1, descending=True, stable=True).indices
    return torch.gather(cols, -1, order)


def reciprocal_neighbors(features: torch.Tensor, k: int,
                         block_elements: int = BLOCK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k neighbour lists and their reciprocal validity.

    Args:
        features: [B, N, D] float tensor (any float dtype; the ranking is done in float64).
        k: neighbours per row (the original's ``topk``, 20).
        block_elements: memory budget of one similarity block (see :func:`row_block`); the
            result does not depend on it.

    Returns:
        ``(idx, valid)``: ``idx`` int64 [B, N, k_eff] with ``idx[:, i, 0] == i``; ``valid`` bool
        [B, N, k_eff], true where the neighbour also lists ``i``.
    """
    if features.dim() != 3:
        raise ValueError(f"features must be [B, N, D], got shape {tuple(features.shape)}")
    b, n, _ = features.shape
    k_eff = effective_k(k, n)
    x = features.detach().to(torch.float64)
    norms = torch.linalg.vector_norm(x, dim=-1).clamp_min(NORM_EPS)
    blocks = []
    rows = row_block(n, block_elements)
    for start in range(0, n, rows):
        key = ranking_key(x[:, start:start + rows], x, norms, start)
        blocks.append(_top_k_lowest_index_ties(key, k_eff))
    idx = torch.cat(blocks, dim=1)
    return idx, reciprocal_validity(idx)


def reciprocal_validity(idx: torch.Tensor) -> torch.Tensor:
    """``valid[b, i, t] = i in idx[b, idx[b, i, t]]`` for idx [B, N, k]."""
    b, n, k = idx.shape
    offset = (torch.arange(b, device=idx.device) * n)[:, None, None]
    back = idx.reshape(b * n, k)[(idx + offset).reshape(-1)].reshape(b, n, k, k)
    me = torch.arange(n, device=idx.device)[None, :, None, None]
    return (back == me).any(-1)


def dense_reciprocal_mask(idx: torch.Tensor, valid: torch.Tensor, n: int) -> torch.Tensor:
    """The original's N x N mask ``M = topk_mask * topk_mask^T`` from the O(N k) form (tests only)."""
    b = idx.shape[0]
    mask = torch.zeros(b, idx.shape[1], n, dtype=torch.bool, device=idx.device)
    mask.scatter_(2, idx, valid)
    return mask
