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
column's canonical norm -- one value wherever it is computed.  The same algorithm as the CUDA
kernels, in numpy (this is the "fast candidate pass, exact re-score" that DESIGN.md's precision
rule allows):

1. **float32 candidates.**  The float32 cosine of the normalised rows differs from the exact one by
   at most ``(d + 4) * 2^-24`` (the dot-product error bound of any summation order), so every
   column within ``margin`` (twice that, with slack) of a row's C-th best float32 value is a
   candidate, C = ``k - 1 + reserve``.  Large sets (``_scan_tiles``) compute the Gram matrix with
   float32 GEMMs (ONNX Runtime's Gemm, ``_gram``) in tiles of its upper half only (each tile serves its rows and, transposed,
   its columns), keeping the entries at or above a per-row threshold taken from a random sample
   of columns (``_pilot_thresholds``); no row is ever partitioned in full.  A row is *certified*
   when its C-th best kept value minus ``margin`` is still at or above its threshold: then
   nothing it needs was left out.  The rows that fail (or kept more than SCAN_ROW_CAP entries:
   near-identical sets) are scanned again against all columns with a bound that cannot fail
   (``_scan_rows``: the C-th best of the elementwise maxima of column slabs).  All-zero rows have
   every key exactly 0 and list the first rows (``_store_zero_rows``).
2. **float64 scores.**  The candidates within ``margin`` of the C-th best are scored with the exact
   float64 products in some float64 summation order (BLAS), within ``delta_i``
   (``key_error_bound``) of the canonical key.  A one-shot computation (``reciprocal_neighbors``)
   keeps the float32 order for candidates more than ``margin`` from every other candidate of
   their row and scores only the others.
3. **canonical keys where they decide.**  Entries of a list whose scores lie within ``2 delta_i``
   of another entry are rescored with the canonical key itself, unless they are copies of one row
   (bitwise-equal rows: one key, ties by position), so every decision is the canonical one.

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

Memory: every computation is blocked, O(block * N) with block * N about 4M elements, plus the
tiled pass's kept entries, at most SCAN_ROW_CAP a row (about 100 on clustered data).
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from export.contract.neighbor_key import NORM_EPS, dd_tree_sum, key_error_bound
from export.contract.ops import effective_k
from export.contract.errors import InputError, as_array, check_count

#: default spare candidates per row beyond the k - 1 that the output needs
DEFAULT_RESERVE = 16
#: elements held at once by a blocked computation (float32 keys, float64 products)
BLOCK_ELEMENTS = 1 << 22
_PAD_UID = -1
_U32 = 2.0 ** -24
#: sets of at least this many rows take the tiled, certified candidate pass (``_scan_sparse``)
SPARSE_SCAN_MIN_ROWS = 2048
#: rows of a tile of the candidate pass (columns: ``block_elements`` / rows)
SCAN_TILE_ROWS = 512
#: threads of the tiled pass's extraction (the GEMMs use ONNX Runtime's own thread pool, ``_gram``)
SCAN_THREADS = min(2, os.cpu_count() or 1)
#: entries a row may keep in the tiled pass before it is scanned again by itself (near-identical sets)
SCAN_ROW_CAP = 384
#: rows finished at a time (in order of their kept entries: similar widths together)
FINISH_ROWS = 2048
#: slabs of columns whose elementwise maxima bound a row's C-th best value (``_scan_rows``)
SCAN_SLABS = 16
#: the pilot sample: at least this many columns, or N / fraction; its group maxima, in this many
#: groups, set each row's threshold about ``PILOT_SIGMAS`` standard deviations past the expected
PILOT_MIN_SAMPLE = 1024
PILOT_SAMPLE_FRACTION = 16
PILOT_GROUPS = 128
PILOT_SIGMAS = 3.0
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
    return one_shot_index(features, k).neighbors()


def one_shot_index(features, k: int) -> "NeighborIndex":
    """The index behind :func:`reciprocal_neighbors` (its ``last_scan`` says what the pass did).
    Its keys are never compared again, so it scores in float64 only where the float32 order is
    not certain: it must not be added to or removed from."""
    index = NeighborIndex(k, reserve=0)
    index._lists_only = True
    index.add(features)
    return index


_GRAM_LOCK = threading.Lock()
_GRAM_SESSION = None


def _gram(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32 ``a @ b.T`` by ONNX Runtime's Gemm (MLAS, its own threads).  Not numpy's matmul:
    OpenBLAS's threads spin for a while after every call, on the cores that the tiled pass's
    extraction threads need between GEMMs (measured: the extraction 1.5x slower)."""
    global _GRAM_SESSION
    if _GRAM_SESSION is None:
        with _GRAM_LOCK:
            if _GRAM_SESSION is None:
                import onnxruntime as ort
                from onnx import TensorProto, helper

                graph = helper.make_graph(
                    [helper.make_node("Gemm", ["a", "b"], ["c"], transB=1)], "gram",
                    [helper.make_tensor_value_info(name, TensorProto.FLOAT, [None, None]) for name in "ab"],
                    [helper.make_tensor_value_info("c", TensorProto.FLOAT, [None, None])])
                model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
                opts = ort.SessionOptions()
                opts.log_severity_level = 3
                opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
                _GRAM_SESSION = ort.InferenceSession(model.SerializeToString(), opts,
                                                     providers=["CPUExecutionProvider"])
    a = np.ascontiguousarray(a, np.float32)
    b = np.ascontiguousarray(b, np.float32)
    if out is None:
        out = np.empty((len(a), len(b)), np.float32)
    if len(a) == 0 or len(b) == 0:
        return out
    binding = _GRAM_SESSION.io_binding()
    binding.bind_cpu_input("a", a)
    binding.bind_cpu_input("b", b)
    binding.bind_output("c", "cpu", 0, np.float32, out.shape, out.ctypes.data)
    _GRAM_SESSION.run_with_iobinding(binding)
    return out


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
class ScanStats:
    """What the last tiled candidate pass did (``NeighborIndex.last_scan``)."""
    rows: int = 0
    fallback_rows: int = 0    # rows scanned again by an exact partition (certificate failed or overflow)
    overflow_rows: int = 0    # of which rows that kept more than SCAN_ROW_CAP entries
    kept_entries: int = 0     # float32 entries kept by the pass (all rows)
    seconds: dict = field(default_factory=dict)   # per phase: pilot, gemm, extract, finish, fallback


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


_STATE_ARRAYS = {"uid": 1, "count": 1, "cand_uid": 2, "cand_key": 2}
_STATE_SCALARS = ("k", "reserve", "next_uid")


def _checked_state(state) -> dict:
    """:meth:`NeighborIndex.state`'s dict as saved: every member there, integer scalars and arrays of
    the right rank (integers, keys floating); else InputError (not a KeyError or TypeError later)."""
    if not hasattr(state, "keys") or any(key not in state for key in (*_STATE_ARRAYS, *_STATE_SCALARS)):
        raise InputError("the saved neighbour lists are incomplete (expected the members "
                         f"{', '.join((*_STATE_ARRAYS, *_STATE_SCALARS))}); the saved lists are damaged")
    out = {key: np.asarray(state[key]) for key in (*_STATE_ARRAYS, *_STATE_SCALARS)}
    out["key_version"] = np.asarray(state["key_version"] if "key_version" in state else 1)
    for key, value in out.items():
        rank = _STATE_ARRAYS.get(key, 0)
        kind = "f" if key == "cand_key" else "iu"
        if value.ndim != rank or value.dtype.kind not in kind:
            raise InputError(f"the saved neighbour lists' {key} is not {'a float' if kind == 'f' else 'an integer'} "
                             f"{'scalar' if rank == 0 else f'{rank}-D array'} (found {value.dtype} of shape "
                             f"{value.shape}); the saved lists are damaged")
    return out


class NeighborIndex:
    """Top-k neighbour lists of a set of float32 rows, exact under additions and removals.

    ``add(rows)`` appends rows (positions N..N+m-1), ``remove(positions)`` drops rows (the others
    keep their relative order), ``neighbors()`` returns the lists of the current set, identical to
    ``export.reference.reciprocal_neighbors.reciprocal_neighbors`` on the same rows.  Not thread-safe: the
    owner (``runtime.gallery.Gallery``) serialises access.
    """

    _ROW_ARRAYS = ("_x", "_x64", "_hash", "_scale", "_delta", "_y32", "_uid", "_cand_key", "_cand_uid", "_count")

    def __init__(self, k: int, dim: int | None = None, reserve: int = DEFAULT_RESERVE,
                 block_elements: int = BLOCK_ELEMENTS):
        check_count(k, "k")
        effective_k(k, 1)
        check_count(reserve, "reserve", least=0)
        self.k = int(k)
        self.reserve = int(reserve)
        self.capacity = max(self.k - 1, 0) + self.reserve   # candidates kept per row (self excluded)
        self.block_elements = int(block_elements)
        self.dim = None
        self._n = 0
        self._next_uid = 0
        self.last_update = UpdateStats()
        self.last_scan = ScanStats()
        self._lists_only = False
        self._extended_depth = 0           # inside `with extended(...)`: removals would break its restore
        if dim is not None:
            self._init_dim(check_count(dim, "dim"))

    def _init_dim(self, dim: int) -> None:
        self.dim = dim
        self._dpad = 1 << max(dim - 1, 0).bit_length()          # the pairwise tree wants 2^p terms
        self.margin = candidate_margin(dim)
        self._x = np.zeros((0, self._dpad), np.float32)        # the rows, zero-padded
        self._x64 = np.zeros((0, dim))                         # the rows in float64 (exact), for the fast keys
        self._hash = np.zeros(0, np.uint64)                    # of the row's values: equal rows, equal hashes
        self._hash_mult = np.random.default_rng(0).integers(1, 2 ** 63, self._dpad, dtype=np.uint64) * 2 + 1
        self._labels = None                                    # equal labels <=> bitwise-equal rows (lazily)
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
        if getattr(self, "_extended_depth", 0):
            raise InputError("rows cannot be removed while the index is temporarily extended (inside `with "
                             "index.extended(...)`): its exit restores the saved lists; remove after the block")
        given = as_array(positions, "row positions")
        if given.size and not np.issubdtype(given.dtype, np.integer):
            raise InputError(f"row positions must be integers, found {given.dtype} (a boolean mask or floats would "
                             "be read as other rows); pass np.flatnonzero(mask) for a mask")
        pos = np.unique(given.astype(np.int64).reshape(-1))
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
        self._labels = None
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
            if self._uid[0] == 0 and self._uid[n - 1] == n - 1:   # uids ascending: they are the positions
                idx[:, 1:] = self._cand_uid[:n, :k_eff - 1]
            else:
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
        self._extended_depth = getattr(self, "_extended_depth", 0) + 1
        try:
            self.add(rows)
            yield self
        finally:
            self._extended_depth -= 1
            self._n, self._next_uid = n, next_uid
            self._labels = None
            if saved is not None:
                self._cand_key[:n], self._cand_uid[:n], self._count[:n] = saved

    def state(self) -> dict[str, np.ndarray]:
        """The lists, to save next to the rows (loading then needs no O(N^2) scan).  Not of a
        one-shot index (:func:`one_shot_index`): some of its keys are float32 approximations, which
        :meth:`from_state` would take for damage."""
        if self._lists_only:
            raise InputError("a one-shot index (one_shot_index / reciprocal_neighbors) keeps approximate keys and "
                             "cannot be saved; build a NeighborIndex and add() the rows to keep lists")
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
        state = _checked_state(state)
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
        keys = np.asarray(state["cand_key"])
        if not np.issubdtype(keys.dtype, np.floating) or not np.isfinite(keys[present]).all() \
                or not (keys[~present] == -np.inf).all():
            raise InputError("the saved neighbour keys are not finite numbers where a neighbour is listed (and -inf "
                             "where none is): the saved lists are damaged")
        pad = np.iinfo(np.int64).max
        ordered = np.sort(np.where(present, cand_uid, pad), axis=1)
        if ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] != pad)).any() \
                or (cand_uid == uids[:, None]).any():
            raise InputError("the saved neighbour lists name a row twice, or a row as its own neighbour: the saved "
                             "lists are damaged")
        index._append(x, uids=uids)
        index._next_uid = max(int(state["next_uid"]), index._next_uid)
        if int(state.get("key_version", 1)) != KEY_VERSION:
            # lists saved with an older key: recompute them (O(N^2 d) once) rather than trust them
            index._scan(np.arange(n))
            return index
        index._check_saved_lists(keys, cand_uid, present)
        index._cand_key[:n] = state["cand_key"]
        index._cand_uid[:n] = cand_uid
        index._count[:n] = count
        return index

    def _check_saved_lists(self, keys: np.ndarray, cand_uid: np.ndarray, present: np.ndarray) -> None:
        """Saved lists (rows already appended) must be lists of these rows: each row's entries first,
        in (key desc, uid asc) order, and each key within ``2 delta`` of the pair's key recomputed
        here (both lie within ``delta`` of the canonical key).  A list whose neighbours were shuffled
        or swapped, even with the file's checksum re-signed, fails; O(N c d), far below a rescan.
        (That every row's neighbours are its *best* ones needs the O(N^2 d) rescan; not checked.)"""
        n = len(keys)
        damaged = "the saved lists are damaged or were edited"
        if (present[:, 1:] & ~present[:, :-1]).any():
            raise InputError(f"the saved neighbour lists have gaps before listed neighbours: {damaged}")
        r, slot = np.nonzero(present)
        cols = np.searchsorted(self._uid[:n], cand_uid[r, slot])
        with np.errstate(invalid="ignore", over="ignore"):
            off = np.abs(keys[r, slot] - self._fast_keys(r, cols)) > 2 * self._delta[r]
        if off.any():
            at = int(np.flatnonzero(off)[0])
            raise InputError(f"the saved neighbour key of row {int(r[at])} and neighbour uid "
                             f"{int(cand_uid[r[at], slot[at]])} is not the key of that pair: {damaged}")
        both = present[:, 1:]
        k0, k1 = keys[:, :-1], keys[:, 1:]
        with np.errstate(invalid="ignore"):
            wrong = both & ((k1 > k0) | ((k1 == k0) & (cand_uid[:, 1:] < cand_uid[:, :-1])))
        if wrong.any():
            row = int(np.flatnonzero(wrong.any(axis=1))[0])
            raise InputError(f"the saved neighbour list of row {row} is not in (key desc, uid asc) order: {damaged}")

    # ---- internals ----

    def _validate_rows(self, rows) -> np.ndarray:
        x = as_array(rows, "rows")
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
        if not np.isfinite(x).all():
            raise InputError("rows contain NaN or infinite values")
        if x.dtype.itemsize > 4 and x.size and np.abs(x).max() > np.finfo(np.float32).max:
            raise InputError(f"rows hold values beyond float32's range (largest {float(np.abs(x).max()):.3g}); the "
                             "index ranks float32 rows: scale them down")
        return x.astype(np.float32, copy=False)

    def _grow(self, need: int) -> None:
        cap = len(self._x)
        if need <= cap:
            return
        new_cap = max(need + need // 4, 2 * cap, 64)   # headroom: the next small add copies nothing
        for name in self._ROW_ARRAYS:              # rows past N are written by _append before use
            arr = getattr(self, name)
            out = np.empty((new_cap, *arr.shape[1:]), arr.dtype)
            out[:self._n] = arr[:self._n]
            setattr(self, name, out)

    def _append(self, x32: np.ndarray, uids: np.ndarray | None = None) -> None:
        m, n = len(x32), self._n
        self._grow(n + m)
        end = n + m
        self._x[n:end, :self.dim] = x32
        self._x[n:end, self.dim:] = 0.0
        self._x64[n:end] = x32
        words = self._x[n:end] + np.float32(0)                  # -0.0 -> +0.0: rows equal as values
        words = words.view(np.uint64) if self._dpad % 2 == 0 else words.view(np.uint32).astype(np.uint64)
        self._hash[n:end] = np.dot(words, self._hash_mult[:words.shape[1]])
        self._labels = None
        lengths = np.sqrt(self._dd_dots(self._x64[n:end], self._x64[n:end]))
        self._scale[n:end] = np.maximum(lengths, NORM_EPS)
        self._delta[n:end] = key_error_bound(self.dim, lengths)
        # x / scale in float32 (norm <= 1 + 2^-52), through no float64 temporary
        np.multiply(self._x64[n:end], (1.0 / self._scale[n:end])[:, None], out=self._y32[n:end], casting="unsafe")
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

    def _dd_dots(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """The contract's canonical dot of row pairs: float64 [M, dim] each (exact float32 values);
        many pairs in two threads (numpy releases the GIL in the tree's passes)."""
        out = np.empty(len(a))

        def part(lo, hi):
            step = max(64, (1 << 16) // self._dpad)
            p = np.zeros((min(step, hi - lo), self._dpad))        # the tree's zero padding stays zero
            for s in range(lo, hi, step):
                r = min(step, hi - s)
                np.multiply(a[s:s + r], b[s:s + r], out=p[:r, :self.dim])
                out[s:s + r] = dd_tree_sum(p[:r])

        if SCAN_THREADS > 1 and len(a) >= 8192:
            with ThreadPoolExecutor(1) as helper:
                theirs = helper.submit(part, len(a) // 2, len(a))
                part(0, len(a) // 2)
                theirs.result()
        else:
            part(0, len(a))
        return out

    def _cosines(self, a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``a @ b.T`` in float32 (one SGEMM): the candidate pass.  Any evaluation within the float32
        dot-product error bound gives the same lists (``candidate_margin``; tests perturb it)."""
        return _gram(a, b, out)

    def _fast_keys(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Scores of the pairs (rows[p], cols[p]) within ``delta`` of the canonical key: the exact
        float64 products of the float32 values summed in some float64 order (``key_error_bound``
        holds for any order), divided by the canonical norm.

        Pairs that come grouped by row (runs of one row, as every caller passes them) are scored
        as one float64 matrix-vector product per run (BLAS; ~3x faster than a pairwise tree)."""
        rows = np.asarray(rows, np.int64)
        cols = np.asarray(cols, np.int64)
        out = np.empty(len(rows))
        if len(rows) == 0:
            return out
        starts = np.flatnonzero(np.concatenate([[True], rows[1:] != rows[:-1]]))
        lengths = np.diff(np.append(starts, len(rows)))
        long = np.repeat(lengths > 512, lengths)               # very long runs: pair by pair
        if long.any():
            at = np.flatnonzero(long)
            step = max(64, (1 << 18) // self._dpad)
            for s in range(0, len(at), step):
                a = np.take(self._x64, rows[at[s:s + step]], axis=0)
                b = np.take(self._x64, cols[at[s:s + step]], axis=0)
                out[at[s:s + step]] = np.einsum("ij,ij->i", a, b)
        # the other runs by length class (little padding), ~16 MB of products a chunk
        for low, high in ((1, 4), (5, 16), (17, 64), (65, 512)):
            pick = (lengths >= low) & (lengths <= high)
            st_all, ln_all = starts[pick], lengths[pick]
            step = max(16, (1 << 13) // high)
            for s in range(0, len(st_all), step):
                st, ln = st_all[s:s + step], ln_all[s:s + step]
                slot = np.arange(int(ln.max()))
                present = slot[None, :] < ln[:, None]
                where = np.where(present, st[:, None] + slot[None, :], st[:, None])   # pads repeat a pair
                a = np.take(self._x64, rows[st], axis=0)                               # [R, D]
                b = np.take(self._x64, cols[where], axis=0)                            # [R, W, D]
                out[where[present]] = np.matmul(b, a[:, :, None])[:, :, 0][present]
        return out / self._scale[cols]

    def _canonical_keys(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """The contract's key of the pairs (rows[p], cols[p]) (never self pairs)."""
        return self._dd_dots(np.take(self._x64, rows, axis=0), np.take(self._x64, cols, axis=0)) / self._scale[cols]

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
        labels = self._row_labels()
        same[1:] = (labels[cols[1:]] == labels[cols[:-1]]) | start[1:]
        mixed = np.zeros(chain[-1] + 1, bool)
        np.logical_or.at(mixed, chain, ~same)
        need = mixed[chain]
        if need.any():
            keys[r[need], col_slot[need]] = self._canonical_keys(rows[r[need]], cols[need])
        ident = ~need
        if ident.any():   # one value per identical chain (stored keys may mix fast and canonical ones)
            first = np.flatnonzero(start)[chain]
            keys[r[ident], col_slot[ident]] = keys[r[first[ident]], col_slot[first[ident]]]

    def _row_labels(self) -> np.ndarray:
        """Per row, the position of the first row with the same values (int64 [N]): rows grouped
        by hash, each member compared with its group's first row (a hash collision only costs
        canonical keys)."""
        n = self._n
        if self._labels is None or len(self._labels) != n:
            order = np.argsort(self._hash[:n], kind="stable")
            h = self._hash[order]
            start = np.concatenate([[True], h[1:] != h[:-1]])
            first = order[np.flatnonzero(start)[np.cumsum(start) - 1]]
            shared = np.flatnonzero(first != order)
            equal = (self._x64[order[shared]] == self._x64[first[shared]]).all(axis=1)
            labels = np.arange(n)
            labels[order[shared[equal]]] = first[shared[equal]]
            self._labels = labels
        return self._labels

    def _store(self, block: np.ndarray, keys: np.ndarray, uids: np.ndarray, resolve: bool = True) -> None:
        if resolve:
            self._resolve(block, keys, uids)
        top_k, top_u, cnt = select_top(keys, uids, self.capacity)
        self._cand_key[block], self._cand_uid[block], self._count[block] = top_k, top_u, cnt

    def _scan(self, rows: np.ndarray) -> int:
        """Full lists of ``rows`` (positions) against the whole current set; returns pairs scored."""
        n, c = self._n, self.capacity
        rows = np.asarray(rows, np.int64)
        if len(rows) == 0 or c == 0:
            return 0
        if n - 1 <= c or n < SPARSE_SCAN_MIN_ROWS:
            return self._scan_dense(rows)
        return self._scan_sparse(rows)

    def _scan_dense(self, rows: np.ndarray) -> int:
        """:meth:`_scan` by the C-th best float32 value of every row (an exact partition of the
        whole row): for small sets, and for the rows that :meth:`_scan_sparse` cannot certify."""
        n, c = self._n, self.capacity
        if len(rows) == 0 or c == 0:
            return 0
        y = self._y32[:n]
        pairs = 0
        step = self._block_rows(n)
        for s in range(0, len(rows), step):
            block = rows[s:s + step]
            cos = self._cosines(y[block], y)                        # float32 candidate pass
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

    def _store_zero_rows(self, rows: np.ndarray) -> None:
        """All-zero rows: every key is exactly 0 (``delta`` is 0), so the list is the first
        ``capacity`` other rows in insertion order."""
        c = min(self.capacity, self._n - 1)
        slot = np.arange(c)[None, :]
        cols = slot + (slot >= rows[:, None])                     # skip the row itself
        self._cand_key[rows] = -np.inf
        self._cand_uid[rows] = _PAD_UID
        self._cand_key[rows, :c] = 0.0
        self._cand_uid[rows, :c] = self._uid[cols]
        self._count[rows] = c

    def _tile_shape(self) -> tuple[int, int]:
        """(rows, columns) of one float32 tile of the candidate pass (``block_elements`` in all)."""
        rows = int(min(SCAN_TILE_ROWS, max(8, math.isqrt(max(1, self.block_elements // 16)))))
        return rows, int(max(rows, self.block_elements // rows))

    def _pilot_thresholds(self, rows: np.ndarray) -> np.ndarray:
        """Per row, a float32 threshold that a few times C columns reach: the q-th best of the
        group maxima of a fixed random sample of columns, q a few standard deviations past the
        number of the row's top C expected in the sample, minus ``margin``.  Only the speed depends
        on it (the tiled pass certifies every row against the threshold it used)."""
        n, c = self._n, self.capacity
        y = self._y32[:n]
        groups = min(PILOT_GROUPS, n)
        size = min(n, max(PILOT_MIN_SAMPLE, n // PILOT_SAMPLE_FRACTION))
        size -= size % groups
        sample = np.sort(np.random.default_rng(0).choice(n, size, replace=False))
        lam = c * size / (n - 1)                    # expected members of a row's top C in the sample
        q = int(min(groups, max(1, math.floor(lam + PILOT_SIGMAS * math.sqrt(lam) + 2))))
        y_s = y[sample]
        out = np.empty(len(rows), np.float32)
        step = self._block_rows(size)
        buf = np.empty(min(step, len(rows)) * size, np.float32)
        for s in range(0, len(rows), step):
            block = rows[s:s + step]
            p = self._cosines(y[block], y_s, buf[:len(block) * size].reshape(len(block), size))
            at = np.searchsorted(sample, block)
            own = (at < size) & (sample[np.minimum(at, size - 1)] == block)
            p[np.flatnonzero(own), at[own]] = -np.inf              # not the row itself
            best = p.reshape(len(block), size // groups, groups).max(axis=1)
            out[s:s + step] = np.partition(best, groups - q, axis=1)[:, groups - q]
        return out - np.float32(self.margin)

    def _scan_sparse(self, rows: np.ndarray) -> int:
        """:meth:`_scan` for large sets.  All-zero rows take :meth:`_store_zero_rows`; when most
        rows are scanned, :meth:`_scan_tiles` (the upper half of the Gram matrix), else
        :meth:`_scan_rows`."""
        zero = self._delta[rows] == 0
        if zero.any():
            self._store_zero_rows(rows[zero])
            rows = rows[~zero]
        if len(rows) == 0:
            return 0
        if 2 * len(rows) >= self._n:
            return self._scan_tiles(rows)
        return self._scan_rows(rows)

    def _narrow(self, values: np.ndarray) -> np.ndarray:
        """Per row of ``values`` (float32 [B, W], padded with -inf): the row's C-th best value minus
        ``margin``, rounded down to float32 (entries at or above it are the row's candidates)."""
        c, width = self.capacity, values.shape[1]
        tc = np.partition(values, width - c, axis=1)[:, width - c].astype(np.float64) - self.margin
        low = tc.astype(np.float32)
        return np.where(low > tc, np.nextafter(low, np.float32(-np.inf)), low)

    def _store_candidates(self, block: np.ndarray, row_of: np.ndarray, cols: np.ndarray,
                          values: np.ndarray | None = None) -> int:
        """Score the candidate columns ``cols`` of rows ``block[row_of]`` (grouped by row, columns
        ascending) in float64, and store each row's best.  Returns the pairs scored.

        For a one-shot index (``_lists_only``: its keys are never compared again), a candidate whose
        float32 value ``values`` lies more than ``margin`` from every other candidate of its row
        keeps ``value * scale_i`` as its key: its place in the order is the float32 one (see
        :meth:`_isolated`); only the others are scored in float64 (and canonically where tied)."""
        rows = block[row_of]
        if values is None or not self._lists_only:
            keys = self._fast_keys(rows, cols)
            scored = len(keys)
        else:
            keys = values.astype(np.float64) * self._scale[rows]
            tied = ~self._isolated(row_of, values, len(block))
            keys[tied] = self._fast_keys(rows[tied], cols[tied])
            scored = int(tied.sum())
        k_pad, u_pad = _ragged_to_padded(row_of, len(block), (keys, -np.inf), (self._uid[cols], _PAD_UID))
        self._store(block, k_pad, u_pad)
        return scored

    def _isolated(self, row_of: np.ndarray, values: np.ndarray, n_rows: int) -> np.ndarray:
        """Entries (grouped by row, rows ``0..n_rows-1``) whose float32 value is more than ``margin``
        from every other entry of their row.  Each value is within ``margin / 2`` of the exact
        cosine, so such an entry's order against every other is the float32 order, and
        ``value * scale_i`` (the key up to that error) sits on the right side of every other
        entry's key: more than ``2 delta`` away, so :meth:`_resolve` leaves it alone."""
        counts = np.bincount(row_of, minlength=n_rows)
        slot = np.arange(len(row_of)) - np.concatenate([[0], np.cumsum(counts)[:-1]])[row_of]
        v = np.full((n_rows, int(counts.max())), -np.inf)
        v[row_of, slot] = values
        order = np.argsort(-v, axis=1)
        v = np.take_along_axis(v, order, axis=1)
        with np.errstate(invalid="ignore"):
            close = v[:, :-1] - v[:, 1:] <= self.margin            # -inf pads are never close
        near = np.zeros(v.shape, bool)
        near[:, :-1] |= close
        near[:, 1:] |= close
        isolated = np.empty(v.shape, bool)
        np.put_along_axis(isolated, order, ~near, axis=1)
        return isolated[row_of, slot]

    def _finish_rows(self, block: np.ndarray, row_of: np.ndarray, cols: np.ndarray, values: np.ndarray) -> int:
        """Rows ``block`` whose float32 entries ``(row_of, cols, values)`` (grouped by row, columns
        ascending) include every column within ``margin`` of the row's C-th best value: keep those
        columns and store the lists.  Returns the pairs scored."""
        counts = np.bincount(row_of, minlength=len(block))
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        v = np.full((len(block), int(counts.max())), -np.inf, np.float32)
        v[row_of, np.arange(len(row_of)) - starts[row_of]] = values
        take = values >= self._narrow(v)[row_of]
        return self._store_candidates(block, row_of[take], cols[take], values[take])

    def _scan_rows(self, rows: np.ndarray) -> int:
        """:meth:`_scan` for some rows of a large set, a block of rows against all columns at a time.

        No partition of whole rows: the columns are cut into SCAN_SLABS slabs and the C-th best
        of the slabs' elementwise maxima is a lower bound of the row's C-th best value (C slab
        positions hold C distinct columns at or above it); the columns at or above that bound
        minus ``margin`` are the row's entries."""
        n, c = self._n, self.capacity
        y = self._y32[:n]
        slabs = max(1, min(SCAN_SLABS, n // (4 * c)))
        width = -(-n // slabs)
        pairs = 0
        step = self._block_rows(n)
        buf = np.empty(min(step, len(rows)) * n, np.float32)
        for s in range(0, len(rows), step):
            block = rows[s:s + step]
            t = self._cosines(y[block], y, buf[:len(block) * n].reshape(len(block), n))
            t[np.arange(len(block)), block] = -np.inf                   # not the row itself
            best = t[:, :width].copy()
            for a in range(width, n, width):
                seg = t[:, a:a + width]
                np.maximum(best[:, :seg.shape[1]], seg, out=best[:, :seg.shape[1]])
            bound = np.partition(best, width - c, axis=1)[:, width - c].astype(np.float64) - self.margin
            low = bound.astype(np.float32)
            low = np.where(low > bound, np.nextafter(low, np.float32(-np.inf)), low)
            f = np.flatnonzero(t >= low[:, None])
            row_of, cols = np.divmod(f, n)
            pairs += self._finish_rows(block, row_of, cols, t.reshape(-1)[f])
        return pairs

    def _scan_tiles(self, rows: np.ndarray) -> int:
        """:meth:`_scan` for most rows of a large set: the float32 Gram matrix in tiles, its upper
        half only (each tile serves its rows and, transposed, its columns), keeping the entries at
        or above a per-row threshold ``theta`` from :meth:`_pilot_thresholds`.

        Certificate: a row whose kept entries hold C values >= ``theta + margin`` has its C-th
        best float32 value ``T >= theta + margin``, so every column within ``margin`` of ``T``
        (every column that can belong to the exact top C) was kept.  Those rows continue from
        their kept entries; the others, and rows that kept more than SCAN_ROW_CAP entries
        (near-identical sets), are scanned again by :meth:`_scan_rows`."""
        n, c = self._n, self.capacity
        y = self._y32[:n]
        cap = max(SCAN_ROW_CAP, c)
        clock = time.perf_counter()
        seconds = dict.fromkeys(("pilot", "gemm", "extract", "finish", "fallback"), 0.0)
        theta = np.full(n, np.inf, np.float32)
        theta[rows] = self._pilot_thresholds(rows)
        seconds["pilot"] = time.perf_counter() - clock
        vals = np.full((n, cap), -np.inf, np.float32)       # kept entries of each row, columns ascending
        cols = np.zeros((n, cap), np.int32)
        flat_vals, flat_cols = vals.reshape(-1), cols.reshape(-1)
        counts = np.zeros(n, np.int64)
        overflow = np.zeros(n, bool)

        def keep(at_rows, at_cols, values):
            # entries grouped by row, columns ascending within a row and above all earlier ones
            if len(at_rows) == 0:
                return
            first = np.flatnonzero(np.concatenate([[True], at_rows[1:] != at_rows[:-1]]))
            run = np.diff(np.append(first, len(at_rows)))
            rows_hit = at_rows[first]
            # flat position row * cap + slot, slot counting on from the row's earlier entries
            at = np.arange(len(at_rows)) + np.repeat(rows_hit * cap + counts[rows_hit] - first, run)
            counts[rows_hit] += run
            full = rows_hit[counts[rows_hit] > cap]
            if len(full):
                overflow[full] = True
                theta[full] = np.inf                          # nothing more for these rows
                ok = at < (at_rows + 1) * cap
                at, values, at_cols = at[ok], values[ok], at_cols[ok]
            flat_vals[at] = values
            flat_cols[at] = at_cols

        def extract(t, r0, r1, c0, c1, a0, a1):
            # rows a0:a1 of the tile t (rows r0:r1, columns c0:c1): their entries, row-major, and
            # the transposed entries of the columns beyond r1 (for the rows c0 + off:c1, grouped by
            # row, and within a row by column: a0 + r0 ... a1 + r0).  One pass over the tile at the
            # lowest threshold involved, then each survivor is tested against its own thresholds.
            if a1 <= a0:
                return None, None
            part = t[a0:a1]
            width = c1 - c0
            off = max(0, r1 - c0)                     # the columns beyond the tile's own rows
            row_theta = theta[r0 + a0:r0 + a1]
            col_theta = theta[c0 + off:c1]
            low = min(row_theta.min(), col_theta.min() if len(col_theta) else np.inf)
            f = np.flatnonzero(part >= low)
            a, b = np.divmod(f, width)
            v = part.reshape(-1)[f]
            take = v >= row_theta[a]
            mine = (a[take] + (r0 + a0), b[take] + c0, v[take])
            if off >= width:
                return mine, None
            # each column's own threshold; +inf for the columns that are the tile's own rows
            take = v >= np.concatenate([np.full(off, np.inf, np.float32), col_theta])[b]
            a, b, v = a[take], b[take], v[take]
            # grouped by column, rows ascending within one (a ascends already: a stable sort keeps it);
            # a 16-bit key takes numpy's radix sort, ~10x faster than sorting int64 keys
            order = np.argsort(b.astype(np.uint16) if width <= 1 << 16 else b, kind="stable")
            return mine, (b[order] + c0, a[order] + (r0 + a0), v[order])

        tile_rows, tile_cols = self._tile_shape()
        buf = np.empty(tile_rows * tile_cols, np.float32)
        # a second thread extracts the entries of half of each tile's rows while this one does the
        # other half, and finishes half of the rows (numpy releases the GIL in the passes over arrays)
        helper = ThreadPoolExecutor(1) if SCAN_THREADS > 1 else None
        try:
            for r0 in range(0, n, tile_rows):
                r1 = min(n, r0 + tile_rows)
                y_b = y[r0:r1]
                for c0 in range(r0, n, tile_cols):
                    c1 = min(n, c0 + tile_cols)
                    clock = time.perf_counter()
                    t = self._cosines(y_b, y[c0:c1], buf[:(r1 - r0) * (c1 - c0)].reshape(r1 - r0, c1 - c0))
                    seconds["gemm"] += time.perf_counter() - clock
                    clock = time.perf_counter()
                    if c0 == r0:                                                  # not the row itself
                        d = np.arange(min(r1, c1) - r0)
                        t[d, d] = -np.inf
                    half = (r1 - r0) // 2 if helper else r1 - r0               # the helper's rows: half:
                    theirs = helper.submit(extract, t, r0, r1, c0, c1, half, r1 - r0) if helper else None
                    rows_top, cols_top = extract(t, r0, r1, c0, c1, 0, half)
                    rows_bottom, cols_bottom = theirs.result() if theirs else (None, None)
                    for entries in (rows_top, rows_bottom, cols_top, cols_bottom):   # per row: columns ascending
                        if entries is not None:
                            keep(*entries)
                    seconds["extract"] += time.perf_counter() - clock
            del buf
            clock = time.perf_counter()

            def finish(block):
                # rows in any order -> (pairs scored, rows to scan again)
                cnt = counts[block]
                width = int(cnt.max())
                if width < c:
                    return 0, block
                v = vals[block, :width]
                low = self._narrow(v)        # the C-th best kept value - margin, rounded down
                # certified: the C-th best - margin >= theta, so no column within margin of it was missed
                certified = (cnt >= c) & (low >= theta[block])
                again = block[~certified]
                block, v, low = block[certified], v[certified], low[certified]
                if len(block) == 0:
                    return 0, again
                r, slot = np.nonzero(v >= low[:, None])
                return self._store_candidates(block, r, cols[block[r], slot].astype(np.int64), v[r, slot]), again

            done = rows[~overflow[rows]]
            done = done[np.argsort(counts[done], kind="stable")]          # similar widths together
            step = max(256, min(FINISH_ROWS, -(-len(done) // SCAN_THREADS)))
            chunks = [done[s:s + step] for s in range(0, len(done), step)]
            self._row_labels()                                # computed once, before the threads read it
            theirs = [helper.submit(finish, ch) for ch in chunks[1::2]] if helper else []
            results = [finish(ch) for ch in (chunks[0::2] if helper else chunks)] + [f.result() for f in theirs]
        finally:
            if helper:
                helper.shutdown()
        pairs = sum(p for p, _ in results)
        redo = [rows[overflow[rows]]] + [again for _, again in results]
        redo = np.sort(np.concatenate(redo))
        seconds["finish"] = time.perf_counter() - clock
        clock = time.perf_counter()
        pairs += self._scan_rows(redo) if len(redo) else 0
        seconds["fallback"] = time.perf_counter() - clock
        self.last_scan = ScanStats(rows=len(rows), fallback_rows=len(redo), overflow_rows=int(overflow.sum()),
                                   kept_entries=int(counts.sum()), seconds=seconds)
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
            cos = self._cosines(self._y32[block], y_new)
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
