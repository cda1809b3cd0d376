"""Exact on every machine: the neighbour lists do not depend on the CPU, the BLAS or the call shape.

The CI machine is one CPU among many, so these tests do not wait for a BLAS to misbehave: they
compute the fast keys through deliberately different summation orders and positions (columns
permuted and un-permuted, D reversed, a plain float64 loop, float64 noise up to the error bound,
MKL's AVX2 code path in a subprocess) and require the same lists, equal to brute-force oracles.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import export.reference.reciprocal_neighbors as rn
from export.contract import neighbor_key as nk
from export.reference.testing import clustered_features
from neighbor_oracle import canonical_lists, fsum_lists
import runtime.neighbors as neighbors_module
from runtime.neighbors import KEY_VERSION, NeighborIndex
from runtime.neighbors import reciprocal_neighbors as numpy_neighbors

ROOT = Path(__file__).resolve().parents[3]


def hard_set(n: int, dim: int = 256, seed: int = 0, dtype=np.float32) -> np.ndarray:
    """Clustered rows with exact duplicates at scattered positions (a group larger than k among
    them), near-duplicates (1e-6 apart), a zero row and a duplicate of the zero row."""
    rng = np.random.default_rng(seed + 1000)
    x = clustered_features(n, dim=dim, seed=seed)
    if n < 4:
        return x.astype(dtype)
    groups = max(1, n // 12)
    for g in range(groups):               # copies of row g at random later positions
        where = rng.choice(np.arange(g + 1, n), size=min(n - g - 1, int(rng.integers(1, 4))), replace=False)
        x[where] = x[g]
    if n > 60:                            # one group larger than k, scattered
        where = rng.choice(np.arange(1, n), size=min(n - 1, 25), replace=False)
        x[where] = x[0]
    near = rng.choice(n, size=max(1, n // 20), replace=False)
    donors = rng.choice(n, size=len(near))
    x[near] = x[donors]
    x[near, rng.integers(0, dim, len(near))] += np.float32(1e-6)
    if n > 8:
        x[n // 2] = 0.0
        x[n // 3] = 0.0
    return x.astype(dtype)


def reference_lists(x: np.ndarray, k: int = 20, **kw) -> tuple[np.ndarray, np.ndarray]:
    idx, valid = rn.reciprocal_neighbors(torch.from_numpy(np.asarray(x))[None], k, **kw)
    return idx[0].numpy().astype(np.int32), valid[0].numpy().astype(np.int32)


def assert_lists_equal(got, expected, what=""):
    idx, valid = got
    e_idx, e_valid = expected
    assert idx.shape == e_idx.shape, what
    bad = np.flatnonzero((idx != e_idx).any(axis=1))
    assert len(bad) == 0, f"{what}: {len(bad)} rows differ, first row {bad[0]}: {idx[bad[0]]} vs {e_idx[bad[0]]}"
    assert np.array_equal(valid, e_valid), what


# ---- the key itself ----

@pytest.mark.parametrize("dim", [1, 2, 3, 100, 128, 256, 257])
def test_canonical_dot_equals_the_correctly_rounded_dot(dim):
    rng = np.random.default_rng(dim)
    a = rng.standard_normal((400, dim)).astype(np.float32)
    b = rng.standard_normal((400, dim)).astype(np.float32)
    a[200:] *= (10.0 ** rng.uniform(-30, 30, (200, 1))).astype(np.float32)    # any row scale
    b[300:, : dim // 2] = a[300:, dim - dim // 2:]                            # some cancellation
    b[300:, dim - dim // 2:] = -a[300:, : dim // 2] * np.float32(0.999)
    got = nk.exact_dots(a, b)
    expected = np.array([math.fsum(r) for r in a.astype(np.float64) * b.astype(np.float64)])
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("dim", [2, 100, 256])
def test_canonical_dot_under_extreme_cancellation_is_within_its_stated_bound(dim):
    """Element magnitudes spanning 80 orders that cancel exactly: more than double-double can
    hold, so the value may differ from fsum, by at most log2(Dp) 2^-104 sum|p| -- and it is still
    one value: the torch and numpy trees agree bitwise."""
    rng = np.random.default_rng(dim)
    a = np.abs(rng.standard_normal((200, dim))).astype(np.float32)
    a *= (np.float32(1e20) ** rng.uniform(-1, 1, (200, dim))).astype(np.float32)
    b = np.empty_like(a)
    b[:, : dim // 2] = a[:, dim - dim // 2:]
    b[:, dim - dim // 2:] = -a[:, : dim // 2]
    p = a.astype(np.float64) * b.astype(np.float64)
    got = nk.exact_dots(a, b)
    expected = np.array([math.fsum(r) for r in p])
    bound = math.log2(nk.padded_dim(dim)) * 2.0 ** -104 * np.abs(p).sum(axis=1)
    assert (np.abs(got - expected) <= bound).all()
    torch_got = rn.canonical_dots(rn.padded64(torch.from_numpy(a)), rn.padded64(torch.from_numpy(b))).numpy()
    assert np.array_equal(torch_got, got)


def test_the_references_dots_are_the_contracts_bitwise():
    rng = np.random.default_rng(3)
    a = (rng.standard_normal((300, 200)) * 10.0 ** rng.uniform(-8, 8, (300, 1))).astype(np.float32)
    b = rng.standard_normal((300, 200)).astype(np.float32)
    got = rn.canonical_dots(rn.padded64(torch.from_numpy(a)), rn.padded64(torch.from_numpy(b))).numpy()
    assert np.array_equal(got, nk.exact_dots(a, b))


def test_torch_and_numpy_norms_are_bitwise_equal():
    """torch's vectorised float64 sqrt is not correctly rounded on a CPU: the reference must not use it."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 256)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    got = rn.canonical_lengths(rn.padded64(torch.from_numpy(x))).numpy()
    assert np.array_equal(got, nk.row_lengths(x))
    assert np.array_equal(got, [math.sqrt(math.fsum(r * r)) for r in x.astype(np.float64)])


def test_duplicates_have_one_key_wherever_they_sit():
    x = hard_set(300, seed=4)
    dup_of_0 = np.flatnonzero((x == x[0]).all(axis=1))
    assert len(dup_of_0) > 20
    other = int(np.setdiff1d(np.arange(300), dup_of_0)[5])
    keys = nk.exact_keys(x, np.full(len(dup_of_0), other), dup_of_0)
    assert len(set(keys.tolist())) == 1


def test_error_bound_covers_every_summation_order():
    rng = np.random.default_rng(5)
    x = hard_set(200, seed=5)
    nrm = nk.norms(x)
    delta = nk.key_error_bound(x.shape[1], nk.row_lengths(x))
    rows, cols = np.divmod(np.arange(200 * 200), 200)
    exact = nk.exact_keys(x, rows, cols, nrm).reshape(200, 200)
    x64 = x.astype(np.float64)
    for fast in (x64 @ x64.T,                                   # BLAS
                 (x64[:, ::-1] @ x64[:, ::-1].T),               # D reversed
                 np.cumsum(x64[:, None, :] * x64[None], axis=-1)[..., -1]):   # sequential
        f = fast / nrm[None]
        off = ~np.eye(200, dtype=bool)
        assert (np.abs(f - exact)[off] <= np.broadcast_to(delta[:, None], f.shape)[off]).all()
    assert delta[np.flatnonzero(~x.any(axis=1))].max() == 0.0   # zero rows: exact


# ---- every implementation equals the oracles ----

@pytest.mark.parametrize("n,dim,k", [(1, 256, 20), (2, 256, 20), (7, 256, 20), (21, 256, 20),
                                     (64, 256, 20), (150, 100, 5), (200, 3, 20), (120, 256, 64)])
def test_reference_and_numpy_equal_the_fsum_oracle(n, dim, k):
    x = hard_set(n, dim=dim, seed=n + dim)
    oracle = fsum_lists(x, k)
    assert_lists_equal(canonical_lists(x, k), oracle, "canonical oracle")
    assert_lists_equal(reference_lists(x, k), oracle, "torch reference")
    assert_lists_equal(numpy_neighbors(x, k), oracle, "numpy form")


@pytest.mark.parametrize("n", [300, 1500])
def test_reference_and_numpy_equal_the_canonical_oracle(n):
    x = hard_set(n, seed=n)
    oracle = canonical_lists(x, 20)
    assert_lists_equal(reference_lists(x), oracle, "torch reference")
    assert_lists_equal(numpy_neighbors(x, 20), oracle, "numpy form")


def test_float16_rows_rank_as_their_float32_values():
    x16 = hard_set(200, seed=8, dtype=np.float16)
    oracle = canonical_lists(x16.astype(np.float32), 20)
    assert_lists_equal(reference_lists(x16), oracle, "torch reference, fp16 input")
    assert_lists_equal(numpy_neighbors(x16, 20), oracle, "numpy form, fp16 input")


def test_batches_are_independent_sets():
    a, b = hard_set(90, seed=1), hard_set(90, seed=2)
    idx, valid = rn.reciprocal_neighbors(torch.from_numpy(np.stack([a, b])), 20)
    for i, x in enumerate((a, b)):
        assert_lists_equal((idx[i].numpy().astype(np.int32), valid[i].numpy().astype(np.int32)),
                           canonical_lists(x, 20), f"batch {i}")


# ---- perturbed summation orders and positions ----

def _perturbed_matmuls():
    real = torch.matmul

    def permuted_columns(a, b):
        perm = torch.randperm(b.shape[-1], generator=torch.Generator().manual_seed(1))
        out = real(a, b[..., perm])
        return out[..., torch.argsort(perm)]

    def reversed_d(a, b):
        return real(a.flip(-1), b.flip(-2))

    def plain_loop(a, b):       # a second "BLAS": one product at a time, in order
        out = torch.zeros(*a.shape[:-1], b.shape[-1], dtype=a.dtype)
        for d in range(a.shape[-1]):
            out += a[..., d:d + 1] * b[..., d:d + 1, :]
        return out

    def noisy(a, b):            # any value within the summation error bound
        gen = torch.Generator().manual_seed(2)
        d = a.shape[-1]
        scale = a.norm(dim=-1, keepdim=True) * b.norm(dim=-2, keepdim=True)
        u = 2.0 ** -53
        return real(a, b) + (torch.rand(scale.shape, generator=gen, dtype=a.dtype) * 1.8 - 0.9) * d * u * scale

    return {"permuted_columns": permuted_columns, "reversed_d": reversed_d,
            "plain_loop": plain_loop, "noisy": noisy}


@pytest.mark.parametrize("how", ["permuted_columns", "reversed_d", "plain_loop", "noisy"])
def test_reference_does_not_depend_on_the_gemm(how, monkeypatch):
    x = hard_set(240, seed=11)
    oracle = canonical_lists(x, 20)
    monkeypatch.setattr(torch, "matmul", _perturbed_matmuls()[how])
    assert_lists_equal(reference_lists(x), oracle, f"reference with a {how} GEMM")


@pytest.mark.parametrize("block_elements,extra", [(1, 0), (5000, 0), (5000, 3), (1 << 25, 64)])
def test_reference_does_not_depend_on_blocks_or_spare_candidates(block_elements, extra):
    x = hard_set(400, seed=12)
    assert_lists_equal(reference_lists(x, block_elements=block_elements, extra=extra),
                       canonical_lists(x, 20), f"block_elements={block_elements}, extra={extra}")


def test_rows_permuted_give_the_permuted_lists():
    """Position must not matter: the same rows in other orders (duplicates elsewhere in the GEMM)
    give each order's oracle lists."""
    x = hard_set(300, seed=13)
    for seed in range(3):
        perm = np.random.default_rng(seed).permutation(300)
        assert_lists_equal(reference_lists(x[perm]), canonical_lists(x[perm], 20), f"permutation {seed}")
        assert_lists_equal(numpy_neighbors(x[perm], 20), canonical_lists(x[perm], 20), f"permutation {seed}")


@functools.lru_cache(maxsize=1)
def _blas_sets():
    """Sets on which the float64-GEMM reference of dfa3657 gave other lists under MKL's AVX2 path
    or with one thread, and their oracle lists (computed once)."""
    sets = [hard_set(200, seed=3), hard_set(1500, seed=1),
            clustered_features(1500, seed=0, duplicates=150), clustered_features(1500, seed=2, duplicates=150)]
    return sets, [canonical_lists(x, 20)[0] for x in sets]


@pytest.mark.parametrize("env", [{"MKL_ENABLE_INSTRUCTIONS": "AVX2"}, {"MKL_CBWR": "COMPATIBLE"},
                                 {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}, {"OMP_NUM_THREADS": "1"}])
def test_reference_is_the_same_under_other_blas_code_paths(env, tmp_path):
    """MKL's AVX2 path on an Intel CPU gave the AMD EPYC failure of the exactness issue: keys of
    duplicate columns that differ in the last bit with the column's position."""
    sets, oracles = _blas_sets()
    np.save(tmp_path / "sets.npy", np.stack(sets[1:]))
    np.save(tmp_path / "small.npy", sets[0])
    script = (
        "import json, numpy as np, torch\n"
        "import export.reference.reciprocal_neighbors as rn\n"
        f"sets = [np.load({str(tmp_path / 'small.npy')!r}), *np.load({str(tmp_path / 'sets.npy')!r})]\n"
        "out = [rn.reciprocal_neighbors(torch.from_numpy(x)[None], 20)[0][0].tolist() for x in sets]\n"
        "print(json.dumps(out))\n")
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=300)
    assert run.returncode == 0, run.stderr
    for lists, oracle in zip(json.loads(run.stdout), oracles):
        assert np.array_equal(np.array(lists, dtype=np.int32), oracle), env


def _perturbed_fast_keys(how, seed):
    """``NeighborIndex._fast_keys`` evaluated otherwise: summed in reversed order ("reversed"), or
    moved by noise up to 0.95 of the stated bound ``delta`` ("noise")."""
    real = NeighborIndex._fast_keys
    rng = np.random.default_rng(seed)

    def perturbed(self, rows, cols):
        if how == "reversed":
            a = self._x[rows, :self.dim][:, ::-1].astype(np.float64)
            b = self._x[cols, :self.dim][:, ::-1].astype(np.float64)
            return np.einsum("ij,ij->i", a, b) / self._scale[cols]
        keys = real(self, rows, cols)
        return keys + rng.uniform(-0.95, 0.95, len(keys)) * self._delta[rows]

    return perturbed


@pytest.mark.parametrize("how", ["noise", "reversed"])
def test_numpy_form_does_not_depend_on_its_float64_scores(how, monkeypatch):
    """Any float64 score within the bound must give the same lists: near-ties and duplicates are
    decided by the canonical key."""
    x = hard_set(400, seed=14)
    oracle = canonical_lists(x, 20)
    monkeypatch.setattr(NeighborIndex, "_fast_keys", _perturbed_fast_keys(how, seed=0))
    assert_lists_equal(numpy_neighbors(x, 20), oracle, f"numpy form with {how} scores")
    index = NeighborIndex(20, reserve=3, block_elements=1 << 12)
    for part in np.array_split(x, 7):
        index.add(part)
    assert_lists_equal(index.neighbors(), oracle, f"incremental numpy form with {how} scores")


def test_incremental_lists_equal_a_one_shot_recompute_through_adds_and_removals():
    rng = np.random.default_rng(15)
    base = hard_set(500, seed=15)
    index = NeighborIndex(20, reserve=4)
    rows = np.zeros((0, base.shape[1]), np.float32)
    for step in range(8):
        m = int(rng.integers(1, 80))
        # later batches bring duplicates of rows that are already in the set, and of each other
        new = base[rng.integers(0, len(base), m)].copy()
        if len(rows):
            new[: m // 3] = rows[rng.integers(0, len(rows), m // 3)]
        index.add(new)
        rows = np.concatenate([rows, new])
        assert_lists_equal(index.neighbors(), canonical_lists(rows, 20), f"after add {step}")
        if step % 2 and len(rows) > 10:
            gone = rng.choice(len(rows), size=int(rng.integers(1, len(rows) // 3)), replace=False)
            index.remove(gone)
            rows = np.delete(rows, gone, axis=0)
            assert_lists_equal(index.neighbors(), canonical_lists(rows, 20), f"after removal {step}")


def test_saved_lists_of_the_old_key_are_recomputed():
    x = hard_set(200, seed=16)
    index = NeighborIndex(20)
    index.add(x)
    state = index.state()
    assert int(state["key_version"]) == KEY_VERSION
    old = {k: v for k, v in state.items() if k != "key_version"}
    old["cand_key"] = np.round(old["cand_key"], 3)        # whatever an older version stored
    loaded = NeighborIndex.from_state(x, old)
    assert_lists_equal(loaded.neighbors(), canonical_lists(x, 20), "lists of an older key version")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 40), dim=st.integers(1, 12), k=st.integers(1, 12), seed=st.integers(0, 2 ** 31 - 1),
       copies=st.integers(0, 12), small_values=st.booleans())
def test_any_small_set_gives_the_oracles_lists(n, dim, k, seed, copies, small_values):
    rng = np.random.default_rng(seed)
    # a few distinct values make exact and near ties common
    x = rng.integers(-2, 3, size=(n, dim)).astype(np.float32)
    if small_values:
        x *= np.float32(1e-30)
    for _ in range(copies):
        x[rng.integers(0, n)] = x[rng.integers(0, n)]
    oracle = fsum_lists(x, k)
    assert_lists_equal(reference_lists(x, k), oracle, "torch reference")
    assert_lists_equal(numpy_neighbors(x, k), oracle, "numpy form")


# ---- the numpy form's tiled, certified candidate pass (runtime.neighbors._scan_tiles / _scan_rows) ----

@contextlib.contextmanager
def tiled_pass(**constants):
    """Every scan takes the tiled pass whatever N (by default only sets of SPARSE_SCAN_MIN_ROWS rows
    do), with other module constants (pilot sample, row cap) set as given."""
    saved = {name: getattr(neighbors_module, name) for name in ("SPARSE_SCAN_MIN_ROWS", *constants)}
    try:
        neighbors_module.SPARSE_SCAN_MIN_ROWS = 0
        for name, value in constants.items():
            setattr(neighbors_module, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(neighbors_module, name, value)


@functools.lru_cache(maxsize=16)
def _hard_case(n: int, seed: int, k: int):
    """``hard_set(n, seed=seed)`` and its canonical lists (computed once per module run)."""
    x = hard_set(n, seed=seed)
    return x, canonical_lists(x, k)


def tiled_lists(x, k=20, reserve=0, block_elements=1 << 22, lists_only=False, **constants):
    """``lists_only``: as ``reciprocal_neighbors`` scores them (float64 keys only for candidates
    within the float32 margin of another)."""
    with tiled_pass(**constants):
        index = NeighborIndex(k, reserve=reserve, block_elements=block_elements)
        index._lists_only = lists_only
        index.add(x)
        return index.neighbors(), index.last_scan


@pytest.mark.parametrize("n,k,reserve,block_elements", [
    (30, 20, 0, 1 << 22), (64, 5, 3, 2000), (300, 20, 0, 5000), (300, 20, 16, 1 << 22),
    (777, 20, 16, 20000), (1500, 20, 0, 1 << 22), (1500, 64, 0, 50000)])
@pytest.mark.parametrize("lists_only", [False, True])
def test_tiled_pass_equals_the_canonical_oracle(n, k, reserve, block_elements, lists_only):
    """Tiles of many shapes (several row blocks and column chunks, partial last tiles), with exact
    duplicates at scattered positions (a group larger than k), near-duplicates and zero rows."""
    x, oracle = _hard_case(n, n + k, k)
    (idx, valid), stats = tiled_lists(x, k, reserve, block_elements, lists_only)
    assert stats.rows == n - int((~x.any(axis=1)).sum())          # zero rows are listed directly
    assert_lists_equal((idx, valid), oracle, f"tiled pass, n={n}, k={k}, reserve={reserve}")


@pytest.mark.parametrize("constants,what", [
    ({"PILOT_SIGMAS": -3.0}, "fallback"),        # thresholds too high: most rows fail the certificate
    ({"SCAN_ROW_CAP": 1}, "overflow"),           # every row keeps too many entries
    ({"PILOT_MIN_SAMPLE": 8, "PILOT_SAMPLE_FRACTION": 1000, "PILOT_GROUPS": 4}, "tiny sample"),
])
@pytest.mark.parametrize("lists_only", [False, True])
def test_rows_the_tiled_pass_cannot_certify_are_scanned_again(constants, what, lists_only):
    x, oracle = _hard_case(600, 21, 20)
    (idx, valid), stats = tiled_lists(x, 20, 16, 30000, lists_only, **constants)
    if what == "fallback":
        assert stats.fallback_rows > stats.rows // 2
    if what == "overflow":
        assert stats.overflow_rows > stats.rows // 2
    assert_lists_equal((idx, valid), oracle, what)


def test_sets_of_identical_rows_are_exact():
    """Every row a copy of one of two (more copies than a row may keep in the tiled pass): each list
    is the row's copies by position."""
    base = hard_set(2, seed=3)
    x = base[np.random.default_rng(0).integers(0, 2, 1000)]
    (idx, valid), stats = tiled_lists(x, 20, 16, 50000)
    assert stats.overflow_rows == 1000
    assert_lists_equal((idx, valid), canonical_lists(x, 20), "two distinct rows")


def _perturbed_cosines(how):
    def cosines(self, a, b, out=None):
        if how == "noise":     # any float32 evaluation within the dot-product error bound
            exact = a.astype(np.float64) @ b.astype(np.float64).T
            rng = np.random.default_rng(len(a) * 7919 + len(b))
            value = exact + rng.uniform(-0.95, 0.95, exact.shape) * (self.dim + 4) * 2.0 ** -24
        elif how == "reversed_d":
            value = a[:, ::-1] @ b[:, ::-1].T
        else:                  # columns permuted, then put back
            perm = np.random.default_rng(len(b)).permutation(len(b))
            value = np.empty((len(a), len(b)), np.float32)
            value[:, perm] = np.ascontiguousarray(a) @ np.ascontiguousarray(b[perm]).T
        if out is None:
            return value.astype(np.float32)
        out[...] = value
        return out

    return cosines


@pytest.mark.parametrize("how", ["noise", "reversed_d", "permuted_columns"])
@pytest.mark.parametrize("tiled", [False, True])
def test_numpy_form_does_not_depend_on_its_float32_pass(how, tiled, monkeypatch):
    """The float32 candidate pass (tiles, pilot thresholds, merges of added rows) evaluated in other
    orders or with errors up to its bound: the same lists."""
    x = hard_set(700, seed=22)
    oracle = canonical_lists(x, 20)
    monkeypatch.setattr(NeighborIndex, "_cosines", _perturbed_cosines(how))
    with tiled_pass() if tiled else contextlib.nullcontext():
        assert_lists_equal(numpy_neighbors(x, 20), oracle, f"one shot, {how}")
        index = NeighborIndex(20, reserve=3, block_elements=1 << 14)
        for part in np.array_split(x, 5):
            index.add(part)
        assert_lists_equal(index.neighbors(), oracle, f"incremental, {how}")


@pytest.mark.parametrize("how", ["noise", "reversed"])
def test_tiled_pass_does_not_depend_on_its_float64_scores(how, monkeypatch):
    x = hard_set(500, seed=23)
    monkeypatch.setattr(NeighborIndex, "_fast_keys", _perturbed_fast_keys(how, seed=1))
    oracle = canonical_lists(x, 20)
    for lists_only in (False, True):
        (idx, valid), _ = tiled_lists(x, 20, 16, 8000, lists_only)
        assert_lists_equal((idx, valid), oracle, f"tiled pass with {how} scores, lists_only={lists_only}")


def test_tiled_pass_through_adds_and_removals():
    """Removals rescan rows that lost candidates and adds scan the new rows (both ``_scan_rows``),
    with duplicates arriving in later batches."""
    rng = np.random.default_rng(24)
    base = hard_set(400, seed=24)
    rows = np.zeros((0, base.shape[1]), np.float32)
    with tiled_pass():
        index = NeighborIndex(20, reserve=2, block_elements=6000)
        for step in range(6):
            new = base[rng.integers(0, len(base), int(rng.integers(40, 160)))].copy()
            if len(rows):
                new[:10] = rows[rng.integers(0, len(rows), 10)]
            index.add(new)
            rows = np.concatenate([rows, new])
            assert_lists_equal(index.neighbors(), canonical_lists(rows, 20), f"after add {step}")
            gone = rng.choice(len(rows), size=int(rng.integers(1, len(rows) // 3)), replace=False)
            index.remove(gone)
            rows = np.delete(rows, gone, axis=0)
            assert_lists_equal(index.neighbors(), canonical_lists(rows, 20), f"after removal {step}")


@pytest.mark.parametrize("n", [2100, 9000])
def test_default_tiled_pass_at_larger_n(n):
    """The default path for N >= SPARSE_SCAN_MIN_ROWS, against the torch reference (itself equal
    to the oracles above): exact duplicates (N // 10, a group larger than k), near-duplicates and
    zero rows; one shot and as a gallery index (float64 keys kept)."""
    assert n >= neighbors_module.SPARSE_SCAN_MIN_ROWS
    x = hard_set(n, seed=n)
    x[-(n // 10):] = x[np.random.default_rng(n).integers(0, n - n // 10, n // 10)]
    expected = reference_lists(x)
    assert_lists_equal(numpy_neighbors(x, 20), expected, f"N={n}")
    index = NeighborIndex(20)
    index.add(x)
    assert_lists_equal(index.neighbors(), expected, f"N={n}, index")


_OPENBLAS_SCRIPT = """
import json, sys, numpy as np
import runtime.neighbors as rn
rn.SPARSE_SCAN_MIN_ROWS = 0
sets = np.load(sys.argv[1])
out = []
for x in sets:
    index = rn.NeighborIndex(20, reserve=0, block_elements=40000)
    index.add(x)
    out.append(index.neighbors()[0].tolist())
print(json.dumps(out))
"""


@pytest.mark.parametrize("env", [{"OPENBLAS_CORETYPE": "Haswell"}, {"OPENBLAS_CORETYPE": "Sandybridge"},
                                 {"OPENBLAS_NUM_THREADS": "1"}, {"OPENBLAS_CORETYPE": "Prescott"}])
def test_numpy_form_is_the_same_under_other_blas_kernels(env, tmp_path):
    """numpy's BLAS (the float64 scores' matrix-vector products) with another kernel (OpenBLAS's
    core types) or one thread: the scores change in the last bits, the lists do not.  (The float32
    pass runs in ONNX Runtime; its perturbations are the test above.  Where numpy uses another
    BLAS the variables are ignored and the test repeats the default path.)"""
    sets = np.stack([hard_set(500, seed=31), hard_set(500, seed=32)])
    np.save(tmp_path / "sets.npy", sets)
    run = subprocess.run([sys.executable, "-c", _OPENBLAS_SCRIPT, str(tmp_path / "sets.npy")], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, **env}, timeout=300)
    assert run.returncode == 0, run.stderr
    for lists, x in zip(json.loads(run.stdout), sets):
        assert np.array_equal(np.array(lists, dtype=np.int32), canonical_lists(x, 20)[0]), env


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 60), dim=st.integers(1, 12), k=st.integers(1, 12), seed=st.integers(0, 2 ** 31 - 1),
       copies=st.integers(0, 20), block_elements=st.sampled_from([64, 1000, 1 << 22]))
def test_any_small_set_gives_the_oracles_lists_through_the_tiled_pass(n, dim, k, seed, copies, block_elements):
    rng = np.random.default_rng(seed)
    x = rng.integers(-2, 3, size=(n, dim)).astype(np.float32)     # exact and near ties everywhere
    for _ in range(copies):
        x[rng.integers(0, n)] = x[rng.integers(0, n)]
    oracle = fsum_lists(x, k)
    for lists_only in (False, True):
        (idx, valid), _ = tiled_lists(x, k, 0, block_elements, lists_only)
        assert_lists_equal((idx, valid), oracle, f"tiled pass, lists_only={lists_only}")
