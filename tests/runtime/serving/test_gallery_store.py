"""The durable gallery of ``runtime serve``: journal, replay, torn appends, limits, compaction, ownership."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from export.contract.errors import InputError
from neighbor_oracle import canonical_lists
from runtime.gallery import POINTER
from runtime.pipeline import Pipeline
from runtime.serving.gallery_store import GalleryStore, encode_record, read_records


@pytest.fixture(scope="module")
def pipe(resnet18_export):
    with Pipeline.load(resnet18_export[0], backend="onnxruntime") as p:
        yield p


def rows(n, d, seed=0, dup=0):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    if dup:
        x[-dup:] = x[:dup]                      # exact duplicates: ties the lists must order canonically
    return x


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def crash(store):
    """What kill -9 leaves: no compaction, descriptors gone."""
    os.close(store._journal_fd)
    os.close(store._lock_fd)
    store._journal_fd = store._lock_fd = -1


def assert_exact_lists(store):
    g = store.gallery
    idx, valid = g._index.neighbors()
    ref_idx, ref_valid = canonical_lists(g._index.rows(), g.config.topk)
    np.testing.assert_array_equal(valid, ref_valid)
    np.testing.assert_array_equal(np.where(valid, idx, -1), np.where(ref_valid, ref_idx, -1))


def test_acknowledged_changes_survive_a_crash_and_replay_in_order(pipe, tmp_path):
    d = pipe.config.n_embd
    x = rows(30, d, dup=4)
    s = GalleryStore(tmp_path / "g", pipe)
    s.add(x[:10], [f"a{i}" for i in range(10)], np.arange(10) % 3)
    s.remove(["a3", "a4"])
    s.add(x[10:30], [f"b{i}" for i in range(20)], np.arange(20) % 3, timestamps=np.arange(20.0))
    expect_ids, expect_raw = s.gallery.ids, s.gallery.embeddings
    crash(s)
    assert sorted(os.listdir(tmp_path / "g")) == [".serve.lock", "CURRENT", "journal.v000001.log", "v000001"]
    s2 = GalleryStore(tmp_path / "g", pipe)
    assert s2.replayed == 3 and s2.gallery.ids == expect_ids
    np.testing.assert_array_equal(s2.gallery.embeddings, expect_raw)
    assert [m["timestamp"] for m in s2.gallery.meta[-20:]] == list(np.arange(20.0))
    assert_exact_lists(s2)
    s2.close()                                      # compacts: one snapshot, an empty journal
    names = sorted(os.listdir(tmp_path / "g"))
    assert names == [".serve.lock", "CURRENT", "journal.v000002.log", "v000002"]
    assert (tmp_path / "g" / "journal.v000002.log").stat().st_size == 0
    with GalleryStore(tmp_path / "g", pipe) as s3:
        assert s3.replayed == 0 and s3.gallery.ids == expect_ids


def test_a_torn_last_record_is_dropped_and_a_damaged_middle_one_is_an_error(pipe, tmp_path):
    d = pipe.config.n_embd
    s = GalleryStore(tmp_path / "g", pipe)
    s.add(rows(4, d), ["a", "b", "c", "d"], np.zeros(4, np.int64))
    s.add(rows(2, d, seed=1), ["e", "f"], np.zeros(2, np.int64))
    crash(s)
    journal = tmp_path / "g" / "journal.v000001.log"
    good = journal.read_bytes()
    torn = encode_record({"op": "add", "ids": ["g"], "camids": [0], "timestamps": [0.0], "evict": [], "dim": d},
                         rows(1, d, seed=2))
    for tail in (torn[:10], torn[:-5], b"\0" * 300):   # a crash mid-append; zeros where the file grew
        journal.write_bytes(good + tail)
        s = GalleryStore(tmp_path / "g", pipe)
        assert s.gallery.ids == ["a", "b", "c", "d", "e", "f"] and s.dropped_torn_bytes == len(tail)
        crash(s)
        assert journal.read_bytes() == good             # truncated to the acknowledged records
    first = len(encode_record({"op": "add", "ids": ["a", "b", "c", "d"], "camids": [0] * 4,
                               "timestamps": [0.0] * 4, "evict": [], "dim": d}, rows(4, d)))
    damaged = bytearray(good)
    damaged[first // 2] ^= 0xFF                          # inside the first of two records
    journal.write_bytes(bytes(damaged))
    with pytest.raises(InputError, match="damaged at byte 0"):
        GalleryStore(tmp_path / "g", pipe)
    assert journal.read_bytes() == bytes(damaged)        # nothing is thrown away on an error


def test_a_refused_change_writes_nothing(pipe, tmp_path):
    d = pipe.config.n_embd
    with GalleryStore(tmp_path / "g", pipe) as s:
        s.add(rows(3, d), ["a", "b", "c"], np.zeros(3, np.int64))
        size = (tmp_path / "g" / "journal.v000001.log").stat().st_size
        bad = [lambda: s.add(rows(1, d), ["a"], [0]),                     # id taken
               lambda: s.add(rows(2, d), ["x", "x"], [0, 0]),             # repeated id
               lambda: s.add(np.full((1, d), np.nan, np.float32), ["y"], [0]),
               lambda: s.add(rows(1, d), [b"\xff"], [0]),                  # not UTF-8
               lambda: s.add(rows(1, d), ["z\n"], [0]),                    # control character
               lambda: s.add(rows(1, d), ["z"], [0], timestamps=[np.inf]),
               lambda: s.remove(["a", "nope"])]
        for call in bad:
            with pytest.raises(InputError):
                call()
        assert (tmp_path / "g" / "journal.v000001.log").stat().st_size == size
        assert s.gallery.ids == ["a", "b", "c"]


def test_cap_and_ttl_evict_the_oldest_and_keep_the_lists_exact(pipe, tmp_path):
    d = pipe.config.n_embd
    clock = Clock()
    x = rows(60, d, seed=3, dup=6)
    s = GalleryStore(tmp_path / "g", pipe, max_items=25, ttl_seconds=100, clock=clock)
    for n in range(0, 60, 6):
        clock.t += 10
        s.add(x[n:n + 6], [f"p{i}" for i in range(n, n + 6)], np.arange(6) % 2,
              timestamps=clock.t - np.arange(6))          # within a batch the last row is the oldest
        assert len(s) <= 25
        assert_exact_lists(s)
    assert len(s) == 25
    stamps = [m["timestamp"] for m in s.gallery.meta]
    assert min(stamps) >= max(stamps) - 50                # the newest 25 of 60
    clock.t += 85                                          # everything older than clock - 100 expires
    expired = s.enforce_limits()
    assert expired > 0 and all(m["timestamp"] >= clock.t - 100 for m in s.gallery.meta)
    assert_exact_lists(s)
    keep = s.gallery.ids
    crash(s)
    s2 = GalleryStore(tmp_path / "g", pipe, max_items=25, ttl_seconds=100, clock=clock)
    assert s2.gallery.ids == keep                          # evictions are journalled, replay agrees
    with pytest.raises(InputError, match="at most 25"):
        s2.add(rows(26, d), [f"q{i}" for i in range(26)], np.zeros(26, np.int64))
    s2.close()


def test_compaction_every_n_records_and_one_server_per_directory(pipe, tmp_path):
    d = pipe.config.n_embd
    s = GalleryStore(tmp_path / "g", pipe, compact_every=3)
    for i in range(7):
        s.add(rows(1, d, seed=i), [f"i{i}"], [0])
    assert json.loads((tmp_path / "g" / POINTER).read_text())["version"] == "v000003"
    assert len(read_records(tmp_path / "g" / "journal.v000003.log")[0]) == 1
    with pytest.raises(InputError, match="already served by another process"):
        GalleryStore(tmp_path / "g", pipe)
    s.close()
    with GalleryStore(tmp_path / "g", pipe) as s2:
        assert s2.gallery.ids == [f"i{i}" for i in range(7)]


def test_bad_arguments(pipe, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        GalleryStore(tmp_path / "file", pipe)
    with pytest.raises(InputError, match="max_items"):
        GalleryStore(tmp_path / "g", pipe, max_items=0)
    with pytest.raises(InputError, match="ttl_seconds"):
        GalleryStore(tmp_path / "g", pipe, ttl_seconds=float("nan"))


def test_a_failed_append_is_cut_off_and_later_changes_survive(pipe, tmp_path, monkeypatch):
    import errno

    import runtime.serving.gallery_store as store_module

    d = pipe.config.n_embd
    s = GalleryStore(tmp_path / "g", pipe)
    s.add(rows(2, d), ["a", "b"], [0, 0])
    real_write, real_fsync = os.write, os.fsync

    def short_write_then_full(fd, data):        # a disk that fills up in the middle of a record
        real_write(fd, bytes(data[:100]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module.os, "write", short_write_then_full)
    with pytest.raises(InputError, match="No space left"):
        s.add(rows(50, d, seed=1), [f"x{i}" for i in range(50)], np.zeros(50, np.int64))
    monkeypatch.setattr(store_module.os, "write", real_write)
    calls = {"n": 0}

    def fsync_fails_once(fd):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(errno.EIO, "Input/output error")
        return real_fsync(fd)

    monkeypatch.setattr(store_module.os, "fsync", fsync_fails_once)
    with pytest.raises(InputError, match="Input/output error"):
        s.add(rows(1, d, seed=2), ["c"], [0])
    monkeypatch.setattr(store_module.os, "fsync", real_fsync)
    s.add(rows(1, d, seed=2), ["c"], [0])            # the client's retry of the refused add
    s.add(rows(1, d, seed=3), ["e"], [0])
    assert s.gallery.ids == ["a", "b", "c", "e"]
    crash(s)
    s2 = GalleryStore(tmp_path / "g", pipe)
    assert s2.gallery.ids == ["a", "b", "c", "e"] and s2.dropped_torn_bytes == 0
    s2.close()


def test_a_failed_snapshot_still_acknowledges_the_change(pipe, tmp_path, monkeypatch):
    d = pipe.config.n_embd
    s = GalleryStore(tmp_path / "g", pipe, compact_every=2)

    def full_disk(path, served_by=None):
        raise InputError("cannot save a gallery: No space left on device")

    monkeypatch.setattr(s.gallery, "save", full_disk)
    for i in range(5):
        s.add(rows(1, d, seed=i), [f"i{i}"], [0])     # compaction fails at 2 and 4: the adds stand
    monkeypatch.undo()
    s.add(rows(1, d, seed=9), ["i9"], [0])            # retried after compact_every more changes: succeeds
    assert json.loads((tmp_path / "g" / POINTER).read_text())["version"] == "v000002"
    crash(s)
    with GalleryStore(tmp_path / "g", pipe) as s2:
        assert s2.gallery.ids == [f"i{i}" for i in range(5)] + ["i9"]


def test_the_lock_is_taken_before_the_first_snapshot(pipe, tmp_path):
    d = pipe.config.n_embd
    s = GalleryStore(tmp_path / "g", pipe)
    s.add(rows(1, d), ["a"], [0])
    with pytest.raises(InputError, match="already served"):
        GalleryStore(tmp_path / "g", pipe)
    assert sorted(p.name for p in (tmp_path / "g").iterdir() if p.name.startswith("v")) == ["v000001"]
    crash(s)
    with GalleryStore(tmp_path / "g", pipe) as s2:
        assert s2.gallery.ids == ["a"]


def test_timestamps_and_the_cap_over_old_and_new_items(pipe, tmp_path):
    d = pipe.config.n_embd
    clock = Clock(10_000.0)
    with GalleryStore(tmp_path / "g", pipe, max_items=2, ttl_seconds=3600, clock=clock) as s:
        s.add(rows(2, d), ["A", "B"], [0, 0], timestamps=[9_100.0, 9_200.0])
        s.add(rows(1, d, seed=1), ["C"], [0], timestamps=[9_050.0])    # older than both: not kept
        assert s.gallery.ids == ["A", "B"]
        s.add(rows(1, d, seed=2), ["D"], [0], timestamps=[9_150.0])    # evicts A, the oldest
        assert s.gallery.ids == ["B", "D"]
        with pytest.raises(InputError, match="no later than now"):
            s.add(rows(1, d, seed=3), ["F"], [0], timestamps=[clock.t + 3600])
        with pytest.raises(InputError, match="would expire at once"):
            s.add(rows(1, d, seed=3), ["F"], [0], timestamps=[clock.t - 7200])


def test_a_gallery_with_integer_ids_is_refused_with_a_clear_error(pipe, tmp_path):
    g = pipe.gallery()
    g.add(rows(3, pipe.config.n_embd), ids=[0, 1, 2])
    g.save(tmp_path / "g")
    with pytest.raises(InputError, match="not text"):
        GalleryStore(tmp_path / "g", pipe)


@pytest.mark.parametrize("header, words", [
    ({"op": "add", "camids": [0], "timestamps": [0.0], "evict": [], "dim": None}, "ids must be a list"),
    ({"op": "add", "ids": [7], "camids": [0], "timestamps": [0.0], "evict": [], "dim": None}, "ids must be"),
    ({"op": "add", "ids": ["g"], "camids": [0], "timestamps": [0.0], "evict": [], "dim": 3}, "wide"),
    ({"op": "add", "ids": ["g"], "camids": ["0"], "timestamps": [0.0], "evict": [], "dim": None}, "camids"),
    ({"op": "add", "ids": ["g"], "camids": [0], "timestamps": None, "evict": [], "dim": None}, "timestamps"),
    ({"op": "add", "ids": ["g", "h"], "camids": [0, 0], "timestamps": [0.0, 0.0], "evict": [], "dim": None}, "values for 2"),
    ({"op": "add", "ids": ["g"], "camids": [0], "timestamps": [0.0], "evict": "a", "dim": None}, "evict must be"),
    ({"op": "remove", "ids": "a"}, "ids must be a list"),
    ({"op": "drop"}, "not a journal record"),
    ([1, 2], "not a journal record"),
])
def test_a_record_with_a_valid_checksum_but_bad_fields_is_one_clear_error(pipe, tmp_path, header, words):
    """Records are checksummed, but a checksum only proves the bytes: a record another program wrote
    (or an edit with the checksum recomputed) was a KeyError/AttributeError/reshape traceback."""
    d = pipe.config.n_embd
    s = GalleryStore(tmp_path / "g", pipe)
    s.add(rows(2, d), ["a", "b"], np.zeros(2, np.int64))
    crash(s)
    if isinstance(header, dict) and header.get("dim", 0) is None:
        header = {**header, "dim": d}
    journal = tmp_path / "g" / "journal.v000001.log"
    good = journal.read_bytes()
    journal.write_bytes(good + encode_record(header, rows(1, d, seed=5) if isinstance(header, dict)
                                             and header.get("op") == "add" else None))
    with pytest.raises(InputError, match="record 1 cannot be replayed") as info:
        GalleryStore(tmp_path / "g", pipe)
    assert words in str(info.value)


def test_an_add_whose_items_are_all_evicted_replays_after_a_crash(pipe, tmp_path):
    """With --max-items, an add older than everything kept is acknowledged and dropped: its record
    holds no rows, and the next start refused to replay it (the server could not start again)."""
    d = pipe.config.n_embd
    clock = Clock(1000.0)
    s = GalleryStore(tmp_path / "g", pipe, max_items=2, clock=clock)
    s.add(rows(2, d), ["a", "b"], [0, 0], timestamps=[990.0, 995.0])
    assert s.add(rows(1, d, seed=1), ["c"], [0], timestamps=[900.0]) == 2
    crash(s)
    s2 = GalleryStore(tmp_path / "g", pipe, max_items=2, clock=clock)
    assert s2.replayed == 2 and s2.gallery.ids == ["a", "b"]
    s2.close()


def test_a_damaged_length_in_a_middle_record_is_an_error_not_a_torn_tail(pipe, tmp_path):
    import struct

    d = pipe.config.n_embd
    s = GalleryStore(tmp_path / "g", pipe)
    s.add(rows(2, d), ["a", "b"], [0, 0])
    s.add(rows(1, d, seed=1), ["c"], [0])
    crash(s)
    journal = tmp_path / "g" / "journal.v000001.log"
    data = bytearray(journal.read_bytes())
    head_len = struct.unpack_from("<I", data, 4)[0]
    struct.pack_into("<I", data, 4, head_len + 10 ** 6)          # the first record now claims to run past the end
    journal.write_bytes(bytes(data))
    with pytest.raises(InputError, match="damaged at byte 0"):
        GalleryStore(tmp_path / "g", pipe)
    assert journal.read_bytes() == bytes(data)                  # nothing truncated


@pytest.mark.parametrize("case", ["odd_payload", "deep_json", "huge_camid"])
def test_journal_records_that_numpy_or_json_choke_on_are_one_clear_error(pipe, tmp_path, case):
    import hashlib
    import struct

    d = pipe.config.n_embd
    s = GalleryStore(tmp_path / "g", pipe)
    s.add(rows(1, d), ["a"], [0])
    crash(s)
    journal = tmp_path / "g" / "journal.v000001.log"
    if case == "odd_payload":
        head, payload = json.dumps({"op": "add", "ids": ["b"], "camids": [0], "timestamps": [0.0], "evict": [],
                                    "dim": d}).encode(), b"\0" * (4 * d + 2)
    elif case == "deep_json":
        head, payload = b"[" * 100_000 + b"]" * 100_000, b""
    else:
        head, payload = json.dumps({"op": "add", "ids": ["b"], "camids": [2 ** 70], "timestamps": [0.0],
                                    "evict": [], "dim": d}).encode(), rows(1, d, seed=3).astype("<f4").tobytes()
    record = struct.pack("<4sIQ32s", b"NFJ1", len(head), len(payload), hashlib.sha256(head + payload).digest())
    journal.write_bytes(journal.read_bytes() + record + head + payload)
    with pytest.raises(InputError) as info:
        GalleryStore(tmp_path / "g", pipe)
    assert {"odd_payload": "whole float32", "deep_json": "no JSON header", "huge_camid": "64-bit"}[case] in str(info.value)


def test_a_save_from_outside_a_running_service_is_refused(pipe, tmp_path):
    """Gallery.save into a served directory deleted the snapshot the service's journal builds on:
    its acknowledged adds were lost at the next start."""
    d = pipe.config.n_embd
    s = GalleryStore(tmp_path / "g", pipe)
    s.add(rows(3, d), ["a", "b", "c"], [0, 0, 0])
    outside = pipe.gallery(tmp_path / "g")
    outside.add(rows(1, d, seed=9), ids=["api"])
    with pytest.raises(InputError, match="served by a running `runtime serve`"):
        outside.save(tmp_path / "g")
    crash(s)
    s2 = GalleryStore(tmp_path / "g", pipe)
    assert s2.gallery.ids == ["a", "b", "c"]
    s2.close()
    outside.save(tmp_path / "g")                                # no service: saving works again


@pytest.mark.parametrize("stamp", ["2024-01-01T00:00:00", [1.0], 10 ** 400, None, float("nan")])
def test_a_gallery_with_timestamps_the_service_cannot_age_is_one_clear_error(pipe, tmp_path, stamp):
    d = pipe.config.n_embd
    g = pipe.gallery()
    g.add(rows(2, d), ids=["a", "b"], meta=[{"timestamp": 5.0}, {"timestamp": stamp}])
    g.save(tmp_path / "g")
    with pytest.raises(InputError, match="'timestamp' metadata is not a finite number"):
        GalleryStore(tmp_path / "g", pipe, max_items=2)


def test_a_saved_gallery_without_timestamps_is_refused_under_a_ttl_not_emptied(pipe, tmp_path):
    """README's Python example saves a gallery with Gallery.save (no timestamps); serving it with
    --ttl-seconds aged its items as of 1970 and journalled the removal of every one at start."""
    d = pipe.config.n_embd
    g = pipe.gallery()
    g.add(rows(3, d), ids=["a", "b", "c"], meta=[{"frame": 1}, {"frame": 2}, {"frame": 3}])
    g.save(tmp_path / "g")
    with pytest.raises(InputError, match="3 item\\(s\\) without 'timestamp' metadata.*serve without --ttl-seconds"):
        GalleryStore(tmp_path / "g", pipe, ttl_seconds=86400, clock=Clock(1e9))
    assert not list(tmp_path.joinpath("g").glob("journal.*.log"))     # nothing journalled, nothing removed
    with GalleryStore(tmp_path / "g", pipe, max_items=10) as s:       # no TTL: served as saved
        assert s.gallery.ids == ["a", "b", "c"]
    stamped = pipe.gallery()
    stamped.add(rows(2, d), ids=["x", "y"], meta=[{"timestamp": 1e9 - 10}, {"timestamp": 1e9 - 20}])
    stamped.save(tmp_path / "h")
    with GalleryStore(tmp_path / "h", pipe, ttl_seconds=86400, clock=Clock(1e9)) as s:
        assert s.gallery.ids == ["x", "y"]


def test_unstamped_items_removed_in_the_journal_do_not_refuse_a_ttl_restart(pipe, tmp_path):
    """The refusal of unstamped items under --ttl-seconds looked at the snapshot before the journal
    was replayed: items the service had removed (acknowledged, then a crash) still refused the start."""
    d = pipe.config.n_embd
    g = pipe.gallery()
    g.add(rows(3, d), ids=["a", "b", "c"])
    g.save(tmp_path / "g")
    s = GalleryStore(tmp_path / "g", pipe)                  # served without a TTL: fine
    s.remove(["a", "b", "c"])
    s.add(rows(2, d, seed=1), ["x", "y"], timestamps=np.array([1e9 - 5, 1e9 - 6]))
    crash(s)                                                 # the removals live in the journal only
    with GalleryStore(tmp_path / "g", pipe, ttl_seconds=86400, clock=Clock(1e9)) as s2:
        assert s2.gallery.ids == ["x", "y"]


def test_a_record_planted_in_a_torn_payload_does_not_turn_the_tail_into_damage(pipe, tmp_path):
    """A client controls an add's floats: a complete fake record hidden in them made a crash during
    that append look like damage in the middle (the server would never start again).  A torn tail is
    judged by its own header, which the server wrote."""
    import hashlib
    import struct

    d = pipe.config.n_embd
    s = GalleryStore(tmp_path / "g", pipe)
    s.add(rows(1, d), ["a"], [0])
    crash(s)
    journal = tmp_path / "g" / "journal.v000001.log"
    good = journal.read_bytes()
    fake_head = b'{"op":"remove","ids":["a"]}'
    fake = struct.pack("<4sIQ32s", b"NFJ1", len(fake_head), 0, hashlib.sha256(fake_head).digest()) + fake_head
    payload = bytearray(rows(2, d, seed=4).astype("<f4").tobytes())
    payload[16:16 + len(fake)] = fake                      # the planted record sits inside the rows
    head = json.dumps({"op": "add", "ids": ["p", "q"], "camids": [0, 0], "timestamps": [0.0, 0.0], "evict": [],
                       "dim": d}, separators=(",", ":")).encode()
    record = struct.pack("<4sIQ32s", b"NFJ1", len(head), len(payload), hashlib.sha256(head + payload).digest())
    journal.write_bytes(good + (record + head + bytes(payload))[:-64])     # the crash cut the append
    s2 = GalleryStore(tmp_path / "g", pipe)
    assert s2.gallery.ids == ["a"] and s2.dropped_torn_bytes > 0
    s2.close()


def test_the_store_takes_ids_as_a_list_never_one_string_split(pipe, tmp_path):
    d = pipe.config.n_embd
    with GalleryStore(tmp_path / "g", pipe) as s:
        s.add(rows(2, d), ["ab", "c"], [0, 0])
        for call in (lambda: s.add(rows(3, d), "abc", [0, 0, 0]), lambda: s.remove("ab"), lambda: s.remove(b"c")):
            with pytest.raises(InputError, match="ids must be a list"):
                call()
        assert s.gallery.ids == ["ab", "c"]
        s.remove(np.array(["ab"]))
        assert s.gallery.ids == ["c"]


def test_a_journal_timestamp_beyond_any_float_is_one_clear_error(pipe, tmp_path):
    d = pipe.config.n_embd
    s = GalleryStore(tmp_path / "g", pipe)
    s.add(rows(1, d), ["a"], [0])
    crash(s)
    journal = tmp_path / "g" / "journal.v000001.log"
    journal.write_bytes(journal.read_bytes() + encode_record(
        {"op": "add", "ids": ["b"], "camids": [0], "timestamps": [10 ** 400], "evict": [], "dim": d}, rows(1, d, seed=2)))
    with pytest.raises(InputError, match="timestamps must be 1 finite numbers"):
        GalleryStore(tmp_path / "g", pipe)


def _full_disk(monkeypatch, store_module):
    """A full disk as the journal sees it: every write fails with ENOSPC (its cut-back still works)."""
    import errno

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module.os, "write", full)


def _expiry_warnings(caplog):
    return [r for r in caplog.records if "cannot journal the expiry" in r.getMessage()]


def test_searches_on_a_full_disk_leave_expired_items_out_and_the_expiry_is_recorded_later(
        pipe, tmp_path, monkeypatch, caplog):
    """With --ttl-seconds a search journals expiries; on a full disk the search itself failed ("cannot
    record the change ... free disk space"), a read refused for want of space to write."""
    import logging

    import runtime.serving.gallery_store as store_module
    from runtime.serving.service import ReidService

    d = pipe.config.n_embd
    caplog.set_level(logging.WARNING, logger=store_module.__name__)
    monkeypatch.setattr(store_module, "EXPIRY_RETRY_S", 0.0)       # retry at every search, not once a second
    real_write = os.write
    clock = Clock(10_000.0)
    x = rows(6, d, seed=7)
    old, new = ["old0", "old1", "old2"], ["new0", "new1", "new2"]
    s = GalleryStore(tmp_path / "g", pipe, ttl_seconds=100, clock=clock)
    service = ReidService(pipe, s)
    s.add(x[:3], old, [0, 0, 0], timestamps=[9_950.0] * 3)
    s.add(x[3:], new, [1, 1, 1], timestamps=[9_990.0] * 3)
    journal = tmp_path / "g" / "journal.v000001.log"
    size = journal.stat().st_size

    _full_disk(monkeypatch, store_module)
    clock.t = 10_060.0                                      # old* are past the ttl, new* are not
    reference = pipe.gallery()                              # what a gallery of new* alone answers
    reference.add(x[3:], ids=new, camids=[1, 1, 1])
    for mode in ("refined", "encoder") * 3:
        ids, dist, unknown = service.search(x, np.full(6, -1), 10, mode)
        assert {i for i in ids.ravel() if i} == {n.encode() for n in new}
        expect = reference.search(x, 10, np.full(6, -1), refined=mode == "refined")
        np.testing.assert_allclose(dist[:, :3], [[h.distance for h in row] for row in expect], rtol=1e-5, atol=1e-6)
        assert not unknown.any()
    assert len(_expiry_warnings(caplog)) == 1                # one warning, not one per search
    assert s.gallery.ids == new and journal.stat().st_size == size
    with pytest.raises(InputError, match="No space left"):
        service.add(rows(1, d, seed=9), ["late"], [0])        # changes still fail clearly
    with pytest.raises(InputError, match="No space left"):
        service.remove(["new0"])
    assert s.gallery.ids == new and journal.stat().st_size == size

    crash(s)                                                # killed before the expiry could be recorded
    s = GalleryStore(tmp_path / "g", pipe, ttl_seconds=100, clock=Clock(10_000.0))
    assert s.gallery.ids == old + new                        # every acknowledged add is there ...
    crash(s)
    s = GalleryStore(tmp_path / "g", pipe, ttl_seconds=100, clock=clock)
    assert s.gallery.ids == new                              # ... and the restart expires old* again (disk still full)
    assert len(_expiry_warnings(caplog)) == 2                # which this process says once
    service = ReidService(pipe, s)

    monkeypatch.setattr(store_module.os, "write", real_write)   # space again: the next change records the expiry first
    service.add(rows(1, d, seed=9), ["late"], [0])
    records = [h for h, _ in read_records(journal)[0]]
    assert [h["op"] for h in records[-2:]] == ["remove", "add"] and records[-2]["ids"] == old
    assert s.gallery.ids == new + ["late"]

    _full_disk(monkeypatch, store_module)
    clock.t = 10_095.0                                       # now new* expire too
    for _ in range(3):
        ids, _, _ = service.search(x[:2], np.full(2, -1), 5, "encoder")
        assert {i for i in ids.ravel() if i} == {b"late"}
    assert len(_expiry_warnings(caplog)) == 3                # a new outage warns once more
    monkeypatch.setattr(store_module.os, "write", real_write)
    service.search(x[:1], [-1], 5, "encoder")                # space again: this search records the expiry
    last = read_records(journal)[0][-1][0]
    assert last == {"op": "remove", "ids": new, "reason": "limits"}
    assert any("journalled now" in r.getMessage() for r in caplog.records)
    crash(s)
    with GalleryStore(tmp_path / "g", pipe, ttl_seconds=100, clock=Clock(10_000.0)) as s2:
        assert s2.gallery.ids == ["late"]                    # the expiries are in the journal, not re-derived
        assert_exact_lists(s2)


def test_searches_go_on_when_the_store_stopped_taking_changes(pipe, tmp_path, monkeypatch, caplog):
    """A failed append that could not be cut off stops the store; every search then failed too."""
    import errno
    import logging

    import runtime.serving.gallery_store as store_module
    from runtime.serving.service import ReidService

    d = pipe.config.n_embd
    caplog.set_level(logging.WARNING, logger=store_module.__name__)
    clock = Clock(10_000.0)
    x = rows(4, d, seed=8)
    s = GalleryStore(tmp_path / "g", pipe, ttl_seconds=100, clock=clock)
    service = ReidService(pipe, s)
    s.add(x[:2], ["a", "b"], [0, 0], timestamps=[9_950.0] * 2)
    s.add(x[2:], ["c", "d"], [0, 0], timestamps=[9_990.0] * 2)
    _full_disk(monkeypatch, store_module)

    def no_truncate(fd, length):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(store_module.os, "ftruncate", no_truncate)
    clock.t = 10_060.0
    for _ in range(4):
        ids, _, _ = service.search(x, np.full(4, -1), 4, "refined")
        assert {i for i in ids.ravel() if i} == {b"c", b"d"}
    assert s._failed and len(_expiry_warnings(caplog)) == 1
    with pytest.raises(InputError, match="stopped taking changes"):
        service.add(rows(1, d, seed=3), ["e"], [0])
    monkeypatch.undo()
    s.close()                                               # nothing to write with: closes without a snapshot
    with GalleryStore(tmp_path / "g", pipe, ttl_seconds=100, clock=Clock(10_000.0)) as s2:
        assert s2.gallery.ids == ["a", "b", "c", "d"]        # nothing acknowledged is lost


def test_the_journal_is_folded_once_its_bytes_pass_the_bound(pipe, tmp_path, monkeypatch):
    """Compaction counted records only: 1000 adds of 65536 rows made a journal of tens of GB before
    the first snapshot, and a restart replayed all of it."""
    import runtime.serving.gallery_store as store_module

    monkeypatch.setattr(store_module, "COMPACT_SNAPSHOT_RATIO", 0.0)     # the fixed bound alone
    d = pipe.config.n_embd
    one = len(encode_record({"op": "add", "ids": [f"r{i}" for i in range(20)], "camids": [0] * 20,
                             "timestamps": [0.0] * 20, "evict": [], "dim": d}, rows(20, d)))
    bound = 3 * one - 100                   # the third 20-row add passes it
    s = GalleryStore(tmp_path / "g", pipe, compact_bytes=bound)        # compact_every: 1000
    for n in range(7):
        s.add(rows(20, d, seed=n, dup=2 if n == 4 else 0), [f"r{n}-{i}" for i in range(20)], np.arange(20) % 3)
        assert (tmp_path / "g" / f"journal.{s.version}.log").stat().st_size < bound
    assert s.version == "v000003"                            # folded after adds 3 and 6
    journal = tmp_path / "g" / "journal.v000003.log"
    assert len(read_records(journal)[0]) == 1 and journal.stat().st_size == s._journal_bytes
    expect_ids, expect_raw = s.gallery.ids, s.gallery.embeddings
    crash(s)                                                 # kill -9 after the folds
    s2 = GalleryStore(tmp_path / "g", pipe, compact_bytes=bound)
    assert s2.replayed == 1 and s2.gallery.ids == expect_ids
    np.testing.assert_array_equal(s2.gallery.embeddings, expect_raw)
    assert_exact_lists(s2)
    crash(s2)

    # a journal already over its bound when the store opens (an older version wrote it) is folded at once
    s3 = GalleryStore(tmp_path / "g", pipe, compact_bytes=one // 2)
    assert s3.replayed == 1 and s3.version == "v000004" and journal.with_name("journal.v000004.log").stat().st_size == 0
    assert not journal.exists() and s3.gallery.ids == expect_ids
    s3.close()


def test_the_byte_bound_grows_with_the_snapshot(pipe, tmp_path):
    """The bound is max(compact_bytes, the snapshot's bytes): a large gallery does not rewrite its
    whole snapshot for every few MB of journal, and the journal stays within about a snapshot."""
    from runtime.serving.gallery_store import _dir_bytes

    d = pipe.config.n_embd
    s = GalleryStore(tmp_path / "g", pipe, compact_bytes=1)
    versions = ["v000001"]
    for n in range(16):
        s.add(rows(10, d, seed=n), [f"r{n}-{i}" for i in range(10)], np.zeros(10, np.int64))
        snapshot = _dir_bytes(tmp_path / "g" / s.version)
        assert s._next_compaction_bytes == max(1, snapshot)
        assert s._journal_bytes < snapshot                    # folded whenever it reached the snapshot's size
        versions.append(s.version)
    folds = [n for n in range(1, len(versions)) if versions[n] != versions[n - 1]]
    assert len(folds) >= 3 and (np.diff(np.diff(folds)) > 0).all()   # less often as the gallery grows
    expect = s.gallery.ids
    crash(s)
    with GalleryStore(tmp_path / "g", pipe) as s2:
        assert s2.gallery.ids == expect


def test_a_directory_that_is_not_a_gallery_is_refused_and_left_as_it_was(pipe, tmp_path):
    """`runtime serve --gallery <model dir>` was refused, but left a .serve.lock in that directory
    (the lock was taken before the directory was judged)."""
    folder = tmp_path / "not_a_gallery"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="non-empty directory that is not a gallery"):
        GalleryStore(folder, pipe)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    with GalleryStore(tmp_path / "new", pipe) as store:      # a new or empty directory still works
        assert len(store) == 0
