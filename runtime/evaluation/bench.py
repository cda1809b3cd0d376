"""Throughput measurements of a model directory (``runtime bench``; ``benchmarks/bench_runtime.py``).

Results are data (dicts) first; the CLI prints them as a table and can write JSON.  Nothing here
asserts a time.

* encoder: images/s when ``producers`` threads each send ``requests`` requests of ``request_size``
  crops, either one request at a time (``sequential``: each request is its own encoder call, calls
  serialised) or through ``runtime.batching`` (``dynamic``: requests grouped up to ``max_batch``
  rows or ``max_wait_ms``).  Inputs are preprocessed tensors, so the numbers are the network's.
* refinement: time of ``Pipeline.refine`` for sets of N clustered unit vectors.
"""
from __future__ import annotations

import statistics
import threading
import time

import numpy as np

from runtime.batching import DynamicBatcher

MODES = ("sequential", "dynamic")


def random_images(n: int, size_hw, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, *size_hw)).astype(np.float32)


def clustered_unit_rows(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Unit rows around n/8 centres (like a gallery); numpy only."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 8), dim))
    x = centres[rng.integers(0, len(centres), n)] + 0.35 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def encoder_throughput(run_batch, size_hw, mode: str = "dynamic", producers: int = 8, requests: int = 20,
                       request_size: int = 1, max_batch: int = 32, max_wait_ms: float = 5.0, seed: int = 0) -> dict:
    """Images/s and request latency of ``run_batch`` ([B, 3, H, W] -> [B, D]) under ``producers`` threads."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, found {mode!r}")
    images = random_images(request_size, size_hw, seed)
    run_batch(images)  # warm-up (allocators, ONNX Runtime arenas)
    lock = threading.Lock()

    def sequential(x):
        with lock:
            return run_batch(x)
    batcher = DynamicBatcher(run_batch, max_batch, max_wait_ms) if mode == "dynamic" else None
    call = batcher if batcher is not None else sequential
    latencies: list[float] = []
    errors: list[BaseException] = []
    start = threading.Barrier(producers + 1)

    def producer():
        start.wait()
        for _ in range(requests):
            t = time.perf_counter()
            try:
                call(images)
            except BaseException as err:  # reported, not raised in a thread
                errors.append(err)
                return
            latencies.append(time.perf_counter() - t)

    threads = [threading.Thread(target=producer) for _ in range(producers)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if batcher is not None:
        batcher.close()
    if errors:
        raise errors[0]
    total = producers * requests * request_size
    lat = sorted(latencies)
    out = {"stage": "encoder", "mode": mode, "producers": producers, "requests": producers * requests,
           "request_size": request_size, "images": total, "seconds": wall, "images_per_s": total / wall,
           "latency_ms_p50": 1000 * statistics.median(lat),
           "latency_ms_p95": 1000 * lat[min(len(lat) - 1, int(0.95 * len(lat)))]}
    if batcher is not None:
        out.update(max_batch=max_batch, max_wait_ms=max_wait_ms, mean_batch=batcher.stats.mean_batch)
    else:
        out.update(mean_batch=float(request_size))
    return out


def refinement_time(refine, dim: int, sizes=(1000,), seed: int = 0, repeats: int = 1) -> list[dict]:
    """Median seconds of ``refine(features [N, dim])`` for each N (after one warm-up call)."""
    rows = []
    for n in sizes:
        x = clustered_unit_rows(n, dim, seed)
        refine(x)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            refine(x)
            times.append(time.perf_counter() - t)
        rows.append({"stage": "refine", "mode": "nformer.onnx", "n": n, "seconds": statistics.median(times)})
    return rows


def bench_pipeline(pipe, producers: int = 8, requests: int = 20, request_size: int = 1, max_batch: int = 32,
                   max_wait_ms: float = 5.0, refine_sizes=(1000,), progress=None) -> list[dict]:
    """Both encoder modes and the refinement sizes for one loaded Pipeline."""
    rows = []
    for mode in MODES:
        if progress:
            progress(f"encoder, {mode} ...")
        rows.append(encoder_throughput(pipe.encoder.embed_images, pipe.config.input_size_hw, mode, producers, requests,
                                       request_size, max_batch, max_wait_ms))
    if rows[0]["images_per_s"] > 0:
        rows[1]["vs_sequential"] = rows[1]["images_per_s"] / rows[0]["images_per_s"]
    for n in refine_sizes:
        if progress:
            progress(f"refinement, N={n} ...")
        rows += refinement_time(lambda x: pipe.refine(x), pipe.config.n_embd, (n,))
    backend = pipe.encoder.backend
    for r in rows:
        r["backend"] = backend.name
        r["providers"] = getattr(backend, "providers", None)
    return rows
