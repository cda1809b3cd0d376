"""The one writer (export/contract/files.py): outputs that belong together appear together or not at
all, and a build's temporary folder never outlives it (removed on any exception, and a killed
process's by the next build), without touching a running build's."""
from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from export.contract.files import (STALE_GRACE_S, WORK_MARKER, WriteError, publish_files, remove_stale_work_dirs,
                                   staged_file, staged_files, work_dir)


def _aged(path, seconds=STALE_GRACE_S + 60):
    old = time.time() - seconds
    os.utime(path, (old, old))


def test_staged_files_publish_all_or_nothing(tmp_path):
    a, b = tmp_path / "e.npy", tmp_path / "names.txt"
    with staged_files(a, b) as (ta, tb):
        ta.write_bytes(b"A")
        tb.write_bytes(b"B")
    assert a.read_bytes() == b"A" and b.read_bytes() == b"B"
    with pytest.raises(UnicodeEncodeError):
        with staged_files(a, b) as (ta, tb):
            ta.write_bytes(b"new A")
            tb.write_bytes("\udcff".encode("utf-8"))   # the second output fails after the first was written
    assert a.read_bytes() == b"A" and b.read_bytes() == b"B"       # neither changed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.npy", "names.txt"]   # no temporary file left
    with pytest.raises(ValueError, match="distinct"):
        with staged_files(a, tmp_path / "." / "e.npy"):
            pass


def test_files_a_tool_wrote_in_a_work_dir_are_published_together_with_the_umask(tmp_path):
    engine, cache = tmp_path / "a.engine", tmp_path / "timing.cache"
    engine.write_bytes(b"old engine")
    old = os.umask(0o027)
    try:
        with work_dir(tmp_path, ".tool-") as work:
            for name in ("a.engine", "timing.cache", "other.engine"):   # as a tool that ignores the umask writes
                os.close(os.open(work / name, os.O_WRONLY | os.O_CREAT, 0o600))
                (work / name).write_bytes(b"new " + name.encode())
            with pytest.raises(WriteError, match="missing"):   # one of them missing: neither is published
                publish_files({engine: work / "other.engine", cache: work / "missing"})
            assert engine.read_bytes() == b"old engine" and not cache.exists()
            publish_files({engine: work / "a.engine", cache: work / "timing.cache"})
    finally:
        os.umask(old)
    assert engine.read_bytes() == b"new a.engine" and cache.read_bytes() == b"new timing.cache"
    assert [stat.S_IMODE(p.stat().st_mode) for p in (engine, cache)] == [0o640, 0o640]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.engine", "timing.cache"]   # nothing else left


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt, SystemExit])
def test_work_dir_is_removed_whatever_ends_the_build(tmp_path, error):
    with pytest.raises(error):
        with work_dir(tmp_path, ".build-") as work:
            (work / "half.onnx").write_bytes(b"x")
            raise error()
    assert list(tmp_path.iterdir()) == []


def test_a_killed_builds_folder_is_removed_by_the_next_build_but_a_running_one_is_not(tmp_path):
    stale = tmp_path / ".build-killed"
    stale.mkdir()
    (stale / "encoder.onnx").write_bytes(b"half")
    (stale / WORK_MARKER).touch()
    _aged(stale)
    fresh = tmp_path / ".build-just-made"    # could be a build that has not locked it yet
    fresh.mkdir()
    (fresh / WORK_MARKER).touch()
    other = tmp_path / "keep-me"
    other.mkdir()
    _aged(other)
    users = tmp_path / ".build-my-backup"     # the user's own folder that happens to match the prefix
    users.mkdir()
    (users / "precious.txt").write_text("keep")
    _aged(users)
    with work_dir(tmp_path, ".build-") as running:
        _aged(running)
        # another build into the same folder meanwhile: the running one's folder stays
        assert remove_stale_work_dirs(tmp_path, ".build-") == []
        assert running.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".build-just-made", ".build-my-backup", "keep-me"]


def test_scratch_dirs_of_killed_processes_are_removed_by_the_next_one_but_a_running_ones_are_not(tmp_path,
                                                                                                  monkeypatch):
    """`runtime serve`'s scratch folder (PyTriton's workspace, about 22 MB) was left in /tmp by every
    killed server; it is private (0700), held while in use, and swept by the next one."""
    import tempfile

    from export.contract.files import scratch_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    stale = tmp_path / "nformer-serve-killed"
    (stale / "workspace").mkdir(parents=True)
    (stale / WORK_MARKER).touch()
    _aged(stale)
    foreign = tmp_path / "nformer-serve-not-ours"      # no marker: not made by scratch_dir, left alone
    foreign.mkdir()
    _aged(foreign)
    with scratch_dir("nformer-serve-") as running:
        assert stat.S_IMODE(running.stat().st_mode) == 0o700 and running.parent == tmp_path
        _aged(running)
        with scratch_dir("nformer-serve-") as second:    # another server meanwhile: the running one's stays
            assert running.is_dir() and second != running
        assert not stale.exists() and foreign.is_dir() and not second.exists()
    assert not running.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["nformer-serve-not-ours"]


def test_temporary_files_of_killed_writers_are_removed_but_a_running_writers_are_not(tmp_path):
    """staged_file / write_bytes_atomic leave `.name.nformer-tmp-XXXXXXXX.tmp` behind when their process is
    SIGKILLed; the next build's sweep (work_dir, runtime build) removes those, never one that a live
    writer holds, a young one, or a user's file of another name."""
    import signal
    import subprocess
    import sys

    from export.contract.files import remove_stale_temp_files

    code = ("import sys, time; from export.contract.files import staged_file\n"
            "with staged_file(sys.argv[1]) as tmp:\n"
            "    open(tmp, 'wb').write(b'half'); print(tmp, flush=True); time.sleep(60)\n")
    killed = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "encoder.int8.onnx")],
                              stdout=subprocess.PIPE, text=True)
    left = Path(killed.stdout.readline().strip())
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    assert left.is_file() and left.name.startswith(".encoder.int8.onnx.") and left.name.endswith(".tmp")
    _aged(left)
    own = [tmp_path / n for n in (".notes.tmp", ".x.abcd1234.tmp", ".report.pdf.download.tmp")]
    for f in own:                                        # the user's own / another program's: never ours
        f.write_text("keep")
        _aged(f)
    with staged_file(tmp_path / "running.onnx") as running:   # a live writer's, aged: held, so kept
        running.write_bytes(b"x")
        _aged(running)
        young = tmp_path / ".other.onnx.nformer-tmp-abcd1234.tmp"   # a killed writer's, but too young to judge
        young.write_bytes(b"y")
        assert remove_stale_temp_files(tmp_path) == [left]
        assert running.is_file() and young.is_file() and all(f.is_file() for f in own) and not left.exists()
    assert (tmp_path / "running.onnx").read_bytes() == b"x"
