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


def check_writable(path: Path) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise InputError(f"cannot write {path}: it is a directory; give a file name")
    if not parent.is_dir():
        raise InputError(f"cannot write {path}: directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise InputError(f"cannot write {path}: directory {parent} is not writable; choose another --out")


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` so that a failure leaves no partial file behind."""
    check_writable(path)
    with staged_file(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"file not found: {path}") from None
    except (ValueError, OSError, EOFError) as err:
        raise InputError(f"{path} is not a .npy array ({err}); expected a file written by numpy.save") from None


def write_report(path: Path | None, report) -> None:
    if path is None:
        return
    check_writable(path)
    write_json_atomic(path, report)
    click.echo(f"wrote {path}")
