"""``runtime threshold``: fit the open-set distance from labelled data (TAR at a chosen FAR).

Place in the flow: evaluation on a Market-1501-layout data set; the result is stored with the model
(``runtime.serving.open_set``) and used by ``runtime serve``.  The query split is searched against
the gallery split the way the service searches: raw embeddings from ``Pipeline.embed``, a
``Gallery`` of the gallery split, ``Gallery.distances`` refined (each request's queries and the
gallery as one set; ``request_size`` queries per request, 1 by default, as a camera pipeline asks)
and encoder-only.  Refined distances move with the request's size (the queries join the set), so
a threshold fitted for one size describes requests of that size.  Pairs are (query, gallery item)
seen by different cameras -- the service leaves same-camera items out -- split into same identity
and different identity.  The threshold at a false-accept rate ``far`` is the largest distance at
which at most ``far`` of the different-identity pairs are accepted (distance <= threshold); TAR is
the share of same-identity pairs accepted at it.
"""
from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np

from export.contract.errors import InputError
from export.contract.market1501 import read_market1501

from runtime.serving.open_set import MODES, save_thresholds

TABLE_FARS = (0.1, 0.01, 0.001, 0.0001)


def threshold_at_far(negatives: np.ndarray, far: float) -> float:
    """Largest distance t with mean(negatives <= t) <= far (negatives: different-identity distances)."""
    if not 0.0 < far < 1.0:
        raise InputError(f"--far must be between 0 and 1 (exclusive), found {far}")
    neg = np.sort(np.asarray(negatives, np.float64))
    if len(neg) == 0:
        raise InputError("the data set has no different-identity pairs seen by different cameras; it cannot "
                         "fit an open-set threshold")
    allowed = int(np.floor(far * len(neg) + 1e-9))        # negatives that may be accepted
    values = np.unique(neg)
    accepted = np.searchsorted(neg, values, side="right")   # negatives <= each value (ties included)
    ok = values[accepted <= allowed]
    # none allowed: just below the nearest negative (negative only when two identities sit at distance 0)
    return float(ok[-1] if len(ok) else np.nextafter(neg[0], -np.inf))


def pair_distances(pipe, data, request_size: int = 1, max_queries: int | None = 300, seed: int = 0,
                   log=None) -> dict:
    """Distances of (query, gallery) pairs across cameras, per mode: {"refined": (pos, neg), ...}.

    Refined distances depend on which queries are refined together with the gallery, so queries
    are searched ``request_size`` at a time, as the service answers requests of that size; at most
    ``max_queries`` of them (drawn with ``seed``) keep the fit's cost bounded (each request refines
    the whole gallery)."""
    q_items, g_items = list(data.query), data.gallery
    if max_queries is not None and len(q_items) > max_queries:
        pick = np.sort(np.random.default_rng(seed).choice(len(q_items), max_queries, replace=False))
        q_items = [q_items[i] for i in pick]
    if log:
        last = len(q_items) % request_size
        log(f"embedding {len(q_items)} query and {len(g_items)} gallery crops; refined search {request_size} "
            f"quer{'y' if request_size == 1 else 'ies'} per request"
            + (f" (the last request {last}: {len(q_items)} queries are not a multiple of {request_size})" if last else ""))
    q = pipe.embed([i.path for i in q_items])
    g = pipe.embed([i.path for i in g_items])
    gallery = pipe.gallery()
    gallery.add(g, ids=list(range(len(g))), camids=np.array([i.camid for i in g_items], np.int64))
    q_pid = np.array([i.pid for i in q_items])[:, None]
    q_cam = np.array([i.camid for i in q_items])[:, None]
    g_pid = np.array([i.pid for i in g_items])[None, :]
    g_cam = np.array([i.camid for i in g_items])[None, :]
    cross = q_cam != g_cam
    same = (q_pid == g_pid) & cross
    diff = (q_pid != g_pid) & cross
    refined = np.concatenate([gallery.distances(q[s:s + request_size], refined=True)
                              for s in range(0, len(q), request_size)])
    out = {}
    for mode, sq in (("refined", refined), ("encoder", gallery.distances(q, refined=False))):
        d = np.sqrt(np.maximum(sq, 0.0))
        out[mode] = (d[same], d[diff])
    return out


def fit_thresholds(dataset_dir: str | Path, model_dir: str | Path, far: float = 0.01, backend: str = "auto",
                   batch_size: int = 32, threads: int | None = None, store: bool = True, request_size: int = 1,
                   max_queries: int | None = 300, seed: int = 0, log=None, precision: str | None = None) -> dict:
    """Fit the thresholds at ``far``; returns the record (and stores it with the model when ``store``).
    ``precision``: the encoder's, as ``Pipeline.load`` takes it (fit at the precision you serve at)."""
    if request_size < 1:
        raise InputError(f"request_size must be >= 1, found {request_size}")
    if max_queries is not None and max_queries < 1:
        raise InputError(f"max_queries must be >= 1, found {max_queries}")
    from runtime.pipeline import Pipeline

    threshold_at_far(np.zeros(1), far)                      # validates far before any work
    data = read_market1501(dataset_dir, splits=("query", "gallery"))
    for note in data.notes() if log else ():
        log(f"note: {note}")
    queries = min(len(data.query), max_queries or len(data.query))
    if request_size > queries:
        raise InputError(f"request_size {request_size} is larger than the {queries} queries the fit uses (each request "
                         f"is refined with the gallery): give at most --request-size {queries}, or more queries "
                         "(--max-queries, a larger query split)")
    with Pipeline.load(model_dir, batch_size=batch_size, threads=threads, backend=backend,
                       precision=precision) as pipe:
        pairs = pair_distances(pipe, data, request_size, max_queries, seed, log)
        manifest, encoder_precision = pipe.manifest, pipe.encoder_precision
    pos_n, neg_n = len(pairs["refined"][0]), len(pairs["refined"][1])
    if pos_n == 0:
        raise InputError(f"{dataset_dir}: no query identity appears in the gallery under another camera; the data "
                         "set cannot measure acceptance (TAR)")
    fars = sorted(set(TABLE_FARS) | {far}, reverse=True)
    table = []
    for f in fars:
        if f * neg_n < 1 and f != far:
            continue                                        # too few pairs to measure this rate
        row = {"far": f}
        for mode in MODES:
            pos, neg = pairs[mode]
            t = threshold_at_far(neg, f)
            row[mode] = {"threshold": t, "tar": float(np.mean(pos <= t)), "far_measured": float(np.mean(neg <= t))}
        table.append(row)
    chosen = next(r for r in table if r["far"] == far)
    record = {
        "far": far,
        "thresholds": {m: chosen[m]["threshold"] for m in MODES},
        "tar": {m: chosen[m]["tar"] for m in MODES},
        "table": table,
        "pairs": {"same_identity": pos_n, "different_identity": neg_n},
        "request_size": request_size,
        "last_request_size": queries % request_size or request_size,
        "encoder_precision": encoder_precision,
        "queries": queries,
        "dataset": str(data.root),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if store:
        record["path"] = str(save_thresholds(model_dir, manifest, {k: v for k, v in record.items()}))
    return record


def format_table(record: dict) -> str:
    lines = [f"{'FAR':>8}  {'threshold (refined)':>19}  {'TAR (refined)':>13}  {'threshold (encoder)':>19}  "
             f"{'TAR (encoder)':>13}"]
    for row in record["table"]:
        mark = " *" if row["far"] == record["far"] else ""
        lines.append(f"{row['far']:>8g}  {row['refined']['threshold']:>19.4f}  {row['refined']['tar']:>13.4f}  "
                     f"{row['encoder']['threshold']:>19.4f}  {row['encoder']['tar']:>13.4f}{mark}")
    lines.append(f"pairs across cameras: {record['pairs']['same_identity']} same identity, "
                 f"{record['pairs']['different_identity']} different identity")
    if record.get("encoder_precision"):
        lines.append(f"encoder precision: {record['encoder_precision']}")
    return "\n".join(lines)
