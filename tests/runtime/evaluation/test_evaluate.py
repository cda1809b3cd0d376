"""`runtime evaluate` and `runtime bench` on a tiny Market-1501-layout folder; evaluate_rank by hand."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from runtime.cli import main as runtime_cli
from runtime.evaluation.evaluate import evaluate, rank_scores
from runtime.evaluation.metrics import euclidean_distances, evaluate_rank
from runtime.pipeline import Pipeline
from runtime.refiner import l2_normalize


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    """4 identities seen by 2-3 cameras, a distractor, a junk image; each identity has its own colours."""
    root = tmp_path_factory.mktemp("market")
    rng = np.random.default_rng(0)
    layout = {
        "query": [(1, 1), (2, 1), (3, 2), (4, 3)],
        "bounding_box_test": [(1, 1), (1, 2), (2, 2), (2, 3), (3, 1), (3, 3), (4, 1), (4, 2), (0, 1), (-1, 2)],
        "bounding_box_train": [(7, 1), (7, 2)],
    }
    palette = {pid: rng.integers(0, 256, size=3) for pid in range(-1, 8)}
    for folder, items in layout.items():
        (root / folder).mkdir()
        for n, (pid, cam) in enumerate(items):
            img = np.clip(palette[pid] + rng.normal(0, 25, size=(96, 48, 3)), 0, 255).astype(np.uint8)
            name = f"{pid:04d}_c{cam}s1_{n:06d}_00.jpg" if pid >= 0 else f"-1_c{cam}s1_{n:06d}_00.jpg"
            Image.fromarray(img).save(root / folder / name)
    return root


def test_evaluate_report_equals_a_direct_computation(market, resnet18_export):
    model_dir = resnet18_export[0]
    report = evaluate(market, model_dir, seed=1)
    rows = {(r["backend"], r["mode"]): r for r in report["results"]}
    assert set(rows) == {("onnxruntime", "encoder"), ("onnxruntime", "refined")}
    assert report["dataset"]["query"]["images"] == 4 and report["dataset"]["gallery"]["images"] == 9  # junk skipped
    pipe = Pipeline.load(model_dir)
    q_files = sorted((market / "query").glob("*.jpg"))
    g_files = sorted(p for p in (market / "bounding_box_test").glob("*.jpg") if not p.name.startswith("-1"))
    emb = pipe.embed(q_files + g_files)
    q_pids, g_pids = [1, 2, 3, 4], [0, 1, 1, 2, 2, 3, 3, 4, 4]
    q_cams = [0, 0, 1, 2]
    g_cams = [0, 0, 1, 1, 2, 0, 2, 0, 1]
    x = l2_normalize(emb)
    want = rank_scores(x[:4], x[4:], q_pids, g_pids, q_cams, g_cams)
    cmc, mAP = evaluate_rank(euclidean_distances(x[:4], x[4:]), q_pids, g_pids, q_cams, g_cams)
    assert want["mAP"] == pytest.approx(mAP) and want["rank1"] == pytest.approx(cmc[0])
    for key in ("mAP", "rank1", "rank5", "rank10"):
        assert rows[("onnxruntime", "encoder")][key] == pytest.approx(want[key], abs=1e-6)
    refined = pipe.refine(emb, seed=1)
    want_refined = rank_scores(refined[:4], refined[4:], q_pids, g_pids, q_cams, g_cams)
    for key in ("mAP", "rank1", "rank5", "rank10"):
        assert rows[("onnxruntime", "refined")][key] == pytest.approx(want_refined[key], abs=1e-6)
        assert 0.0 <= rows[("onnxruntime", "refined")][key] <= 1.0


def test_cli_evaluate_writes_a_report(market, resnet18_export, tmp_path):
    r = CliRunner().invoke(runtime_cli, ["evaluate", str(market), "--model-dir", str(resnet18_export[0]),
                                         "--report", str(tmp_path / "eval.json"), "--backend", "onnxruntime"])
    assert r.exit_code == 0, r.output
    assert "mAP" in r.output and "refined" in r.output
    report = json.loads((tmp_path / "eval.json").read_text())
    assert len(report["results"]) == 2 and report["dataset"]["query"]["images"] == 4
    for row in report["results"]:        # the curve, as long as the gallery allows (9 items: shorter than 50)
        assert len(row["cmc"]) == 9 and row["cmc"][0] == row["rank1"] and row["cmc"][9 - 1] == row["rank10"]
    r = CliRunner().invoke(runtime_cli, ["evaluate", str(market), "--model-dir", str(resnet18_export[0]),
                                         "--report", str(tmp_path / "eval3.json"), "--backend", "onnxruntime",
                                         "--max-rank", "3"])
    assert r.exit_code == 0, r.output
    for row, full in zip(json.loads((tmp_path / "eval3.json").read_text())["results"], report["results"]):
        assert row["cmc"] == full["cmc"][:3] and row["rank10"] == full["rank10"]


def test_cli_evaluate_bad_dataset_is_one_line(resnet18_export, tmp_path):
    out = subprocess.run([sys.executable, "-m", "runtime.cli", "evaluate", str(tmp_path), "--model-dir",
                          str(resnet18_export[0])], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "bounding_box_test" in lines[0]


def test_cli_bench_small(resnet18_export, tmp_path):
    r = CliRunner().invoke(runtime_cli, ["bench", str(resnet18_export[0]), "--producers", "3", "--requests", "2",
                                         "--max-batch", "4", "--refine-sizes", "40", "--json", str(tmp_path / "b.json")])
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [(r["stage"], r["mode"]) for r in rows] == [("encoder", "sequential"), ("encoder", "dynamic"),
                                                       ("refine", "nformer.onnx")]
    assert all(r.get("images_per_s", 1) > 0 for r in rows) and rows[1]["mean_batch"] >= 1


def test_evaluate_rank_hand_computed_mixed_case():
    """Three queries: one with a tie, one whose only match is same-camera (skipped), one ranked
    behind a distractor (pid 0); junk never reaches evaluate_rank (the reader drops pid -1)."""
    g_pids = np.array([0, 5, 5, 6, 7])
    g_cams = np.array([0, 1, 2, 1, 0])
    dist = np.array([
        [0.5, 0.2, 0.2, 0.1, 0.9],   # q pid 5 cam 0: order g3(6), g1(5), g2(5), g0, g4 -> first hit at rank 2
        [0.1, 0.2, 0.3, 0.4, 0.0],   # q pid 7 cam 0: its only match g4 is same camera -> skipped
        [0.0, 0.5, 0.4, 0.3, 0.2],   # q pid 6 cam 2: g0 distractor first, then g4, then g3 -> rank 3
    ])
    cmc, mAP = evaluate_rank(dist, [5, 7, 6], g_pids, [0, 0, 2], g_cams, max_rank=5)
    np.testing.assert_allclose(cmc, [0, 0.5, 1, 1, 1])
    ap_q0 = (1 / 2 + 2 / 3) / 2
    ap_q2 = 1 / 3
    assert mAP == pytest.approx((ap_q0 + ap_q2) / 2)
