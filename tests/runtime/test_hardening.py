"""Hostile input for the serving runtime: the dynamic batcher survives bad requests and never
leaves a caller waiting forever; a saved gallery is opened only by the model that made it, resists
concurrent saves and loads, and detects any edit of gallery.json."""
from __future__ import annotations

import json
import os
import shutil
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


def test_a_gallery_of_another_precision_opens_with_a_warning(tmp_path, caplog):
    """The encoder's precision is recorded; another precision of the same model is accepted (a
    GPU-built INT8 gallery stays usable on a CPU box) and logged, the same precision is silent."""
    import logging

    small_gallery(model=model_identity(MANIFEST, SMALL, encoder_precision="int8")).save(tmp_path / "gal")
    for precision, warns in (("int8-cpu", True), ("int8", False), (None, False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="runtime.gallery"):
            g = Gallery.load(tmp_path / "gal", SMALL, model=model_identity(MANIFEST, SMALL, encoder_precision=precision))
        assert len(g) == 12 and g.model["encoder_precision"] == "int8"
        said = [r.getMessage() for r in caplog.records]
        assert bool(said) == warns, said
        if warns:
            assert "int8 encoder" in said[0] and "int8-cpu" in said[0]


def test_a_gallery_records_mixed_precisions_and_refuses_unknown_ones(tmp_path, caplog):
    import logging

    from runtime.gallery import ITEMS, _canonical_sha256, _content_sha256, _read_pointer

    small_gallery(model=model_identity(MANIFEST, SMALL, encoder_precision="fp32")).save(tmp_path / "gal")
    g = Gallery.load(tmp_path / "gal", SMALL, model=model_identity(MANIFEST, SMALL, encoder_precision="int8-cpu"))
    g.add(np.ones((1, SMALL.n_embd), np.float32), ids=["new"])
    assert g.model["encoder_precision"] == "mixed"
    g.save(tmp_path / "gal")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="runtime.gallery"):   # an fp32 pipeline is told, too
        Gallery.load(tmp_path / "gal", SMALL, model=model_identity(MANIFEST, SMALL, encoder_precision="fp32"))
    assert len(caplog.records) == 1 and "mixed precisions" in caplog.records[0].getMessage()
    # an empty gallery takes the precision of its first rows
    small_gallery(n=0, model=model_identity(MANIFEST, SMALL, encoder_precision="fp32")).save(tmp_path / "empty")
    e = Gallery.load(tmp_path / "empty", SMALL, model=model_identity(MANIFEST, SMALL, encoder_precision="int8"))
    e.add(np.ones((2, SMALL.n_embd), np.float32), ids=["a", "b"])
    assert e.model["encoder_precision"] == "int8"
    with pytest.raises(InputError, match="encoder precision must be one of"):
        model_identity(MANIFEST, SMALL, encoder_precision="fp8")
    # an edited value (checksums made to match) is one clear error, shown short
    folder = tmp_path / "gal" / _read_pointer(tmp_path / "gal")["version"]
    for value in (8, ["fp32"], "bogus", "x" * 5_000_000, "fp32\n\x1b[31mINFO fake"):
        items = json.loads((folder / ITEMS).read_text())
        items["model"]["encoder_precision"] = value
        items["content_sha256"] = _content_sha256(items)
        items["model_sha256"] = _canonical_sha256(items["model"])
        (folder / ITEMS).write_text(json.dumps(items))
        with pytest.raises(InputError, match="model.encoder_precision must be one of") as err:
            Gallery.load(tmp_path / "gal", SMALL, model=model_identity(MANIFEST, SMALL, encoder_precision="fp32"))
        assert len(str(err.value)) < 400 and "\n" not in str(err.value)


def test_the_pipeline_records_its_encoder_precision(pipe):
    assert pipe.gallery().model["encoder_precision"] == "fp32"


def test_a_gallery_of_another_input_size_is_refused_by_the_pipeline(pipe, resnet18_export, tmp_path):
    """End to end: the same files under a manifest that says 128x64.  The manifest no longer describes
    its encoder (recorded or actual input 256x128), so the model directory is refused when loaded,
    before any gallery; with the recorded shapes edited too, the ONNX file itself disagrees.  (The
    gallery's own identity check: test_a_gallery_opens_only_with_the_model_that_made_it.)"""
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
    with pytest.raises(InputError, match=r"records input images is float32 \[batch, 3, 256, 128\], expected "
                                         r"float32 \[\*, 3, 128, 64\]"):
        Pipeline.load(other).gallery(tmp_path / "gal")
    manifest["files"]["encoder"]["inputs"][0]["shape"] = ["batch", 3, 128, 64]
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=r"encoder.onnx is not the encoder network .* input images is float32 "
                                         r"\[batch, 3, 256, 128\]"):
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


# ---- output paths, config injection, ranges, sizes (items 7, 8, 9, 11 of the hardening issue) ----


@pytest.fixture(scope="module")
def small_export(tmp_path_factory):
    """A random 128-d model (the shipped model's shapes): texts must say 128, not the default 256."""
    from precision_support import random_small_export

    return random_small_export(tmp_path_factory)[1]


def cli(*args):
    from click.testing import CliRunner

    from runtime.cli import main as runtime_cli

    return CliRunner().invoke(runtime_cli, [str(a) for a in args])


def one_error(result, *words):
    """Exit status 2, one line that says what is wrong, no traceback."""
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.lower().startswith("error:")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def tree(folder: Path) -> dict:
    """Every path below ``folder`` with its bytes (files) or None (folders)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def test_deepstream_config_into_a_directory_is_one_error_and_writes_nothing(small_export, tmp_path):
    (tmp_path / "dsdir").mkdir()
    one_error(cli("deepstream-config", small_export, tmp_path / "dsdir"), "is a directory", "give a file name")
    assert tree(tmp_path) == {"dsdir": None}           # no dsdir.encoder.onnx, no .dsdir.*.tmp


@pytest.mark.parametrize("name", ["manifest.json", "encoder.onnx", "nformer_layers.onnx", "nformer"])
def test_deepstream_config_never_replaces_a_file_of_the_model(small_export, tmp_path, name):
    model = tmp_path / "model"
    model.mkdir()
    for f in small_export.iterdir():
        os.link(f, model / f.name)
    before = tree(model)
    # "nformer": the config is new, but its folded encoder would be nformer.encoder.onnx (free): allowed
    result = cli("deepstream-config", model, model / name)
    if name == "nformer":
        assert result.exit_code == 0, result.output
        assert {k: v for k, v in tree(model).items() if k in before} == before
        return
    one_error(result, f"would replace {name}", "model directory")
    assert tree(model) == before
    # also through a symbolic link to the model directory
    (tmp_path / "link").symlink_to(model)
    one_error(cli("deepstream-config", model, tmp_path / "link" / name), "would replace")
    assert tree(model) == before
    Pipeline.load(model)


@pytest.mark.parametrize("ids", ["0\nnetwork-mode=0\n[evil]", "0;x", "-1", "", "1.5", "0;;2", "2147483648", "0 2"])
def test_deepstream_class_ids_that_are_not_class_ids_are_refused(small_export, tmp_path, ids):
    one_error(cli("deepstream-config", small_export, tmp_path / "sgie.txt", "--operate-on-class-ids", ids),
              "operate-on-class-ids must be semicolon-separated class ids")
    assert list(tmp_path.iterdir()) == []


def test_deepstream_config_holds_exactly_its_keys(small_export, tmp_path):
    import configparser

    from runtime.serving.exports import write_deepstream_config

    r = cli("deepstream-config", small_export, tmp_path / "sgie.txt", "--operate-on-class-ids", " 0 ; 2 ",
            "--gpu-id", 2**31 - 1, "--plugin-lib", "none")
    assert r.exit_code == 0, r.output
    parser = configparser.ConfigParser(inline_comment_prefixes=None, strict=True)
    parser.read(tmp_path / "sgie.txt")
    assert parser.sections() == ["property"]
    p = parser["property"]
    assert p["operate-on-class-ids"] == "0;2" and p["gpu-id"] == str(2**31 - 1)
    assert sorted(p) == sorted(["gpu-id", "net-scale-factor", "offsets", "model-color-format", "onnx-file", "infer-dims",
                                "batch-size", "network-mode", "network-type", "output-tensor-meta",
                                "output-blob-names", "process-mode", "gie-unique-id", "operate-on-gie-id",
                                "operate-on-class-ids", "maintain-aspect-ratio", "scaling-filter"])
    r = cli("deepstream-config", small_export, tmp_path / "sgie2.txt", "--gpu-id", 2**31)
    assert r.exit_code == 2 and "--gpu-id" in r.output and not (tmp_path / "sgie2.txt").exists()
    for kwargs, words in ((dict(gpu_id=2**31), "gpu id must be an integer from 0 to 2147483647"),
                          (dict(batch_size=True), "batch size must be an integer"),
                          (dict(gie_unique_id=0), "gie-unique-id must be an integer from 1"),
                          (dict(operate_on_class_ids=[0, "1\n[x]"]), "operate-on-class-ids")):
        with pytest.raises(InputError, match=words):
            write_deepstream_config(small_export, tmp_path / "api.txt", plugin_library=None, **kwargs)
    assert write_deepstream_config(small_export, tmp_path / "api.txt", plugin_library=None,
                                   operate_on_class_ids=[0, 3])["config"]
    assert "operate-on-class-ids=0;3\n" in (tmp_path / "api.txt").read_text()


@pytest.mark.parametrize("where", ["out", "engine", "plugin"])
def test_deepstream_paths_with_a_line_break_are_refused(small_export, tmp_path, where):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    odd = tmp_path / "odd\nname=1\n[evil]"
    odd.mkdir()
    args = ["deepstream-config", small_export, out_dir / "sgie.txt"]
    if where == "out":
        args[2] = odd / "sgie.txt"
    elif where == "engine":
        (odd / "e.plan").write_bytes(b"x")
        args += ["--engine", odd / "e.plan"]
    else:
        (odd / "lib.so").write_bytes(b"x")
        args += ["--plugin-lib", odd / "lib.so"]
    one_error(cli(*args), "contains '\\n'", "rename or move it")
    assert list(out_dir.iterdir()) == [] and sorted(p.name for p in odd.iterdir()) == \
        {"out": [], "engine": ["e.plan"], "plugin": ["lib.so"]}[where]


@pytest.mark.parametrize("option, value", [("--instances", "99999999999999999999"), ("--max-batch", "3000000000"),
                                           ("--instances", str(2**31)), ("--max-queue-delay-us", str(2**64))])
def test_triton_values_its_parser_rejects_are_refused(small_export, tmp_path, option, value):
    r = cli("triton-repo", small_export, tmp_path / "repo", option, value)
    assert r.exit_code == 2 and option in r.output and "Traceback" not in r.output, r.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option, value", [("--max-n", "99999999999999999999"), ("--max-n", "1000001"),
                                           ("--opt-n", str(2**31)), ("--min-n", str(2**63)),
                                           ("--max-batch", "4097"), ("--opt-batch", str(2**31)),
                                           ("--min-batch", "99999999999999999999")])
def test_engine_profile_sizes_past_the_largest_profile_are_refused(small_export, tmp_path, option, value):
    """TensorRT's dimensions are 32-bit: a profile size past the largest (batch 4096, N 1,000,000) is
    one error before anything is written, not a number that overflows in trtexec."""
    before = tree(small_export)
    line = one_error(cli("build", small_export, "--precision", "fp16", "--engine-tool", "none", option, value),
                     option, value)
    assert ("1<=x<=4096" if "batch" in option else "1<=x<=1000000") in line
    assert tree(small_export) == before and list(tmp_path.iterdir()) == []


def test_triton_extremes_triton_accepts_parse_and_the_library_checks_too(small_export, tmp_path):
    from runtime.serving.exports import write_triton_repository

    for kwargs, words in ((dict(max_batch=3_000_000_000), "max_batch must be an integer from 1 to 2147483647"),
                          (dict(instance_count=2**31), "instance_count must be an integer from 1 to 2147483647"),
                          (dict(max_queue_delay_us=2**64), "max_queue_delay_us must be an integer from 0 to"),
                          (dict(max_batch=1.5), "max_batch must be an integer")):
        with pytest.raises(InputError, match=words):
            write_triton_repository(small_export, tmp_path / "repo", **kwargs)
    assert list(tmp_path.iterdir()) == []
    r = cli("triton-repo", small_export, tmp_path / "repo", "--max-batch", 2**31 - 1, "--instances", 2**31 - 1,
            "--max-queue-delay-us", 2**64 - 1)
    assert r.exit_code == 0, r.output
    pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed: Triton's model_config "
                        "protobuf is needed to parse config.pbtxt")
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    enc = text_format.Parse((tmp_path / "repo" / "nformer_encoder" / "config.pbtxt").read_text(),
                            model_config_pb2.ModelConfig())
    assert (enc.max_batch_size, enc.instance_group[0].count, enc.dynamic_batching.max_queue_delay_microseconds) == \
        (2**31 - 1, 2**31 - 1, 2**64 - 1)
    # what the refused values would have written: Triton's own parser rejects them
    from google.protobuf.text_format import ParseError

    with pytest.raises(ParseError):
        text_format.Parse("max_batch_size: 3000000000", model_config_pb2.ModelConfig())


def test_serving_texts_give_the_models_own_feature_dim(small_export, tmp_path):
    from runtime.serving.exports import write_deepstream_config, write_triton_repository

    import re

    def without_paths(text):        # pytest's folders (pytest-256/...) may hold any number
        return re.sub(r"/[^\s'\"]+", "", text)

    write_triton_repository(small_export, tmp_path / "repo")
    readme = without_paths((tmp_path / "repo" / "README.md").read_text())
    assert "[batch, 128]" in readme and "[1, N, 128]" in readme and "256" not in readme
    write_deepstream_config(small_export, tmp_path / "sgie.txt", plugin_library=None)
    text = without_paths((tmp_path / "sgie.txt").read_text())
    assert "128-d embedding" in text and "256" not in text


# ---- embed: --out, --names-out and crop names ----


@pytest.fixture()
def crop_folder(tmp_path):
    from PIL import Image

    folder = tmp_path / "crops"
    folder.mkdir()
    for i, c in enumerate(crops(2, seed=3)):
        Image.fromarray(c).save(folder / f"{i:03d}.png")
    return folder


def test_names_out_equal_to_out_is_refused_before_anything_is_written(small_export, crop_folder, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    one_error(cli("embed", small_export, crop_folder, "--out", out / "e.npy", "--names-out", out / "." / "e.npy"),
              "--names-out", "same file as --out")
    assert list(out.iterdir()) == []


def test_a_crop_name_that_is_not_utf8_is_written_byte_for_byte(small_export, crop_folder, tmp_path):
    raw = b"caf\xe9_\xff.png"                               # Latin-1, not UTF-8
    (crop_folder / "001.png").rename(crop_folder / os.fsdecode(raw))
    out = tmp_path / "o"
    out.mkdir()
    r = cli("embed", small_export, crop_folder, "--out", out / "e.npy", "--names-out", out / "names.txt")
    assert r.exit_code == 0, r.output
    names = (out / "names.txt").read_bytes().split(b"\n")
    assert names == [b"000.png", raw, b""]                  # one line per row, as the file system names them
    assert np.load(out / "e.npy").shape == (2, 128)
    assert sorted(p.name for p in out.iterdir()) == ["e.npy", "names.txt"]


@pytest.mark.parametrize("brk", ["\n", "\r", "\u2028", "\x0c"])
def test_a_crop_name_with_a_line_break_is_refused_before_anything_is_written(small_export, crop_folder, tmp_path, brk):
    (crop_folder / "001.png").rename(crop_folder / f"a{brk}b.png")
    out = tmp_path / "o"
    out.mkdir()
    one_error(cli("embed", small_export, crop_folder, "--out", out / "e.npy", "--names-out", out / "names.txt"),
              "contains a line break", "rename the file or leave out --names-out")
    assert list(out.iterdir()) == []
    # without --names-out the name does not matter
    assert cli("embed", small_export, crop_folder, "--out", out / "e.npy").exit_code == 0


def test_embed_and_refine_never_replace_a_file_of_the_model(small_export, crop_folder, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for f in small_export.iterdir():
        os.link(f, model / f.name)
    before = tree(model)
    one_error(cli("embed", model, crop_folder, "--out", model / "encoder.onnx"), "would replace encoder.onnx")
    one_error(cli("embed", model, crop_folder, "--out", tmp_path / "e.npy", "--names-out", model / "manifest.json"),
              "would replace manifest.json")
    np.save(tmp_path / "x.npy", np.ones((3, 128), np.float32))
    one_error(cli("refine", model, tmp_path / "x.npy", "--out", model / "nformer.onnx"), "would replace nformer.onnx")
    assert tree(model) == before
    # nor anything in the model's own folders: the calibration cache (a cache entry replaced by .npy bytes
    # made the next build recalibrate), new names in it too, and through a link to it
    cache = model / "calibration_cache"
    cache.mkdir()
    (cache / "encoder.entropy.0123.json").write_text("{}")
    (tmp_path / "cache_link").symlink_to(cache)
    before = tree(model)
    for out in (cache / "encoder.entropy.0123.json", cache / "new.npy", tmp_path / "cache_link" / "x.npy"):
        one_error(cli("refine", model, tmp_path / "x.npy", "--out", out), "calibration_cache/", "somewhere else")
    one_error(cli("embed", model, crop_folder, "--out", cache / "e.npy"), "calibration_cache/")
    assert tree(model) == before and not (tmp_path / "e.npy").exists()


# ---- features beyond what a float32 norm can take ----


@pytest.mark.parametrize("value, dtype", [(1e30, np.float32), (1e39, np.float64), (-3e20, np.float32)])
def test_embeddings_that_overflow_the_float32_norm_are_refused(pipe, value, dtype):
    from runtime.refiner import feature_limit

    x = np.random.default_rng(0).standard_normal((6, 256)).astype(dtype)
    x[2:4] *= value
    with pytest.raises(InputError, match=r"values beyond \+-5\.76e\+17 in 2 row\(s\), first rows \[2, 3\].*overflow"):
        pipe.refine(x)
    g = pipe.gallery()
    g.add(np.ones((2, 256), np.float32))
    with pytest.raises(InputError, match="overflow"):
        g.add(x)
    with pytest.raises(InputError, match="overflow"):
        g.search(x)
    assert len(g) == 2
    # just inside the bound: distinct rows come out distinct, and finite
    y = np.random.default_rng(1).standard_normal((6, 256))
    y = (y / np.abs(y).max(axis=1, keepdims=True) * feature_limit(256)).astype(np.float32)
    refined = pipe.refine(y)
    assert np.isfinite(refined).all() and len(np.unique(refined.round(4), axis=0)) == 6
    np.testing.assert_allclose(refined, pipe.refine(y / np.float32(1e17)), atol=1e-5)


# ---- gallery save, synth: places that cannot be written ----


def test_gallery_save_into_a_read_only_directory_is_one_clear_error(tmp_path, monkeypatch):
    import stat

    import runtime.gallery as gallery_module

    g = small_gallery()
    g.save(tmp_path / "gal")
    before = tree(tmp_path / "gal")
    (tmp_path / "gal").chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.geteuid() == 0:   # root writes anywhere: make the write fail as a read-only folder would
            def denied(*a, **k):
                raise PermissionError(13, "Permission denied")
            monkeypatch.setattr(gallery_module, "make_temp_dir", denied)
        with pytest.raises(InputError, match=r"cannot save a gallery to .*gal: Permission denied; check that the "
                                             "directory is writable"):
            small_gallery(seed=1).save(tmp_path / "gal")
    finally:
        (tmp_path / "gal").chmod(0o755)
    assert tree(tmp_path / "gal") == before
    # a write failing half-way (disk full) is one error too, and the previous version stays
    monkeypatch.undo()

    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(gallery_module, "write_bytes_atomic", full)
    with pytest.raises(InputError, match="No space left on device; the previous version, if any, is unchanged"):
        small_gallery(seed=1).save(tmp_path / "gal")
    monkeypatch.undo()
    assert tree(tmp_path / "gal") == before
    assert Gallery.load(tmp_path / "gal", SMALL).ids == g.ids


def test_a_gallery_whose_serve_lock_is_no_file_is_refused_without_waiting(tmp_path):
    """A FIFO named .serve.lock in a gallery directory made Gallery.save wait forever (opening a
    FIFO for reading blocks until someone writes to it)."""
    g = small_gallery()
    g.save(tmp_path / "gal")
    fifo = tmp_path / "gal" / ".serve.lock"
    os.mkfifo(fifo)
    before = tree(tmp_path / "gal")
    try:
        with pytest.raises(InputError, match=r"\.serve\.lock is not a regular file"):
            in_thread(lambda: small_gallery(seed=1).save(tmp_path / "gal"), timeout=20)
    finally:
        try:                                  # release a reader still blocked in open(), should there be one
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    assert tree(tmp_path / "gal") == before
    assert Gallery.load(tmp_path / "gal", SMALL).ids == g.ids


def test_synth_into_an_existing_file_is_one_clear_error(tmp_path):
    (tmp_path / "data").write_text("keep me")
    one_error(cli("synth", tmp_path / "data", "--identities", 4), "is a file", "choose a new or empty directory")
    one_error(cli("synth", tmp_path / "data" / "sub", "--identities", 4), "cannot create")
    assert tree(tmp_path) == {"data": b"keep me"}
    # more identities than Market-1501's four-digit person ids: one error, nothing written
    one_error(cli("synth", tmp_path / "big", "--identities", 2000), "--identities", "1501")
    one_error(cli("demo", "--work-dir", tmp_path / "demo", "--identities", 1502), "--identities", "1501")
    from runtime.evaluation.synth import generate

    with pytest.raises(InputError, match="1501"):
        generate(tmp_path / "lib", identities=1502)
    for bad in (4.5, 10.0, "10", None, True):         # one error before anything is written
        with pytest.raises(InputError, match="--identities must be 4..1501"):
            generate(tmp_path / "lib", identities=bad)
    assert generate(tmp_path / "lib", identities=np.int64(4))["query"] > 0
    (tmp_path / "lib").rename(tmp_path / "lib4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "lib4"]


# ---- file modes: everything written follows the umask ----


def test_everything_written_follows_the_umask(tmp_path_factory, tmp_path):
    """Export, build, embed (with names), refine, a report, a gallery save, triton-repo,
    deepstream-config and synth under umask 027: every file 0640 and every folder 0750 (027 rather
    than the usual 022 so that a hard-coded 0644/0755 shows as well as mkstemp's 0600 / mkdtemp's 0700)."""
    import stat

    from PIL import Image

    from export.to_onnx import export_checkpoint
    from precision_support import random_small_export
    from runtime.cli.options import write_report
    from runtime.evaluation.synth import generate

    ckpt = random_small_export(tmp_path_factory)[0]
    folder = tmp_path / "crops"
    folder.mkdir()
    for i, c in enumerate(crops(3, seed=5)):
        Image.fromarray(c).save(folder / f"{i}.png")
    root = tmp_path / "written"
    root.mkdir()
    old = os.umask(0o027)
    try:
        result = export_checkpoint(ckpt, root / "build", input_size_hw=(128, 64), batches=(2,), sizes=(9,),
                                   log=lambda *a: None)
        assert result["ok"]
        model = root / "build"
        assert cli("build", model, "--precision", "fp16", "--engine-tool", "none").exit_code == 0
        (root / "out").mkdir()
        r = cli("embed", model, folder, "--out", root / "out" / "e.npy", "--names-out", root / "out" / "names.txt")
        assert r.exit_code == 0, r.output
        assert cli("refine", model, root / "out" / "e.npy", "--out", root / "out" / "r.npy").exit_code == 0
        write_report(root / "out" / "report.json", {"rows": []})
        with Pipeline.load(model) as p:
            g = p.gallery()
            g.add(np.load(root / "out" / "e.npy"))
            g.save(root / "gal")
        assert cli("triton-repo", model, root / "triton_models").exit_code == 0
        assert cli("deepstream-config", model, root / "out" / "sgie.txt", "--plugin-lib", "none").exit_code == 0
        generate(root / "synth", identities=4)
    finally:
        os.umask(old)
    wrong = []
    for path in sorted(root.rglob("*")):
        mode = stat.S_IMODE(path.lstat().st_mode)
        want = 0o750 if path.is_dir() else 0o640
        if mode != want:
            wrong.append(f"{path.relative_to(root)}: {oct(mode)} (expected {oct(want)})")
    assert not wrong, "\n".join(wrong)
    names = {str(p.relative_to(root)) for p in root.rglob("*")}
    assert {"build/manifest.json", "build/encoder.onnx", "build/encoder.fp16.onnx", "out/names.txt",
            "triton_models/nformer_encoder/config.pbtxt", "out/sgie.encoder.onnx", "gal/CURRENT",
            "synth/query"} <= names
    assert not [n for n in names if ".tmp" in n or ".export-" in n], names


def test_sigterm_during_a_runtime_command_removes_its_work_folder(tmp_path):
    """``runtime synth`` (any runtime subcommand) stopped by SIGTERM exits 143 and leaves nothing
    half-written: its work folder is removed like on Ctrl-C."""
    import signal

    from process_support import sigterm_once

    out = tmp_path / "data"
    status, err = sigterm_once(["runtime.cli", "synth", str(out), "--identities", "1500"],
                               lambda: any(out.glob(".synth-*/*/*.jpg")), "synth writing images")
    assert status == 128 + signal.SIGTERM, err.decode(errors="replace")[-2000:]
    assert not out.exists()                   # its work folder, and the folder it created for the data set
    assert b"Traceback" not in err


# ---- outputs: special files, the model's files, write errors, names (a hostile review, session 6) ----


def test_an_output_over_a_fifo_or_socket_is_refused_and_left_alone(small_export, tmp_path):
    """Outputs are renamed into place: over a FIFO (or, as root, /dev/null) that replaced the node."""
    import socket

    np.save(tmp_path / "x.npy", np.ones((3, 128), np.float32))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    try:
        for target, kind in ((fifo, "a FIFO"), (sock_path, "a socket")):
            one_error(cli("refine", small_export, tmp_path / "x.npy", "--out", target), kind, "not a regular file")
        one_error(cli("deepstream-config", small_export, fifo), "a FIFO")
        import stat

        assert stat.S_ISFIFO(os.stat(fifo).st_mode) and stat.S_ISSOCK(os.stat(sock_path).st_mode)
    finally:
        sock.close()
    from export.contract.files import WriteError, write_bytes_atomic

    with pytest.raises(InputError, match="a FIFO"):        # the library writers refuse it too
        write_bytes_atomic(fifo, b"x")
    assert issubclass(WriteError, OSError) and issubclass(WriteError, InputError)


def test_reports_never_replace_a_file_of_the_model(small_export, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(small_export, model)
    before = tree(model)
    one_error(cli("bench", model, "--json", model / "manifest.json", "--requests", "1", "--producers", "1",
                  "--refine-sizes", ""), "--json", "would replace manifest.json")
    data = tmp_path / "data"
    one_error(cli("evaluate", data, "--model-dir", model, "--report", model / "encoder.onnx"),
              "--report", "would replace encoder.onnx")
    one_error(cli("parity", model, "--data", data, "--report", model / "manifest.json"), "would replace manifest.json")
    assert tree(model) == before


def test_a_long_output_name_and_a_full_disk_are_one_clear_error(small_export, tmp_path, monkeypatch):
    np.save(tmp_path / "x.npy", np.ones((3, 128), np.float32))
    name = "e" * 246 + ".npy"                               # 250 bytes: the file system takes it, name + 14 it did not
    r = cli("refine", small_export, tmp_path / "x.npy", "--out", tmp_path / name)
    assert r.exit_code == 0, r.output
    assert np.load(tmp_path / name).shape == (3, 128)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(np, "save", full)
    one_error(cli("refine", small_export, tmp_path / "x.npy", "--out", tmp_path / "y.npy"),
              "cannot write", "No space left on device", "free some space")
    assert not (tmp_path / "y.npy").exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_npy_inputs_that_are_no_single_array_are_one_clear_error(small_export, tmp_path):
    from numpy.lib import format as npy

    with open(tmp_path / "huge.npy", "wb") as f:           # 93 TiB promised, 1 KiB there
        npy.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (10 ** 11, 256)})
        f.write(b"\0" * 1024)
    np.savez(tmp_path / "a.npz", x=np.zeros((3, 128), np.float32))
    one_error(cli("refine", small_export, tmp_path / "huge.npy", "--out", tmp_path / "o.npy"),
              "header promises shape (100000000000, 256)", "holds 1,024")
    np.save(tmp_path / "x.npy", np.ones((3, 128), np.float32))
    one_error(cli("refine", small_export, tmp_path / "x.npy", "--landmarks", tmp_path / "huge.npy", "--out",
                  tmp_path / "o.npy"), "header promises")
    one_error(cli("refine", small_export, tmp_path / "a.npz", "--out", tmp_path / "o.npy"), "an .npz archive")
    (tmp_path / "names.txt").write_text("0001_c1s1_000001_00.jpg\n")    # was: "(Cannot load file containing pickled data ...)"
    line = one_error(cli("refine", small_export, tmp_path / "names.txt", "--out", tmp_path / "o.npy"), ".npy signature")
    assert "pickle" not in line
    assert not (tmp_path / "o.npy").exists()


def test_an_output_name_that_is_not_utf8_is_reported_not_a_crash(small_export, tmp_path):
    """The "wrote ..." line of a name with bytes that are not UTF-8 (was a UnicodeEncodeError after the
    work, exit 1, with PYTHONIOENCODING=utf-8)."""
    np.save(tmp_path / "x.npy", np.ones((3, 128), np.float32))
    out = tmp_path / os.fsdecode(b"bad\xff.npy")
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    r = subprocess.run([sys.executable, "-m", "runtime", "refine", str(small_export), str(tmp_path / "x.npy"),
                        "--out", str(out)], capture_output=True, cwd=REPO, env=env, timeout=300)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    assert b"wrote" in r.stdout and b"\\udcff" in r.stdout
    assert np.load(out).shape == (3, 128)


def test_triton_repo_into_the_current_directory_is_one_clear_error(small_export, tmp_path, monkeypatch):
    here = tmp_path / "empty"
    here.mkdir()
    monkeypatch.chdir(here)
    one_error(cli("triton-repo", small_export, "."), "is the current directory", "./triton_models")
    assert list(here.iterdir()) == []
    r = cli("triton-repo", small_export, "triton_models")   # a relative OUT below it works
    assert r.exit_code == 0, r.output
    assert (here / "triton_models" / "nformer_repository.json").is_file()


def _edited(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    edit(manifest)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def _swap_paths(m):
    enc, ref = m["files"]["encoder"], m["files"]["nformer"]
    enc["path"], ref["path"], enc["sha256"], ref["sha256"] = ref["path"], enc["path"], ref["sha256"], enc["sha256"]


def _topk_and_op(m):
    m["model"]["topk"] = 5
    for op in m["custom_ops"]:
        op["attributes"]["k"] = 5


@pytest.mark.parametrize("edit, words", [
    (lambda m: m["model"].update(feature_dim=64), ["files.encoder records output embeddings", "[*, 64]"]),
    (lambda m: m["model"].update(n_layer=2), ["files.nformer records input landmarks", "[2, *]"]),
    (lambda m: m["model"].update(input_size_hw=[96, 48]), ["input images", "[*, 3, 96, 48]"]),
    (lambda m: m["model"].update(input_size_hw=[100000, 100000]), ["input images"]),
    (lambda m: m["model"].update(topk=5), ["exported with k = ", "topk = 5"]),
    (_topk_and_op, ["node has k = 20", "topk is 5"]),                  # consistent edit: the file itself says 20
    (_swap_paths, ["is not the encoder network", "inputs"]),            # checksums moved with the paths
    (lambda m: m["files"]["encoder"].update(path="nformer_layers.onnx",
                                             sha256=m["files"]["nformer_layers"]["sha256"]), ["not the encoder"]),
])
def test_a_manifest_that_no_longer_describes_its_files_is_one_clear_error(small_export, tmp_path, edit, words):
    """A model section edited after the export fed the files shapes they were not made for
    (tracebacks, a 100000 x 100000 resize) or, for topk, computed k = 5 lists on the CPU path and
    k = 20 inside nformer.onnx: refused when the model is opened."""
    model = _edited(small_export, tmp_path / "m", edit)
    np.save(tmp_path / "x.npy", np.ones((3, 128), np.float32))
    line = one_error(cli("refine", model, tmp_path / "x.npy", "--out", tmp_path / "o.npy"))
    for w in words:
        assert w in line, line
    assert not (tmp_path / "o.npy").exists()


def test_a_manifest_naming_a_file_that_is_no_onnx_model_is_one_clear_error(small_export, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(small_export, model)
    (model / "notes.bin").write_bytes(b"\x80\x02not a protobuf" * 100)
    from export.contract.files import sha256_file

    _edited(model, tmp_path / "m2", lambda m: m["files"]["encoder"].update(path="notes.bin",
                                                                          sha256=sha256_file(model / "notes.bin")))
    with pytest.raises(InputError, match="cannot open .*notes.bin as a model"):
        Pipeline.load(tmp_path / "m2")


def test_pipeline_api_values_that_are_not_what_they_look_like(resnet18_export, pipe, tmp_path):
    """embed("crop.jpg") read one crop per character; max_wait_ms=inf failed the first embed from
    inside the batcher (nan was taken); batch_size=1.5 and a generator of crops were TypeErrors."""
    from PIL import Image

    path = tmp_path / "crop.png"
    Image.fromarray(crops(1)[0]).save(path)
    one = pipe.embed(str(path))
    assert one.shape == (1, pipe.config.feature_dim)
    np.testing.assert_array_equal(pipe.embed(path), one)
    np.testing.assert_array_equal(pipe.embed(p for p in [path]), one)
    np.testing.assert_array_equal(pipe.embed(np.stack(crops(2))), pipe.embed(crops(2)))
    np.testing.assert_array_equal(pipe.embed(crops(1)[0]), pipe.embed(crops(1)))
    with pytest.raises(InputError, match="crops must be a list"):
        pipe.embed(42)
    for kwargs, words in (({"batch_size": 1.5}, "batch_size must be an integer"),
                          ({"batch_size": True}, "batch_size must be an integer"),
                          ({"dynamic_batching": True, "max_wait_ms": float("inf")}, "max_wait_ms"),
                          ({"dynamic_batching": True, "max_wait_ms": float("nan")}, "max_wait_ms"),
                          ({"dynamic_batching": True, "max_batch": 2.0}, "max_batch must be an integer"),
                          ({"dynamic_batching": "no"}, "dynamic_batching must be True or False")):
        with pytest.raises(InputError, match=words):
            Pipeline.load(resnet18_export[0], **kwargs)


@pytest.mark.parametrize("damage", ["unnormalised", "huge_embeddings", "nan_key", "topk_text", "shuffled_lists",
                                    "nan_refined", "unnormalised_refined"])
def test_gallery_arrays_edited_with_fresh_checksums_are_refused(tmp_path, damage):
    """features.npy scaled (search used other rows than the embeddings), embeddings past float32's
    norm (an overflow warning, then the wrong message), a NaN key in
    neighbors.npz (loaded, then a reshape error in search), topk saved as text (the message said
    "made for topk=20, this model has topk=20"), a list's neighbours permuted (loaded and served),
    refined.npy with NaN or rows that are not unit length (returned by Gallery.refine() as they were)."""
    from export.contract.files import sha256_file
    from runtime.gallery import ITEMS, _read_pointer

    small_gallery().save(tmp_path / "gal")
    folder = tmp_path / "gal" / _read_pointer(tmp_path / "gal")["version"]
    items = json.loads((folder / ITEMS).read_text())
    if damage == "unnormalised":
        np.save(folder / "features.npy", np.load(folder / "features.npy") * 2)
        words = "not embeddings.npy L2-normalised"
    elif damage == "huge_embeddings":   # their float32 norm overflowed (a RuntimeWarning, then "not normalised")
        np.save(folder / "embeddings.npy", np.full_like(np.load(folder / "embeddings.npy"), 3e38))
        words = "values beyond"
    elif damage == "nan_key":
        z = dict(np.load(folder / "neighbors.npz"))
        z["cand_key"][0, 0] = np.nan
        with open(folder / "neighbors.npz", "wb") as f:
            np.savez(f, **z)
        words = "not finite"
    elif damage in ("nan_refined", "unnormalised_refined"):   # loaded, then served by Gallery.refine() as is
        rows = np.ones((12, SMALL.n_embd), np.float32)
        if damage == "nan_refined":
            rows[3, 1] = np.nan
        np.save(folder / "refined.npy", rows)
        items["sha256"]["refined.npy"] = ""
        words = "refined.npy holds"
    elif damage == "shuffled_lists":    # one row's neighbours permuted, keys left in place: wrong neighbours served
        z = dict(np.load(folder / "neighbors.npz"))
        z["cand_uid"][0, :4] = z["cand_uid"][0, :4][::-1].copy()
        with open(folder / "neighbors.npz", "wb") as f:
            np.savez(f, **z)
        words = "not the key of that pair"
    else:
        items["model"]["topk"] = str(items["model"]["topk"])
        words = "topk='"
    for name in items["sha256"]:
        items["sha256"][name] = sha256_file(folder / name)
    (folder / ITEMS).write_text(json.dumps(_resign(items)))
    with pytest.raises(InputError, match=words):
        Gallery.load(tmp_path / "gal", SMALL)


def test_gallery_with_zero_refined_rows_loads(tmp_path):
    """l2_normalize keeps a zero row zero (and a row shorter than NORM_EPS short): such refined rows
    are what refine() gives for them, not damage."""
    from export.contract.files import sha256_file
    from runtime.gallery import ITEMS, _read_pointer

    small_gallery().save(tmp_path / "gal")
    folder = tmp_path / "gal" / _read_pointer(tmp_path / "gal")["version"]
    items = json.loads((folder / ITEMS).read_text())
    rows = np.zeros((12, SMALL.n_embd), np.float32)
    rows[1, 0], rows[2, :2] = 1e-13, (0.6, 0.8)
    np.save(folder / "refined.npy", rows)
    items["sha256"]["refined.npy"] = sha256_file(folder / "refined.npy")
    (folder / ITEMS).write_text(json.dumps(_resign(items)))
    np.testing.assert_array_equal(Gallery.load(tmp_path / "gal", SMALL).refine(), rows)


@pytest.mark.parametrize("damage", ["extra_member", "k", "reserve", "version_name"])
def test_gallery_neighbour_files_edited_with_fresh_checksums_are_refused(tmp_path, damage):
    """An extra neighbors.npz member was inflated in full (4 GB from 3.9 MB) before any check; a
    reserve of 1e9 loaded and failed the first add; k was not compared with topk; CURRENT naming
    "v²" loaded and broke the next save."""
    import zipfile

    from export.contract.files import sha256_file
    from runtime.gallery import ITEMS, POINTER, _read_pointer

    small_gallery().save(tmp_path / "gal")
    version = _read_pointer(tmp_path / "gal")["version"]
    folder = tmp_path / "gal" / version
    items = json.loads((folder / ITEMS).read_text())
    z = dict(np.load(folder / "neighbors.npz"))
    words = "damaged"
    if damage == "extra_member":
        with zipfile.ZipFile(folder / "neighbors.npz", "a", zipfile.ZIP_DEFLATED) as f:
            f.writestr("zeros.npy", b"\0" * (64 << 20))        # 64 MB inflated, a few KB on disk
        words = "members"
    elif damage == "k":
        z["k"] = np.int64(z["k"] + 1)
    elif damage == "reserve":
        items["reserve"] = 10 ** 9
        words = "reserve must be an integer in 0..1024"
    else:
        os.rename(folder, tmp_path / "gal" / "v²")
        pointer = json.loads((tmp_path / "gal" / POINTER).read_text())
        pointer["version"] = "v²"
        (tmp_path / "gal" / POINTER).write_text(json.dumps(pointer))
        words = "not a version directory"
    if damage == "k":
        with open(folder / "neighbors.npz", "wb") as f:
            np.savez(f, **z)
    if damage != "version_name":
        for name in items["sha256"]:
            items["sha256"][name] = sha256_file(folder / name)
        (folder / ITEMS).write_text(json.dumps(_resign(items)))
    with pytest.raises(InputError, match=words):
        Gallery.load(tmp_path / "gal", SMALL)


def test_gallery_ids_as_one_string_and_camids_beyond_int64_are_refused(tmp_path):
    g = small_gallery(n=3)
    x = np.ones((3, SMALL.n_embd), np.float32)
    for ids in ("abc", b"abc"):
        with pytest.raises(InputError, match="ids must be a list"):
            g.add(x, ids=ids)
    with pytest.raises(InputError, match="64-bit"):
        g.add(x, ids=["x", "y", "z"], camids=np.full(3, 2 ** 64 - 1, np.uint64))
    with pytest.raises(InputError, match="64-bit"):
        g.search(x[:1], query_camids=np.array([2 ** 64 - 1], np.uint64), refined=False)
    for reserve in (float("nan"), 10 ** 12, True, 2.5, -1):
        with pytest.raises(InputError, match="reserve"):
            Gallery(SMALL, reserve=reserve)
    assert len(g) == 3


def test_triton_repo_and_deepstream_config_never_overwrite_their_own_inputs(small_export, tmp_path):
    """triton-repo --overwrite deleted a model folder kept inside OUT_DIR; deepstream-config wrote
    its config over the --engine / --plugin-lib it names."""
    repo = tmp_path / "TR"
    assert cli("triton-repo", small_export, repo).exit_code == 0
    inside = repo / "mymodel"
    shutil.copytree(small_export, inside)
    before = tree(inside)
    one_error(cli("triton-repo", inside, repo, "--overwrite"), "or holds it")
    assert tree(inside) == before
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "reid.engine").write_bytes(b"plan")
    one_error(cli("deepstream-config", small_export, ds / "reid.engine", "--engine", ds / "reid.engine"), "--engine")
    (ds / "x.encoder.onnx").write_bytes(b"plan")
    one_error(cli("deepstream-config", small_export, ds / "x.txt", "--engine", ds / "x.encoder.onnx"), "--engine")
    assert (ds / "reid.engine").read_bytes() == b"plan" and (ds / "x.encoder.onnx").read_bytes() == b"plan"


@pytest.mark.parametrize("value", [-1.0, 1e300, 2.5])
def test_stored_thresholds_outside_the_distance_range_are_refused(small_export, tmp_path, value):
    from runtime.serving.open_set import _digest, load_thresholds, save_thresholds

    model = tmp_path / "m"
    shutil.copytree(small_export, model)
    manifest = json.loads((model / "manifest.json").read_text())
    path = save_thresholds(model, manifest, {"thresholds": {"refined": 0.5, "encoder": 0.6}, "far": 0.01})
    data = json.loads(path.read_text())
    data["thresholds"]["refined"] = value
    data["content_sha256"] = _digest(data)
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match="distances in 0..2"):
        load_thresholds(model, manifest)


def test_stored_thresholds_nested_past_the_recursion_limit_are_one_error(small_export, tmp_path):
    from runtime.serving.open_set import load_thresholds, save_thresholds

    model = tmp_path / "m"
    shutil.copytree(small_export, model)
    manifest = json.loads((model / "manifest.json").read_text())
    path = save_thresholds(model, manifest, {"thresholds": {"refined": 0.5, "encoder": 0.6}, "far": 0.01})
    path.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(InputError, match="cannot read"):
        load_thresholds(model, manifest)


def test_demo_outputs_follow_the_output_rules(small_export, tmp_path):
    """demo replaced another model's export in --work-dir/build, wrote --report over its encoder, and
    wrote --figure through a symlink (or failed with tracebacks for a missing folder, a FIFO, .onnx)."""
    from runtime.evaluation.demo import ensure_export

    work = tmp_path / "w"
    shutil.copytree(small_export, work / "build")
    before = tree(work / "build")
    with pytest.raises(InputError, match="another checkpoint"):
        ensure_export(work, log=lambda *a: None)
    one_error(cli("demo", "--work-dir", work, "--report", work / "build" / "encoder.onnx"), "would replace encoder.onnx")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    (tmp_path / "fig.png").symlink_to(victim)
    os.mkfifo(tmp_path / "fifo.png")
    for figure, words in ((tmp_path / "missing" / "f.png", "does not exist"), (tmp_path / "fifo.png", "a FIFO"),
                          (tmp_path / "f.onnx", "must be a .png")):
        one_error(cli("demo", "--work-dir", work, "--figure", figure), words)
    (tmp_path / "afile").write_text("x")
    one_error(cli("demo", "--work-dir", tmp_path / "afile" / "sub"), "is a file")
    assert tree(work / "build") == before and victim.read_text() == "keep"
    from runtime.evaluation.demo import draw_figure   # the figure replaces a link, never writes through it

    rng = np.random.default_rng(0)
    pids = np.repeat(np.arange(1, 5), 3)
    x = rng.standard_normal((len(pids), 8))
    draw_figure(tmp_path / "fig.png", {"curves": {("onnxruntime", "fp32", "refined"): (np.linspace(0.5, 1, 20), 0.5)},
                                       "projection": {"pids": pids, "encoder": x, "refined": x}})
    assert victim.read_text() == "keep" and not (tmp_path / "fig.png").is_symlink()
    assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_parity_runs_only_the_variant_files_the_manifest_lists(small_export, tmp_path):
    """A file named like a variant but not listed (or stale: its checksum no longer matches) was run
    by parity/demo as if it were the model's."""
    from runtime.evaluation.runners import onnxruntime_runner

    model = tmp_path / "m"
    shutil.copytree(small_export, model)
    shutil.copy(model / "encoder.onnx", model / "encoder.fp16.onnx")
    shutil.copy(model / "nformer.onnx", model / "nformer.fp16.onnx")
    shutil.copy(model / "encoder.onnx", model / "encoder.int8.onnx")
    assert onnxruntime_runner(model, "fp16") is None and onnxruntime_runner(model, "int8") is None
    runner = onnxruntime_runner(model, "fp32")
    assert runner is not None and runner.files == ("encoder.onnx", "nformer.onnx")


def test_an_embed_request_of_small_files_that_decode_to_huge_images_is_refused():
    """Eight 7000x7000 PNGs of 160 KB each took a server from 140 MB to 1.8 GB: one request's decoded
    pixels are bounded, not only each file's bytes and each crop's pixels."""
    import io

    from PIL import Image

    from runtime.serving.service import MAX_REQUEST_PIXELS, ReidService

    buf = io.BytesIO()
    Image.new("RGB", (5000, 5000)).save(buf, format="PNG")
    flat = buf.getvalue()
    assert len(flat) < 1 << 20
    service = ReidService.__new__(ReidService)
    service.max_request = 64
    assert len(service.decode(np.array([flat, flat], dtype=object))) == 2      # 50 Mpixel: fine
    with pytest.raises(InputError, match=f"more than {MAX_REQUEST_PIXELS:,} pixels .*crop 2 reaches"):
        service.decode(np.array([flat, flat, flat], dtype=object))


def test_third_review_regressions_stay_fixed(pipe, small_export, tmp_path):
    """Normal use the first fixes broke: a 1-D array of paths (a DataFrame column) and bytes paths
    to embed; a repository inside the model directory; a --figure in the --work-dir the demo makes;
    and a .npy that is a FIFO blocks no more."""
    from PIL import Image

    paths = []
    for i, c in enumerate(crops(2, seed=7)):
        paths.append(tmp_path / f"c{i}.png")
        Image.fromarray(c).save(paths[-1])
    want = pipe.embed([str(p) for p in paths])
    np.testing.assert_array_equal(pipe.embed(np.array([str(p) for p in paths])), want)
    np.testing.assert_array_equal(pipe.embed([os.fsencode(p) for p in paths]), want)
    np.testing.assert_array_equal(pipe.embed(os.fsencode(paths[0])), want[:1])
    model = tmp_path / "m"
    shutil.copytree(small_export, model)
    r = cli("triton-repo", model, model / "triton_models")
    assert r.exit_code == 0, r.output
    one_error(cli("triton-repo", model, model, "--overwrite"), "or holds it")
    one_error(cli("triton-repo", model, tmp_path, "--overwrite"), "or holds it")
    os.mkfifo(tmp_path / "in.npy")
    one_error(cli("refine", small_export, tmp_path / "in.npy", "--out", tmp_path / "o.npy"), "not a regular file")
    from runtime.cli.evaluation import demo as demo_command   # the figure's folder is the work dir it makes
    import runtime.evaluation.demo as demo_module

    seen = {}

    def fake_run(work_dir, report, figure, identities, seed, log):
        seen.update(work_dir=work_dir, figure=figure)
        return [], figure
    original, demo_module.run_demo = demo_module.run_demo, fake_run
    try:
        from click.testing import CliRunner

        r = CliRunner().invoke(demo_command, ["--work-dir", str(tmp_path / "new"), "--figure",
                                              str(tmp_path / "new" / "fig.png")])
    finally:
        demo_module.run_demo = original
    assert r.exit_code == 0 and seen["figure"] == tmp_path / "new" / "fig.png", r.output


def test_a_killed_demo_export_does_not_block_the_next_run(tmp_path):
    from export.contract.files import WORK_MARKER
    from runtime.evaluation import demo as demo_module

    leftover = tmp_path / "w" / "build" / ".export-abc"
    leftover.mkdir(parents=True)
    (leftover / WORK_MARKER).write_text("")
    calls = []

    def fake_export(*args, **kwargs):              # ensure_export imports it from export.to_onnx when it runs
        calls.append(args)
        return {"ok": True}
    import export.to_onnx as to_onnx

    real, to_onnx.export_checkpoint = to_onnx.export_checkpoint, fake_export
    try:
        assert demo_module.ensure_export(tmp_path / "w", log=lambda *a: None) == tmp_path / "w" / "build"
    finally:
        to_onnx.export_checkpoint = real
    assert len(calls) == 1                          # it exported again instead of refusing the folder


# ---- session 7 review: API values that are not what they look like ----

def test_gallery_ids_in_a_set_are_refused_and_default_ids_are_never_reused(tmp_path):
    """ids={'zeta', 'alpha'} took the set's hash-seeded order (the rows got other ids from run to
    run); default ids were max(int ids) + 1, so a removed item's id went to the next new item."""
    g = Gallery(SMALL, seed=0)
    x = np.random.default_rng(0).standard_normal((6, SMALL.n_embd)).astype(np.float32)
    for unordered in ({"a", "b"}, frozenset({"a", "b"}), {"a": 1, "b": 2}, {"a": 1, "b": 2}.keys()):
        with pytest.raises(InputError, match="ordered list"):
            g.add(x[:2], ids=unordered)
    assert len(g) == 0
    assert g.add(x[:3]) == [0, 1, 2]
    g.remove({2})                                  # removing takes a set: no order to get wrong
    assert g.add(x[3:4]) == [3]                    # not 2 again
    g.remove(g.ids)
    assert g.add(x[4:5]) == [4]                    # not 0 after emptying
    g.add(x[5:6], ids=["kept"])
    g.remove([4])
    g.save(tmp_path / "gal")                       # no integer id left in the saved items
    loaded = Gallery.load(tmp_path / "gal", SMALL)
    assert loaded.add(x[:1]) == [5]                # the counter survives save/load (not 0 again)
    assert [1] not in loaded and {} not in loaded  # unhashable: no such id (was a TypeError)


def test_ragged_nested_lists_are_one_error_everywhere_an_array_is_taken(resnet18_export, pipe):
    from runtime.neighbors import NeighborIndex

    width = pipe.config.n_embd
    x = np.random.default_rng(0).standard_normal((4, width)).astype(np.float32)
    ragged = [[0.0] * width, [0.0] * (width - 1)]
    with pytest.raises(InputError, match="embeddings must be a rectangular array"):
        pipe.refine(ragged)
    with pytest.raises(InputError, match="landmarks must be a rectangular array"):
        pipe.refine(x, landmarks=[[0, 1], [1], [2], [3]])
    g = pipe.gallery()
    with pytest.raises(InputError, match="camids must be a rectangular array"):
        g.add(x[:2], ids=["c", "d"], camids=[[1], [2, 3]])
    with pytest.raises(InputError, match="embeddings must be a rectangular array"):
        g.add(ragged, ids=["c", "d"])
    index = NeighborIndex(3)
    with pytest.raises(InputError, match="rows must be a rectangular array"):
        index.add([[1.0, 2.0], [1.0]])
    index.add(np.eye(3, dtype=np.float32))
    with pytest.raises(InputError, match="positions must be a rectangular array"):
        index.remove([[0], [1, 2]])
    with pytest.raises(InputError, match="beyond float32's range"):
        index.add(np.full((2, 3), 1e300))          # was "NaN or infinite values" and an overflow warning
    for bad, words in (((1.5,), "k must be an integer"), ((5, 1.5), "dim must be an integer"),
                       ((5, -1), "dim must be an integer")):
        with pytest.raises(InputError, match=words):
            NeighborIndex(*bad)
    with pytest.raises(InputError, match="reserve must be an integer"):
        NeighborIndex(5, reserve=1.5)


def test_crops_that_are_not_images_are_one_error_naming_the_crop(pipe, tmp_path):
    import io

    from PIL import Image

    path = tmp_path / "ok.png"
    Image.fromarray(crops(1)[0]).save(path)
    data = path.read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[:len(data) // 2])
    truncated = Image.open(tmp_path / "trunc.png")
    with Image.open(path) as closed:
        pass
    for crop, words in ((truncated, "could not be decoded"), (closed, "could not be decoded"),
                        (Image.new("RGB", (0, 0)), "1..")):
        with pytest.raises(InputError, match=words):
            pipe.embed([crop])
    with pytest.raises(InputError) as err:
        pipe.embed([data])                                   # encoded bytes, not a file name
    assert "bytes of data, not a file name" in str(err.value) and "PNG" not in str(err.value)
    with pytest.raises(InputError, match="open file"):
        pipe.embed(io.BytesIO(data))
    with pytest.raises(InputError, match=r"crop #5: a crop array must be uint8"):
        pipe.embed(crops(5) + [np.zeros((8, 8, 3), np.float64)])
    with pytest.raises(InputError, match="progress must be a function"):
        pipe.embed(crops(1), progress=5)
    one = crops(1)[0]
    np.testing.assert_array_equal(pipe.embed(memoryview(one)), pipe.embed([one]))


def test_pipeline_load_options_that_are_not_what_they_look_like(resnet18_export, monkeypatch):
    model_dir = resnet18_export[0]
    # threads=2**31 was a TypeError from ONNX Runtime's binding; 20,000 aborted the process (thread-local data)
    for kwargs, words in (({"threads": 0}, "threads must be an integer"), ({"threads": 1.5}, "threads must be"),
                          ({"threads": "2"}, "threads must be"), ({"threads": 2 ** 31}, "threads must be an integer"),
                          ({"threads": 10 ** 6}, "threads must be an integer in 1...*4 per CPU"),
                          ({"providers": "CPUExecutionProvider"}, "providers must be a list"),
                          ({"dynamic_batching": True, "max_batch": 0}, "max_batch must be an integer")):
        with pytest.raises(InputError, match=words):
            Pipeline.load(model_dir, **kwargs)
    for path in (None, 3, ["m"], str(model_dir) + "\0"):       # TypeErrors from pathlib; a NUL is no file name
        with pytest.raises(InputError, match="model directory must be a path"):
            Pipeline.load(path)
    with Pipeline.load(os.fsencode(str(model_dir))) as pipe:     # bytes, like crop paths
        with pytest.raises(InputError, match="max_batch"):
            pipe.enable_dynamic_batching(0)
    from runtime.backends import OnnxRuntimeBackend

    for value in ("two", "-1", str(2 ** 31)):
        monkeypatch.setenv("NFORMER_ORT_THREADS", value)
        with pytest.raises(InputError, match="NFORMER_ORT_THREADS must be an integer.*4 per CPU"):
            OnnxRuntimeBackend(model_dir / "encoder.onnx")
    monkeypatch.setenv("NFORMER_ORT_THREADS", "0")          # ONNX Runtime's default, as before the check
    OnnxRuntimeBackend(model_dir / "encoder.onnx")
    monkeypatch.delenv("NFORMER_ORT_THREADS")
    with pytest.raises(InputError, match="threads must be an integer"):
        OnnxRuntimeBackend(model_dir / "encoder.onnx", threads=2 ** 31)


def test_cli_readers_and_writers_say_what_they_expected(tmp_path, resnet18_export):
    from PIL import Image

    from export.contract.market1501 import read_market1501

    root = tmp_path / "upper"
    for folder in ("query", "bounding_box_test"):
        (root / folder).mkdir(parents=True)
    img = Image.fromarray(crops(1)[0])
    img.save(root / "query" / "0001_c1s1_000001_00.JPG", format="JPEG")    # upper-case suffixes were skipped
    img.save(root / "bounding_box_test" / "0001_c2s1_000001_00.jpeg", format="JPEG")
    data = read_market1501(root, splits=("query", "gallery"))
    assert [i.path.name for i in data.query] == ["0001_c1s1_000001_00.JPG"] and len(data.gallery) == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError) as err:
        read_market1501(tmp_path / "empty", splits=("query", "gallery"))
    assert "bounding_box_train" not in str(err.value)          # evaluate does not need it
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    one_error(cli("synth", tmp_path / "notes", "--identities", 4), "is not empty")
    assert sorted(p.name for p in (tmp_path / "notes").iterdir()) == ["keep.txt"]
    one_error(cli("embed", resnet18_export[0], root / "query" / "0001_c1s1_000001_00.JPG", "--out", tmp_path / "o.npy"),
              "is a file; give the folder")
    for args in (["--refine-sizes", "99999999999999999999"], ["--refine-sizes", "1000001"], ["--request-size", "100000"],
                 ["--producers", "100000"]):
        result = cli("bench", resnet18_export[0], "--producers", "1", "--requests", "1", *args)
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output


def test_providers_this_onnx_runtime_does_not_have_are_refused(resnet18_export):
    """providers=["Bogus"] (or CUDA on a CPU-only install) ran on the CPU with only ONNX Runtime's
    stderr warning: the caller thought it had asked for something else."""
    import onnxruntime as ort

    for providers in (["Bogus"], ["BogusExecutionProvider", "CPUExecutionProvider"]):
        with pytest.raises(InputError, match="not available"):
            Pipeline.load(resnet18_export[0], providers=providers)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(InputError, match="onnxruntime-gpu"):
            Pipeline.load(resnet18_export[0], providers=["CUDAExecutionProvider"])
    with Pipeline.load(resnet18_export[0], providers=["CPUExecutionProvider"]) as pipe:
        assert pipe.encoder.backend.providers == ["CPUExecutionProvider"]


def test_image_files_without_market_names_are_counted_and_reported(tmp_path):
    """They were skipped without a word: a folder of renamed crops was scored on a subset."""
    from PIL import Image

    from export.contract.market1501 import read_market1501

    root = tmp_path / "d"
    for folder in ("query", "bounding_box_test"):
        (root / folder).mkdir(parents=True)
    img = Image.fromarray(crops(1)[0])
    for name in ("0001_c1s1_000001_00.jpg", "person_a.jpg", "IMG_0001.PNG"):
        img.save(root / "query" / name, format="PNG" if name.endswith("PNG") else "JPEG")
    img.save(root / "bounding_box_test" / "0001_c2s1_000001_00.jpg", format="JPEG")
    (root / "query" / "notes.txt").write_text("not an image: not counted")
    data = read_market1501(root, splits=("query", "gallery"))
    assert len(data.query) == 1 and data.summary()["query"]["unnamed_skipped"] == 2
    assert data.notes() == ["query: 2 image file(s) skipped, their names are not PPPP_cC... Market-1501 names"]
    assert data.summary()["gallery"]["unnamed_skipped"] == 0


def test_triton_repo_with_a_long_output_name_the_file_system_accepts(small_export, tmp_path):
    """A 250-byte OUT_DIR name was refused ("File name too long"): the work folder's name was
    ".<name>.tmp-XXXXXXXX", past 255 bytes."""
    out = tmp_path / ("r" * 250)
    result = cli("triton-repo", small_export, out)
    assert result.exit_code == 0, result.output
    assert len(list(out.rglob("config.pbtxt"))) == 2                      # encoder and refinement
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]      # no work folder left
