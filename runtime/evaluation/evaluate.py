"""Retrieval accuracy of a model directory on a Market-1501-layout data set (``runtime evaluate``).

Place in the flow: the task-level check of DESIGN.md section 3.  Images are read by the one
reader (``export.contract.market1501``) and preprocessed by the one preprocessing; mAP and CMC come from
``runtime.evaluation.metrics.evaluate_rank`` with the Market-1501 protocol.  Two rows per backend:
``encoder`` (L2-normalised encoder embeddings, Euclidean distance) and ``refined`` (query and
gallery refined together as one set, the original's test protocol, then the same ranking).
"""
from __future__ import annotations

import datetime
import platform
import time
from pathlib import Path

import numpy as np

from export.contract.errors import InputError

from export.contract.market1501 import read_market1501
from runtime.evaluation.metrics import euclidean_distances, evaluate_rank
from runtime.refiner import l2_normalize

RANKS = (1, 5, 10)


def available_backends(model_dir: str | Path) -> list[str]:
    """``onnxruntime`` always; ``tensorrt`` when the manifest lists usable engines for both networks."""
    from export.contract.manifest import load_manifest

    from runtime.tensorrt.backend import find_engine, listed_engines

    model_dir = Path(model_dir)
    manifest = load_manifest(model_dir)
    names = ["onnxruntime"]
    if listed_engines(manifest) and all(find_engine(manifest, model_dir, net)[0] for net in ("encoder", "nformer")):
        names.append("tensorrt")
    return names


def rank_scores(query, gallery, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50) -> dict:
    """mAP and Rank-1/5/10 of L2-normalised ``query`` [q, D] against ``gallery`` [g, D]."""
    cmc, mAP = evaluate_rank(euclidean_distances(query, gallery), q_pids, g_pids, q_camids, g_camids, max_rank)
    scores = {"mAP": float(mAP)}
    for r in RANKS:
        scores[f"rank{r}"] = float(cmc[min(r, len(cmc)) - 1])
    return scores


def evaluate(dataset_dir: str | Path, model_dir: str | Path, backends=None, batch_size: int = 32, seed: int = 0,
             threads: int | None = None, max_rank: int = 50, progress: bool = False) -> dict:
    """Embed query and gallery with each backend, score encoder-only and refined retrieval.

    Returns a JSON-able report: data set summary, one row per (backend, mode), versions, date.
    """
    from tqdm import tqdm

    from runtime.pipeline import Pipeline

    data = read_market1501(dataset_dir, splits=("query", "gallery"))
    backends = list(backends or available_backends(model_dir))
    q_pids = np.array([i.pid for i in data.query])
    g_pids = np.array([i.pid for i in data.gallery])
    q_cams = np.array([i.camid for i in data.query])
    g_cams = np.array([i.camid for i in data.gallery])
    files = [i.path for i in data.query] + [i.path for i in data.gallery]
    nq = len(data.query)
    rows = []
    for backend in backends:
        pipe = Pipeline.load(model_dir, batch_size=batch_size, threads=threads, backend=backend)
        try:
            t0 = time.perf_counter()
            with tqdm(total=len(files), unit="img", desc=f"embed ({backend})", disable=not progress) as bar:
                emb = pipe.embed(files, progress=bar.update)
            t_embed = time.perf_counter() - t0
            x = l2_normalize(emb)
            base = {"backend": backend, "encoder_backend": pipe.encoder.backend.name,
                    "providers": getattr(pipe.encoder.backend, "providers", None)}
            rows.append({**base, "mode": "encoder", **rank_scores(x[:nq], x[nq:], q_pids, g_pids, q_cams, g_cams,
                                                                  max_rank), "seconds": t_embed})
            t0 = time.perf_counter()
            refined = pipe.refine(emb, seed=seed)
            t_refine = time.perf_counter() - t0
            rows.append({**base, "mode": "refined", **rank_scores(refined[:nq], refined[nq:], q_pids, g_pids, q_cams,
                                                                  g_cams, max_rank), "seconds": t_refine})
        finally:
            pipe.close()
    import onnxruntime

    return {
        "dataset": {"root": str(data.root), **data.summary()},
        "model_dir": str(Path(model_dir)),
        "protocol": "Market-1501 (same-identity same-camera gallery items excluded per query; queries without "
                    "a match skipped); refined = query and gallery refined together as one set",
        "seed": seed,
        "results": rows,
        "versions": {"onnxruntime": onnxruntime.__version__, "python": platform.python_version()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def check_backends(names, model_dir) -> list[str] | None:
    """Validate a user's ``--backend`` choices (None: every available backend)."""
    if not names:
        return None
    unknown = [n for n in names if n not in ("onnxruntime", "tensorrt")]
    if unknown:
        raise InputError(f"unknown backend(s) {', '.join(unknown)}: choose onnxruntime or tensorrt")
    return list(dict.fromkeys(names))
