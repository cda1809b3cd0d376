"""runtime.neighbors against the one reference (export.reference.reciprocal_neighbors): one shot and incremental.

Index arrays are compared exactly (not only sets), on fresh clustered data with exact duplicates
(a group larger than k included), zero rows, rows of different norms, N = 1 and N < k.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from export.contract.errors import InputError
from export.reference.reciprocal_neighbors import reciprocal_neighbors as reference
from export.reference.testing import clustered_features
from runtime.neighbors import NORM_EPS, NeighborIndex, one_shot_index, reciprocal_neighbors


def expected(x: np.ndarray, k: int):
    idx, valid = reference(torch.from_numpy(np.ascontiguousarray(x, np.float32))[None], k)
    return idx[0].numpy().astype(np.int32), valid[0].numpy().astype(np.int32)


def assert_same(actual, x, k, what=""):
    idx, valid = expected(x, k)
    np.testing.assert_array_equal(actual[0], idx, err_msg=f"neighbour index differs {what}")
    np.testing.assert_array_equal(actual[1], valid, err_msg=f"validity differs {what}")


def awkward_rows(n: int, seed: int) -> np.ndarray:
    """Clustered rows with duplicate groups (one larger than k), a zero row and varied norms.

    The norm factor is a function of the row, so exact duplicates stay exact duplicates (rows that
    are only parallel tie in exact arithmetic but not in any float64 evaluation: no implementation
    can promise the reference's order for those)."""
    x = clustered_features(n, seed=seed, duplicates=max(1, n // 4), identities=max(2, n // 16))
    if n > 3:
        x[n // 3] = 0.0
        x = x * (0.5 + 2.5 * (np.abs(x[:, :1]) * 1000.0 % 1.0)).astype(np.float32)
    return x


@pytest.mark.parametrize("n", [1, 2, 5, 19, 20, 21, 64, 400])
@pytest.mark.parametrize("k", [20, 1, 3])
def test_one_shot_equals_reference(n, k):
    x = awkward_rows(n, seed=n + k)
    out = reciprocal_neighbors(x, k)
    assert out[0].dtype == np.int32 and out[1].dtype == np.int32
    assert out[0].shape == (n, min(n, k))
    assert_same(out, x, k, f"(n={n}, k={k})")


def test_small_blocks_give_the_same_lists():
    x = awkward_rows(300, seed=7)
    index = NeighborIndex(20, block_elements=2000)   # many tiny blocks
    index.add(x)
    assert_same(index.neighbors(), x, 20)


def test_duplicate_group_larger_than_k_across_chunks():
    """Exact duplicates added in different chunks (keys computed by different calls) tie exactly."""
    base = clustered_features(120, seed=3)
    x = np.concatenate([base, np.repeat(base[5:6], 30, axis=0), base[:10], np.repeat(base[5:6], 5, axis=0)])
    index = NeighborIndex(20, reserve=4)
    for chunk in np.array_split(x, 9):
        index.add(chunk)
    assert_same(index.neighbors(), x, 20)
    drop = np.arange(100, 140)          # part of the big group and some originals
    index.remove(drop)
    assert_same(index.neighbors(), np.delete(x, drop, axis=0), 20)


@pytest.mark.parametrize("seed,reserve,k", [(0, 16, 20), (1, 0, 20), (2, 3, 20), (3, 2, 5)])
def test_incremental_adds_and_removals_equal_one_shot(seed, reserve, k):
    rng = np.random.default_rng(seed)
    pool = awkward_rows(600, seed=100 + seed)
    index = NeighborIndex(k, reserve=reserve)
    current = np.zeros((0, pool.shape[1]), np.float32)
    used = 0
    for step in range(10):
        m = int(rng.integers(1, 70))
        rows = pool[used:used + m]
        if rng.random() < 0.3 and len(current):   # re-add exact copies of rows already present
            rows = np.concatenate([rows, current[rng.integers(0, len(current), size=3)]])
        used += m
        index.add(rows)
        current = np.concatenate([current, rows])
        assert_same(index.neighbors(), current, k, f"after add, step {step}")
        if len(current) > 2 and rng.random() < 0.6:
            drop = rng.choice(len(current), size=int(rng.integers(1, min(40, len(current) - 1))), replace=False)
            index.remove(drop)
            current = np.delete(current, drop, axis=0)
            assert_same(index.neighbors(), current, k, f"after remove, step {step}")


def test_grow_from_one_row_and_shrink_to_nothing():
    x = awkward_rows(30, seed=11)
    index = NeighborIndex(20)
    for i in range(25):                 # N = 1, N < k, N = k, N > k one row at a time
        index.add(x[i:i + 1])
        assert_same(index.neighbors(), x[:i + 1], 20, f"N={i + 1}")
    index.remove(np.arange(0, 24))
    assert_same(index.neighbors(), x[24:25], 20, "N=1 after removal")
    index.remove([0])
    idx, valid = index.neighbors()
    assert idx.shape == (0, 0) and valid.shape == (0, 0) and len(index) == 0
    index.add(x[:5])
    assert_same(index.neighbors(), x[:5], 20, "refilled")


def test_extended_restores_the_set_even_on_error():
    x = awkward_rows(200, seed=5)
    index = NeighborIndex(20)
    index.add(x[:150])
    before = index.state()
    with index.extended(x[150:]) as both:
        assert_same(both.neighbors(), x, 20, "while extended")
    after = index.state()
    for key in before:
        np.testing.assert_array_equal(after[key], before[key])
    with pytest.raises(RuntimeError, match="boom"):
        with index.extended(x[150:160]):
            raise RuntimeError("boom")
    assert_same(index.neighbors(), x[:150], 20, "after a failed extension")
    index.add(x[150:])                  # uids keep increasing correctly afterwards
    assert_same(index.neighbors(), x, 20, "after a real add")


def test_state_round_trip_and_damaged_state():
    x = awkward_rows(120, seed=9)
    index = NeighborIndex(20)
    index.add(x)
    index.remove([3, 50, 51])
    rows = index.rows()
    clone = NeighborIndex.from_state(rows, index.state())
    assert_same(clone.neighbors(), rows, 20, "restored")
    more = awkward_rows(40, seed=10)
    clone.add(more)
    assert_same(clone.neighbors(), np.concatenate([rows, more]), 20, "restored, then added")
    state = index.state()
    state["cand_uid"] = state["cand_uid"].copy()
    state["cand_uid"][0, 0] = 10 ** 9
    with pytest.raises(InputError, match="not in the saved set"):
        NeighborIndex.from_state(rows, state)
    with pytest.raises(InputError, match="do not match"):
        NeighborIndex.from_state(rows[:-1], index.state())
    # incomplete or mistyped states (was: KeyError, TypeError or a cast of text)
    good = index.state()
    for damaged, words in (({k: v for k, v in good.items() if k != "count"}, "incomplete"),
                           ([1, 2], "incomplete"),
                           ({**good, "k": np.array("20")}, "k is not an integer scalar"),
                           ({**good, "reserve": np.array([16, 16])}, "reserve is not an integer scalar"),
                           ({**good, "uid": good["uid"].astype(np.float64)}, "uid is not an integer"),
                           ({**good, "cand_key": good["cand_key"].astype(object)}, "cand_key is not a float"),
                           ({**good, "cand_uid": good["cand_uid"][0]}, "cand_uid is not an integer 2-D")):
        with pytest.raises(InputError, match=words):
            NeighborIndex.from_state(rows, damaged)


def test_bad_input_changes_nothing():
    x = awkward_rows(50, seed=12)
    index = NeighborIndex(20)
    index.add(x)
    before = index.neighbors()
    for bad, match in [(np.zeros((3, 7), np.float32), "256 wide"), (np.ones((2, 256), np.int64), "floating point"),
                       (np.full((1, 256), np.nan, np.float32), "NaN"), (np.zeros(256, np.float32), "2-D")]:
        with pytest.raises(InputError, match=match):
            index.add(bad)
    with pytest.raises(InputError, match="positions must be in 0..49"):
        index.remove([3, 50])
    after = index.neighbors()
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_array_equal(after[1], before[1])
    with pytest.raises(InputError, match="k"):
        NeighborIndex(0)


def test_removal_inside_a_temporary_extension_and_positions_that_are_no_integers_are_refused():
    """``remove`` inside ``with extended(...)`` left the index corrupted after the block (the exit
    restores lists saved for other rows); a boolean mask or floats removed other rows."""
    from export.contract.errors import InputError

    x = np.random.default_rng(3).standard_normal((12, 8)).astype(np.float32)
    index = NeighborIndex(4, reserve=2)
    index.add(x[:8])
    before = index.neighbors()
    with pytest.raises(InputError, match="temporarily extended"):
        with index.extended(x[8:]) as both:
            both.remove([0])
    after = index.neighbors()
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_array_equal(index.rows(), x[:8])
    for positions in (np.array([True, False]), [1.7], np.array([0.0])):
        with pytest.raises(InputError, match="must be integers"):
            index.remove(positions)
    assert len(index) == 8
    index.remove([])                                   # nothing to remove is fine
    index.remove(np.array([1], np.int32))
    assert len(index) == 7


def test_saved_lists_with_bad_keys_or_repeated_rows_are_refused():
    from export.contract.errors import InputError

    x = np.random.default_rng(4).standard_normal((10, 8)).astype(np.float32)
    index = NeighborIndex(4, reserve=2)
    index.add(x)
    state = index.state()
    NeighborIndex.from_state(x, state)                 # as saved: fine
    for damage in ("nan", "inf", "twice", "self"):
        s = {k: np.array(v, copy=True) for k, v in state.items()}
        if damage == "nan":
            s["cand_key"][0, 0] = np.nan
        elif damage == "inf":
            s["cand_key"][1, 0] = np.inf
        elif damage == "twice":
            s["cand_uid"][3, 1] = s["cand_uid"][3, 0]
        else:
            s["cand_uid"][4, 0] = s["uid"][4]
        with pytest.raises(InputError, match="damaged"):
            NeighborIndex.from_state(x, s)


def test_saved_lists_that_are_not_these_rows_lists_are_refused():
    """A list whose neighbours were shuffled or swapped (keys left in place, as an edit that re-signs
    the file's checksum leaves them) is refused: each key is checked against its pair, and the order."""
    from export.contract.errors import InputError

    x = awkward_rows(200, seed=21)
    index = NeighborIndex(20)
    index.add(x)
    index.remove([5, 6])
    rows, state = index.rows(), index.state()
    NeighborIndex.from_state(rows, state)                    # as saved: fine
    for damage, match in (("shuffle", "not the key of that pair"), ("swap_rows", "not the key of that pair"),
                          ("reorder", "order"), ("gap", "gaps")):
        s = {k: np.array(v, copy=True) for k, v in state.items()}
        if damage == "shuffle":                               # one row's neighbours permuted, keys kept
            s["cand_uid"][7, :10] = s["cand_uid"][7, :10][::-1]
        elif damage == "swap_rows":                           # two rows' lists exchanged (keys follow the uids)
            a, b = next((a, b) for a in range(len(rows)) for b in range(a + 1, len(rows))
                        if s["uid"][a] not in s["cand_uid"][b] and s["uid"][b] not in s["cand_uid"][a]
                        and s["count"][a] == s["count"][b])
            for name in ("cand_uid", "cand_key"):
                s[name][[a, b]] = s[name][[b, a]]
        elif damage == "reorder":                             # pairs and keys together, out of order
            for name in ("cand_uid", "cand_key"):
                s[name][9, [0, 5]] = s[name][9, [5, 0]]
        else:                                                 # an entry removed from the middle of a list
            s["cand_uid"][3, 2], s["cand_key"][3, 2] = -1, -np.inf
            s["count"][3] -= 1
        with pytest.raises(InputError, match=match):
            NeighborIndex.from_state(rows, s)
    one_shot = one_shot_index(x, 20)
    with pytest.raises(InputError, match="cannot be saved"):
        one_shot.state()



def test_lists_saved_where_float64_sums_round_one_way_load_where_they_round_the_other(monkeypatch):
    """The load check compares each saved key with the pair's key recomputed here, within 2 delta: a
    BLAS on another CPU sums in another order, and every order lies within delta of the canonical key.
    Saved with every float64 score pushed +0.99 delta and loaded with -0.99 delta (the far ends of
    what any summation order gives), the lists load and are the reference's."""
    x = awkward_rows(160, seed=31)
    real = NeighborIndex._fast_keys

    def pushed(sign):
        def fast_keys(self, rows, cols):
            return real(self, rows, cols) + sign * 0.99 * self._delta[np.asarray(rows, np.int64)]
        return fast_keys

    monkeypatch.setattr(NeighborIndex, "_fast_keys", pushed(+1))
    index = NeighborIndex(20)
    index.add(x[:120])
    index.add(x[120:])
    index.remove([7, 8])
    rows, state = index.rows(), index.state()
    monkeypatch.setattr(NeighborIndex, "_fast_keys", pushed(-1))
    loaded = NeighborIndex.from_state(rows, state)
    assert_same(loaded.neighbors(), rows, 20, "saved +delta, loaded -delta")
