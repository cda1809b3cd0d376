"""runtime.gallery: incremental refinement equals one-shot refinement, search protocol, atomic
save/load, bad input leaving the gallery unchanged."""
from __future__ import annotations

import json

import numpy as np
import pytest

import runtime.gallery as gallery_module
from export.contract.errors import InputError
from export.reference.testing import clustered_features
from runtime.evaluation.metrics import euclidean_distances
from runtime.pipeline import Pipeline

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def pipe(resnet18_export):
    return Pipeline.load(resnet18_export[0])


@pytest.fixture(scope="module")
def features():
    """Raw-looking embeddings (not unit norm) with exact duplicates, a group larger than k included."""
    x = clustered_features(260, seed=21, duplicates=50)
    return x * np.float32(4.0)


def snapshot(g):
    idx, valid = g._index.neighbors()
    return {"ids": g.ids, "camids": g.camids, "meta": g.meta, "raw": g.embeddings, "idx": idx, "valid": valid}


def assert_unchanged(g, before):
    after = snapshot(g)
    assert after["ids"] == before["ids"] and after["meta"] == before["meta"]
    for key in ("camids", "raw", "idx", "valid"):
        np.testing.assert_array_equal(after[key], before[key])


def test_chunked_adds_equal_one_shot_refinement(pipe, features):
    g = pipe.gallery(seed=4)
    for s, e in ((0, 1), (1, 15), (15, 90), (90, 200)):   # N = 1, N < k, then larger chunks
        g.add(features[s:e], ids=[f"p{i}" for i in range(s, e)])
    one = pipe.gallery(seed=4)
    one.add(features[:200], ids=[f"p{i}" for i in range(200)])
    for a, b in zip(g._index.neighbors(), one._index.neighbors()):
        np.testing.assert_array_equal(a, b)
    refined = g.refine()
    np.testing.assert_allclose(refined, one.refine(), rtol=0, atol=1e-5)
    # and the same as nformer.onnx on the whole set (its own neighbour step, same landmarks)
    np.testing.assert_allclose(refined, pipe.refine(features[:200], seed=4), rtol=0, atol=1e-5)
    assert refined.shape == (200, 256) and np.allclose(np.linalg.norm(refined, axis=1), 1, atol=1e-5)


def test_removal_equals_refinement_of_what_is_left(pipe, features):
    g = pipe.gallery(seed=1)
    g.add(features[:220], ids=list(range(220)), camids=np.arange(220) % 6)
    gone = list(range(0, 220, 3)) + [219]
    g.remove(gone)
    left = [i for i in range(220) if i not in set(gone)]
    assert g.ids == left and list(g.camids) == [i % 6 for i in left]
    fresh = pipe.gallery(seed=1)
    fresh.add(features[left], ids=left)
    for a, b in zip(g._index.neighbors(), fresh._index.neighbors()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(g.refine(), fresh.refine(), rtol=0, atol=1e-5)


def test_search_refines_queries_and_gallery_together(pipe, features):
    g = pipe.gallery(seed=2)
    g.add(features[:180], ids=[f"g{i}" for i in range(180)], camids=np.arange(180) % 4,
          meta=[{"frame": i} for i in range(180)])
    before = snapshot(g)
    queries = features[200:206]
    hits = g.search(queries, topn=5)
    assert_unchanged(g, before)                               # the queries left the set again
    both = pipe.refine(np.concatenate([features[:180], queries]), seed=2)
    dist = euclidean_distances(both[180:], both[:180])
    for q, row in enumerate(hits):
        order = np.argsort(dist[q], kind="stable")[:5]
        assert [h.id for h in row] == [f"g{p}" for p in order]
        np.testing.assert_allclose([h.distance for h in row], np.sqrt(dist[q, order]), atol=1e-5)
        assert row[0].meta == {"frame": int(order[0])} and row[0].camid == order[0] % 4
    # cross-camera: no hit from the query's own camera
    cams = np.array([0, 1, 2, 3, 0, 1])
    for q, row in enumerate(g.search(queries, topn=8, query_camids=cams)):
        assert len(row) == 8 and all(h.camid != cams[q] for h in row)
    # encoder-only ranking on request
    raw_hits = g.search(queries[:1], topn=3, refined=False)
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    order = np.argsort(euclidean_distances(unit[200:201], unit[:180])[0], kind="stable")[:3]
    assert [h.id for h in raw_hits[0]] == [f"g{p}" for p in order]
    assert json.dumps([h.to_json() for h in hits[0]])


def test_save_load_round_trip(pipe, features, tmp_path):
    g = pipe.gallery(seed=5)
    g.add(features[:120], ids=[f"a{i}" for i in range(120)], camids=np.arange(120) % 3,
          meta=[{"track": i, "tags": ["x"]} for i in range(120)])
    g.add(features[120:150], ids=list(range(30)))             # int and str ids side by side
    g.remove(["a7", 3])
    refined = g.refine()
    g.save(tmp_path / "gal")
    g2 = pipe.gallery(tmp_path / "gal")
    assert g2.ids == g.ids and g2.meta == g.meta and g2.seed == 5
    np.testing.assert_array_equal(g2.camids, g.camids)
    np.testing.assert_array_equal(g2.embeddings, g.embeddings)
    for a, b in zip(g2._index.neighbors(), g._index.neighbors()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(g2.refine(), refined)
    q = features[200:203]
    assert [[h.id for h in r] for r in g2.search(q)] == [[h.id for h in r] for r in g.search(q)]
    g2.add(features[150:160], ids=[f"b{i}" for i in range(10)])  # the loaded lists keep working
    g.add(features[150:160], ids=[f"b{i}" for i in range(10)])
    np.testing.assert_allclose(g2.refine(), g.refine(), atol=1e-6)
    g2.save(tmp_path / "gal")                                  # a second save replaces the first
    assert sorted(p.name for p in (tmp_path / "gal").iterdir()) == ["CURRENT", "v000002"]
    assert len(pipe.gallery(tmp_path / "gal")) == 158


@pytest.mark.parametrize("fail_at", ["arrays", "pointer"])
def test_interrupted_save_leaves_the_previous_save_readable(pipe, features, tmp_path, monkeypatch, fail_at):
    g = pipe.gallery()
    g.add(features[:60], ids=list(range(60)))
    g.save(tmp_path / "gal")
    g.add(features[60:80], ids=list(range(60, 80)))
    real = gallery_module.write_bytes_atomic
    calls = []

    def failing(path, data):
        calls.append(path.name)
        if (fail_at == "arrays" and path.name == "features.npy") or (fail_at == "pointer" and path.name == "CURRENT"):
            raise OSError(28, "No space left on device (injected)")
        return real(path, data)
    monkeypatch.setattr(gallery_module, "write_bytes_atomic", failing)
    with pytest.raises(InputError, match=r"cannot save a gallery to .*injected\); the previous version"):
        g.save(tmp_path / "gal")                               # one clear error, not a raw OSError
    monkeypatch.setattr(gallery_module, "write_bytes_atomic", real)
    assert sorted(p.name for p in (tmp_path / "gal").iterdir()) == ["CURRENT", "v000001"]
    old = pipe.gallery(tmp_path / "gal")
    assert old.ids == list(range(60))
    np.testing.assert_array_equal(old.embeddings, features[:60])
    g.save(tmp_path / "gal")                                   # and the next save works
    assert pipe.gallery(tmp_path / "gal").ids == list(range(80))


@pytest.mark.parametrize("case", ["int_dtype", "width", "nan", "3d", "ids_len", "dup_ids", "taken_ids", "bool_id",
                                  "camids_len", "camids_float", "meta_len", "meta_json", "meta_deep"])
def test_bad_additions_change_nothing(pipe, features, case):
    g = pipe.gallery()
    g.add(features[:30], ids=list(range(30)), camids=[1] * 30)
    before = snapshot(g)
    x = features[30:33]
    kwargs = {"ids": ["n1", "n2", "n3"]}
    if case == "int_dtype":
        x = np.ones((3, 256), np.int32)
    elif case == "width":
        x = features[30:33, :128]
    elif case == "nan":
        x = x.copy()
        x[1, 5] = np.nan
    elif case == "3d":
        x = x[None].repeat(2, axis=0)
    elif case == "ids_len":
        kwargs["ids"] = ["n1"]
    elif case == "dup_ids":
        kwargs["ids"] = ["n1", "n1", "n2"]
    elif case == "taken_ids":
        kwargs["ids"] = ["n1", 5, "n3"]
    elif case == "bool_id":
        kwargs["ids"] = ["n1", True, "n3"]
    elif case == "camids_len":
        kwargs["camids"] = [1, 2]
    elif case == "camids_float":
        kwargs["camids"] = [1.5, 2.0, 3.0]
    elif case == "meta_len":
        kwargs["meta"] = [{}]
    elif case == "meta_json":
        kwargs["meta"] = [{"a": object()}, {}, {}]
    elif case == "meta_deep":                      # json.dumps raised RecursionError
        deep: list = []
        for _ in range(100000):
            deep = [deep]
        kwargs["meta"] = [{"a": deep}, {}, {}]
    with pytest.raises(InputError):
        g.add(x, **kwargs)
    assert_unchanged(g, before)


def test_unknown_ids_on_removal_change_nothing(pipe, features):
    g = pipe.gallery()
    g.add(features[:25], ids=[f"p{i}" for i in range(25)])
    before = snapshot(g)
    with pytest.raises(InputError, match="unknown id.*'nobody'.*nothing was removed"):
        g.remove(["p1", "nobody", "p2"])
    assert_unchanged(g, before)


def test_refusals_on_load_and_save(pipe, features, tmp_path, resnet18_export):
    g = pipe.gallery()
    g.add(features[:20], ids=list(range(20)))
    with pytest.raises(InputError, match="not a gallery directory"):
        pipe.gallery(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not a gallery"):
        g.save(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    g.save(tmp_path / "gal")
    before = snapshot(g)
    pointer = tmp_path / "gal" / "CURRENT"
    data = json.loads(pointer.read_text())
    pointer.write_text(json.dumps({**data, "format_version": 99}))
    with pytest.raises(InputError, match="version 99, expected .*version 1"):
        pipe.gallery(tmp_path / "gal")
    pointer.write_text("[" * 100000 + "]" * 100000)       # nested past the recursion limit: not a RecursionError
    with pytest.raises(InputError, match="cannot read .*CURRENT"):
        pipe.gallery(tmp_path / "gal")
    pointer.write_text(json.dumps(data))
    items = tmp_path / "gal" / data["version"] / "gallery.json"
    saved = json.loads(items.read_text())
    items.write_text("{\"a\": " * 100000 + "1" + "}" * 100000)
    with pytest.raises(InputError, match="cannot read .*gallery.json"):
        pipe.gallery(tmp_path / "gal")
    items.write_text(json.dumps({**saved, "model": {**saved["model"], "checkpoint_sha256": "0" * 64}}))
    with pytest.raises(InputError, match="another model"):
        pipe.gallery(tmp_path / "gal")
    assert len(pipe.gallery(tmp_path / "gal", allow_model_mismatch=True)) == 20
    items.write_text(json.dumps(saved))
    np.save(tmp_path / "gal" / data["version"] / "embeddings.npy", np.zeros((20, 256), np.float32))
    with pytest.raises(InputError, match="checksum"):
        pipe.gallery(tmp_path / "gal")
    assert_unchanged(g, before)


def test_empty_gallery_and_unbound_gallery(pipe, features):
    g = pipe.gallery()
    with pytest.raises(InputError, match="empty"):
        g.search(features[:2])
    assert g.add(np.zeros((0, 256), np.float32)) == []
    from runtime.gallery import Gallery

    unbound = Gallery(pipe.config)
    unbound.add(features[:5])
    assert unbound.ids == [0, 1, 2, 3, 4]
    assert [h.id for h in unbound.search(features[:1], topn=1, refined=False)[0]] == [0]
    with pytest.raises(InputError, match="not bound"):
        unbound.refine()


def test_api_values_that_are_not_what_they_look_like_are_refused(tmp_path):
    """seed -1 saved a gallery that could not be searched or loaded; remove(True) / remove([1.0])
    removed id 1; topn 2.5 or nan was a TypeError deep in the search."""
    from export.contract.config import ModelConfig
    from export.contract.errors import InputError
    from runtime.gallery import Gallery

    config = ModelConfig(arch="resnet18", n_embd=16, feature_dim=16, topk=3)
    for seed in (-1, 1.5, True, 2 ** 63):
        with pytest.raises(InputError, match="seed"):
            Gallery(config, seed=seed)
    g = Gallery(config)
    g.add(np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32))
    for ids in (True, [1.0], np.float64(2.0), np.array([True]), [None]):
        with pytest.raises(InputError, match="ids must be strings or integers"):
            g.remove(ids)
    assert g.ids == [0, 1, 2, 3, 4]
    g.remove(np.int64(1))
    g.remove(np.array([2, 3]))
    assert g.ids == [0, 4]
    for topn in (2.5, float("nan"), True, 0):
        with pytest.raises(InputError, match="topn must be an integer"):
            g.search(np.ones((1, 16), np.float32), topn=topn, refined=False)


def test_gallery_paths_that_are_no_paths_are_one_error_and_bytes_are_names(tmp_path):
    """save(None), save(b"dir") and load(3) were TypeErrors from pathlib (Pipeline.load takes bytes)."""
    import os

    from export.contract.config import ModelConfig
    from runtime.gallery import Gallery

    config = ModelConfig(arch="resnet18", n_embd=16, feature_dim=16, topk=3)
    g = Gallery(config)
    g.add(np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32))
    for path in (None, 3, 1.5, ["gal"], str(tmp_path / "a\0b")):
        with pytest.raises(InputError, match="gallery directory must be a path"):
            g.save(path)
        with pytest.raises(InputError, match="gallery directory must be a path"):
            Gallery.load(path, config)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    g.save(os.fsencode(str(tmp_path / "gal")))
    assert Gallery.load(os.fsencode(str(tmp_path / "gal")), config).ids == g.ids
