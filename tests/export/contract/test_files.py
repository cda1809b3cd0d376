"""The one writer (export/contract/files.py): outputs that belong together appear together or not at
all, and a build's temporary folder never outlives it (removed on any exception, and a killed
process's by the next build), without touching a running build's."""
from __future__ import annotations

import os
import time

import pytest

from export.contract.files import STALE_GRACE_S, WORK_MARKER, remove_stale_work_dirs, staged_files, work_dir


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
