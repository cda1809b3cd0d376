"""The shipped small checkpoint and `runtime demo` on the synthetic evaluation split."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from export.reference.checkpoint import load_checkpoint
from export.to_onnx import export_checkpoint
from runtime.cli import main as runtime_cli
from export.shipped import SHIPPED, shipped_card
from runtime.evaluation.demo import REPORT_KEYS, split_note
from runtime.evaluation.synth import plan


def test_shipped_checkpoint_is_small_plain_and_documented():
    assert SHIPPED.stat().st_size <= 10 * 1024 * 1024
    torch.load(SHIPPED, map_location="cpu", weights_only=True)  # raises if anything but tensors is inside
    card = shipped_card()
    assert card["command"].startswith("python tools/train_small.py") and card["seed"] == 0
    model = load_checkpoint(SHIPPED, input_size_hw=tuple(card["export_options"]["input_size_hw"]))
    assert model.config.arch == "resnet18" and model.config.widths == (16, 32, 64, 128)


def test_the_demo_says_when_its_split_is_not_the_models_held_out_one():
    """The card names the data the shipped model was trained on; the demo notes a split where its
    scores mean less: another seed (other cameras and people: near chance) or a size of the same
    seed whose queried people include training people (optimistic)."""
    data = shipped_card()["data"]
    identities, seed = data["identities"], data["seed"]
    assert data["made_by"] == f"runtime synth DIR --identities {identities} --seed {seed}"
    trained, held_out = (plan(identities, seed)[s] for s in ("train", "query"))
    assert not {e[0] for e in trained} & {e[0] for e in held_out}
    assert split_note(identities, seed) is None
    assert "seed 0" in split_note(identities, 3) and "near chance" in split_note(identities, 3)
    overlap = {e[0] for e in trained} & {e[0] for e in plan(1000, seed)["query"]}
    assert overlap and f"{len(overlap)} of the " in split_note(1000, seed)
    for n in (4, 150):      # sizes whose queried people the model never saw: no note
        if not {e[0] for e in trained} & {e[0] for e in plan(n, seed)["query"]}:
            assert split_note(n, seed) is None


def test_shipped_checkpoint_passes_the_exports_parity_check(tmp_path):
    card = shipped_card()
    result = export_checkpoint(SHIPPED, tmp_path, input_size_hw=tuple(card["export_options"]["input_size_hw"]),
                               batches=(1, 7), sizes=(1, 21, 500), log=lambda *a: None)
    assert result["ok"], result["checks"]


@pytest.fixture(scope="module")
def demo_rows(tmp_path_factory):
    work = tmp_path_factory.mktemp("demo")
    result = CliRunner().invoke(runtime_cli, ["demo", "--work-dir", str(work), "--report", str(work / "r.json")])
    assert result.exit_code == 0, result.output
    return work, json.loads((work / "r.json").read_text()), result.output


def test_demo_writes_table_report_and_figure(demo_rows):
    work, rows, output = demo_rows
    assert (work / "demo.png").stat().st_size > 10_000
    assert all(set(r) == set(REPORT_KEYS) for r in rows)
    assert {(r["backend"], r["precision"], r["stage"]) for r in rows} >= {
        ("pytorch", "fp32", "encoder"), ("pytorch", "fp32", "refined"),
        ("onnxruntime", "fp32", "encoder"), ("onnxruntime", "fp32", "refined")}
    assert "mAP" in output and "cosine_to_reference_mean" in output


def _row(rows, backend, precision, stage):
    return next(r for r in rows if (r["backend"], r["precision"], r["stage"]) == (backend, precision, stage))


def test_refinement_raises_map_over_the_encoder(demo_rows):
    _, rows, _ = demo_rows
    assert _row(rows, "pytorch", "fp32", "refined")["mAP"] > _row(rows, "pytorch", "fp32", "encoder")["mAP"]


@pytest.mark.parametrize("stage", ["encoder", "refined"])
def test_onnxruntime_matches_pytorch_within_a_tenth_of_a_map_point(demo_rows, stage):
    _, rows, _ = demo_rows
    ours, ref = _row(rows, "onnxruntime", "fp32", stage), _row(rows, "pytorch", "fp32", stage)
    assert abs(ours["mAP"] - ref["mAP"]) * 100 <= 0.1
    assert ours["cosine_to_reference_mean"] >= 0.9999


def test_demo_reuses_its_work(demo_rows):
    work, _, _ = demo_rows
    result = CliRunner().invoke(runtime_cli, ["demo", "--work-dir", str(work)])
    assert result.exit_code == 0 and "reusing synthetic data" in result.output and "reusing exported" in result.output
