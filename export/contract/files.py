"""The one way this project writes a file, and the one checksum of a file.

Every write goes through a temporary file beside its target, is fsynced and renamed over it: a crash
leaves the old file or the new one, never half of one.  Files and directories get the permissions
the process's umask gives a plain ``open()`` / ``mkdir()`` (``mkstemp``/``mkdtemp`` alone would make
them 0600 / 0700, unreadable to a container running as another user).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process's umask, read without changing it where /proc allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _publish(path: str | Path, fill) -> None:
    """``fill(f)`` writes a temporary file beside ``path``; it is fsynced, given the umask's mode and
    renamed over ``path`` (removed on any failure)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file beside it, fsync, then rename over it."""
    _publish(path, lambda f: f.write(data))


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, data) -> None:
    """Write JSON atomically (:func:`write_bytes_atomic`)."""
    write_bytes_atomic(path, (json.dumps(data, indent=1, sort_keys=False, default=str) + "\n").encode())


def copy_file_atomic(src: str | Path, dst: str | Path) -> None:
    """Copy ``src`` to ``dst`` atomically (large files are streamed, not read into memory)."""
    def fill(out):
        with open(src, "rb") as inp:
            shutil.copyfileobj(inp, out, 1 << 20)
    _publish(dst, fill)


def make_temp_dir(parent: str | Path, prefix: str) -> Path:
    """A new directory in ``parent`` with the umask's permissions (for a build published by rename)."""
    path = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    os.chmod(path, 0o777 & ~current_umask())
    return path


@contextlib.contextmanager
def staged_file(path: str | Path):
    """Yield a temporary path beside ``path`` for a library that writes a file by name (onnx.save,
    np.save ...); on success it is fsynced and renamed over ``path``, on failure removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
