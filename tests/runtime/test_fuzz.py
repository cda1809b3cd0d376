"""The property-based layer (Hypothesis): generated arrays, mutated manifests and mutated gallery
files fed to the public entry points (Pipeline.load, Pipeline.refine, LayersRefiner.refine,
reciprocal_neighbors, NeighborIndex, Gallery.add / search / load).  Every call ends in a result that is what it
claims (shape, dtype, finite values) or in one project error (an ``NFormerError``); nothing on disk
changes when a load is refused, and a gallery is unchanged by a refused ``add``.

Arrays are built by numpy from a few drawn parameters (shape, dtype, scale, where NaN/inf go)
rather than element by element, so each example is cheap.  Examples are derandomised (the same ones
in every run: CI stays reproducible); ``NFORMER_FUZZ_EXAMPLES`` raises the count and
``NFORMER_FUZZ_RANDOM=1`` draws new ones, for a longer hunt.  One export (the random 128-d small
model, session-cached, shared with the calibration tests; about 45 s to make) serves every test;
the examples themselves take about half a minute on the 2-core CI machine.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed (the dev extra pins it)")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from export.contract.errors import NFormerError  # noqa: E402
from runtime.neighbors import reciprocal_neighbors  # noqa: E402
from runtime.pipeline import Pipeline  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def fuzz(examples: int):
    return settings(max_examples=int(os.environ.get("NFORMER_FUZZ_EXAMPLES", examples)), deadline=None,
                    derandomize=os.environ.get("NFORMER_FUZZ_RANDOM") != "1", database=None,
                    suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from precision_support import random_small_export

    return random_small_export(tmp_path_factory)[1]


@pytest.fixture(scope="module")
def pipe(model_dir):
    with Pipeline.load(model_dir) as p:
        yield p


def tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


# ---- generated arrays ----


DTYPES = ["float32", "float64", "float16", "int64", "int32", "bool", "complex64", "object"]
SCALES = [0.0, 1e-30, 1e-3, 1.0, 1e3, 1e17, 1e30, 1e39, 1e300]
SPECIALS = ["none", "nan", "inf", "-inf", "mixed"]


@st.composite
def feature_arrays(draw, width: int):
    """Arrays meant as embeddings [N, width]: mostly the right width, often not; any dtype."""
    n = draw(st.integers(0, 40))
    shape = draw(st.sampled_from([(n, width), (n, width), (n, width), (1, n, width), (n, width + 1),
                                  (n, max(width - 1, 0)), (n,), (), (2, n, width), (n, 0), (n, width, 1)]))
    dtype = draw(st.sampled_from(DTYPES))
    scale = draw(st.sampled_from(SCALES))
    special = draw(st.sampled_from(SPECIALS))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = np.asarray(rng.standard_normal(shape) * scale)
    if draw(st.booleans()) and x.size:               # duplicated rows (ties in the neighbour ranking)
        flat = x.reshape(-1, shape[-1]) if len(shape) >= 2 and shape[-1] else None
        if flat is not None and len(flat) > 1:
            flat[1::2] = flat[0]
    if special != "none" and x.size:
        where = rng.random(shape) < draw(st.sampled_from([0.0, 0.01, 0.5, 1.0]))
        value = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}.get(special)
        x[where] = value if value is not None else rng.choice([np.nan, np.inf, -np.inf], size=int(where.sum()))
    with np.errstate(all="ignore"):
        if dtype == "object":
            return x.astype(object)
        if dtype == "bool":
            return x > 0
        if dtype.startswith("int"):
            return np.nan_to_num(x, posinf=1, neginf=-1).clip(-1e6, 1e6).astype(dtype)
        return x.astype(dtype)


def check_embeddings(out, n: int, width: int):
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (n, width), \
        (type(out), getattr(out, "dtype", None), getattr(out, "shape", None))
    assert np.isfinite(out).all()


@fuzz(150)
@given(data=st.data())
def test_refine_gives_refined_rows_or_one_error(pipe, data):
    width = pipe.config.n_embd
    x = data.draw(feature_arrays(width))
    seed = data.draw(st.integers(-3, 2**63))
    before = x.copy()
    try:
        out = pipe.refine(x, seed=seed)
    except NFormerError:
        return
    finally:
        assert x.tobytes() == before.tobytes()           # the caller's array is not changed
    n = x.shape[-2] if x.ndim == 3 else x.shape[0]
    check_embeddings(out, n, width)
    norms = np.linalg.norm(out, axis=1)
    assert np.all(norms <= 1 + 1e-4)


@fuzz(100)
@given(data=st.data())
def test_reciprocal_neighbors_give_lists_or_one_error(data):
    x = data.draw(feature_arrays(data.draw(st.sampled_from([1, 3, 16, 128]))))
    k = data.draw(st.integers(-2, 50))
    try:
        idx, valid = reciprocal_neighbors(x, k)
    except NFormerError:
        return
    n = len(x)
    k_eff = min(k, n)
    assert idx.shape == valid.shape == (n, k_eff) and idx.dtype == valid.dtype == np.int32
    if n:
        assert idx.min() >= 0 and idx.max() < n and set(np.unique(valid)) <= {0, 1}
        assert np.array_equal(idx[:, 0], np.arange(n))   # each row first in its own list


@st.composite
def small_rows(draw, dim: int, most: int = 12):
    """Rows that stress the ranking: random, copies of one row, zeros, parallel rows of other
    lengths, one-hot rows, and rows at float32's subnormal scale."""
    m = draw(st.integers(0, most))
    kind = draw(st.sampled_from(["small ints", "normal", "copies", "zeros", "parallel", "one-hot", "tiny"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "small ints":
        return rng.integers(-2, 3, (m, dim)).astype(np.float32)
    if kind == "normal":
        return rng.standard_normal((m, dim)).astype(np.float32)
    if kind == "copies":
        return np.repeat(rng.standard_normal((1, dim)), m, axis=0).astype(np.float32)
    if kind == "zeros":
        return np.zeros((m, dim), np.float32)
    if kind == "parallel":
        return (rng.integers(-1, 2, (1, dim)) * rng.choice([1, 2, 4, 0.5, -1], size=(m, 1))).astype(np.float32)
    if kind == "one-hot":
        return np.eye(dim, dtype=np.float32)[rng.integers(0, dim, m)]
    return (rng.standard_normal((m, dim)) * 1e-38).astype(np.float32)


@fuzz(100)
@given(data=st.data())
def test_neighbor_index_under_adds_and_removals_keeps_the_one_shot_lists(data):
    """NeighborIndex after any sequence of add / remove / extended: the lists reciprocal_neighbors
    computes from scratch for the same rows, identical index and validity arrays."""
    from runtime.neighbors import NeighborIndex

    dim, k = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 7))
    index = NeighborIndex(k, dim=dim, reserve=data.draw(st.integers(0, 3)))
    current = np.zeros((0, dim), np.float32)

    def same(got, rows):
        if len(rows):
            want = reciprocal_neighbors(rows, k)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])
        else:
            assert got[0].shape == (0, 0)
    for _ in range(data.draw(st.integers(1, 8))):
        op = data.draw(st.sampled_from(["add", "add", "remove", "extended"]))
        if op == "add":
            rows = data.draw(small_rows(dim))
            if len(current) and data.draw(st.booleans()):   # copies of rows already in the set
                rows = np.concatenate([rows, current[data.draw(st.lists(st.integers(0, len(current) - 1), max_size=4))]])
            index.add(rows)
            current = np.concatenate([current, rows])
        elif op == "remove" and len(current):
            drop = data.draw(st.lists(st.integers(0, len(current) - 1), max_size=len(current)))
            index.remove(np.array(drop, np.int64))
            current = np.delete(current, drop, axis=0)
        elif op == "extended":
            rows = data.draw(small_rows(dim, 5))
            with index.extended(rows) as both:
                same(both.neighbors(), np.concatenate([current, rows]))
        np.testing.assert_array_equal(index.rows(), current)
        same(index.neighbors(), current)
    if len(current):
        again = NeighborIndex.from_state(index.rows(), index.state())
        np.testing.assert_array_equal(again.neighbors()[0], index.neighbors()[0])


@fuzz(60)
@given(data=st.data())
def test_layers_refine_with_given_lists_gives_rows_or_one_error(pipe, data):
    refiner = pipe.layers_refiner
    width = pipe.config.n_embd
    n = data.draw(st.integers(1, 30))
    x = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))).standard_normal((n, width)).astype(np.float32)
    idx, valid = reciprocal_neighbors(x / np.linalg.norm(x, axis=1, keepdims=True), pipe.config.topk)
    how = data.draw(st.sampled_from(["as is", "shift", "negative", "too big", "float", "transpose", "short"]))
    if how == "shift":
        idx = (idx + 1) % n
    elif how == "negative":
        idx = idx - n
    elif how == "too big":
        idx = idx + n
    elif how == "float":
        idx = idx.astype(np.float32)
    elif how == "transpose":
        idx, valid = idx.T, valid.T
    elif how == "short":
        idx, valid = idx[:, :-1], valid[:, :-1]
    try:
        out = refiner.refine(x, idx, valid)
    except NFormerError:
        assert how != "as is"
        return
    check_embeddings(out, n, width)


# ---- the gallery in memory ----


IDS = st.one_of(st.integers(-5, 5), st.text(max_size=3), st.booleans(), st.none(), st.floats(allow_nan=True),
                st.integers(2**63, 2**70))
META = st.one_of(st.dictionaries(st.text(max_size=2), st.one_of(st.integers(), st.floats(), st.text(max_size=2)),
                                 max_size=2),
                 st.just({"x": {1, 2}}), st.just([1]), st.none(), st.just({"nested": {"ok": [1, "a"]}}))


def snapshot(g):
    return (list(g.ids), g.camids.copy(), copy.deepcopy(g.meta), g.embeddings.copy())


@fuzz(100)
@given(data=st.data())
def test_gallery_add_and_search_give_results_or_one_error_and_refusals_change_nothing(pipe, data):
    width = pipe.config.n_embd
    g = pipe.gallery(seed=1)
    g.add(np.random.default_rng(0).standard_normal((12, width)).astype(np.float32), ids=[f"g{i}" for i in range(12)],
          camids=np.arange(12) % 3)
    x = data.draw(feature_arrays(width))
    m = len(x) if x.ndim >= 1 else 0
    ids = data.draw(st.one_of(st.none(), st.lists(IDS, min_size=max(m - 1, 0), max_size=m + 1)))
    camids = data.draw(st.one_of(st.none(), st.integers(-3, 3),
                                 st.lists(st.integers(-2**70, 2**70), min_size=max(m - 1, 0), max_size=m + 1),
                                 st.lists(st.floats(), min_size=m, max_size=m)))
    meta = data.draw(st.one_of(st.none(), st.lists(META, min_size=max(m - 1, 0), max_size=m + 1)))
    before = snapshot(g)
    try:
        added = g.add(x, ids=ids, camids=camids, meta=meta)
    except NFormerError:
        after = snapshot(g)
        assert after[0] == before[0] and after[2] == before[2]
        np.testing.assert_array_equal(after[1], before[1])
        np.testing.assert_array_equal(after[3], before[3])
    else:
        assert len(g) == 12 + len(added)
        json.dumps(g.meta)                                # what save will write
    topn = data.draw(st.sampled_from([1, 5, 100, 0, -1]))
    query = data.draw(feature_arrays(width))
    cams = data.draw(st.one_of(st.none(), st.just([0])))
    try:
        hits = g.search(query, topn=topn, query_camids=cams)
    except NFormerError:
        return
    assert len(hits) == (query.shape[1] if query.ndim == 3 else len(query))
    assert all(len(h) == min(topn, len(g)) if cams is None else len(h) <= topn for h in hits)
    assert all(np.isfinite(hit.distance) and hit.id in g for h in hits for hit in h)


# ---- mutated files: manifests and galleries ----


ODD_VALUES = [None, True, 0, -1, 1.5, float("nan"), 2**70, "", "x", "../../../../etc/passwd", "/etc/passwd",
              "a" * 64, "g" * 64, [], [1, 2], {}, {"path": "../x"}]


def _paths(obj, prefix=()):
    """Every (path, value) in a JSON document (keys and list positions)."""
    yield prefix, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


@st.composite
def json_mutation(draw, document):
    """A copy of ``document`` with one part deleted, replaced by an odd value, or duplicated."""
    doc = copy.deepcopy(document)
    paths = [p for p, _ in _paths(doc) if p]
    path = draw(st.sampled_from(paths))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    op = draw(st.sampled_from(["replace", "replace", "delete", "wrap"]))
    if op == "delete":
        del parent[key]
    elif op == "wrap":
        parent[key] = [parent[key]]
    else:
        parent[key] = copy.deepcopy(draw(st.sampled_from(ODD_VALUES)))
    return doc, (op, path)


@fuzz(100)
@given(data=st.data())
def test_a_mutated_manifest_loads_correctly_or_is_one_error(model_dir, data):
    from export.contract.manifest import MANIFEST_NAME

    manifest = json.loads((model_dir / MANIFEST_NAME).read_text())
    doc, how = data.draw(json_mutation(manifest))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "model"
        work.mkdir()
        for f in model_dir.iterdir():
            if f.name != MANIFEST_NAME:
                os.link(f, work / f.name)
        (work / MANIFEST_NAME).write_text(json.dumps(doc))
        before = tree(Path(tmp))
        try:
            with Pipeline.load(work) as loaded:
                x = np.random.default_rng(0).standard_normal((5, loaded.config.n_embd)).astype(np.float32)
                try:
                    out = loaded.refine(x)
                except NFormerError:
                    pass
                else:
                    check_embeddings(out, 5, loaded.config.n_embd)
        except NFormerError:
            pass
        assert tree(Path(tmp)) == before, how


@pytest.fixture(scope="module")
def saved_gallery(pipe, tmp_path_factory):
    g = pipe.gallery(seed=2)
    g.add(np.random.default_rng(3).standard_normal((20, pipe.config.n_embd)).astype(np.float32),
          ids=[f"p{i}" for i in range(19)] + [7], camids=np.arange(20) % 4, meta=[{"i": i} for i in range(20)])
    g.refine()
    path = tmp_path_factory.mktemp("fuzz_gallery") / "gal"
    g.save(path)
    return path


def _resign(items: dict) -> None:
    from runtime.gallery import _canonical_sha256, _content_sha256

    try:
        items["content_sha256"] = _content_sha256(items)
        items["model_sha256"] = _canonical_sha256(items["model"])
    except Exception:  # noqa: BLE001 - a mutation the signer cannot follow: leave it unsigned
        pass


@fuzz(150)
@given(data=st.data())
def test_a_mutated_gallery_loads_correctly_or_is_one_error(pipe, saved_gallery, data):
    from export.contract.files import sha256_file

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gal"
        shutil.copytree(saved_gallery, path)
        version = json.loads((path / "CURRENT").read_text())["version"]
        folder = path / version
        target = data.draw(st.sampled_from(["gallery.json", "gallery.json", "CURRENT", "embeddings.npy",
                                            "features.npy", "neighbors.npz", "refined.npy"]))
        resign = data.draw(st.booleans())
        if target == "gallery.json":
            items = json.loads((folder / "gallery.json").read_text())
            doc, how = data.draw(json_mutation(items))
            if resign and isinstance(doc, dict):
                _resign(doc)
            (folder / "gallery.json").write_text(json.dumps(doc))
        elif target == "CURRENT":
            pointer = json.loads((path / "CURRENT").read_text())
            doc, how = data.draw(json_mutation(pointer))
            (path / "CURRENT").write_text(json.dumps(doc))
        else:
            file = folder / target
            blob = bytearray(file.read_bytes())
            how = data.draw(st.sampled_from(["truncate", "flip", "other array", "delete", "pickle"]))
            if how == "truncate":
                blob = blob[:data.draw(st.integers(0, len(blob) - 1))]
            elif how == "flip":
                for _ in range(data.draw(st.integers(1, 8))):
                    blob[data.draw(st.integers(0, len(blob) - 1))] ^= 1 << data.draw(st.integers(0, 7))
            elif how == "other array":
                import io

                buf = io.BytesIO()
                shape = data.draw(st.sampled_from([(20, 128), (19, 128), (20, 127), (20,), (0, 128), (20, 128, 1)]))
                dtype = data.draw(st.sampled_from(["float32", "float64", "int32", "bool"]))
                arr = np.random.default_rng(0).standard_normal(shape)
                if arr.size:
                    arr[0] = data.draw(st.sampled_from([0.0, np.nan, np.inf, 1e30]))
                with np.errstate(all="ignore"):
                    np.save(buf, arr.astype(dtype))
                blob = bytearray(buf.getvalue())
            elif how == "pickle":
                import io

                buf = io.BytesIO()
                np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
                blob = bytearray(buf.getvalue())
            if how == "delete":
                file.unlink()
            else:
                file.write_bytes(bytes(blob))
            if resign and file.exists():           # someone who updates the checksums after editing
                items = json.loads((folder / "gallery.json").read_text())
                items["sha256"][target] = sha256_file(file)
                _resign(items)
                (folder / "gallery.json").write_text(json.dumps(items))
        before = tree(path)
        try:
            g = pipe.gallery(path)
        except NFormerError:
            assert tree(path) == before, (target, how)
            return
        assert tree(path) == before, (target, how)
        n = len(g)
        assert len(g.ids) == len(set(g.ids)) == n and g.camids.shape == (n,) and len(g.meta) == n
        check_embeddings(g.embeddings, n, pipe.config.n_embd)
        if n:                                   # the saved refined rows, when kept, are what refine() returns
            check_embeddings(g.refine(), n, pipe.config.n_embd)
        try:
            hits = g.search(np.ones((2, pipe.config.n_embd), np.float32), topn=3)
        except NFormerError:
            return
        assert len(hits) == 2 and all(np.isfinite(h.distance) for hs in hits for h in hs)
