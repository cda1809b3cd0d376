"""Comparison measures shared by the export check, the tests and the parity tools (numpy only).

Results are data first (dicts that go to JSON), a table second.
"""
from __future__ import annotations

import numpy as np


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """``||a - b|| / ||b||`` (0 when both are zero)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    denom = np.linalg.norm(expected)
    num = np.linalg.norm(actual - expected)
    return float(num / denom) if denom > 0 else float(num)


def max_abs_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(actual, np.float64) - np.asarray(expected, np.float64)), initial=0.0))


def neighbor_set_agreement(idx_a: np.ndarray, idx_b: np.ndarray) -> float:
    """Fraction of rows whose neighbour sets (order ignored) are identical."""
    a = np.sort(np.asarray(idx_a).reshape(-1, idx_a.shape[-1]), axis=-1)
    b = np.sort(np.asarray(idx_b).reshape(-1, idx_b.shape[-1]), axis=-1)
    if a.shape != b.shape:
        return 0.0
    return float(np.mean(np.all(a == b, axis=-1))) if len(a) else 1.0


def cosine_rows(actual: np.ndarray, expected: np.ndarray) -> np.ndarray:
    a = np.asarray(actual, np.float64).reshape(-1, actual.shape[-1])
    b = np.asarray(expected, np.float64).reshape(-1, expected.shape[-1])
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    return np.sum(a * b, axis=1) / np.maximum(na * nb, 1e-12)


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain fixed-width table of ``rows`` (dicts) for the terminal."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if (v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4)) else f"{v:.4f}"
        return str(v)
    cells = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]   # rows may be none
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
