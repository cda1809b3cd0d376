"""Retrieval accuracy of a model directory on a Market-1501-layout data set (``runtime evaluate``).

Place in the flow: the task-level check of DESIGN.md section 3.  Images are read by the one
reader (``export.contract.market1501``) and preprocessed by the one preprocessing; mAP and CMC come from
``runtime.evaluation.metrics.evaluate_rank`` with the Market-1501 protocol.  Two rows per backend:
``encoder`` (L2-normalised encoder embeddings, Euclidean distance) and ``refined`` (query and
gallery refined together as one set, the original's test protocol, then the same ranking).

The backends are ``runtime.pipeline.Pipeline`` objects (the encoder and refinement a deployment
would open), wrapped as runners (``runtime.evaluation.runners.pipeline_runner``) and run through
the one encode -> refine -> score loop (``runtime.evaluation.loop``); crops are read once for all
backends.
"""
from __future__ import annotations

import datetime
import platform
from pathlib import Path

from export.contract.errors import InputError

from export.contract.manifest import load_manifest, model_config
from export.contract.market1501 import read_market1501
from runtime.evaluation.loop import CHUNK, RANKS, image_chunks, run_loop, score
from runtime.evaluation.runners import pipeline_runner


def available_backends(model_dir: str | Path) -> list[str]:
    """``onnxruntime`` always; ``tensorrt`` when the manifest lists usable engines for both networks."""
    from runtime.tensorrt.backend import find_engine, listed_engines

    model_dir = Path(model_dir)
    manifest = load_manifest(model_dir)
    names = ["onnxruntime"]
    if listed_engines(manifest) and all(find_engine(manifest, model_dir, net)[0] for net in ("encoder", "nformer")):
        names.append("tensorrt")
    return names


def rank_scores(query, gallery, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50) -> dict:
    """mAP and Rank-1/5/10 of L2-normalised ``query`` [q, D] against ``gallery`` [g, D]."""
    return score(query, gallery, q_pids, g_pids, q_camids, g_camids, max_rank).as_dict(RANKS)


def evaluate(dataset_dir: str | Path, model_dir: str | Path, backends=None, batch_size: int = 32, seed: int = 0,
             threads: int | None = None, max_rank: int = 50, progress: bool = False,
             precision: str | None = None) -> dict:
    """Embed query and gallery with each backend, score encoder-only and refined retrieval.

    ``precision``: the encoder's precision, as for :meth:`Pipeline.load` (None: the best engine
    available, else fp32); each row says the one that ran (``precision``).

    Returns a JSON-able report: data set summary, one row per (backend, mode) with ``cmc`` (Rank-1 up
    to ``max_rank``, or the gallery's size), versions, date.
    ``seconds`` of an ``encoder`` row is reading and preprocessing the crops (done once, shared by
    the backends) plus that backend's encoder; of a ``refined`` row, the refinement.
    """
    from tqdm import tqdm

    from runtime.pipeline import Pipeline

    data = read_market1501(dataset_dir, splits=("query", "gallery"))
    backends = list(backends or available_backends(model_dir))
    config = model_config(load_manifest(model_dir))
    items = data.query + data.gallery
    pipes = []
    try:
        for backend in backends:
            pipes.append(Pipeline.load(model_dir, batch_size=batch_size, threads=threads, backend=backend,
                                       precision=precision))
        runners = [pipeline_runner(pipe, backend) for pipe, backend in zip(pipes, backends)]
        chunk = batch_size * max(1, CHUNK // batch_size)  # whole encoder batches: the same batches as Pipeline.embed
        with tqdm(total=len(items), unit="img", desc=f"embed ({', '.join(backends)})", disable=not progress) as bar:
            results = run_loop(runners, image_chunks([i.path for i in items], config, chunk, progress=bar.update),
                               query=len(data.query), pids=[i.pid for i in items], camids=[i.camid for i in items],
                               config=config, seed=seed, max_rank=max_rank)
    finally:
        for pipe in pipes:
            pipe.close()
    rows = []
    for pipe, res in zip(pipes, results):
        base = {"backend": res.runner.backend, "precision": pipe.encoder_precision,
                "encoder_backend": pipe.encoder.backend.name,
                "providers": getattr(pipe.encoder.backend, "providers", None)}
        for mode, seconds in (("encoder", res.seconds["read"] + res.seconds["encoder"]),
                              ("refined", res.seconds["refinement"])):
            stage = res.stages[mode]
            rows.append({**base, "mode": mode, **stage.as_dict(RANKS), "seconds": seconds,
                         "cmc": [float(v) for v in stage.cmc[:max_rank]]})
    import onnxruntime

    return {
        "dataset": {"root": str(data.root), **data.summary(), "notes": data.notes()},
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
