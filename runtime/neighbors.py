"""Reciprocal neighbour lists in numpy: computed once, or kept exact while a set grows and shrinks.

Place in the flow: the serving path (no torch).  A gallery that gains a few items at a time feeds
``nformer_layers.onnx`` (the refinement with ``neighbor_index`` / ``neighbor_valid`` as inputs)
from a :class:`NeighborIndex` instead of re-ranking all N^2 pairs on every change.

The lists are those of the one reference, ``export.reference.reciprocal_neighbors`` (tests compare index
arrays): key ``x_i . x_j / max(||x_j||, eps)`` in float64 from the float32 rows, the row itself in
slot 0, the other slots by decreasing key with equal keys to the lower index, ``k_eff = min(k,
N)``, ``valid[i, t] = i in idx[idx[i, t]]``.

How the keys are computed.  The key is the contract's (``export.contract.neighbor_key``): the
exact float64 products of the float32 values summed by a fixed double-double tree, divided by the
column's canonical norm -- one value wherever it is computed.  A float32 pass (one SGEMM per block
of rows) finds, for each row, every column that can belong to its list: the float32 cosine differs
from the exact one by at most ``(d + 4) * 2^-24`` (the standard dot-product error bound), so every
column within twice that of the row's C-th best float32 value is a candidate.  The candidates are
then scored by a fixed float64 pairwise tree (a function of the two rows alone, so duplicates get
bit-identical scores), within ``delta_i`` (``key_error_bound``) of the canonical key.  Entries of
a list whose scores lie within ``2 delta_i`` of another entry (near-ties, duplicates) are rescored
with the canonical key itself, so every decision is the canonical one: entries further apart keep
their float64 score, whose order is already the canonical order.  This is the "fast candidate
pass, exact re-score" that DESIGN.md's precision rule allows.

Incremental maintenance.  Row order is insertion order (removal compacts and keeps the relative
order, so "lower index" keeps meaning "inserted earlier"); each row also carries a never-reused
``uid`` that grows with insertion, and ties are broken by uid.  Each row keeps its best
``k - 1 + reserve`` other rows (its candidates) sorted by (key desc, uid asc), with the invariant:
*a row's candidates are exactly the best ``count`` other rows of the current set*.

* adding m rows: each existing row takes the new columns that rank above its last candidate
  (O(N m d) for the float32 pass; exact scores only for the few that pass); the new rows get full
  scans.  A row whose list is shorter than the set (it lost candidates to removals) must not take
  a new column that ranks below its last candidate: an old row that was not kept could rank
  between them.
* removing rows: they are dropped from every list (the rest shift up, order kept); rows left with
  fewer than ``k_eff - 1`` candidates (they lost more than ``reserve``) are rescanned in full.

Memory: every computation is blocked, O(block * N) with block * N about 4M elements.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np

from export.contract.neighbor_key import NORM_EPS, dd_tree_sum, key_error_bound
from export.contract.ops import effective_k
from export.contract.errors import InputError

#: default spare candidates per row beyond the k - 1 that the output needs
DEFAULT_RESERVE = 16
#: elements held at once by a blocked computation (float32 keys, float64 products)
BLOCK_ELEMENTS = 1 << 22
_PAD_UID = -1
_U32 = 2.0 ** -24
#: version of the key stored in :meth:`NeighborIndex.state` (1: plain float64 keys, before the
#: canonical key; such saved lists are recomputed on load)
KEY_VERSION = 2


def candidate_margin(dim: int) -> float:
    """How far below a row's C-th best float32 cosine an exact top-C column can lie (twice the
    float32 error bound of a ``dim``-term dot product of vectors of norm <= 1, with slack)."""
    return 2.2 * (dim + 4) * _U32 + 1e-6


def select_top(keys: np.ndarray, uids: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The best ``c`` entries of each row by (key desc, uid asc).

    ``keys`` float64 [B, W] with -inf for absent entries; ``uids`` int64 [B, W] in which, among
    equal keys, column order is uid order.  Returns ``(keys [B, c], uids [B, c], count [B])``:
    sorted, absent entries padded with -inf / -1, ``count`` the number of present ones.
    """
    b, w = keys.shape
    out_keys = np.full((b, c), -np.inf)
    out_uids = np.full((b, c), _PAD_UID, np.int64)
    if c <= 0 or b == 0 or w == 0:
        return out_keys, out_uids, np.zeros(b, np.int64)
    if w <= c:
        cols = np.broadcast_to(np.arange(w), (b, w))
    else:
        # the c-th largest key of each row, every key above it, and the lowest-uid ties
        threshold = np.partition(keys, w - c, axis=1)[:, w - c:w - c + 1]
        chosen = keys > threshold
        tied = keys == threshold
        need = c - chosen.sum(axis=1)
        crowded = np.flatnonzero(tied.sum(axis=1) > need)   # rows where some ties stay out
        chosen |= tied
        if len(crowded):
            t = tied[crowded]
            chosen[crowded] &= ~(t & (np.cumsum(t, axis=1) > need[crowded, None]))
        cols = np.nonzero(chosen)[1].reshape(b, c)
    top_keys = np.take_along_axis(keys, cols, axis=1)
    top_uids = np.take_along_axis(uids, cols, axis=1)
    order = np.lexsort((top_uids, -top_keys), axis=1)
    top_keys = np.take_along_axis(top_keys, order, axis=1)
    top_uids = np.take_along_axis(top_uids, order, axis=1)
    present = top_keys > -np.inf
    out_keys[:, :top_keys.shape[1]] = top_keys
    out_uids[:, :top_uids.shape[1]] = np.where(present, top_uids, _PAD_UID)
    return out_keys, out_uids, present.sum(axis=1)


def reciprocal_validity(idx: np.ndarray, block: int = 4096) -> np.ndarray:
    """``valid[i, t] = i in idx[idx[i, t]]`` for idx [N, k] (int32 result)."""
    n, k = idx.shape
    valid = np.empty((n, k), np.int32)
    for s in range(0, n, block):
        rows = idx[s:s + block]
        me = np.arange(s, s + len(rows))[:, None, None]
        valid[s:s + block] = (idx[rows] == me).any(axis=-1)
    return valid


def reciprocal_neighbors(features, k: int) -> tuple[np.ndarray, np.ndarray]:
    """One-shot lists of a set: ``(idx, valid)`` int32 [N, k_eff], as the reference computes them."""
    index = NeighborIndex(k, reserve=0)
    index.add(features)
    return index.neighbors()


def _ragged_to_padded(row_of: np.ndarray, n_rows: int, *columns: tuple[np.ndarray, float]):
    """Entries grouped by row (``row_of`` ascending) -> [n_rows, width] arrays padded with ``fill``."""
    counts = np.bincount(row_of, minlength=n_rows)
    width = int(counts.max()) if len(row_of) else 0
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = np.arange(len(row_of)) - starts[row_of]
    out = []
    for values, fill in columns:
        arr = np.full((n_rows, width), fill, values.dtype)
        arr[row_of, slot] = values
        out.append(arr)
    return out


@dataclass
class UpdateStats:
    """What the last add/remove did (for benchmarks and logs)."""
    operation: str = ""
    rows_added: int = 0
    rows_removed: int = 0
    rows_merged: int = 0      # existing rows whose lists took new columns
    rows_scanned: int = 0     # rows given a full scan
    pairs_scored: int = 0     # exact float64 scores computed
    seconds: float = 0.0


class NeighborIndex:
    """Top-k neighbour lists of a set of float32 rows, exact under additions and removals.

    ``add(rows)`` appends rows (positions N..N+m-1), ``remove(positions)`` drops rows (the others
    keep their relative order), ``neighbors()`` returns the lists of the current set, identical to
    ``export.reference.reciprocal_neighbors.reciprocal_neighbors`` on the same rows.  Not thread-safe: the
    owner (``runtime.gallery.Gallery``) serialises access.
    """

    _ROW_ARRAYS = ("_x", "_scale", "_delta", "_y32", "_uid", "_cand_key", "_cand_uid", "_count")

    def __init__(self, k: int, dim: int | None = None, reserve: int = DEFAULT_RESERVE,
                 block_elements: int = BLOCK_ELEMENTS):
        effective_k(k, 1)
        if reserve < 0:
            raise InputError(f"reserve must be >= 0, found {reserve}")
        self.k = int(k)
        self.reserve = int(reserve)
        self.capacity = max(self.k - 1, 0) + self.reserve   # candidates kept per row (self excluded)
        self.block_elements = int(block_elements)
        self.dim = None
        self._n = 0
        self._next_uid = 0
        self.last_update = UpdateStats()
        if dim is not None:
            self._init_dim(int(dim))

    def _init_dim(self, dim: int) -> None:
        self.dim = dim
        self._dpad = 1 << max(dim - 1, 0).bit_length()          # the pairwise tree wants 2^p terms
        self.margin = candidate_margin(dim)
        self._x = np.zeros((0, self._dpad), np.float32)        # the rows, zero-padded
        self._scale = np.zeros(0)                              # canonical norm, float64
        self._delta = np.zeros(0)                              # key error bound of the row
        self._y32 = np.zeros((0, dim), np.float32)             # x / scale in float32 (norm <= 1)
        self._uid = np.zeros(0, np.int64)
        self._cand_key = np.zeros((0, self.capacity))
        self._cand_uid = np.zeros((0, self.capacity), np.int64)
        self._count = np.zeros(0, np.int64)

    # ---- public API ----

    def __len__(self) -> int:
        return self._n

    @property
    def k_eff(self) -> int:
        return min(self.k, self._n)

    def rows(self) -> np.ndarray:
        """The current rows, float32 [N, dim] (a copy)."""
        return self._x[:self._n, :self.dim].copy()

    def add(self, rows) -> None:
        """Append float32 rows [m, dim] at the end of the set."""
        t0 = time.perf_counter()
        x = self._validate_rows(rows)
        if len(x) == 0:
            return
        n_old = self._n
        self._append(x)
        stats = UpdateStats("add", rows_added=len(x), rows_scanned=len(x))
        if n_old:
            stats.rows_merged, pairs = self._merge_new_columns(n_old)
            stats.pairs_scored += pairs
        stats.pairs_scored += self._scan(np.arange(n_old, self._n))
        stats.seconds = time.perf_counter() - t0
        self.last_update = stats

    def remove(self, positions) -> None:
        """Drop the rows at ``positions`` (current 0-based order); the others keep their order."""
        t0 = time.perf_counter()
        pos = np.unique(np.asarray(positions, dtype=np.int64).reshape(-1))
        if len(pos) == 0:
            return
        if pos[0] < 0 or pos[-1] >= self._n:
            raise InputError(f"row positions must be in 0..{self._n - 1}, found {pos[0]}..{pos[-1]}")
        removed_uids = self._uid[pos]
        keep = np.ones(self._n, bool)
        keep[pos] = False
        live = np.flatnonzero(keep)
        n = len(live)
        for name in self._ROW_ARRAYS:
            arr = getattr(self, name)
            arr[:n] = arr[live]
        self._n = n
        # drop removed uids from every list, keeping the order of the rest
        ck, cu, cnt = self._cand_key[:n], self._cand_uid[:n], self._count[:n]
        hit = np.isin(cu, removed_uids)
        affected = np.flatnonzero(hit.any(axis=1))
        if len(affected):
            gone = hit[affected] | (cu[affected] == _PAD_UID)
            order = np.argsort(gone, axis=1, kind="stable")
            sub_k = np.take_along_axis(ck[affected], order, axis=1)
            sub_u = np.take_along_axis(cu[affected], order, axis=1)
            kept = (~gone).sum(axis=1)
            pad = np.arange(self.capacity)[None, :] >= kept[:, None]
            sub_k[pad] = -np.inf
            sub_u[pad] = _PAD_UID
            ck[affected], cu[affected], cnt[affected] = sub_k, sub_u, kept
        rescan = np.flatnonzero(cnt < min(self.k - 1, n - 1))
        pairs = self._scan(rescan)
        self.last_update = UpdateStats("remove", rows_removed=len(pos), rows_scanned=len(rescan),
                                       pairs_scored=pairs, seconds=time.perf_counter() - t0)

    def neighbors(self) -> tuple[np.ndarray, np.ndarray]:
        """``(idx, valid)`` int32 [N, k_eff] of the current set (self in slot 0)."""
        n, k_eff = self._n, self.k_eff
        idx = np.empty((n, k_eff), np.int32)
        if n == 0:
            return idx, idx.copy()
        idx[:, 0] = np.arange(n)
        if k_eff > 1:
            if (self._count[:n] < k_eff - 1).any():  # the invariant; a failure here is a bug
                raise RuntimeError("neighbour index lost candidates it needs; please report this")
            idx[:, 1:] = np.searchsorted(self._uid[:n], self._cand_uid[:n, :k_eff - 1])
        return idx, reciprocal_validity(idx)

    def copy(self) -> "NeighborIndex":
        other = NeighborIndex.__new__(NeighborIndex)
        other.__dict__.update(self.__dict__)
        if self.dim is not None:
            for name in self._ROW_ARRAYS:
                setattr(other, name, getattr(self, name)[:self._n].copy())
        return other

    @contextlib.contextmanager
    def extended(self, rows):
        """Temporarily add ``rows`` at the end; on exit the set is as before (also on an exception).

        The same as ``add(rows)`` ... ``remove(those positions)``, but the exit restores the saved
        lists (O(N k)) instead of removing with rescans.
        """
        n = self._n
        saved = None
        if self.dim is not None:
            saved = (self._cand_key[:n].copy(), self._cand_uid[:n].copy(), self._count[:n].copy())
        next_uid = self._next_uid
        try:
            self.add(rows)
            yield self
        finally:
            self._n, self._next_uid = n, next_uid
            if saved is not None:
                self._cand_key[:n], self._cand_uid[:n], self._count[:n] = saved

    def state(self) -> dict[str, np.ndarray]:
        """The lists, to save next to the rows (loading then needs no O(N^2) scan)."""
        n = self._n
        return {"k": np.int64(self.k), "reserve": np.int64(self.reserve),
                "uid": self._uid[:n].copy() if n else np.zeros(0, np.int64),
                "cand_key": self._cand_key[:n].copy() if n else np.zeros((0, self.capacity)),
                "cand_uid": self._cand_uid[:n].copy() if n else np.zeros((0, self.capacity), np.int64),
                "count": self._count[:n].copy() if n else np.zeros(0, np.int64),
                "next_uid": np.int64(self._next_uid), "key_version": np.int64(KEY_VERSION)}

    @classmethod
    def from_state(cls, rows, state: dict, block_elements: int = BLOCK_ELEMENTS) -> "NeighborIndex":
        """Rebuild from saved rows and :meth:`state`; InputError when they do not fit together."""
        x = np.asarray(rows)
        index = cls(int(state["k"]), None, int(state["reserve"]), block_elements)
        n = len(x)
        c = index.capacity
        ok = (x.ndim == 2 and state["uid"].shape == (n,) and state["count"].shape == (n,)
              and state["cand_key"].shape == (n, c) and state["cand_uid"].shape == (n, c))
        if not ok:
            raise InputError("the saved neighbour lists do not match the saved embeddings")
        x = index._validate_rows(x)
        if n == 0:
            return index
        uids = state["uid"].astype(np.int64)
        cand_uid = state["cand_uid"].astype(np.int64)
        count = state["count"].astype(np.int64)
        present = cand_uid != _PAD_UID
        if (np.any(np.diff(uids) <= 0) or not np.isin(cand_uid[present], uids).all()
                or np.any(present.sum(axis=1) != count) or np.any(count < min(index.k - 1, n - 1))):
            raise InputError("the saved neighbour lists refer to rows that are not in the saved set")
        index._append(x, uids=uids)
        index._next_uid = max(int(state["next_uid"]), index._next_uid)
        if int(state.get("key_version", 1)) != KEY_VERSION:
            # lists saved with an older key: recompute them (O(N^2 d) once) rather than trust them
            index._scan(np.arange(n))
            return index
        index._cand_key[:n] = state["cand_key"]
        index._cand_uid[:n] = cand_uid
        index._count[:n] = count
        return index

    # ---- internals ----

    def _validate_rows(self, rows) -> np.ndarray:
        x = np.asarray(rows)
        if x.ndim != 2:
            raise InputError(f"rows must be a 2-D array [m, dim], found shape {x.shape}")
        if not np.issubdtype(x.dtype, np.floating):
            raise InputError(f"rows must be floating point, found dtype {x.dtype}")
        if self.dim is None:
            if x.shape[1] < 1:
                raise InputError(f"rows must be at least 1 wide, found shape {x.shape}")
            self._init_dim(x.shape[1])
        if x.shape[1] != self.dim:
            raise InputError(f"rows must be {self.dim} wide, found {x.shape[1]}")
        x = x.astype(np.float32, copy=False)
        if not np.isfinite(x).all():
            raise InputError("rows contain NaN or infinite values")
        return x

    def _grow(self, need: int) -> None:
        cap = len(self._x)
        if need <= cap:
            return
        new_cap = max(need + need // 4, 2 * cap, 64)   # headroom: the next small add copies nothing
        fills = {"_cand_key": -np.inf, "_cand_uid": _PAD_UID}
        for name in self._ROW_ARRAYS:
            arr = getattr(self, name)
            out = np.full((new_cap, *arr.shape[1:]), fills.get(name, 0), arr.dtype)
            out[:self._n] = arr[:self._n]
            setattr(self, name, out)

    def _append(self, x32: np.ndarray, uids: np.ndarray | None = None) -> None:
        m, n = len(x32), self._n
        self._grow(n + m)
        end = n + m
        self._x[n:end, :self.dim] = x32
        self._x[n:end, self.dim:] = 0.0
        xs = self._x[n:end].astype(np.float64)
        lengths = np.sqrt(self._dd_chunks(xs, xs))
        self._scale[n:end] = np.maximum(lengths, NORM_EPS)
        self._delta[n:end] = key_error_bound(self.dim, lengths)
        self._y32[n:end] = xs[:, :self.dim] / self._scale[n:end, None]
        if uids is None:
            uids = np.arange(self._next_uid, self._next_uid + m, dtype=np.int64)
        self._uid[n:end] = uids
        self._next_uid = max(self._next_uid, int(uids[-1]) + 1)
        self._cand_key[n:end] = -np.inf
        self._cand_uid[n:end] = _PAD_UID
        self._count[n:end] = 0
        self._n = end

    def _block_rows(self, width: int) -> int:
        return int(max(8, min(4096, self.block_elements // max(width, 1))))

    def _dd_chunks(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        out = np.empty(len(a))
        step = max(64, (1 << 16) // self._dpad)
        for s in range(0, len(a), step):
            out[s:s + step] = dd_tree_sum(a[s:s + step] * b[s:s + step])
        return out

    def _fast_keys(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Scores of the pairs (rows[p], cols[p]) within ``delta`` of the canonical key, and
        bit-identical whatever the call: float32 products are exact in float64 and the sum is a
        fixed pairwise tree."""
        out = np.empty(len(rows))
        step = max(64, (1 << 18) // self._dpad)   # products stay in cache: ~3x faster than big chunks
        for s in range(0, len(rows), step):
            r, c = rows[s:s + step], cols[s:s + step]
            p = self._x[r].astype(np.float64)
            p *= self._x[c]                      # float32 x float32 is exact in float64
            h = self._dpad
            while h > 1:
                h //= 2
                p[:, :h] += p[:, h:2 * h]
            out[s:s + len(r)] = p[:, 0] / self._scale[c]
        return out

    def _canonical_keys(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """The contract's key of the pairs (rows[p], cols[p]) (never self pairs)."""
        return self._dd_chunks(self._x[rows].astype(np.float64), self._x[cols].astype(np.float64)) / self._scale[cols]

    def _resolve(self, rows: np.ndarray, keys: np.ndarray, uids: np.ndarray) -> None:
        """Give the canonical key to every entry of ``keys`` [B, W] (rows at positions ``rows``,
        columns by ``uids``) that lies within ``2 delta`` of another entry of its row, in place.

        Every entry is within ``delta`` of its canonical key, so entries further apart are already
        in canonical order; after this call the order of each row by (key desc, uid asc) is the
        canonical one."""
        if keys.shape[1] < 2:
            return
        order = np.argsort(-keys, axis=1, kind="stable")
        ks = np.take_along_axis(keys, order, axis=1)
        delta = self._delta[rows][:, None]
        with np.errstate(invalid="ignore"):
            close = (ks[:, :-1] - ks[:, 1:] <= 2 * delta) & (delta > 0) & np.isfinite(ks[:, 1:])
        if not close.any():
            return
        near = np.zeros(ks.shape, bool)
        near[:, :-1] |= close
        near[:, 1:] |= close
        r, slot = np.nonzero(near)                       # row-major: chains are contiguous runs
        col_slot = order[r, slot]
        cols = np.searchsorted(self._uid[:self._n], uids[r, col_slot])
        # a chain of entries within 2 delta of each other; it needs canonical keys only when it holds
        # rows that are not bitwise identical (identical rows have one key: they tie, by uid)
        start = np.ones(len(r), bool)
        start[1:] = ~((r[1:] == r[:-1]) & close[r[1:], np.maximum(slot[1:] - 1, 0)] & (slot[1:] > 0))
        chain = np.cumsum(start) - 1
        same = np.ones(len(r), bool)
        same[1:] = (self._x[cols[1:]] == self._x[cols[:-1]]).all(axis=1) | start[1:]
        mixed = np.zeros(chain[-1] + 1, bool)
        np.logical_or.at(mixed, chain, ~same)
        need = mixed[chain]
        if need.any():
            keys[r[need], col_slot[need]] = self._canonical_keys(rows[r[need]], cols[need])
        ident = ~need
        if ident.any():   # one value per identical chain (stored keys may mix fast and canonical ones)
            first = np.flatnonzero(start)[chain]
            keys[r[ident], col_slot[ident]] = keys[r[first[ident]], col_slot[first[ident]]]

    def _store(self, block: np.ndarray, keys: np.ndarray, uids: np.ndarray, resolve: bool = True) -> None:
        if resolve:
            self._resolve(block, keys, uids)
        top_k, top_u, cnt = select_top(keys, uids, self.capacity)
        self._cand_key[block], self._cand_uid[block], self._count[block] = top_k, top_u, cnt

    def _scan(self, rows: np.ndarray) -> int:
        """Full lists of ``rows`` (positions) against the whole current set; returns pairs scored."""
        n, c = self._n, self.capacity
        if len(rows) == 0 or c == 0:
            return 0
        y = self._y32[:n]
        pairs = 0
        step = self._block_rows(n)
        for s in range(0, len(rows), step):
            block = rows[s:s + step]
            cos = y[block] @ y.T                                   # float32 candidate pass
            cos[np.arange(len(block)), block] = -np.inf            # self is slot 0, not a candidate
            if n - 1 <= c:
                mask = cos > -np.inf
            else:
                threshold = np.partition(cos, n - c, axis=1)[:, n - c]
                mask = cos >= (threshold - np.float32(self.margin))[:, None]
            del cos
            row_of, cols = np.divmod(np.flatnonzero(mask), n)     # per row, columns ascending
            del mask
            keys = self._fast_keys(block[row_of], cols)
            pairs += len(keys)
            k_pad, u_pad = _ragged_to_padded(row_of, len(block), (keys, -np.inf),
                                             (self._uid[cols], _PAD_UID))
            self._store(block, k_pad, u_pad)
        return pairs

    def _merge_new_columns(self, n_old: int) -> tuple[int, int]:
        """Merge columns n_old..N-1 (just appended) into the lists of rows 0..n_old-1.

        Returns (rows whose lists changed, pairs scored)."""
        if self.capacity == 0:
            return 0, 0
        new = np.arange(n_old, self._n)
        y_new, uid_new = self._y32[new], self._uid[new]
        merged = pairs = 0
        step = self._block_rows(len(new))
        for s in range(0, n_old, step):
            block = np.arange(s, min(n_old, s + step))
            ck, cu, cnt = self._cand_key[block], self._cand_uid[block], self._count[block]
            complete = cnt == n_old - 1                 # the list holds every other row
            tail = ck[np.arange(len(block)), np.maximum(cnt - 1, 0)]
            # a new column can enter a list only by ranking above its last entry (its uid is
            # larger, so an equal key ranks below); the float32 pass screens with a margin
            tail_cos = np.where(cnt > 0, tail / self._scale[block], np.inf)
            cos = self._y32[block] @ y_new.T
            mask = complete[:, None] | (cos >= (tail_cos - self.margin).astype(np.float32)[:, None])
            del cos
            row_of, col = np.divmod(np.flatnonzero(mask), len(new))
            if len(row_of) == 0:
                continue
            keys = self._fast_keys(block[row_of], new[col])
            pairs += len(keys)
            # within 2 delta of the tail the canonical keys decide, after the merge
            take = complete[row_of] | (keys >= tail[row_of] - 2 * self._delta[block[row_of]])
            row_of, col, keys = row_of[take], col[take], keys[take]
            if len(row_of) == 0:
                continue
            hit = np.unique(row_of)
            local = np.searchsorted(hit, row_of)
            k_new, u_new = _ragged_to_padded(local, len(hit), (keys, -np.inf), (uid_new[col], _PAD_UID))
            rows = block[hit]
            keys_all = np.concatenate([ck[hit], k_new], axis=1)
            uids_all = np.concatenate([cu[hit], u_new], axis=1)
            self._resolve(rows, keys_all, uids_all)
            # a list that does not hold every other row may take a new column only above its
            # (resolved) last entry: an old row that was not kept could rank between them
            last = np.maximum(cnt[hit] - 1, 0)
            tail_key = keys_all[np.arange(len(hit)), last]
            drop = ~complete[hit][:, None] & (keys_all[:, ck.shape[1]:] <= tail_key[:, None])
            keys_all[:, ck.shape[1]:][drop] = -np.inf
            uids_all[:, ck.shape[1]:][drop] = _PAD_UID
            self._store(rows, keys_all, uids_all, resolve=False)
            merged += len(hit)
        return merged, pairs
