"""``runtime threshold``: the open-set distance at a false-accept rate, stored with the model."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from export.contract.errors import InputError
from export.contract.market1501 import read_market1501
from runtime.cli import main as runtime_cli
from runtime.evaluation.threshold import fit_thresholds, threshold_at_far
from runtime.pipeline import Pipeline
from runtime.serving.open_set import OPEN_SET_FILE, load_thresholds


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=300), st.floats(0.001, 0.999))
def test_threshold_is_the_largest_distance_within_the_far(values, far):
    neg = np.array(values, np.float64) / 20.0          # many ties
    t = threshold_at_far(neg, far)
    assert np.mean(neg <= t) <= far + 1e-12
    above = neg[neg > t]
    if len(above):                                      # the next distance up would accept too many
        assert np.mean(neg <= above.min()) > far
    assert t >= 0 or neg.min() == 0 and t < 0


def test_threshold_refuses_a_far_outside_0_1():
    for far in (0.0, 1.0, -0.1, float("nan")):
        with pytest.raises(InputError, match="--far"):
            threshold_at_far(np.ones(3), far)


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    """6 identities, each seen by 3 cameras (2 crops each), with their own colours."""
    root = tmp_path_factory.mktemp("market")
    rng = np.random.default_rng(0)
    for folder in ("query", "bounding_box_test", "bounding_box_train"):
        (root / folder).mkdir()
    for pid in range(1, 7):
        colour = rng.integers(0, 256, size=3)
        for cam in (1, 2, 3):
            for n in range(2):
                img = np.clip(colour + rng.normal(0, 20, size=(96, 48, 3)), 0, 255).astype(np.uint8)
                folder = "query" if (cam == 1 and n == 0) else "bounding_box_test"
                Image.fromarray(img).save(root / folder / f"{pid:04d}_c{cam}s1_{n:06d}_00.jpg")
    Image.fromarray(np.zeros((96, 48, 3), np.uint8)).save(root / "bounding_box_train" / "0009_c1s1_000000_00.jpg")
    return root


@pytest.fixture()
def model_dir(resnet18_export, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(resnet18_export[0], dst)
    return dst


def test_fit_equals_a_direct_computation_and_is_stored_with_the_model(market, model_dir):
    record = fit_thresholds(market, model_dir, far=0.1, backend="onnxruntime")
    data = read_market1501(market, splits=("query", "gallery"))
    with Pipeline.load(model_dir, backend="onnxruntime") as pipe:
        q = pipe.embed([i.path for i in data.query])
        g = pipe.embed([i.path for i in data.gallery])
        gallery = pipe.gallery()
        gallery.add(g, ids=list(range(len(g))), camids=[i.camid for i in data.gallery])
        qp, qc = np.array([i.pid for i in data.query]), np.array([i.camid for i in data.query])
        gp, gc = np.array([i.pid for i in data.gallery]), np.array([i.camid for i in data.gallery])
        cross = qc[:, None] != gc[None, :]
        same, diff = (qp[:, None] == gp[None, :]) & cross, (qp[:, None] != gp[None, :]) & cross
        per_request = {"refined": np.concatenate([gallery.distances(q[i:i + 1]) for i in range(len(q))]),
                       "encoder": gallery.distances(q, refined=False)}
        for mode in ("refined", "encoder"):
            d = np.sqrt(np.maximum(per_request[mode], 0))
            t = threshold_at_far(d[diff], 0.1)
            assert record["thresholds"][mode] == t
            assert record["tar"][mode] == pytest.approx(np.mean(d[same] <= t))
    assert record["pairs"] == {"same_identity": int(same.sum()), "different_identity": int(diff.sum())}
    assert [row["far"] for row in record["table"]] == [0.1, 0.01]          # 0.001 needs > 1000 pairs
    with Pipeline.load(model_dir, backend="onnxruntime") as pipe:
        assert load_thresholds(model_dir, pipe.manifest) == record["thresholds"]


def test_a_stored_threshold_is_checked(market, model_dir):
    fit_thresholds(market, model_dir, far=0.1, backend="onnxruntime")
    path = model_dir / OPEN_SET_FILE
    manifest = json.loads((model_dir / "manifest.json").read_text())
    data = json.loads(path.read_text())
    data["thresholds"]["refined"] = 1.99                 # edited by hand
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match="checksum"):
        load_thresholds(model_dir, manifest)
    fit_thresholds(market, model_dir, far=0.1, backend="onnxruntime")
    other = json.loads(json.dumps(manifest))
    other["files"]["encoder"]["sha256"] = "0" * 64
    with pytest.raises(InputError, match="another encoder"):
        load_thresholds(model_dir, other)
    from runtime.serving.open_set import _digest

    data = json.loads(path.read_text())
    assert data["encoder_precision"] == "fp32"
    data["encoder_precision"] = "int9"                   # consistent checksum, impossible precision
    data["content_sha256"] = _digest(data)
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match="encoder_precision must be one of"):
        load_thresholds(model_dir, manifest)
    del data["encoder_precision"]                        # a file from before the precision was recorded
    data["content_sha256"] = _digest(data)
    path.write_text(json.dumps(data))
    assert set(load_thresholds(model_dir, manifest, encoder_precision="int8-cpu")) == {"refined", "encoder"}
    path.write_text("{not json")
    with pytest.raises(InputError, match="cannot read"):
        load_thresholds(model_dir, manifest)
    # serve refuses it with one clear error before starting anything
    pytest.importorskip("pytriton")
    result = CliRunner().invoke(runtime_cli, ["serve", str(model_dir), "--gallery", str(model_dir / "g")])
    assert result.exit_code == 2 and "cannot read" in result.output and "Traceback" not in result.output


def test_cli_prints_the_table_and_refuses_bad_input(market, model_dir):
    result = CliRunner().invoke(runtime_cli, ["threshold", str(market), "--model-dir", str(model_dir), "--far", "0.1",
                                              "--backend", "onnxruntime"])
    assert result.exit_code == 0, result.output
    assert "TAR (refined)" in result.output and "stored thresholds" in result.output
    assert (model_dir / OPEN_SET_FILE).is_file()
    for args, message in ((["--far", "0"], "--far"), (["--far", "1.5"], "--far")):
        bad = CliRunner().invoke(runtime_cli, ["threshold", str(market), "--model-dir", str(model_dir), *args])
        assert bad.exit_code == 2 and message in bad.output
    bad = CliRunner().invoke(runtime_cli, ["threshold", str(model_dir), "--model-dir", str(model_dir)])
    assert bad.exit_code == 2 and "Market-1501" in bad.output and "Traceback" not in bad.output


def test_serve_answers_unknown_beyond_the_stored_threshold(market, model_dir, tmp_path):
    from runtime.serving.triton_server import open_service

    record = fit_thresholds(market, model_dir, far=0.1, backend="onnxruntime")
    service = open_service(model_dir, tmp_path / "g", backend="onnxruntime")
    try:
        assert service.thresholds == record["thresholds"]
        width = service.width
        g = np.random.default_rng(0).standard_normal((30, width)).astype(np.float32)
        service.add(g, [f"g{i}" for i in range(30)], np.zeros(30, np.int64))
        q = np.concatenate([g[:3], np.random.default_rng(1).standard_normal((3, width)).astype(np.float32)])
        for mode in ("refined", "encoder"):
            ids, dist, unknown = service.search(q, np.full(6, -1), 2, mode)
            np.testing.assert_array_equal(unknown, dist[:, 0] > record["thresholds"][mode])
            assert [i.decode() for i in ids[:3, 0]] == ["g0", "g1", "g2"]
    finally:
        service.close()
    override = open_service(model_dir, tmp_path / "g", backend="onnxruntime", unknown_distance=0.25)
    try:
        assert override.thresholds == {"refined": 0.25, "encoder": 0.25} and len(override.store) == 30
    finally:
        override.close()


def test_a_request_size_the_fit_cannot_use_is_refused_and_a_short_last_request_is_recorded(market, model_dir):
    """--request-size 1024 with 6 queries recorded 1024 while every request held 6 (review, session 7)."""
    with pytest.raises(InputError, match="larger than the 6 queries"):
        fit_thresholds(market, model_dir, far=0.1, backend="onnxruntime", request_size=7, store=False)
    notes = []
    record = fit_thresholds(market, model_dir, far=0.1, backend="onnxruntime", request_size=4, store=False,
                            log=notes.append)
    assert (record["request_size"], record["last_request_size"], record["queries"]) == (4, 2, 6)
    assert any("the last request 2" in n for n in notes)
