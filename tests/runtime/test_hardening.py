"""Hostile input for the serving runtime: the dynamic batcher survives bad requests and never
leaves a caller waiting forever; a saved gallery is opened only by the model that made it, resists
concurrent saves and loads, and detects any edit of gallery.json."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from export.contract.config import ModelConfig
from export.contract.errors import InputError
from runtime.batching import BatcherClosed, DynamicBatcher
from runtime.gallery import Gallery, model_identity
from runtime.pipeline import Pipeline

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
REPO = Path(__file__).resolve().parents[2]


def in_thread(fn, timeout=30.0):
    """Run ``fn`` in a thread; its result or exception, or fail the test if it is still waiting."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed back to the test
            box["error"] = err
    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "the call is still waiting: it would have hung forever"
    if "error" in box:
        raise box["error"]
    return box["value"]


def crops(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(60, 30, 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def pipe(resnet18_export):
    return Pipeline.load(resnet18_export[0])


# ---- the dynamic batcher ----


def test_a_mis_shaped_request_fails_alone_and_the_batcher_survives(resnet18_export, pipe):
    expected = pipe.embed(crops(2))
    with Pipeline.load(resnet18_export[0], dynamic_batching=True, max_batch=8, max_wait_ms=300) as bp:
        h, w = bp.config.input_size_hw
        good_rows = np.zeros((4, 3, h, w), np.float32)
        good = bp.batcher.submit(good_rows)                           # these two wait for one batch ...
        bad = bp.batcher.submit(np.zeros((2, 3, 10, 10), np.float32))  # ... but never share it
        np.testing.assert_allclose(good.result(30), pipe.encoder.embed_images(good_rows), rtol=1e-5, atol=1e-5)
        with pytest.raises(InputError, match=r"images must be \[batch, 3, \d+, \d+\], found \(2, 3, 10, 10\)"):
            bad.result(30)
        np.testing.assert_allclose(in_thread(lambda: bp.embed(crops(2))), expected, rtol=1e-5, atol=1e-5)
        assert bp.batcher._worker.is_alive()


def test_rows_of_several_shapes_each_get_their_own_result():
    def run(x):
        return x.reshape(len(x), -1).sum(1, keepdims=True)

    with DynamicBatcher(run, max_batch=16, max_wait_ms=200) as batcher:
        shapes = [(3, 2, 2), (2, 5), (4, 2, 2), (1, 5), (2, 2, 2)]
        futures = [batcher.submit(np.full(s, i + 1.0)) for i, s in enumerate(shapes)]
        for i, (s, f) in enumerate(zip(shapes, futures)):
            np.testing.assert_array_equal(f.result(10), np.full((s[0], 1), (i + 1.0) * np.prod(s[1:])))
    assert batcher.stats.batches >= 2                    # one per shape at least, none mixed


def test_a_failure_while_handing_out_results_fails_only_that_request():
    """A request split across batches whose parts come back in different widths: that request fails
    with the reason, the batcher goes on."""
    calls = []

    def run(x):
        calls.append(len(x))
        width = 2 if len(calls) == 1 else 3
        return np.zeros((len(x), width))

    with DynamicBatcher(run, max_batch=4, max_wait_ms=0) as batcher:
        split = batcher.submit(np.ones((6, 2)))
        with pytest.raises(RuntimeError, match="cannot assemble the result of a request of 6 rows"):
            split.result(10)
        assert in_thread(lambda: batcher(np.ones((2, 2)))).shape == (2, 3)


def test_a_dead_worker_fails_callers_instead_of_hanging(resnet18_export):
    """Should the worker itself break, queued and later requests get BatcherClosed: no hang."""
    with Pipeline.load(resnet18_export[0], dynamic_batching=True, max_batch=4, max_wait_ms=0) as bp:
        def broken(backlog):
            backlog.popleft()                  # the request leaves the queue, then the worker breaks
            raise RuntimeError("injected batcher bug")
        bp.batcher._run_one = broken
        with pytest.raises(BatcherClosed, match="stopped after an internal error.*injected batcher bug"):
            in_thread(lambda: bp.embed(crops(1)))
        with pytest.raises(BatcherClosed, match="injected batcher bug"):
            in_thread(lambda: bp.embed(crops(1)))
        with pytest.raises(BatcherClosed):
            in_thread(lambda: bp.batcher.submit(np.zeros((1, 3, 4, 4), np.float32)).result(10))


def test_a_worker_that_ended_without_answering_is_noticed():
    """Last guard: a request the worker never answered (it ended) fails instead of waiting forever."""
    batcher = DynamicBatcher(lambda x: x, max_batch=4, max_wait_ms=0)
    batcher.close()
    batcher._closed = False                       # as if a request had slipped in after the worker ended
    with pytest.raises(BatcherClosed):
        in_thread(lambda: batcher(np.ones((1, 2))), timeout=10)


# ---- the gallery: which model it belongs to ----


SMALL = ModelConfig(n_embd=8, feature_dim=8, topk=3, n_layer=1, landmarks=1)
MANIFEST = {"files": {"encoder": {"sha256": "a" * 64}}, "source": {"sha256": "b" * 64}}


def small_gallery(n=12, seed=0, tag="g", config=SMALL, model=None) -> Gallery:
    rng = np.random.default_rng(seed)
    g = Gallery(config, seed=seed, model=model)
    g.add(rng.standard_normal((n, config.n_embd)).astype(np.float32), ids=[f"{tag}{i}" for i in range(n)],
          camids=np.arange(n) % 3, meta=[{"i": i, "tag": tag} for i in range(n)])
    return g


@pytest.mark.parametrize("change", ["input_size_hw", "pixel_mean", "pixel_std", "encoder_sha256", "checkpoint_sha256"])
def test_a_gallery_opens_only_with_the_model_that_made_it(tmp_path, change):
    small_gallery(model=model_identity(MANIFEST, SMALL)).save(tmp_path / "gal")
    config, manifest = SMALL, json.loads(json.dumps(MANIFEST))
    if change == "input_size_hw":                 # a 256x128 export of the same checkpoint: other encoder file
        config = ModelConfig(**{**SMALL.to_json(), "input_size_hw": (128, 64)})
    elif change == "pixel_mean":
        config = ModelConfig(**{**SMALL.to_json(), "pixel_mean": (0.5, 0.5, 0.5)})
    elif change == "pixel_std":
        config = ModelConfig(**{**SMALL.to_json(), "pixel_std": (0.5, 0.5, 0.5)})
    elif change == "encoder_sha256":              # same checkpoint, another encoder file
        manifest["files"]["encoder"]["sha256"] = "e" * 64
    else:
        manifest["source"]["sha256"] = "f" * 64
    with pytest.raises(InputError, match=f"another model: .*{change}"):
        Gallery.load(tmp_path / "gal", config, model=model_identity(manifest, config))
    assert len(Gallery.load(tmp_path / "gal", config, model=model_identity(manifest, config),
                            allow_model_mismatch=True)) == 12
    assert len(Gallery.load(tmp_path / "gal", SMALL, model=model_identity(MANIFEST, SMALL))) == 12


def test_a_gallery_of_another_input_size_is_refused_by_the_pipeline(pipe, resnet18_export, tmp_path):
    """End to end: the same checkpoint exported at another input size (its manifest says 128x64)."""
    g = pipe.gallery()
    g.add(np.random.default_rng(0).standard_normal((10, 256)).astype(np.float32))
    g.save(tmp_path / "gal")
    other = tmp_path / "build128"
    other.mkdir()
    for f in resnet18_export[0].iterdir():
        if f.suffix == ".onnx":
            os.link(f, other / f.name)
    manifest = json.loads((resnet18_export[0] / "manifest.json").read_text())
    manifest["model"]["input_size_hw"] = [128, 64]
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=r"another model: input_size_hw \[256, 128\] \(this model: \[128, 64\]\)"):
        Pipeline.load(other).gallery(tmp_path / "gal")
    assert len(pipe.gallery(tmp_path / "gal")) == 10


def test_a_gallery_without_a_recorded_encoder_is_not_assumed_to_fit(tmp_path):
    small_gallery().save(tmp_path / "gal")        # made without a model directory: no encoder sha256
    with pytest.raises(InputError, match="does not record the encoder_sha256"):
        Gallery.load(tmp_path / "gal", SMALL, model=model_identity(MANIFEST, SMALL))
    assert len(Gallery.load(tmp_path / "gal", SMALL)) == 12
    assert len(Gallery.load(tmp_path / "gal", SMALL, model=model_identity(MANIFEST, SMALL),
                            allow_model_mismatch=True)) == 12


# ---- the gallery: gallery.json is checked like the arrays ----


def _items_path(folder: Path) -> Path:
    version = json.loads((folder / "CURRENT").read_text())["version"]
    return folder / version / "gallery.json"


def _resign(items: dict) -> dict:
    """What someone who knows the format would write: edited contents with fresh checksums."""
    from runtime.gallery import _canonical_sha256, _content_sha256

    items["content_sha256"] = _content_sha256(items)
    items["model_sha256"] = _canonical_sha256(items["model"])
    return items


def _edit(case: str, items: dict):
    if case == "duplicate_ids":
        items["ids"][1] = items["ids"][0]
    elif case == "other_ids":
        items["ids"][3] = "somebody else"
    elif case == "camids":
        items["camids"][0] = 2
    elif case == "meta":
        items["meta"][0] = {"i": 99}
    elif case == "count":
        items["count"] = 11
    elif case == "no_content_sha256":
        del items["content_sha256"]
    elif case == "no_array_checksums":
        del items["sha256"]
    elif case == "one_array_checksum_less":
        del items["sha256"]["embeddings.npy"]
    elif case == "model_edited":
        items["model"]["note"] = "edited"
    elif case == "not_an_object":
        return [items]
    elif case == "signed_duplicate_ids":
        items["ids"][1] = items["ids"][0]
        _resign(items)
    elif case == "signed_bool_id":
        items["ids"][1] = True
        _resign(items)
    elif case == "signed_ids_string":
        items["ids"] = "g0"
        _resign(items)
    elif case == "signed_camid_float":
        items["camids"][1] = 1.5
        _resign(items)
    elif case == "signed_meta_list":
        items["meta"][1] = [1]
        _resign(items)
    elif case == "signed_count_string":
        items["count"] = "12"
        _resign(items)
    elif case == "signed_seed_none":
        items["seed"] = None
        _resign(items)
    elif case == "signed_unknown_array":
        items["sha256"]["../../etc/passwd"] = "0" * 64
        _resign(items)
    elif case == "signed_model_list":
        items["model"] = []
        _resign(items)
    return items


EDITS = {
    "duplicate_ids": "does not match its checksum", "other_ids": "does not match its checksum",
    "camids": "does not match its checksum", "meta": "does not match its checksum",
    "count": "does not match its checksum", "no_content_sha256": "no valid content_sha256",
    "no_array_checksums": "does not match its checksum",
    "one_array_checksum_less": "does not match its checksum",
    "model_edited": "model identity does not match its checksum",
    "not_an_object": "must hold a JSON object",
    "signed_duplicate_ids": r"ids must be unique, found repeated ids \['g0'\]",
    "signed_bool_id": "ids must be a list of 12 strings or integers",
    "signed_ids_string": "ids must be a list of 12 strings or integers",
    "signed_camid_float": "camids must be a list of 12 integers",
    "signed_meta_list": "meta must be a list of 12 objects",
    "signed_count_string": "count must be an integer",
    "signed_seed_none": "seed must be an integer",
    "signed_unknown_array": "sha256 must be an object mapping",
    "signed_model_list": "model must be an object",
}


@pytest.mark.parametrize("case", sorted(EDITS))
def test_an_edited_gallery_json_is_refused(tmp_path, case):
    small_gallery().save(tmp_path / "gal")
    where = _items_path(tmp_path / "gal")
    where.write_text(json.dumps(_edit(case, json.loads(where.read_text()))))
    before = sorted(p.name for p in (tmp_path / "gal").rglob("*"))
    with pytest.raises(InputError, match=EDITS[case]) as info:
        Gallery.load(tmp_path / "gal", SMALL)
    assert "gallery.json" in str(info.value)
    assert sorted(p.name for p in (tmp_path / "gal").rglob("*")) == before


@pytest.mark.parametrize("text", ["", "{", "null", "\"x\""])
def test_an_unreadable_gallery_json_is_refused(tmp_path, text):
    small_gallery().save(tmp_path / "gal")
    _items_path(tmp_path / "gal").write_text(text)
    with pytest.raises(InputError, match="gallery.json"):
        Gallery.load(tmp_path / "gal", SMALL)


def test_an_unedited_gallery_round_trips_and_reformatting_is_harmless(tmp_path):
    g = small_gallery()
    g.save(tmp_path / "gal")
    where = _items_path(tmp_path / "gal")
    where.write_text(json.dumps(json.loads(where.read_text()), indent=3, sort_keys=True))
    loaded = Gallery.load(tmp_path / "gal", SMALL)
    assert loaded.ids == g.ids and loaded.meta == g.meta
    np.testing.assert_array_equal(loaded.camids, g.camids)
    np.testing.assert_array_equal(loaded.embeddings, g.embeddings)


# ---- the gallery: concurrent saves and loads ----


WORKER = r"""
import json, sys
import numpy as np
from export.contract.config import ModelConfig
from export.contract.errors import NFormerError
from runtime.gallery import Gallery

path, worker, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
config = ModelConfig(n_embd=8, feature_dim=8, topk=3, n_layer=1, landmarks=1)

def content(w, r):
    rng = np.random.default_rng(1000 * w + r)
    n = 5 + (w * 7 + r) % 9
    return rng.standard_normal((n, 8)).astype(np.float32), [f"w{w}r{r}i{i}" for i in range(n)]

errors = []
for r in range(rounds):
    try:
        if worker % 2 == 0 or r % 2 == 0:
            x, ids = content(worker, r)
            g = Gallery(config, seed=worker)
            g.add(x, ids=ids, camids=np.full(len(ids), worker), meta=[{"w": worker, "r": r}] * len(ids))
            g.save(path)
        else:
            g = Gallery.load(path, config)
            tag = g.ids[0].split("i")[0]
            w, r2 = (int(v) for v in tag[1:].split("r"))
            x, ids = content(w, r2)
            if g.ids != ids or not np.array_equal(g.embeddings, x) or g.meta != [{"w": w, "r": r2}] * len(ids):
                errors.append(f"load saw a mixture: {tag}")
    except (NFormerError, OSError) as err:
        errors.append(f"{type(err).__name__}: {err}")
print(json.dumps(errors))
"""


def test_concurrent_saves_and_loads_from_processes(tmp_path):
    path = tmp_path / "gal"
    small_gallery(tag="w0r0i").save(path)       # loads may start at once
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(path), str(w), "12"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in range(6)]
    errors = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        errors += json.loads(out.strip().splitlines()[-1])
    assert errors == []
    # nothing half-written is left: the pointer and the one version it names
    version = json.loads((path / "CURRENT").read_text())["version"]
    assert sorted(p.name for p in path.iterdir()) == ["CURRENT", version]
    final = Gallery.load(path, SMALL)
    assert final.meta[0]["w"] == final.camids[0]


def test_a_negative_seed_is_one_clear_error(tmp_path):
    from click.testing import CliRunner

    from export.contract.errors import InputError
    from export.contract.landmarks import sample_landmarks
    from runtime.cli import main as runtime_cli

    with pytest.raises(InputError, match="integer >= 0"):
        sample_landmarks(10, 4, 5, seed=-1)
    for args in (["synth", str(tmp_path / "d"), "--seed", "-1"], ["refine", str(tmp_path), "x.npy", "--out",
                                                                    str(tmp_path / "o.npy"), "--seed", "-3"]):
        result = CliRunner().invoke(runtime_cli, args)
        assert result.exit_code == 2 and "--seed" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "d").exists() and not (tmp_path / "o.npy").exists()
