"""The reciprocal top-k neighbour step of NFormer: the one reference implementation.

Every other implementation (the ONNX function body written by ``export.onnx_functions``, the numpy
serving form ``runtime.neighbors``, the TensorRT plugin in ``plugins/reciprocal_neighbors``) is
tested against :func:`reciprocal_neighbors`, and all of them against brute-force oracles.

Contract (DESIGN.md section 1, made exact on every machine):

* The ranking key is ``export.contract.neighbor_key``'s: ``key[i, j] = dot(x_i, x_j) /
  max(sqrt(dot(x_j, x_j)), eps)`` where ``dot`` sums the exact float64 products of the float32
  values by a fixed pairwise double-double tree -- one value wherever and however it is computed
  (within about 2^-100 of the correctly rounded dot product).  A float64 GEMM is not enough: its
  last bits depend on the BLAS, the CPU and where a column sits in the call, so bitwise-identical
  rows got different keys on one machine and equal keys on another.  The row scale
  ``1/||x_i||`` does not change the order of row ``i``, so this is the original's cosine ranking.
* Each row keeps itself first: ``idx[i, 0] = i``.  The original gets this from self-similarity
  being maximal; stating it makes exact duplicates and zero vectors safe (no empty softmax row).
* The remaining ``k_eff - 1`` slots hold the other rows by decreasing key; equal keys (always the
  case for bitwise-identical rows) go to the lower index first.  ``k_eff = min(k, N)``.
* ``valid[i, t] = i in idx[idx[i, t]]`` -- the reciprocal condition; ``valid[i, 0]`` is always true.

How the reference evaluates it (the scheme of every fast implementation): a float64 GEMM gives a
fast key ``F`` with ``|F - key| <= delta_i`` (:func:`export.contract.neighbor_key.key_error_bound`);
each row takes its ``c = k_eff + EXTRA_CANDIDATES`` best columns by ``F``, rescores them with the
canonical key and orders them by (key desc, index asc).  The result is certified when the last
pick's key exceeds ``F_c + delta_i`` (every column left out scored at most ``F_c``, so its key is
strictly lower); a row that is not certified (a duplicate group larger than the spare candidates
at the end of its list, an all-zero row) is ranked by the canonical key against every column.

The dense mask of the original, ``M[i, j] = 1 iff j in idx[i] and i in idx[j]``, is
:func:`dense_reciprocal_mask` of these two arrays.
"""
from __future__ import annotations

import numpy as np
import torch

from export.contract.neighbor_key import NORM_EPS, dd_tree_sum, padded_dim
from export.contract.ops import (  # noqa: F401  (re-exported for the reference's users)
    BLOCK_ELEMENTS, EXTRA_CANDIDATES, OP_DOMAIN, OP_TYPE, PLUGIN_NAMESPACE, PLUGIN_VERSION, ROW_BLOCK, effective_k,
    row_block)

#: float64 elements of the products held at once while rescoring
_RESCORE_ELEMENTS = 1 << 21
_U = 2.0 ** -53


def padded64(x: torch.Tensor) -> torch.Tensor:
    """float32 rows [..., D] -> float64 [..., Dp], zero-padded (the tree's operand)."""
    d = x.shape[-1]
    out = x.new_zeros((*x.shape[:-1], padded_dim(d)), dtype=torch.float64)
    out[..., :d] = x
    return out


def canonical_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``dot`` of padded float64 rows (:func:`padded64`) broadcast against each other: the products in
    torch (exact), their sum by the contract's own tree (``export.contract.neighbor_key.dd_tree_sum``,
    one definition for every CPU implementation)."""
    return torch.from_numpy(dd_tree_sum((a * b).cpu().numpy()))


def canonical_lengths(xp: torch.Tensor) -> torch.Tensor:
    """``sqrt(dot(x, x))`` of padded rows, unclamped.  The square root is numpy's (the IEEE,
    correctly rounded instruction): torch's vectorised float64 sqrt on a CPU is not correctly
    rounded (measured: 63 of 3,000 unit rows differ from ``math.sqrt`` in the last bit)."""
    return torch.from_numpy(np.sqrt(canonical_dots(xp, xp).cpu().numpy()))


def key_error_bound(dim: int, lengths: torch.Tensor) -> torch.Tensor:
    """``delta_i`` of ``export.contract.neighbor_key.key_error_bound`` in torch."""
    return torch.where(lengths > 0, (dim + 8) * _U * 1.0001 * lengths + 2.0 ** -1000,
                       torch.zeros_like(lengths))


def _order(cols: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``k`` of each row by (key desc, column asc); returns (columns, keys)."""
    by_col = torch.argsort(cols, dim=-1, stable=True)
    cols = torch.gather(cols, -1, by_col)
    keys = torch.gather(keys, -1, by_col)
    by_key = torch.argsort(keys, dim=-1, descending=True, stable=True)[..., :k]
    return torch.gather(cols, -1, by_key), torch.gather(keys, -1, by_key)


def _exact_row(xp: torch.Tensor, nrm: torch.Tensor, i: int, k: int) -> torch.Tensor:
    """Row ``i``'s list ranked by the canonical key against every column (xp [N, Dp], nrm [N])."""
    n, dp = xp.shape
    step = max(1, _RESCORE_ELEMENTS // dp)
    keys = torch.cat([canonical_dots(xp[i], xp[s:s + step]) for s in range(0, n, step)]) / nrm
    keys[i] = float("inf")
    return _order(torch.arange(n), keys, k)[0]


def reciprocal_neighbors(features: torch.Tensor, k: int,
                         block_elements: int = BLOCK_ELEMENTS,
                         extra: int = EXTRA_CANDIDATES) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k neighbour lists and their reciprocal validity.

    Args:
        features: [B, N, D] float tensor; rows are ranked as float32 values (float16 converts
            exactly; float64 is rounded to float32 first).  Must be finite.
        k: neighbours per row (the original's ``topk``, 20).
        block_elements: memory budget of one similarity block (see :func:`row_block`); the
            result does not depend on it.
        extra: spare candidates per row before the exact fallback; the result does not depend on it.

    Returns:
        ``(idx, valid)``: ``idx`` int64 [B, N, k_eff] with ``idx[:, i, 0] == i``; ``valid`` bool
        [B, N, k_eff], true where the neighbour also lists ``i``.
    """
    if features.dim() != 3:
        raise ValueError(f"features must be [B, N, D], got shape {tuple(features.shape)}")
    b, n, d = features.shape
    k_eff = effective_k(k, n)
    x32 = features.detach().to(torch.float32).cpu()
    if not torch.isfinite(x32).all():
        raise ValueError("features must be finite (NaN or inf found, or values beyond float32)")
    xp = padded64(x32)                                            # [B, N, Dp]
    dp = xp.shape[-1]
    lengths = canonical_lengths(xp)                               # [B, N]
    nrm = lengths.clamp_min(NORM_EPS)
    delta = key_error_bound(d, lengths)
    x64 = x32.to(torch.float64)
    c = min(n, k_eff + max(0, extra))
    idx = torch.empty((b, n, k_eff), dtype=torch.int64)
    rows = row_block(n, block_elements)
    sub = max(1, _RESCORE_ELEMENTS // (c * dp))
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        r = torch.arange(start, stop)
        fast = torch.matmul(x64[:, start:stop], x64.transpose(1, 2)) / nrm[:, None, :]
        fast[:, r - start, r] = float("inf")
        cand_fast, cand = torch.topk(fast, c, dim=-1, sorted=True)   # [B, R, c]
        del fast
        for s in range(0, stop - start, sub):
            rs = slice(s, s + sub)
            cols = cand[:, rs]
            gathered = torch.gather(xp[:, None].expand(b, cols.shape[1], n, dp), 2,
                                    cols[..., None].expand(*cols.shape, dp))
            keys = canonical_dots(xp[:, start:stop][:, rs, None, :], gathered)
            keys = keys / torch.gather(nrm[:, None].expand(b, cols.shape[1], n), 2, cols)
            keys[cols == r[rs][None, :, None]] = float("inf")
            picked, picked_keys = _order(cols, keys, k_eff)
            idx[:, start + s:start + s + cols.shape[1]] = picked
            if c < n and k_eff > 1:
                certified = picked_keys[..., -1] > cand_fast[:, rs, -1] + delta[:, start:stop][:, rs]
                for bb, rr in (~certified).nonzero().tolist():
                    i = start + s + rr
                    idx[bb, i] = _exact_row(xp[bb], nrm[bb], i, k_eff)
    return idx.to(features.device), reciprocal_validity(idx).to(features.device)


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
