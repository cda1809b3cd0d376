"""The synthetic Market-1501-layout generator: deterministic, and read back correctly."""
from __future__ import annotations

import hashlib

import pytest
from click.testing import CliRunner

from export.contract.errors import InputError
from runtime.cli import main as runtime_cli
from export.contract.market1501 import SPLITS, parse_name, read_market1501
from runtime.evaluation.synth import CAMERAS, generate, plan


def digest(root):
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes(tmp_path):
    generate(tmp_path / "a", identities=8, seed=3)
    generate(tmp_path / "b", identities=8, seed=3)
    generate(tmp_path / "c", identities=8, seed=4)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


def test_layout_reads_back_with_the_right_identities_and_cameras(tmp_path):
    counts = generate(tmp_path, identities=12, seed=1)
    expected = plan(12, 1)
    data = read_market1501(tmp_path)
    assert sorted((i.pid, i.camid) for i in data.train) == sorted((p, c) for p, c, _, _ in expected["train"])
    assert sorted((i.pid, i.camid) for i in data.query) == sorted((p, c) for p, c, _, _ in expected["query"])
    # junk (-1) is on disk but skipped by the reader; distractors (0) stay in the gallery
    on_disk = [parse_name(p.name) for p in (tmp_path / SPLITS["gallery"]).iterdir()]
    assert any(pid == -1 for pid, _ in on_disk)
    assert sorted((i.pid, i.camid) for i in data.gallery) == sorted((p, c) for p, c, _, _ in expected["gallery"] if p != -1)
    assert any(i.pid == 0 for i in data.gallery)
    train_ids = {i.pid for i in data.train}
    test_ids = {i.pid for i in data.query}
    assert len(train_ids) == 6 and len(test_ids) == 6 and not train_ids & test_ids
    assert {i.pid for i in data.gallery} - {0} == test_ids
    assert {i.camid for i in data.train + data.query + data.gallery} <= set(range(CAMERAS))
    assert counts["train"] == len(data.train)


def test_refuses_an_existing_data_set_and_tiny_sizes(tmp_path):
    generate(tmp_path, identities=4, seed=0)
    with pytest.raises(InputError, match="already holds"):
        generate(tmp_path, identities=4, seed=0)
    with pytest.raises(InputError, match="must be 4..1501"):
        generate(tmp_path / "x", identities=3)


def test_cli(tmp_path):
    result = CliRunner().invoke(runtime_cli, ["synth", str(tmp_path / "d"), "--identities", "6", "--seed", "2"])
    assert result.exit_code == 0, result.output
    assert read_market1501(tmp_path / "d").summary()["train"]["identities"] == 3
    again = CliRunner().invoke(runtime_cli, ["synth", str(tmp_path / "d"), "--identities", "6"])
    assert again.exit_code == 2 and "already holds" in again.output
