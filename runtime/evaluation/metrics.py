"""Retrieval evaluation with the Market-1501 protocol (the original's ``eval_func``), numpy only."""
from __future__ import annotations

import numpy as np

from export.contract.errors import InputError, check_count


def evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50):
    """CMC curve and mAP.

    For each query, gallery items of the same identity seen by the same camera are removed; queries
    with no remaining match are skipped.  Ties in distance keep gallery order (stable sort).

    Returns ``(cmc, mAP)``: ``cmc`` float array [max_rank] (``cmc[0]`` is Rank-1), ``mAP`` float.
    """
    distmat = np.asarray(distmat, dtype=np.float64)
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)
    if distmat.ndim != 2 or distmat.shape != (len(q_pids), len(g_pids)) or len(q_camids) != len(q_pids) \
            or len(g_camids) != len(g_pids):
        raise InputError(f"distmat must be [num_query, num_gallery] = [{len(q_pids)}, {len(g_pids)}] with "
                         f"matching id and camera arrays, found {distmat.shape}")
    max_rank = check_count(max_rank, "max_rank")
    num_q, num_g = distmat.shape
    max_rank = min(max_rank, num_g)
    order = np.argsort(distmat, axis=1, kind="stable")
    matches = (g_pids[order] == q_pids[:, None])
    all_cmc, all_ap = [], []
    for q in range(num_q):
        keep = ~((g_pids[order[q]] == q_pids[q]) & (g_camids[order[q]] == q_camids[q]))
        hits = matches[q][keep]
        if not hits.any():
            continue
        cmc = hits.cumsum()
        cmc[cmc > 1] = 1
        all_cmc.append(cmc[:max_rank])
        num_rel = hits.sum()
        precision = hits.cumsum() / (np.arange(len(hits)) + 1.0)
        all_ap.append(float((precision * hits).sum() / num_rel))
    if not all_cmc:
        raise InputError("no query has a match in the gallery (after removing same-camera matches)")
    cmc = np.asarray([np.pad(c, (0, max_rank - len(c)), mode="edge") for c in all_cmc], dtype=np.float64)
    return cmc.mean(axis=0), float(np.mean(all_ap))


def euclidean_distances(query: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances between rows (L2-normalised rows: the order of cosine similarity)."""
    q = np.asarray(query, np.float64)
    g = np.asarray(gallery, np.float64)
    d = (q * q).sum(1)[:, None] + (g * g).sum(1)[None, :] - 2.0 * q @ g.T
    return np.maximum(d, 0.0)
