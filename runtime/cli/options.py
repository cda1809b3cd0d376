"""Options and file helpers shared by the ``runtime`` subcommands (one definition of each default)."""
from __future__ import annotations

import os
from pathlib import Path

import click
import numpy as np

from export.contract.errors import InputError
from export.contract.files import staged_file, write_json_atomic

model_dir_arg = click.argument("model_dir", type=click.Path(path_type=Path))
threads_option = click.option("--threads", type=click.IntRange(1), default=None, help="ONNX Runtime intra-op threads.")
batch_size_option = click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True,
                                 help="Crops per encoder call.")


def check_writable(path: Path, model_dir: Path | None = None, what: str = "the output") -> None:
    """Refuse an output path before any work: a directory, a missing or read-only folder, an
    existing special file (device, FIFO, socket: renaming over it would replace it), or -- with
    ``model_dir`` -- a file of the model directory (its manifest, ONNX files, records)."""
    from export.contract.files import check_target
    from export.contract.manifest import refuse_model_file

    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise InputError(f"cannot write {path}: it is a directory; give a file name")
    if not parent.is_dir():
        raise InputError(f"cannot write {path}: directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise InputError(f"cannot write {path}: directory {parent} is not writable; choose another --out")
    check_target(path)
    if model_dir is not None:
        refuse_model_file(path, model_dir, what=what)


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` so that a failure leaves no partial file behind."""
    check_writable(path)
    with staged_file(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def _npy_header_problem(path: Path) -> str | None:
    """Why ``path``'s bytes cannot be the array its .npy header describes, else None: an .npz
    archive, or a header promising more data than the file holds (a hostile header must not make
    numpy allocate terabytes before it notices)."""
    from numpy.lib import format as npy

    with open(path, "rb") as f:
        head = f.read(6)
        if head.startswith(b"PK\x03\x04"):
            return "it is an .npz archive (several named arrays), not one array; save the array with numpy.save"
        if head and not head.startswith(b"\x93NUMPY"):
            # np.load would try it as a pickle and report "pickled data" for a text or image file
            return f"it does not start with the .npy signature (its first bytes are {head[:4].hex(' ')})"
        f.seek(0)
        try:
            version = npy.read_magic(f)
            shape, _, dtype = (npy.read_array_header_1_0(f) if version == (1, 0) else npy.read_array_header_2_0(f))
        except Exception:  # noqa: BLE001 - np.load below gives the precise message
            return None
        if dtype.hasobject:
            return None
        need = int(np.prod(shape, dtype=object)) * dtype.itemsize
        have = os.fstat(f.fileno()).st_size - f.tell()
    if need > have:
        return f"its header promises shape {tuple(shape)} of {dtype} ({need:,} bytes) but the file holds {have:,}"
    return None


def load_npy(path: Path) -> np.ndarray:
    import stat

    try:
        if path.exists() and not stat.S_ISREG(path.stat().st_mode) and not path.is_dir():
            raise InputError(f"{path} is not a regular file (a FIFO, socket or device would block or never end); "
                             "give a .npy file")
        problem = _npy_header_problem(path)
        if problem:
            raise InputError(f"{path} is not a usable .npy array: {problem}; expected a file written by numpy.save")
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise InputError(f"{path} is a directory; give a .npy file") from None
    except (ValueError, OSError, EOFError) as err:
        raise InputError(f"{path} is not a .npy array ({err}); expected a file written by numpy.save") from None


def write_report(path: Path | None, report) -> None:
    if path is None:
        return
    check_writable(path)
    write_json_atomic(path, report)
    click.echo(f"wrote {path}")
