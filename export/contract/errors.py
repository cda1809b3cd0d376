"""The project's one exception type for mistakes a user can make (shared by every stage)."""


class NFormerError(Exception):
    """A user-facing error: says what was expected, what was found and what to do.

    Command-line entry points print ``str(err)`` on one line and exit non-zero.
    """


class CheckpointError(NFormerError):
    """A checkpoint is missing, unreadable, unsafe or of another architecture."""


class InputError(NFormerError):
    """Features, landmarks, crops or paths that do not fit the model's contract."""


def check_count(value, name: str, least: int = 1, most: int | None = None) -> int:
    """The one check of a count given through an API (a batch size, topn ...): an integer (not a
    bool, not a float that happens to be whole) at least ``least`` (and at most ``most``, when
    given); else InputError naming it."""
    from numbers import Integral

    if isinstance(value, bool) or not isinstance(value, Integral) or value < least:   # numpy's bool_ is no Integral
        expected = f">= {least}" if most is None else f"in {least}..{most}"
        raise InputError(f"{name} must be an integer {expected}, found {value!r}")
    if most is not None and value > most:
        raise InputError(f"{name} must be an integer in {least}..{most}, found {value!r}")
    return int(value)


def as_array(value, name: str, dtype=None):
    """``np.asarray(value)`` of something given through an API, with one InputError naming it where
    numpy cannot make an array of it (nested lists of different lengths, objects numpy refuses)."""
    import numpy as np

    try:
        return np.asarray(value, dtype=dtype)
    except (ValueError, TypeError, NotImplementedError, OverflowError) as err:
        raise InputError(f"{name} must be a rectangular array of numbers (every row the same length), but numpy "
                         f"cannot read it as one ({type(err).__name__}: {str(err)[:120]}); pass a numpy array or "
                         "equal-length lists") from None


def as_path(value, name: str):
    """A path given through an API (``str``, ``os.PathLike`` or ``bytes``, a file-system name read
    with ``os.fsdecode``) as a ``pathlib.Path``; InputError naming it for anything else (None, a
    number, a list) and for a name with a NUL character, which no file system takes."""
    import os
    from pathlib import Path

    if isinstance(value, (str, bytes, os.PathLike)):
        value = os.fspath(value)
        text = os.fsdecode(value) if isinstance(value, bytes) else value
        if isinstance(text, str) and "\0" not in text:
            return Path(text)
    shown = repr(value)
    raise InputError(f"{name} must be a path (a str, pathlib.Path or bytes file name without NUL characters), "
                     f"found {type(value).__name__} {shown[:60] + '...' if len(shown) > 60 else shown}")
