"""The ONNX function body of ``nformer::ReciprocalNeighbors`` gives the canonical lists exactly.

The body (``export.onnx_functions``) runs in ONNX Runtime and is compared with the brute-force
oracles of ``tests/neighbor_oracle.py``: every pair's canonical key (``canonical_lists``) and,
for small sets, ``math.fsum`` keys (``fsum_lists``).  The sets are made to hit the paths that a
fast float64 key cannot decide alone: exact duplicates at scattered positions (a group larger than
the candidate count), rows whose components are permutations of each other (equal exact dots
summed in other orders), near-duplicates, zero rows.  The lists must not depend on the row order
(up to the lower-index tie rule) nor on the block sizes.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx.inliner
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from export.contract.neighbor_key import exact_keys, norms
from export.onnx_functions import EXTRA, OPSET, OUTPUTS, reciprocal_neighbors_function
from export.reference.reciprocal_neighbors import OP_DOMAIN, OP_TYPE
from export.reference.testing import clustered_features
from neighbor_oracle import canonical_lists, fsum_lists

_SESSIONS: dict = {}
_ORACLE: dict = {}


def oracle(x: np.ndarray, k: int):
    """canonical_lists, remembered (N = 1500 takes ~25 s on the 2-core CI machine)."""
    key = (x.dtype.str, x.shape, x.tobytes(), k)
    if key not in _ORACLE:
        _ORACLE[key] = canonical_lists(x, k)
    return _ORACLE[key]


def big_set() -> np.ndarray:
    """N = 1500: clustered rows with 150 duplicates, 50 scattered copies of row 0 and the rest."""
    return hard_set(1500, 256, seed=1500, big_group=50, duplicates=150)


def _model(k: int, dtype: int, block_elements: int | None) -> onnx.ModelProto:
    node = helper.make_node(OP_TYPE, ["features"], OUTPUTS, domain=OP_DOMAIN, k=k, plugin_version="1",
                            plugin_namespace="")
    graph = helper.make_graph(
        [node], "reciprocal_neighbors", [helper.make_tensor_value_info("features", dtype, ["B", "N", "D"])],
        [helper.make_tensor_value_info(o, TensorProto.INT32, ["B", "N", None]) for o in OUTPUTS])
    function = reciprocal_neighbors_function(*([block_elements] if block_elements else []))
    model = helper.make_model(graph, functions=[function], ir_version=10,
                              opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(OP_DOMAIN, 1)])
    onnx.checker.check_model(model, full_check=True)
    return model


def session(k: int = 20, dtype: int = TensorProto.FLOAT, block_elements: int | None = None,
            count_redone: bool = False) -> ort.InferenceSession:
    """A session of one node; with ``count_redone`` the function is inlined and the number of rows
    that the certificate sent to the one-row fallback is a third output."""
    key = (k, dtype, block_elements, count_redone)
    if key not in _SESSIONS:
        model = _model(k, dtype, block_elements)
        if count_redone:
            model = onnx.inliner.inline_local_functions(model)
            names = [o for nd in model.graph.node for o in nd.output if o.startswith("fail_count__")]
            assert len(names) == 1, names
            model.graph.output.append(helper.make_tensor_value_info(names[0], TensorProto.INT64, []))
        _SESSIONS[key] = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return _SESSIONS[key]


def run(x: np.ndarray, k: int, **kw):
    """Lists of one set [N, D] (or a batch [B, N, D]): int32 (idx, valid), leading axis kept."""
    dtype = TensorProto.FLOAT16 if x.dtype == np.float16 else TensorProto.FLOAT
    batch = x if x.ndim == 3 else x[None]
    out = session(k, dtype, **kw).run(None, {"features": batch})
    assert out[0].dtype == np.int32 and out[1].dtype == np.int32
    if x.ndim == 2:
        out = [o[0] if o.ndim else o for o in out]
    return out


def assert_lists_equal(got, expected, what=""):
    idx, valid = got[0], got[1]
    e_idx, e_valid = expected
    assert idx.shape == e_idx.shape, f"{what}: shape {idx.shape} vs {e_idx.shape}"
    bad = np.flatnonzero((idx != e_idx).reshape(len(idx), -1).any(axis=1))
    assert len(bad) == 0, f"{what}: {len(bad)} rows differ, first {bad[0]}: {idx[bad[0]]} vs {e_idx[bad[0]]}"
    np.testing.assert_array_equal(valid, e_valid, err_msg=what)


def redone_rows(x: np.ndarray, k: int) -> int:
    return int(run(x, k, count_redone=True)[2])


def hard_set(n: int, dim: int = 256, seed: int = 0, big_group: int = 0, duplicates: int = 0) -> np.ndarray:
    """Clustered rows (``export.reference.testing.clustered_features`` with its ``duplicates``) plus: copies
    of rows at random positions (``big_group`` copies of row 0), near-duplicates (1e-6 apart in a
    few components), rows whose components are permuted where another row's are equal (the same
    exact dot summed in another order), zero rows."""
    rng = np.random.default_rng(seed + 7)
    x = clustered_features(n, dim, seed=seed, duplicates=duplicates)
    if n < 6:
        return x
    for g in range(1, max(2, n // 15)):                 # small groups of copies, scattered
        where = rng.choice(n, size=int(rng.integers(1, 4)), replace=False)
        x[where[where != g]] = x[g]
    if big_group:
        where = rng.choice(np.arange(1, n), size=min(big_group, n - 1), replace=False)
        x[where] = x[0]
    near = rng.choice(n, size=max(1, n // 25), replace=False)
    for i in near:                                      # near-duplicates of random rows
        x[i] = x[rng.integers(n)]
        x[i, rng.choice(dim, size=min(dim, 3), replace=False)] += np.float32(1e-6)
    if dim >= 4 and n >= 12:                            # permuted components, equal exact dots
        probe = int(rng.integers(n))
        x[probe, : dim // 2] = x[probe, 0]
        for j in rng.choice(n, size=min(6, n // 2), replace=False):
            if j == probe:
                continue
            x[j] = x[int(rng.integers(n))]
            x[j, : dim // 2] = rng.permutation(x[j, : dim // 2])
    x[n // 2] = 0.0
    x[n // 3] = 0.0
    return x


# ---- equal to the oracles ----

@pytest.mark.parametrize("n,dim,k", [
    (1, 256, 20), (2, 3, 5), (2, 256, 1), (7, 100, 20), (20, 256, 20), (21, 256, 20),
    (64, 1, 5), (64, 3, 20), (64, 100, 64), (150, 256, 1), (200, 256, 20), (200, 3, 5),
])
def test_equals_both_oracles(n, dim, k):
    x = hard_set(n, dim, seed=n + dim + k, big_group=n // 4)
    expected = canonical_lists(x, k)
    assert_lists_equal(run(x, k), expected, "canonical")
    assert_lists_equal(expected, fsum_lists(x, k), "the two oracles")


@pytest.mark.parametrize("n,dim,k,big_group", [(300, 256, 20, 60), (300, 100, 64, 90), (300, 3, 5, 0)])
def test_equals_canonical_oracle(n, dim, k, big_group):
    x = hard_set(n, dim, seed=n + k, big_group=big_group, duplicates=n // 10)
    assert_lists_equal(run(x, k), canonical_lists(x, k))


def test_equals_canonical_oracle_at_1500():
    x = big_set()
    assert redone_rows(x, 20) > 0          # the fallback is part of what is compared
    assert_lists_equal(run(x, 20), oracle(x, 20))


def test_clustered_set():
    x = clustered_features(300, seed=3, duplicates=30)
    for k in (1, 5, 20, 64):
        assert_lists_equal(run(x, k), canonical_lists(x, k), f"k={k}")


def test_a_duplicate_group_larger_than_the_candidates_takes_the_fallback():
    """Copies of row 0 at scattered positions, more than k + EXTRA of them: a member's candidates
    are all copies, so the fast pass cannot certify it; the one-row fallback must give the lowest
    indices of the group."""
    k = 20
    x = hard_set(200, 256, seed=3, big_group=k + EXTRA + 20)
    group = np.flatnonzero((x == x[0]).all(axis=1))
    assert len(group) > k + EXTRA
    assert redone_rows(x, k) >= len(group)
    idx, valid = run(x, k)
    assert_lists_equal((idx, valid), canonical_lists(x, k))
    for i in group:
        assert idx[i, 0] == i
        assert idx[i, 1:].tolist() == [j for j in group if j != i][: k - 1]


def test_all_rows_equal_and_all_rows_zero():
    for x in (np.tile(clustered_features(1, 64, seed=1), (50, 1)), np.zeros((50, 64), np.float32)):
        for k in (1, 5, 50):
            idx, valid = run(x, k)
            expected = canonical_lists(x, k)
            assert_lists_equal((idx, valid), expected)
            others = [[j for j in range(50) if j != i][: k - 1] for i in range(50)]
            assert idx.tolist() == [[i, *o] for i, o in enumerate(others)]


def test_zero_rows_are_certified_without_the_fallback():
    """A zero row's keys are all exactly 0 and so are its fast keys: no fallback needed."""
    x = clustered_features(200, 256, seed=9)
    x[[3, 50, 51, 199]] = 0.0
    assert redone_rows(x, 20) == 0
    assert_lists_equal(run(x, 20), canonical_lists(x, 20))


def test_float16_input_ranks_like_its_float32_values():
    x = hard_set(300, 256, seed=11, big_group=40).astype(np.float16)
    got = run(x, 20)
    assert_lists_equal(got, canonical_lists(x, 20))
    assert_lists_equal(got, canonical_lists(x.astype(np.float32), 20), "as float32")


@pytest.mark.parametrize("n,dim,k", [(1, 3, 20), (21, 256, 20), (300, 256, 20)])
def test_batch_of_two(n, dim, k):
    sets = np.stack([hard_set(n, dim, seed=21, big_group=n // 5), hard_set(n, dim, seed=22)])
    idx, valid = run(sets, k)
    for b in range(2):
        assert_lists_equal((idx[b], valid[b]), canonical_lists(sets[b], k), f"set {b}")


# ---- independent of the row order and of the block sizes ----

def list_keys(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The canonical key of every listed column, row by row."""
    rows = np.repeat(np.arange(len(idx)), idx.shape[1])
    return exact_keys(x, rows, idx.reshape(-1), norms(x)).reshape(idx.shape)


@pytest.mark.parametrize("n", [300, 1500])
def test_row_order_does_not_change_the_lists(n):
    k = 20
    x = hard_set(n, 256, seed=5, big_group=50, duplicates=30) if n < 1500 else big_set()
    perm = np.random.default_rng(n).permutation(n)
    inverse = np.argsort(perm)
    idx, valid = run(x, k)
    p_idx, p_valid = run(x[perm], k)
    if n < 1500:
        assert_lists_equal((p_idx, p_valid), canonical_lists(x[perm], k))
    else:                                  # (the oracle of the permuted set: 25 s more)
        assert_lists_equal((idx, valid), oracle(x, k))
        keys = list_keys(x[perm], p_idx)
        tied = keys[:, 1:] == keys[:, :-1]
        assert (p_idx[:, 1:] > p_idx[:, :-1])[tied].all()      # equal keys: lower index first
    # row perm[r] of x is row r of x[perm]: the same keys in the same order (exact ties may list
    # other members of a tie group: the lower index wins, and the indices changed)
    np.testing.assert_array_equal(list_keys(x[perm], p_idx), list_keys(x, idx)[perm])
    # rows whose k + 1 best keys are all different are the permuted lists
    longer = list_keys(x, run(x, k + 1)[0])
    untied = (longer[:, 1:] < longer[:, :-1]).all(axis=1)[perm]
    assert untied.sum() >= 20
    np.testing.assert_array_equal(p_idx[untied], inverse[idx[perm]][untied])


def test_row_order_without_ties_permutes_the_lists():
    x = clustered_features(400, 256, seed=13)
    perm = np.random.default_rng(1).permutation(400)
    idx, valid = run(x, 20)
    p_idx, p_valid = run(x[perm], 20)
    np.testing.assert_array_equal(p_idx, np.argsort(perm)[idx[perm]])
    np.testing.assert_array_equal(p_valid, valid[perm])


@pytest.mark.parametrize("n,block_elements", [(300, 1), (300, 300 * 3), (1500, 1500 * 37), (33, 33 * 4)])
def test_block_sizes_do_not_change_the_lists(n, block_elements):
    x = hard_set(n, 256, seed=17, big_group=n // 6) if n < 1500 else big_set()
    default = run(x, 20)
    small = run(x, 20, block_elements=block_elements)
    assert_lists_equal(small, default, f"block_elements={block_elements}")
    assert_lists_equal(default, oracle(x, 20))


def test_onnx_runtime_float64_sqrt_and_div_are_correctly_rounded():
    """The body's norms and keys use ONNX Runtime's float64 Sqrt and Div: they must be the IEEE,
    correctly rounded operations (torch's vectorised CPU sqrt is not), or the norms differ by machine."""
    import math

    graph = helper.make_graph(
        [helper.make_node("Sqrt", ["a"], ["s"]), helper.make_node("Div", ["a", "b"], ["q"])], "g",
        [helper.make_tensor_value_info("a", TensorProto.DOUBLE, [None]),
         helper.make_tensor_value_info("b", TensorProto.DOUBLE, [None])],
        [helper.make_tensor_value_info("s", TensorProto.DOUBLE, [None]),
         helper.make_tensor_value_info("q", TensorProto.DOUBLE, [None])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=10)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    a = np.abs(rng.standard_normal(200_000)) * 10.0 ** rng.uniform(-30, 30, 200_000)
    b = np.abs(rng.standard_normal(200_000)) + 0.5
    s, q = sess.run(["s", "q"], {"a": a, "b": b})
    assert np.array_equal(s, [math.sqrt(v) for v in a])
    assert np.array_equal(q, a / b)
