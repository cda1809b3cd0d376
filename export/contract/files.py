"""The one way this project writes a file, and the one checksum of a file.

Every write goes through a temporary file beside its target, is fsynced and renamed over it: a crash
leaves the old file or the new one, never half of one.  Files and directories get the permissions
the process's umask gives a plain ``open()`` / ``mkdir()`` (``mkstemp``/``mkdtemp`` alone would make
them 0600 / 0700, unreadable to a container running as another user).  Outputs that belong
together are published together (``staged_files``; ``publish_files`` for files a tool wrote by
name in a work folder); a build's temporary folder (``work_dir``) is removed on any exception, and
a killed process's is removed by the next build into the same folder.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
from pathlib import Path

from export.contract.errors import InputError


class WriteError(InputError, OSError):
    """A file could not be written (full disk, no permission, a name the file system refuses...):
    one message for the user, and still an ``OSError`` for code that handles those."""


#: a temporary file's name is the target's plus about 14 characters; longer names than this get a
#: short generic prefix instead, so a target name the file system accepts never fails for its temp file
_NAME_ROOM = 200


#: in every temporary file name this module makes: what :func:`remove_stale_temp_files` may remove
_TEMP_MARK = "nformer-tmp-"


def _temp_prefix(path: Path) -> str:
    name = path.name if len(os.fsencode(path.name)) <= _NAME_ROOM else "nformer-out"
    return f".{name}.{_TEMP_MARK}"


def check_target(path: str | Path) -> None:
    """Refuse a target that exists and is not a regular file: renaming a new file over a device,
    FIFO or socket would replace it (with root's rights, /dev/null itself), and over a directory fails."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as err:
        raise WriteError(f"cannot write {path}: {err.strerror}") from None
    if stat.S_ISREG(mode):
        return
    kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
            "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else
            "not a regular file")
    raise InputError(f"cannot write {path}: it is {kind}, not a regular file (outputs are written to a new file "
                     "and renamed into place); give the path of a file")


@contextlib.contextmanager
def _as_write_error(*paths: Path):
    """OSError while writing ``paths`` -> :class:`WriteError` saying which file(s) and why."""
    try:
        yield
    except WriteError:
        raise
    except OSError as err:
        reason = err.strerror or str(err)
        name = Path(os.fsdecode(err.filename)).name if err.filename else None
        if name and not any(name == p.name or name.startswith(_temp_prefix(p)) for p in paths):
            reason += f" ({os.fsdecode(err.filename)})"         # another file than the ones being written
        hint = {28: "free some space or write elsewhere", 36: "choose a shorter name",
                13: "check the folder's permissions or write elsewhere", 30: "write to a writable file system",
                122: "free some space (quota) or write elsewhere"}.get(err.errno, "check the path and the disk")
        raise WriteError(f"cannot write {' and '.join(map(str, paths))}: {reason}; {hint}") from None


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
    renamed over ``path`` (removed on any failure).  The temporary file is held with ``flock`` until
    then, so :func:`remove_stale_temp_files` removes only those of killed processes."""
    path = Path(path)
    check_target(path)
    with _as_write_error(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
        held = _lock_file(tmp)
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
        finally:
            if held is not None:
                os.close(held)


#: the temporary files of :func:`_publish` and :func:`staged_file`: ``.<name>.nformer-tmp-<8 random>.tmp``
#: (the mark: a user's or another program's ``.x.tmp`` files are never taken for ours)
_TEMP_FILE = re.compile(r"\..+\." + re.escape(_TEMP_MARK) + r"[a-z0-9_]{8}\.tmp")


def _lock_file(path) -> int | None:
    """An fd holding ``flock`` on file ``path`` (not through a link); None when another process holds
    it, or when locks are not available here."""
    return _try_lock(path, directory=False)


def remove_stale_temp_files(parent: str | Path) -> list[Path]:
    """Remove the temporary files of :func:`_publish` / :func:`staged_file` in ``parent`` that no
    process holds (their writer was killed: SIGKILL, power loss).  Files a running writer holds,
    files younger than :data:`STALE_GRACE_S`, links and names of another pattern are left alone."""
    removed = []
    try:
        entries = [p for p in Path(parent).iterdir() if _TEMP_FILE.fullmatch(p.name)]
    except OSError:
        return removed
    now = time.time()
    for path in entries:
        try:
            st = path.lstat()
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode) or now - st.st_mtime < STALE_GRACE_S:
            continue
        fd = _lock_file(path)
        if fd is None:
            continue
        try:
            path.unlink(missing_ok=True)
            removed.append(path)
        finally:
            os.close(fd)
    return removed


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


#: a file every :func:`work_dir` folder holds: only folders with it are ever swept (a user's own
#: folder that happens to match a prefix is not)
WORK_MARKER = ".nformer-work-dir"
#: a work directory younger than this is never taken for a dead process's leftover: it may have
#: been created a moment ago by a process that has not locked it yet
STALE_GRACE_S = 10.0


def _try_lock(path: Path, blocking: bool = False, directory: bool = True) -> int | None:
    """An fd holding ``flock`` on directory ``path`` (a file with ``directory=False``, not through a
    link); None when another process holds it, or when locks are not available here (then nobody
    can tell whether it is in use)."""
    try:
        import fcntl
    except ImportError:
        return None
    flags = getattr(os, "O_DIRECTORY", 0) if directory else getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, os.O_RDONLY | flags)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except OSError:
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def dir_lock(path: str | Path):
    """Hold an exclusive ``flock`` on directory ``path`` for the block (waits for another holder;
    nothing is held where locks are not available).  For a check-then-publish step that two
    processes must not interleave (two writers of one output directory)."""
    fd = _try_lock(Path(path), blocking=True)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def remove_stale_work_dirs(parent: str | Path, prefix: str) -> list[Path]:
    """Remove the :func:`work_dir` folders named ``prefix*`` in ``parent`` (those holding
    :data:`WORK_MARKER`) that no process holds any more (their process was killed: SIGKILL, power
    loss).  Folders a running process holds, folders younger than :data:`STALE_GRACE_S`, and
    folders without the marker (not made by :func:`work_dir`) are left alone.  Returns what was removed."""
    removed = []
    try:
        entries = [p for p in Path(parent).iterdir() if p.name.startswith(prefix) and (p / WORK_MARKER).is_file()]
    except OSError:
        return removed
    now = time.time()
    for path in entries:
        try:
            if path.is_symlink() or not path.is_dir() or now - path.stat().st_mtime < STALE_GRACE_S:
                continue
        except OSError:
            continue
        fd = _try_lock(path)
        if fd is None:
            continue
        try:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)
        removed.append(path)
    return removed


@contextlib.contextmanager
def work_dir(parent: str | Path, prefix: str):
    """A private temporary directory in ``parent`` (umask permissions) for a build that is published
    by renaming what is in it.  Removed on leaving the block whatever happened (an exception,
    KeyboardInterrupt, SystemExit); held with ``flock`` meanwhile, so that a later
    :func:`remove_stale_work_dirs` (called here first) removes only the leftovers of killed
    processes, never a running build's."""
    # a prefix from a long output name would not fit the file system's 255-byte names with mkdtemp's suffix
    prefix = prefix if len(os.fsencode(prefix)) <= _NAME_ROOM else ".nformer-work-"
    remove_stale_work_dirs(parent, prefix)
    remove_stale_temp_files(parent)
    with _held_dir(make_temp_dir(parent, prefix)) as path:
        yield path


@contextlib.contextmanager
def _held_dir(path: Path):
    """``path`` marked (:data:`WORK_MARKER`) and held with ``flock`` for the block, removed after it."""
    fd = _try_lock(path, blocking=True)
    try:
        (path / WORK_MARKER).touch()
        yield path
    finally:
        try:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            if fd is not None:
                os.close(fd)


@contextlib.contextmanager
def staged_file(path: str | Path, _together: tuple = ()):
    """Yield a temporary path beside ``path`` for a library that writes a file by name (onnx.save,
    np.save ...); on success it is fsynced and renamed over ``path``, on failure removed."""
    path = Path(path)
    check_target(path)
    with _as_write_error(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
        os.close(fd)
    tmp = Path(tmp)
    held = _lock_file(tmp)            # until published or removed (remove_stale_temp_files)
    try:
        # the caller's own writes into tmp (np.save, onnx.save ...) too; outputs staged together are
        # named together (which of them a failed write was into is not known here)
        with _as_write_error(*(_together or (path,))):
            yield tmp
            os.chmod(tmp, 0o666 & ~current_umask())
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if held is not None:
            os.close(held)


@contextlib.contextmanager
def staged_files(*paths: str | Path):
    """:func:`staged_file` for outputs that belong together (embeddings and their names, a config
    and the model it names): one temporary path beside each; all are published only after the
    block wrote every one, and all removed on any failure, so they appear together or not at all."""
    if len({Path(p).parent.resolve() / Path(p).name for p in paths}) != len(paths):
        raise ValueError(f"staged_files needs distinct paths, got {[str(p) for p in paths]}")
    together = tuple(Path(p) for p in paths)
    with contextlib.ExitStack() as stack:
        yield tuple(stack.enter_context(staged_file(p, together)) for p in paths)


def publish_files(files: dict) -> None:
    """Publish files that a tool wrote by name in a :func:`work_dir` (``{target: written}``, each
    ``written`` on its target's file system): each is given the umask's permissions (the tool may
    have used others) and fsynced where it lies, inside the work folder (flocked: no sweep touches
    it); only then are they renamed over their targets, one after the other.  A failure before the
    renames publishes none.  (Renamed straight from the work folder: a staged name beside the target
    would hold an inode that its flock does not cover.)"""
    for target, written in files.items():
        check_target(target)
        with _as_write_error(*files):
            os.chmod(written, 0o666 & ~current_umask())
            with open(written, "rb+") as f:
                os.fsync(f.fileno())
    for target, written in files.items():
        with _as_write_error(target):
            os.replace(written, target)


@contextlib.contextmanager
def scratch_dir(prefix: str):
    """A new private (0700) directory in the system's temporary folder for a process's scratch files
    (never published), removed on leaving the block.  Held with ``flock`` meanwhile, like
    :func:`work_dir`: the folders of this prefix that killed processes left (a served model's
    PyTriton workspace is about 22 MB) are removed when the next one is made, never a running one's."""
    parent = tempfile.gettempdir()
    remove_stale_work_dirs(parent, prefix)
    with _held_dir(Path(tempfile.mkdtemp(dir=parent, prefix=prefix))) as path:
        yield path
