"""The one evaluation loop: encode -> L2-normalise -> refine -> score, for a list of runners.

Place in the flow: between :mod:`runtime.evaluation.runners` (the ways of running the two
networks) and the three commands that report on them -- ``runtime demo``
(:mod:`runtime.evaluation.demo`), ``runtime parity`` (:mod:`runtime.evaluation.parity`) and
``runtime evaluate`` (:mod:`runtime.evaluation.evaluate`), which only turn :class:`RunnerResult`
into their own rows.

Images arrive as an iterable of preprocessed chunks ``[b, 3, H, W]`` (a list, or
:func:`image_chunks` reading and preprocessing files lazily); each chunk is read once and given to
every runner's encoder, so memory stays bounded by one chunk plus the embeddings.  The first
``query`` rows are the query set, the rest the gallery.  Every runner refines the L2-normalised
embeddings of the whole set (query and gallery together, the original's test protocol) with the
same landmarks (``sample_landmarks`` with the given seed).  Both stages are scored by
``runtime.evaluation.metrics.evaluate_rank`` (Market-1501 protocol, Euclidean distance of
L2-normalised rows).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np

from export.contract.config import ModelConfig
from export.contract.errors import InputError
from export.contract.landmarks import sample_landmarks
from export.contract.preprocess import preprocess_batch

from runtime.evaluation.metrics import euclidean_distances, evaluate_rank
from runtime.evaluation.runners import Runner
from runtime.refiner import l2_normalize

#: crops read and preprocessed at a time (every runner encodes each chunk)
CHUNK = 256
#: the Rank-k points reported besides mAP
RANKS = (1, 5, 10)
STAGES = ("encoder", "refined")


@dataclass
class StageScores:
    """mAP and the CMC curve (``cmc[0]`` is Rank-1) of one set of embeddings."""
    mAP: float
    cmc: np.ndarray

    def rank(self, k: int) -> float:
        """Rank-k (the last CMC point when the curve is shorter than k)."""
        return float(self.cmc[min(k, len(self.cmc)) - 1])

    def as_dict(self, ranks: Sequence[int] = RANKS) -> dict:
        return {"mAP": self.mAP, **{f"rank{k}": self.rank(k) for k in ranks}}


def score(query, gallery, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50) -> StageScores:
    """mAP and CMC of L2-normalised ``query`` [q, D] against ``gallery`` [g, D].

    The curve reaches at least the reported :data:`RANKS` (Rank-10) whatever ``max_rank`` says: a
    curve cut at ``max_rank`` = 1 would report Rank-1 as Rank-5 and Rank-10 (:meth:`StageScores.rank`
    reads the last point of a shorter curve, which is right only when the gallery is what cut it)."""
    cmc, mAP = evaluate_rank(euclidean_distances(query, gallery), q_pids, g_pids, q_camids, g_camids,
                             max(max_rank, max(RANKS)))
    return StageScores(float(mAP), cmc)


@dataclass
class RunnerResult:
    """What the loop measured for one runner."""
    runner: Runner
    raw: np.ndarray                 # encoder output [N, D]
    encoder: np.ndarray             # L2-normalised ``raw``
    refined: np.ndarray             # L2-normalised refinement of ``encoder``
    stages: dict[str, StageScores]  # "encoder", "refined"
    seconds: dict[str, float] = field(default_factory=dict)  # "read" (shared by all runners), "encoder", "refinement"

    def embeddings(self, stage: str) -> np.ndarray:
        return self.encoder if stage == "encoder" else self.refined


def image_chunks(paths: Sequence, config: ModelConfig, chunk: int = CHUNK,
                 progress: Callable[[int], None] | None = None) -> Iterable[np.ndarray]:
    """Crops (paths, PIL images or uint8 arrays) -> preprocessed chunks of at most ``chunk`` images,
    read lazily with ``config``'s input size and pixel statistics."""
    for s in range(0, len(paths), chunk):
        images = preprocess_batch(paths[s:s + chunk], config.input_size_hw, config.pixel_mean, config.pixel_std)
        if progress:
            progress(len(images))
        yield images


def run_loop(runners: Sequence[Runner], images: Iterable[np.ndarray], *, query: int, pids, camids,
             config: ModelConfig, seed: int = 0, max_rank: int = 50) -> list[RunnerResult]:
    """Encode every chunk of ``images`` with every runner, refine, and score both stages.

    ``pids`` and ``camids`` give one entry per image (query first, then gallery); ``seed`` is the
    landmark draw (the same landmarks for every runner).  Returns one result per runner, in order.
    """
    pids, camids = np.asarray(pids), np.asarray(camids)
    n = len(pids)
    if n == 0:
        raise InputError("no query or gallery images to evaluate")
    raw: list[np.ndarray | None] = [None] * len(runners)
    enc_seconds = [0.0] * len(runners)
    read_seconds, s = 0.0, 0
    chunks = iter(images)
    while True:
        t = time.perf_counter()
        batch = next(chunks, None)
        read_seconds += time.perf_counter() - t
        if batch is None:
            break
        for j, r in enumerate(runners):
            t = time.perf_counter()
            out = r.encode(batch)
            enc_seconds[j] += time.perf_counter() - t
            if raw[j] is None:
                raw[j] = np.zeros((n, out.shape[1]), np.float32)
            raw[j][s:s + len(batch)] = out
        s += len(batch)
    if s != n:
        raise ValueError(f"the images gave {s} rows but {n} identities were given")
    landmarks = sample_landmarks(n, config.n_layer, config.landmarks, seed)

    def stage_scores(emb):
        return score(emb[:query], emb[query:], pids[:query], pids[query:], camids[:query], camids[query:], max_rank)

    results = []
    for j, r in enumerate(runners):
        feats = l2_normalize(raw[j])
        t = time.perf_counter()
        refined = l2_normalize(r.refine(feats, landmarks))
        ref_seconds = time.perf_counter() - t
        results.append(RunnerResult(r, raw[j], feats, refined,
                                    {"encoder": stage_scores(feats), "refined": stage_scores(refined)},
                                    {"read": read_seconds, "encoder": enc_seconds[j], "refinement": ref_seconds}))
    return results
