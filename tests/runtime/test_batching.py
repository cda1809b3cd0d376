"""runtime.batching: every caller gets exactly its own rows; clean shutdown; Pipeline.embed through it."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from export.contract.errors import InputError
from runtime.batching import BatcherClosed, DynamicBatcher
from runtime.pipeline import Pipeline


def row_function(x: np.ndarray) -> np.ndarray:
    """A per-row network stand-in: each output row depends on its input row only."""
    flat = x.reshape(len(x), -1).astype(np.float64)
    return np.stack([flat.sum(1), (flat ** 2).sum(1), flat[:, 0] * 3.0], axis=1)


def test_eight_threads_fifty_requests_each_get_their_own_rows():
    seen_batches = []

    def run(x):
        seen_batches.append(len(x))
        time.sleep(0.0005)          # long enough for requests to pile up
        return row_function(x)

    failures = []
    with DynamicBatcher(run, max_batch=16, max_wait_ms=1.0) as batcher:
        def producer(seed):
            rng = np.random.default_rng(seed)
            for _ in range(50):
                x = rng.standard_normal((int(rng.integers(1, 40)), 3, 4, 2)).astype(np.float32)
                got = batcher(x, timeout=30)
                if not np.array_equal(got, row_function(x)):   # exactly the unbatched result
                    failures.append(seed)
        threads = [threading.Thread(target=producer, args=(s,)) for s in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "producers deadlocked"
    assert not failures
    assert max(seen_batches) <= 16
    assert batcher.stats.requests == 400 and batcher.stats.rows == sum(seen_batches)
    assert batcher.stats.mean_batch > 1          # requests were actually grouped


def test_eight_threads_through_the_real_encoder(resnet18_export):
    """The same with encoder.onnx (fewer requests: resnet18 takes ~20 ms a crop on this CPU): each
    caller's embeddings equal an unbatched call on its images."""
    pipe = Pipeline.load(resnet18_export[0])
    rng = np.random.default_rng(5)
    requests = [[rng.standard_normal((int(rng.integers(1, 3)), 3, 256, 128)).astype(np.float32) for _ in range(6)]
                for _ in range(8)]
    expected = [[pipe.encoder.embed_images(x) for x in per_thread] for per_thread in requests]
    mismatches = []
    with DynamicBatcher(pipe.encoder.embed_images, max_batch=16, max_wait_ms=2.0) as batcher:
        def producer(t):
            for x, want in zip(requests[t], expected[t]):
                got = batcher(x, timeout=60)
                if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4, atol=1e-4):
                    mismatches.append(t)
        threads = [threading.Thread(target=producer, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads), "producers deadlocked"
    assert not mismatches
    assert batcher.stats.rows == sum(len(x) for r in requests for x in r) and batcher.stats.mean_batch > 1


def test_close_without_drain_fails_pending_requests_clearly():
    started, release = threading.Event(), threading.Event()

    def run(x):
        started.set()
        release.wait(10)
        return row_function(x)

    batcher = DynamicBatcher(run, max_batch=4, max_wait_ms=0.0)
    first = batcher.submit(np.ones((4, 2), np.float32))     # in flight
    assert started.wait(5)
    pending = [batcher.submit(np.full((3, 2), i, np.float32)) for i in range(5)]
    closer = threading.Thread(target=batcher.close, kwargs={"drain": False, "timeout": 10})
    closer.start()
    time.sleep(0.05)
    release.set()
    closer.join(10)
    assert not closer.is_alive()
    np.testing.assert_array_equal(first.result(5), row_function(np.ones((4, 2), np.float32)))
    for f in pending:
        with pytest.raises(BatcherClosed, match="closed before this request ran"):
            f.result(5)
    with pytest.raises(BatcherClosed, match="closed"):
        batcher.submit(np.ones((1, 2), np.float32))


def test_close_with_drain_finishes_queued_requests():
    batcher = DynamicBatcher(lambda x: (time.sleep(0.01), row_function(x))[1], max_batch=2, max_wait_ms=0.0)
    futures = [batcher.submit(np.full((3, 2), i, np.float32)) for i in range(6)]
    batcher.close(drain=True, timeout=10)
    for i, f in enumerate(futures):
        np.testing.assert_array_equal(f.result(1), row_function(np.full((3, 2), i, np.float32)))


def test_a_failing_batch_fails_only_its_requests():
    def run(x):
        if (x < 0).any():
            raise ValueError("network failed")
        return row_function(x)

    with DynamicBatcher(run, max_batch=8, max_wait_ms=0.0) as batcher:
        bad = batcher.submit(-np.ones((2, 2), np.float32))
        with pytest.raises(ValueError, match="network failed"):
            bad.result(5)
        good = batcher(np.ones((3, 2), np.float32), timeout=5)
        np.testing.assert_array_equal(good, row_function(np.ones((3, 2), np.float32)))


def test_bad_requests_and_options():
    with pytest.raises(InputError, match="max_batch"):
        DynamicBatcher(row_function, max_batch=0)
    with DynamicBatcher(row_function) as batcher:
        with pytest.raises(InputError, match="non-empty"):
            batcher.submit(np.zeros((0, 2), np.float32))


def test_pipeline_embed_with_dynamic_batching(resnet18_export):
    rng = np.random.default_rng(3)
    crops = [[rng.integers(0, 256, size=(int(rng.integers(40, 200)), int(rng.integers(20, 90)), 3), dtype=np.uint8)
              for _ in range(n)] for n in (1, 3, 2, 4)]
    plain = Pipeline.load(resnet18_export[0])
    expected = [plain.embed(c) for c in crops]
    with Pipeline.load(resnet18_export[0], dynamic_batching=True, max_batch=4, max_wait_ms=20) as pipe:
        results = [None] * len(crops)

        def producer(i):
            results[i] = pipe.embed(crops[i])
        threads = [threading.Thread(target=producer, args=(i,)) for i in range(len(crops))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for got, want in zip(results, expected):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        # bad crops fail in the caller's thread, before reaching the batcher
        with pytest.raises(InputError, match="uint8"):
            pipe.embed([np.zeros((10, 10, 3), np.float32)])
        with pytest.raises(InputError, match="HxWx3"):
            pipe.embed([np.zeros((10, 10, 4), np.uint8)])
        assert pipe.embed([]).shape == (0, 256)
    assert pipe.batcher.closed


def test_pipeline_embed_images_goes_through_the_batcher(resnet18_export):
    """Preprocessed images (what Triton's embed and encoder models hand over) take the same road as
    crops: the dynamic batcher when it is on, the encoder's batches otherwise."""
    from export.contract.preprocess import preprocess_batch

    rng = np.random.default_rng(5)
    crops = [rng.integers(0, 256, size=(80, 40, 3), dtype=np.uint8) for _ in range(7)]
    plain = Pipeline.load(resnet18_export[0], batch_size=3)
    c = plain.config
    images = preprocess_batch(crops, c.input_size_hw, c.pixel_mean, c.pixel_std)
    want = plain.embed(crops)
    np.testing.assert_allclose(plain.embed_images(images), want, rtol=1e-5, atol=1e-5)
    with Pipeline.load(resnet18_export[0], dynamic_batching=True, max_batch=4, max_wait_ms=5) as pipe:
        calls = []
        real = pipe.batcher.submit
        pipe.batcher.submit = lambda rows: calls.append(len(rows)) or real(rows)
        np.testing.assert_allclose(pipe.embed_images(images), want, rtol=1e-5, atol=1e-5)
        assert calls == [4, 3]
        with pytest.raises(InputError, match=r"\[batch, 3, 256, 128\]"):
            pipe.embed_images(images[:, :2])
        assert pipe.embed_images(images[:0]).shape == (0, 256)
