"""What both command-line tools share (``python -m export.to_onnx`` and ``runtime``): one way to report
a user's mistake, and one parser for each kind of option value.  Torch-free (click only)."""
from __future__ import annotations

import functools
import math
import sys

import click

from export.contract.config import MAX_INPUT_SIDE, MIN_INPUT_SIDE
from export.contract.errors import NFormerError


def _tolerant_streams() -> None:
    """Paths are printed as the file system holds them: a name that is not valid in the terminal's
    encoding (bytes that are not UTF-8, kept by Python as surrogates) is shown escaped instead of
    failing the command after its work is done."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None and getattr(stream, "errors", None) == "strict":
            try:
                reconfigure(errors="backslashreplace")
            except (ValueError, OSError):   # a stream that cannot change now: leave it
                pass


def user_errors(fn):
    """Turn the project's errors into one line on stderr and exit status 2 (no traceback)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _tolerant_streams()
        try:
            return fn(*args, **kwargs)
        except NFormerError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)
    return wrapper


def int_list(ctx, param, value, allow_empty: bool = False):
    """click callback: ``"1,4,16"`` -> ``(1, 4, 16)``, every value >= 1."""
    if value is None or not str(value).strip():
        if allow_empty:
            return ()
        raise click.BadParameter("expected comma-separated integers >= 1, got nothing")
    try:
        values = tuple(int(v) for v in str(value).split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not values and not allow_empty:
        raise click.BadParameter(f"expected comma-separated integers >= 1, got {value!r}")
    if min(values, default=1) < 1:
        raise click.BadParameter(f"expected integers >= 1, got {value!r}")
    return values


def int_list_at_most(limit: int, allow_empty: bool = False):
    """:func:`int_list` whose every value is at most ``limit`` (a size that would exhaust memory is
    refused up front, not met as an allocation failure halfway through); ``allow_empty``: an empty
    value is a step to skip."""
    def callback(ctx, param, value):
        values = int_list(ctx, param, value, allow_empty=allow_empty)
        if max(values, default=0) > limit:
            raise click.BadParameter(f"expected integers 1..{limit}, got {value!r}")
        return values
    return callback


def size_hw(ctx, param, value: str) -> tuple[int, int]:
    """click callback: ``"256x128"`` -> ``(256, 128)``, each side in MIN_INPUT_SIDE..MAX_INPUT_SIDE."""
    try:
        h, w = (int(v) for v in str(value).lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"expected HxW such as 256x128, got {value!r}") from None
    if not (MIN_INPUT_SIDE <= h <= MAX_INPUT_SIDE and MIN_INPUT_SIDE <= w <= MAX_INPUT_SIDE):
        raise click.BadParameter(f"expected HxW such as 256x128 with each side in {MIN_INPUT_SIDE}..{MAX_INPUT_SIDE}, "
                                 f"got {value!r}")
    return h, w


class FiniteFloatRange(click.FloatRange):
    """``click.FloatRange`` that also refuses ``nan`` and ``inf`` (which pass its comparisons)."""

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number; give a number such as 1e-4", param, ctx)
        return rv
