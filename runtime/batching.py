"""Dynamic batching for the encoder: many producer threads, one batched network call at a time.

Place in the flow: between the callers of ``Pipeline.embed`` (one thread per camera or stream,
each sending a few crops) and the encoder backend.  Requests queue up; a worker thread takes up to
``max_batch`` rows, waiting at most ``max_wait_ms`` after the first request of a batch for more,
runs the network once and hands every caller exactly its own rows.  A request larger than
``max_batch`` is split across batches.  Preprocessing stays in the callers' threads (it runs in
parallel there); only the network call is serialised, which is what a GPU (one stream per
execution context) or a CPU backend that already uses every core wants.

Shutdown: ``close()`` (or leaving a ``with`` block) stops accepting requests; ``drain=True`` (the
default) finishes the queued ones first, ``drain=False`` fails them with :class:`BatcherClosed`.
A failing network call fails the requests of that batch only.  A batch only ever holds rows of one
shape and dtype (a mis-shaped request runs alone and fails alone), and anything that goes wrong
while a batch is put together or handed out fails that batch's requests, never the worker.  Should
the worker stop anyway, every waiting and later request fails with :class:`BatcherClosed` (and
``__call__`` notices a worker that died without answering): a caller never waits forever.
"""
from __future__ import annotations

import collections
import queue
import threading
import time
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from export.contract.errors import InputError, NFormerError, check_count


class BatcherClosed(NFormerError):
    """The batcher was closed before (or while) the request could run."""


@dataclass
class BatchStats:
    batches: int = 0
    rows: int = 0
    requests: int = 0
    sizes: collections.Counter = field(default_factory=collections.Counter)

    @property
    def mean_batch(self) -> float:
        return self.rows / self.batches if self.batches else 0.0


class _Request:
    __slots__ = ("rows", "future", "out", "scheduled", "done", "failed")

    def __init__(self, rows: np.ndarray):
        self.rows = rows
        self.future: Future = Future()
        self.out = None
        self.scheduled = 0   # rows handed to a batch
        self.done = 0        # rows whose results arrived
        self.failed = False

    def fail(self, err: BaseException) -> None:
        if not self.failed and not self.future.done():
            self.failed = True
            self.future.set_exception(err)


_STOP = object()
#: the longest a batch may wait to fill (a minute): inf overflowed the worker's timer, nan never waited
MAX_WAIT_MS = 60_000.0
_POLL = 0.5   # seconds between checks that the worker is alive, for callers without a timeout


class DynamicBatcher:
    """Groups concurrent requests into batches for ``run_batch`` ([B, ...] -> [B, ...])."""

    @staticmethod
    def check_options(max_batch, max_wait_ms) -> None:
        """InputError unless ``max_batch`` is an integer >= 1 and ``max_wait_ms`` a number of
        milliseconds in 0..MAX_WAIT_MS."""
        from numbers import Real

        check_count(max_batch, "max_batch")
        if isinstance(max_wait_ms, bool) or not isinstance(max_wait_ms, Real) \
                or not 0 <= float(max_wait_ms) <= MAX_WAIT_MS:
            raise InputError(f"max_wait_ms must be a number of milliseconds in 0..{MAX_WAIT_MS:g}, found "
                             f"{max_wait_ms!r}")

    def __init__(self, run_batch: Callable[[np.ndarray], np.ndarray], max_batch: int = 32,
                 max_wait_ms: float = 2.0, name: str = "encoder"):
        self.check_options(max_batch, max_wait_ms)
        self.run_batch = run_batch
        self.max_batch = int(max_batch)
        self.max_wait = float(max_wait_ms) / 1000.0
        self.name = name
        self.stats = BatchStats()
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self._cancel = False
        self._error: BaseException | None = None   # what stopped the worker, if it failed
        self._inflight: list = []                  # requests of the batch being run
        self._worker = threading.Thread(target=self._serve, name=f"{name}-batcher", daemon=True)
        self._worker.start()

    # ---- producers ----

    def submit(self, rows: np.ndarray) -> Future:
        """Queue ``rows`` [n, ...]; the future's result is the network output for exactly them."""
        rows = np.asarray(rows)
        if rows.ndim < 1 or len(rows) == 0:
            raise InputError(f"a request must be a non-empty array of rows [n, ...], found shape {rows.shape}")
        req = _Request(rows)
        with self._lock:
            if self._closed:
                raise BatcherClosed(self._closed_message())
            self.stats.requests += 1
            self._queue.put(req)
        return req.future

    def __call__(self, rows: np.ndarray, timeout: float | None = None) -> np.ndarray:
        future = self.submit(rows)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            step = _POLL if left is None else max(0.0, min(_POLL, left))
            try:
                return future.result(step)
            except FutureTimeout:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                if not self._worker.is_alive() and not future.done():
                    # the worker fails every request it holds before it ends; this is the last guard
                    err = BatcherClosed(self._closed_message())
                    with self._lock:
                        self._closed = True
                    try:
                        future.set_exception(err)
                    except InvalidStateError:   # answered in the meantime after all
                        pass
                    return future.result(0)

    def _closed_message(self) -> str:
        if self._error is not None:
            return (f"the {self.name} batcher stopped after an internal error ({type(self._error).__name__}: "
                    f"{self._error}); create a new one (or a new Pipeline) to submit more requests")
        return f"the {self.name} batcher is closed: create a new one (or a new Pipeline) to submit more requests"

    # ---- shutdown ----

    def close(self, drain: bool = True, timeout: float | None = 30.0) -> None:
        """Stop accepting requests; finish (``drain``) or fail the queued ones; join the worker."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._cancel = not drain
                self._queue.put(_STOP)
            elif not drain:
                self._cancel = True
        if threading.current_thread() is not self._worker:
            self._worker.join(timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "DynamicBatcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close(drain=exc[0] is None)

    # ---- the worker ----

    def _serve(self) -> None:
        backlog: collections.deque[_Request] = collections.deque()
        stopping = False
        try:
            while True:
                if self._cancel:
                    break
                if not backlog:
                    if stopping:
                        break
                    item = self._queue.get()
                    if item is _STOP:
                        stopping = True
                        continue
                    backlog.append(item)
                pending = sum(len(r.rows) - r.scheduled for r in backlog)
                deadline = time.monotonic() + self.max_wait
                while pending < self.max_batch and not stopping and not self._cancel:
                    left = deadline - time.monotonic()
                    try:
                        item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is _STOP:
                        stopping = True
                        break
                    backlog.append(item)
                    pending += len(item.rows)
                if self._cancel:
                    break
                self._inflight = list(backlog)   # failed below should the worker itself break
                self._run_one(backlog)
                self._inflight = []
        except BaseException as err:   # a bug of the batcher itself: fail everyone below, never hang
            self._error = err
        finally:
            with self._lock:             # no submit can slip into the queue after the sweep below
                self._closed = True
                if self._error is not None:
                    err = BatcherClosed(self._closed_message())
                else:
                    err = BatcherClosed(f"the {self.name} batcher was closed before this request ran")
                for req in [*self._inflight, *backlog]:
                    req.fail(err)
                self._inflight = []
                while True:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is not _STOP:
                        item.fail(err)

    def _take_batch(self, backlog: collections.deque) -> list:
        """Up to ``max_batch`` rows of one shape and dtype: (request, start, end) parts, oldest first.

        Requests of another row shape or dtype wait for a later batch (in their order)."""
        head = backlog[0]
        kind = (head.rows.shape[1:], head.rows.dtype)
        parts = []
        room = self.max_batch
        for req in list(backlog):
            if not room:
                break
            if (req.rows.shape[1:], req.rows.dtype) != kind:
                continue
            take = min(room, len(req.rows) - req.scheduled)
            parts.append((req, req.scheduled, req.scheduled + take))
            req.scheduled += take
            room -= take
            if req.scheduled == len(req.rows):
                backlog.remove(req)
        return parts

    def _run_one(self, backlog: collections.deque) -> None:
        parts = self._take_batch(backlog)
        try:
            batch = parts[0][0].rows[parts[0][1]:parts[0][2]] if len(parts) == 1 else \
                np.concatenate([r.rows[s:e] for r, s, e in parts])
            out = np.asarray(self.run_batch(batch))
            if out.ndim < 1 or len(out) != len(batch):
                raise RuntimeError(f"{self.name}: the network returned {out.shape[0] if out.ndim else 'no'} rows "
                                   f"for a batch of {len(batch)}")
            self.stats.batches += 1
            self.stats.rows += len(batch)
            self.stats.sizes[len(batch)] += 1
            offset = 0
            for req, s, e in parts:
                if not req.failed:
                    try:
                        if req.out is None:
                            req.out = np.empty((len(req.rows), *out.shape[1:]), out.dtype)
                        req.out[s:e] = out[offset:offset + e - s]
                    except Exception as err:   # e.g. a later part of a split request came back another shape
                        req.fail(RuntimeError(f"{self.name}: cannot assemble the result of a request of "
                                              f"{len(req.rows)} rows: {err}"))
                        if req in backlog:
                            backlog.remove(req)
                        continue
                    req.done += e - s
                    if req.done == len(req.rows):
                        req.future.set_result(req.out)
                offset += e - s
        except BaseException as err:  # the requests of this batch fail; the batcher goes on
            for req, _, _ in parts:
                req.fail(err)
                if req in backlog:
                    backlog.remove(req)
