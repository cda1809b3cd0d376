"""A gallery that survives ``kill -9``: the atomic snapshot of ``runtime.gallery`` plus a journal.

Place in the flow: the serving end of ``runtime/`` (no torch), under ``runtime serve``.  Every
change a client asks for (an add with the items it evicts, a remove) is one record appended to
``journal.<version>.log`` in the gallery directory and fsynced *before* the change is applied and
acknowledged; ``<version>`` names the snapshot (``CURRENT``) the journal continues.  Expiries by
``ttl_seconds`` (and evictions by ``enforce_limits``) are the exception: they are applied first and
journalled after (below), since they follow from journalled timestamps and the clock.  Opening the
store loads that snapshot and replays its journal, so a restart serves exactly the acknowledged
changes.  ``compact()`` (every ``compact_every`` records, once the journal's bytes pass
``max(compact_bytes, COMPACT_SNAPSHOT_RATIO * the snapshot's bytes)``, at opening when the journal is
over either bound, and at ``close()``) saves a new snapshot through ``Gallery.save`` (atomic: a crash
keeps the old snapshot and its journal) and starts an empty journal for it; journals of older
snapshots are deleted afterwards.

A record is ``MAGIC | u32 header length | u64 payload length | sha256(header + payload) | header
(JSON) | payload (float32 rows)``.  A crash while appending leaves at most one torn record at the end:
it was never acknowledged, so replay drops it (and truncates the file).  A damaged record anywhere
else is an error: acknowledged changes after it could not be trusted.

Limits: ``max_items`` (the oldest items are evicted to make room; a single add larger than the cap
is refused) and ``ttl_seconds`` (items whose timestamp is older are expired).  Age is the item's
``timestamp`` (UNIX seconds, given with the add or the time the server received it); ties keep
insertion order.  Evictions go through ``Gallery.remove``, so the neighbour lists stay exact.

One process serves a gallery directory at a time (``.serve.lock``, ``flock``, taken before anything
is written); a second gets a clear error instead of two journals racing.  A failed append (a full
disk, a failed fsync) is cut off again before the error is returned, so the journal never holds
a change that was not acknowledged ahead of ones that were; if even that fails, the store refuses
further changes.  A snapshot that fails (``compact``) is logged and retried later: the change that
triggered it is already durable in the journal and is acknowledged.  Expiries (``enforce_limits``, run
before every search with ``ttl_seconds``) never fail a search: on a full disk, or in a store that
stopped taking changes, the expired items leave the in-memory gallery at once and their record is
written later (one warning, repeated at most every ``EXPIRY_WARN_EVERY_S``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import struct
import threading
import time
from pathlib import Path

import numpy as np

from export.contract.errors import InputError

from runtime.gallery import POINTER, SERVE_LOCK, Gallery, check_gallery_dir, id_list

log = logging.getLogger(__name__)

MAGIC = b"NFJ1"
_HEAD = struct.Struct("<4sIQ32s")
JOURNAL = re.compile(r"journal\.(v\d+)\.log")
#: records after which the journal is folded into a new snapshot
COMPACT_EVERY = 1000
#: journal bytes after which it is folded into a new snapshot, at the least (see ``GalleryStore``)
COMPACT_BYTES = 256 << 20
#: ... or this multiple of the snapshot's bytes on disk, where that is more
COMPACT_SNAPSHOT_RATIO = 1.0
#: seconds between attempts to journal expiries that a full disk refused (searches; a change retries at once)
EXPIRY_RETRY_S = 1.0
#: seconds between warnings that expiries are still not journalled
EXPIRY_WARN_EVERY_S = 600.0
#: meta key holding an item's timestamp (UNIX seconds)
TIMESTAMP = "timestamp"
#: how far in the future an item's timestamp may lie (clock skew between cameras and the server)
FUTURE_SKEW_S = 60.0


def _journal_name(version: str) -> str:
    return f"journal.{version}.log"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def encode_record(header: dict, rows: np.ndarray | None = None) -> bytes:
    head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    payload = b"" if rows is None else np.ascontiguousarray(rows, "<f4").tobytes()
    digest = hashlib.sha256(head + payload).digest()
    return _HEAD.pack(MAGIC, len(head), len(payload), digest) + head + payload


def read_records(path: Path) -> tuple[list[tuple[dict, np.ndarray | None]], int, int]:
    """The journal's records, the byte length of its valid prefix and the file's length.

    A record that ends past the end of the file or fails its checksum while being the last one is
    a torn append (dropped); a damaged record followed by more data is an InputError."""
    data = path.read_bytes()
    records, pos = [], 0
    while pos < len(data):
        end_of_head = pos + _HEAD.size
        if end_of_head > len(data):
            break                                           # torn header at the end
        magic, head_len, payload_len, digest = _HEAD.unpack_from(data, pos)
        end = end_of_head + head_len + payload_len
        body = data[end_of_head:end]
        intact = magic == MAGIC and end <= len(data) and hashlib.sha256(body).digest() == digest
        if not intact:
            # a crash mid-append leaves a prefix of the record, or zeros where the file grew; a record
            # whose length runs past the end is torn only if no intact record follows it (a damaged
            # length field in the middle must not make the records after it look like a torn tail)
            torn = (not data[pos:].strip(b"\0")) if magic != MAGIC else end >= len(data)
            if torn and magic == MAGIC and not _genuinely_torn(data[end_of_head:], head_len, payload_len):
                torn = False
            if torn:
                break
            raise InputError(f"{path} is damaged at byte {pos} (a record that is not the last one fails its "
                             "checksum): the changes after it cannot be trusted. Move the journal away to serve the "
                             "last snapshot, or restore the gallery from a backup")
        try:
            header = json.loads(body[:head_len].decode())
        except (ValueError, RecursionError) as err:
            raise InputError(f"{path}: record at byte {pos} has a checksum but no JSON header "
                             f"({type(err).__name__}); the journal was written by another program") from None
        rows = None
        if payload_len:
            if payload_len % 4:
                raise InputError(f"{path}: record at byte {pos} carries {payload_len} payload bytes, not whole float32 "
                                 "values; the journal was written by another program")
            rows = np.frombuffer(body[head_len:], "<f4").astype(np.float32)
        records.append((header, rows))
        pos = end
    return records, pos, len(data)


class GalleryStore:
    """``Gallery`` + journal: every acknowledged change survives a crash.  Thread-safe.

    Compaction is due after ``compact_every`` records or once the journal holds
    ``max(compact_bytes, COMPACT_SNAPSHOT_RATIO * bytes of the snapshot it continues)`` bytes,
    whichever comes first.  Records alone do not bound the journal: one add may carry 65536 rows
    (tens of MB), so 1000 of them made journals of many GB whose replay (all read into memory, every
    add re-run through the neighbour lists) took hours.  A fixed byte bound alone would make a large
    gallery rewrite its whole snapshot every ``compact_bytes`` (a 10 GB snapshot every 256 MB: 40
    times the journal's writes); a multiple of the snapshot alone would compact a small gallery at
    nearly every add.  With both, the snapshot rewritten is never larger than the journal bytes it
    folds (at most one write more per journal byte), and the journal a restart replays holds at most
    about as many bytes as the snapshot it continues, or ``compact_bytes``, plus one record (a
    snapshot stores a row about three times over: raw, normalised, neighbour lists; so that is at
    most about three galleries' worth of added rows; ``read_records`` holds no more in memory).  The
    snapshot's size is known exactly: it is the version directory ``Gallery.save`` returned (or
    ``CURRENT`` names at opening), summed once per compaction.
    """

    def __init__(self, path: str | Path, pipe, max_items: int | None = None, ttl_seconds: float | None = None,
                 compact_every: int = COMPACT_EVERY, clock=time.time, compact_bytes: int = COMPACT_BYTES):
        if max_items is not None and max_items < 1:
            raise InputError(f"max_items must be >= 1, found {max_items}")
        if ttl_seconds is not None and not (np.isfinite(ttl_seconds) and ttl_seconds > 0):
            raise InputError(f"ttl_seconds must be a positive number of seconds, found {ttl_seconds}")
        self.path = Path(path)
        self.pipe = pipe
        self.max_items = max_items
        self.ttl_seconds = ttl_seconds
        self.compact_every = max(1, int(compact_every))
        self.compact_bytes = max(1, int(compact_bytes))
        self.clock = clock
        self._lock = threading.RLock()
        self._lock_fd = -1
        self._journal_fd = -1
        self._records = 0
        self._journal_bytes = 0
        self._snapshot_bytes = 0
        self._next_compaction = self.compact_every
        self._next_compaction_bytes = self.compact_bytes
        self._failed: str | None = None
        # ids already taken out of the in-memory gallery by the limits whose record the journal has not
        # taken yet (a full disk): the next record written is theirs (see enforce_limits)
        self._unrecorded: list = []
        self._retry_at = 0.0
        self._warned_at: float | None = None
        self.replayed = 0
        self.dropped_torn_bytes = 0
        self._open()

    # ---- opening ----

    def _open(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise InputError(f"gallery {self.path} is a file; give a directory (a new one is created)")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise InputError(f"cannot create gallery directory {self.path}: {err.strerror or err}") from None
        check_gallery_dir(self.path)        # another folder is refused before its .serve.lock is made
        self._take_owner_lock()             # before anything is written: two servers never both save
        try:
            if not (self.path / POINTER).is_file():
                self.pipe.gallery().save(self.path, served_by=self._lock_fd)   # a new, empty gallery: the first snapshot
            self.gallery: Gallery = self.pipe.gallery(self.path)
            foreign = [i for i in self.gallery.ids if not isinstance(i, str)][:3]
            if foreign:
                raise InputError(f"gallery {self.path} has ids that are not text (first {foreign}); the service's ids "
                                 "are UTF-8 strings: re-add these items with string ids")
            odd = [i for i, m in zip(self.gallery.ids, self.gallery.meta) if not _is_stamp(m.get(TIMESTAMP, 0.0))][:3]
            if odd:
                raise InputError(f"gallery {self.path} has items whose '{TIMESTAMP}' metadata is not a finite number of "
                                 f"UNIX seconds (first ids {odd}); the service ages items by it: fix or remove those "
                                 "items' timestamps")
            self.version = json.loads((self.path / POINTER).read_text())["version"]
            journal = self.path / _journal_name(self.version)
            if journal.exists():
                self._replay(journal)
            # after the replay (acknowledged removals of such items count), before the journal is opened
            unstamped = [i for i, m in zip(self.gallery.ids, self.gallery.meta) if TIMESTAMP not in m]
            if unstamped and self.ttl_seconds is not None:
                # a gallery written by Gallery.save without timestamps: aged as of 1970, every such item
                # would be expired (and the removal journalled) the moment the service starts
                raise InputError(f"gallery {self.path} has {len(unstamped)} item(s) without '{TIMESTAMP}' metadata "
                                 f"(first ids {unstamped[:3]}; saved by Gallery.save without timestamps), and "
                                 f"--ttl-seconds {self.ttl_seconds:g} ages items by it: they would all expire at "
                                 f"start; add them with meta={{'{TIMESTAMP}': UNIX seconds}}, or serve without "
                                 "--ttl-seconds")
            self._open_journal(journal)
            self._remove_stale_journals()
            self._snapshot_bytes = _dir_bytes(self.path / self.version)
            self._next_compaction_bytes = self._byte_bound()
            self.enforce_limits()
            self._compact_if_due()          # a journal left over its bounds (an older version, failed snapshots)
        except BaseException:
            self.close(compact=False)
            raise

    def _take_owner_lock(self) -> None:
        import fcntl

        lock = self.path / SERVE_LOCK
        try:
            self._lock_fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise InputError(f"cannot open {lock}: {err.strerror or err}; the gallery directory must be writable") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise InputError(f"gallery {self.path} is already served by another process (it holds {lock}); stop "
                             "that server or give another --gallery directory") from None

    def _replay(self, journal: Path) -> None:
        records, good, size = read_records(journal)
        for n, (header, rows) in enumerate(records):
            try:
                _check_record(header, rows, self.gallery.config.n_embd)
                self._apply(header, rows)
            except InputError as err:
                raise InputError(f"{journal}: record {n} cannot be replayed onto snapshot {self.version} ({err}); "
                                 "the gallery directory was changed by hand: restore it from a backup") from None
        self.replayed = len(records)
        self._records = len(records)
        self._journal_bytes = good
        if good < size:
            self.dropped_torn_bytes = size - good
            log.warning("%s: dropped a torn last record (%d bytes) left by a crash; it was never acknowledged",
                        journal, size - good)
            with open(journal, "r+b") as f:
                f.truncate(good)
                f.flush()
                os.fsync(f.fileno())

    def _open_journal(self, journal: Path) -> None:
        self._journal_fd = self._create_journal(journal)

    def _create_journal(self, journal: Path) -> int:
        existed = journal.exists()
        fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)    # the umask applies
        if not existed:
            try:
                _fsync_dir(self.path)
            except OSError:
                os.close(fd)
                raise
        return fd

    def _remove_stale_journals(self) -> None:
        for p in self.path.iterdir():
            m = JOURNAL.fullmatch(p.name)
            if m and m.group(1) != self.version:
                p.unlink(missing_ok=True)

    # ---- changes ----

    def __len__(self) -> int:
        return len(self.gallery)

    def add(self, embeddings, ids, camids=None, timestamps=None) -> int:
        """Add raw embeddings [m, D] with string ids, camera ids and timestamps (UNIX seconds; default:
        now); evicts the oldest items beyond ``max_items``.  Returns the gallery's size once the change
        is durable."""
        with self._lock:
            ids = [_as_id(i) for i in id_list(ids, "gallery_add")]
            m = len(ids)
            now = self.clock()
            if timestamps is None:
                stamps = np.full(m, now, np.float64)
            else:
                stamps = np.asarray(timestamps, np.float64).reshape(-1)
                if stamps.shape != (m,) or not np.isfinite(stamps).all():
                    raise InputError(f"gallery_add: timestamps must be {m} finite numbers (UNIX seconds, one per "
                                     f"row), found shape {stamps.shape}")
            if (stamps > now + FUTURE_SKEW_S).any():
                raise InputError(f"gallery_add: timestamps must be UNIX seconds no later than now (+{FUTURE_SKEW_S:.0f} s "
                                 f"of clock skew), found {float(stamps.max()):.6g} with now {now:.6g}")
            if self.ttl_seconds is not None and (stamps < now - self.ttl_seconds).any():
                raise InputError(f"gallery_add: {int((stamps < now - self.ttl_seconds).sum())} item(s) are older than "
                                 f"--ttl-seconds {self.ttl_seconds:g} and would expire at once; send recent items")
            meta = [{TIMESTAMP: float(t)} for t in stamps]
            x, ids, cams, meta = self.gallery.validate_add(embeddings, ids, camids, meta)
            if self.max_items is not None and len(x) > self.max_items:
                raise InputError(f"gallery_add: {len(x)} items at once but the gallery holds at most "
                                 f"{self.max_items} (--max-items); send fewer")
            evict: list = []
            if self.max_items is not None and len(self.gallery) + len(x) > self.max_items:
                # the oldest of old and new together make room; a new item older than all kept ones is not added
                old_stamps, n_old = self._stamps(), len(self.gallery)
                pool = np.concatenate([old_stamps, stamps])
                drop = np.argsort(pool, kind="stable")[:n_old + len(x) - self.max_items]
                gallery_ids = self.gallery.ids
                evict = [gallery_ids[p] for p in drop if p < n_old]
                keep = np.setdiff1d(np.arange(len(x)), drop[drop >= n_old] - n_old)
                x, cams, stamps = x[keep], cams[keep], stamps[keep]
                ids = [ids[k] for k in keep]
            header = {"op": "add", "ids": ids, "camids": cams.tolist(), "timestamps": stamps.tolist(),
                      "evict": evict, "dim": int(x.shape[1])}
            self._commit(header, x)
            return len(self.gallery)

    def remove(self, ids) -> int:
        """Remove items by id (all known, or nothing changes).  Returns the gallery's size."""
        with self._lock:
            ids = [_as_id(i) for i in id_list(ids, "gallery_remove", ordered=False)]
            unknown = [i for i in ids if i not in self.gallery]
            if unknown:
                raise InputError(f"gallery_remove: {len(unknown)} unknown id(s), first {unknown[:5]}; nothing was "
                                 "removed")
            if len(set(ids)) != len(ids):
                raise InputError("gallery_remove: ids must be unique")
            if ids:
                self._commit({"op": "remove", "ids": ids}, None)
            return len(self.gallery)

    def enforce_limits(self) -> int:
        """Expire items older than ``ttl_seconds`` and evict beyond ``max_items``; returns how many.

        Never fails for want of disk space: the items leave the in-memory gallery first (so no search
        sees them), then their record is journalled.  Where the journal cannot take it (a full disk, a
        store that stopped taking changes) the record waits: the next change writes it before its own
        record, and searches retry it every ``EXPIRY_RETRY_S``; a warning says so, at most every
        ``EXPIRY_WARN_EVERY_S``.  This is safe because an expiry acknowledges nothing: it follows from
        the journalled timestamps and the clock, so a restart before it is recorded expires the same
        items again, and the journal still replays (the waiting record comes before any later one, so
        the ids it removes are there when it is replayed)."""
        with self._lock:
            drop: list = []
            if self.ttl_seconds is not None and len(self.gallery):
                stamps = self._stamps()
                old = np.flatnonzero(stamps < self.clock() - self.ttl_seconds)
                ids = self.gallery.ids
                drop = [ids[p] for p in old]
            if self.max_items is not None:
                over = len(self.gallery) - len(drop) - self.max_items
                if over > 0:
                    dropped = set(drop)
                    drop += [i for i in self._oldest(over + len(drop)) if i not in dropped][:over]
            if drop:
                self.gallery.remove(drop)
                self._unrecorded.extend(drop)
            self._try_record_expiries()
            return len(drop)

    def search(self, queries, topn: int, camids=None, refined: bool = True) -> list:
        """``Gallery.search`` after enforcing ``ttl_seconds``: no item that had expired when the
        search began is a hit, whether or not its expiry could be journalled yet.  With
        ``ttl_seconds`` the expiry takes the store's lock (it waits for an add's fsync, and may
        write and fsync its own record); the search itself then runs under the gallery's lock only.
        An add that lands in between brings no expired item: adds past ``ttl_seconds`` are refused.
        An empty gallery gives no lists (``[]``)."""
        if self.ttl_seconds is not None:
            self.enforce_limits()
        gallery = self.gallery
        return [] if len(gallery) == 0 else gallery.search(queries, topn, camids, refined=refined)

    def _stamps(self) -> np.ndarray:
        return np.array([m.get(TIMESTAMP, 0.0) for m in self.gallery.meta], np.float64)

    def _oldest(self, count: int) -> list:
        if count <= 0:
            return []
        order = np.argsort(self._stamps(), kind="stable")[:count]
        ids = self.gallery.ids
        return [ids[p] for p in order]

    def _commit(self, header: dict, rows: np.ndarray | None) -> None:
        """Journal (fsync), then apply: a change is acknowledged only once it is on disk."""
        if self._journal_fd < 0:
            raise InputError(self._failed or "the gallery store is closed")
        try:
            self._record_expiries()                 # waiting expiries first: the journal keeps the order
            self._append(header, rows)
        except OSError as err:
            raise InputError(f"cannot record the change in {self.path} ({err.strerror or err}); nothing was changed: "
                             "free disk space or fix the directory, then retry") from None
        self._apply(header, rows)
        self._compact_if_due()

    def _append(self, header: dict, rows: np.ndarray | None) -> None:
        """Append one record and fsync it; on failure cut it off again and raise the OSError."""
        record = encode_record(header, rows)
        start = os.lseek(self._journal_fd, 0, os.SEEK_END)
        try:
            view = memoryview(record)
            while view:
                written = os.write(self._journal_fd, view)
                view = view[written:]
            os.fsync(self._journal_fd)
        except OSError as err:
            self._cut_back(start, err)
            raise
        self._records += 1
        self._journal_bytes = start + len(record)

    def _record_expiries(self) -> None:
        """Journal the expiries that ``enforce_limits`` applied but could not record (raises OSError)."""
        if not self._unrecorded:
            return
        self._append({"op": "remove", "ids": self._unrecorded, "reason": "limits"}, None)
        count, self._unrecorded, self._retry_at = len(self._unrecorded), [], 0.0
        if self._warned_at is not None:
            self._warned_at = None
            log.warning("%s: the expiry of %d item(s) is journalled now", self.path, count)

    def _try_record_expiries(self) -> None:
        if not self._unrecorded:
            return
        if self._journal_fd < 0:
            self._warn_unrecorded(self._failed or "the gallery store is closed")
            return
        if time.monotonic() < self._retry_at:
            return
        try:
            self._record_expiries()
        except OSError as err:
            self._retry_at = time.monotonic() + EXPIRY_RETRY_S
            self._warn_unrecorded(str(err.strerror or err))
            return
        self._compact_if_due()

    def _warn_unrecorded(self, reason: str) -> None:
        now = time.monotonic()
        if self._warned_at is not None and now - self._warned_at < EXPIRY_WARN_EVERY_S:
            return
        self._warned_at = now
        log.warning("%s: cannot journal the expiry of %d item(s) (%s); searches leave them out already, the record "
                    "is retried with the next change or search (a restart before then expires them again)",
                    self.path, len(self._unrecorded), reason)

    def _byte_bound(self) -> int:
        return max(self.compact_bytes, int(COMPACT_SNAPSHOT_RATIO * self._snapshot_bytes))

    def _compact_if_due(self) -> None:
        if self._records < self._next_compaction and self._journal_bytes < self._next_compaction_bytes:
            return
        try:
            self.compact()
        except (InputError, OSError) as err:      # the changes are durable in the journal: still acknowledged
            self._next_compaction = self._records + self.compact_every
            self._next_compaction_bytes = self._journal_bytes + self._byte_bound()
            log.warning("%s: could not fold the journal into a snapshot (%s); retrying after %d more changes or "
                        "%d more journal bytes", self.path, err, self.compact_every, self._byte_bound())

    def _cut_back(self, offset: int, cause: OSError) -> None:
        """Remove a failed append, so that later records never follow an unacknowledged one."""
        try:
            os.ftruncate(self._journal_fd, offset)
            os.fsync(self._journal_fd)
        except OSError as err:
            fd, self._journal_fd = self._journal_fd, -1
            os.close(fd)
            self._failed = (f"the gallery store at {self.path} stopped taking changes: an append failed "
                            f"({cause.strerror or cause}) and could not be removed again ({err.strerror or err}); "
                            "restart the server once the disk is fixed")
            log.error("%s", self._failed)

    def _apply(self, header: dict, rows: np.ndarray | None) -> None:
        op = header.get("op")
        if op == "add":
            if header.get("evict"):
                self.gallery.remove(header["evict"])
            ids = header["ids"]
            if not ids:                              # every new item was evicted at once: only the evictions
                return
            x = rows.reshape(len(ids), int(header["dim"]))
            self.gallery.add(x, ids, np.asarray(header["camids"], np.int64),
                             [{TIMESTAMP: float(t)} for t in header["timestamps"]])
        elif op == "remove":
            self.gallery.remove(header["ids"])
        else:
            raise InputError(f"unknown journal operation {op!r}")

    # ---- snapshots ----

    def compact(self) -> None:
        """Fold the journal into a new snapshot and start an empty journal for it."""
        with self._lock:
            if self._journal_fd < 0:
                return
            saved = self.gallery.save(self.path, served_by=self._lock_fd)   # atomic: on failure the old snapshot and journal stay
            try:
                fd = self._create_journal(self.path / _journal_name(saved.name))
            except OSError as err:
                # CURRENT already names the new snapshot: appending to the old journal would be lost
                os.close(self._journal_fd)
                self._journal_fd = -1
                self._failed = (f"the gallery store at {self.path} stopped taking changes: its snapshot {saved.name} "
                                f"was saved but its journal could not be created ({err.strerror or err}); restart "
                                "the server once the directory is writable (nothing acknowledged is lost)")
                raise InputError(self._failed) from None
            os.close(self._journal_fd)
            self._journal_fd = fd
            self.version = saved.name
            self._records = self._journal_bytes = 0
            if self._unrecorded:                    # the snapshot left them out: their expiry is durable now
                self._unrecorded, self._retry_at = [], 0.0
                if self._warned_at is not None:
                    self._warned_at = None
                    log.warning("%s: the waiting expiries are recorded by snapshot %s", self.path, saved.name)
            self._snapshot_bytes = _dir_bytes(saved)
            self._next_compaction = self.compact_every
            self._next_compaction_bytes = self._byte_bound()
            self._remove_stale_journals()

    def close(self, compact: bool = True) -> None:
        """Compact (by default) and release the journal and the directory."""
        with self._lock:
            try:
                if compact and self._journal_fd >= 0 and (self._records or self._unrecorded):
                    self.compact()
            finally:
                if self._journal_fd >= 0:
                    os.close(self._journal_fd)
                    self._journal_fd = -1
                if self._lock_fd >= 0:
                    os.close(self._lock_fd)
                    self._lock_fd = -1

    def __enter__(self) -> "GalleryStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _dir_bytes(folder: Path) -> int:
    """Bytes of the files directly in ``folder`` (a snapshot's version directory); 0 if unreadable."""
    try:
        with os.scandir(folder) as entries:
            return sum(e.stat(follow_symlinks=False).st_size for e in entries if e.is_file(follow_symlinks=False))
    except OSError:
        return 0


def _is_stamp(value) -> bool:
    """A timestamp the service can age: a finite int or float (UNIX seconds)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:                    # an int beyond any float
        return False


def _genuinely_torn(body: bytes, head_len: int, payload_len: int) -> bool:
    """Whether a record that runs past the end of the file is a torn last append rather than a
    record whose length fields were damaged (which would hide the records after it).  Decided by the
    record's own header, which this program wrote (clients control only the payload's floats): its
    JSON must end exactly at ``head_len`` and describe ``payload_len`` bytes of rows.  A header cut
    short by the crash cannot be checked and counts as torn."""
    try:
        header, used = json.JSONDecoder().raw_decode(body[:head_len].decode("latin-1"))
    except ValueError:
        return len(body) < head_len                    # the crash cut the header itself
    if used != head_len or not isinstance(header, dict):
        return False
    if header.get("op") == "remove":
        return payload_len == 0
    ids, dim = header.get("ids"), header.get("dim")
    if header.get("op") != "add" or not isinstance(ids, list) or isinstance(dim, bool) or not isinstance(dim, int):
        return False
    return payload_len == 4 * dim * len(ids)


def _check_record(header, rows, dim: int) -> None:
    """A journal record read back from disk has the fields :meth:`GalleryStore._commit` writes, with
    their types (a checksum only shows the bytes are the ones written, not that our code wrote them)."""
    if not isinstance(header, dict) or header.get("op") not in ("add", "remove"):
        found = header.get("op") if isinstance(header, dict) else header
        raise InputError(f"not a journal record of this program (op {found!r:.40})")

    def listed_ids(key, required=True):
        value = header.get(key)
        if value is None and not required:
            return []
        if not isinstance(value, list):
            raise InputError(f"its {key} must be a list of ids, found {type(value).__name__}")
        return [_as_id(v) for v in value]
    ids = listed_ids("ids")
    if header["op"] == "remove":
        return
    listed_ids("evict", required=False)
    m = len(ids)
    if header.get("dim") != dim or isinstance(header.get("dim"), bool):
        raise InputError(f"its rows are {header.get('dim')!r} wide, the gallery's {dim}")
    values = 0 if rows is None else rows.size
    if values != m * dim:                     # an add that kept nothing (all evicted) carries no rows
        raise InputError(f"it carries {values} values for {m} rows of {dim}")
    cams, stamps = header.get("camids"), header.get("timestamps")
    if not (isinstance(cams, list) and len(cams) == m and all(
            isinstance(c, int) and not isinstance(c, bool) and -2 ** 63 <= c < 2 ** 63 for c in cams)):
        raise InputError(f"its camids must be {m} 64-bit integers")
    if not (isinstance(stamps, list) and len(stamps) == m and all(_is_stamp(t) for t in stamps)):
        raise InputError(f"its timestamps must be {m} finite numbers")


def _as_id(value) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"ids must be UTF-8 text, found bytes {bytes(value)[:20]!r}") from None
    if not isinstance(value, str) or not value or len(value) > 256 or any(ord(c) < 32 for c in value):
        raise InputError(f"ids must be non-empty text of at most 256 printable characters, found {value!r:.60}")
    return value
