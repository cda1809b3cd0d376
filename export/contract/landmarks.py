"""Landmark rows for the refinement's agent attention (numpy only; the runtime uses it too).

The original draws ``random.sample(range(N), l)`` inside every layer on every call, so its
outputs are not reproducible.  Here the landmarks are an input ``[n_layer, l]`` (int64) and the
default choice is a seeded draw without replacement, ``l = min(count, N)``.
"""
from __future__ import annotations

from numbers import Integral

import numpy as np

from export.contract.errors import InputError


def sample_landmarks(n: int, n_layer: int, count: int = 5, seed: int = 0) -> np.ndarray:
    if n < 1:
        raise ValueError(f"need at least one row to draw landmarks from, got N={n}")
    if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
        raise InputError(f"the landmark seed must be an integer >= 0, found {seed!r}")
    rng = np.random.default_rng(seed)
    l = min(count, n)
    return np.stack([rng.choice(n, size=l, replace=False) for _ in range(n_layer)]).astype(np.int64)
