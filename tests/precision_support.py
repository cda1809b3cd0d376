"""Shared, session-cached inputs of the precision tests (test_calibration, test_precision,
test_engine_builder): the synthetic data set, the shipped checkpoint's export, and a random small
model's export for tests that need no trained weights.

Built at most once per test session (pytest's ``tmp_path_factory`` is session-scoped); each test
that writes variants copies an export with :func:`fresh_copy` so the tests stay independent.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from export.contract.config import ModelConfig

SMALL = ModelConfig(arch="resnet18", widths=(16, 32, 64, 128), stem_width=16, feature_dim=128, n_embd=128,
                    input_size_hw=(128, 64))
_cache: dict = {}


def synthetic_data(tmp_path_factory, identities: int = 600) -> Path:
    """``runtime synth`` data (600 identities: the demo's set; ~10 s)."""
    key = ("synth", identities)
    if key not in _cache:
        from runtime.evaluation.synth import generate

        root = tmp_path_factory.mktemp(f"synth{identities}") / "data"
        generate(root, identities=identities, seed=0)
        _cache[key] = root
    return _cache[key]


def shipped_export(tmp_path_factory) -> Path:
    """The shipped checkpoint exported once (skips when it is not in export/data yet)."""
    from export.shipped import SHIPPED, shipped_card

    if not SHIPPED.is_file():
        pytest.skip(f"the shipped checkpoint {SHIPPED} is not there")
    if "shipped" not in _cache:
        from export.to_onnx import export_checkpoint

        out = tmp_path_factory.mktemp("shipped") / "build"
        result = export_checkpoint(SHIPPED, out, input_size_hw=tuple(shipped_card()["export_options"]["input_size_hw"]),
                                   batches=(2,), sizes=(9,), log=lambda *a: None)
        assert result["ok"], result["checks"]
        _cache["shipped"] = out
    return _cache["shipped"]


def random_small_export(tmp_path_factory) -> tuple[Path, Path]:
    """A random-weight small model (the shipped model's shapes) and its export: (checkpoint, model dir)."""
    if "random" not in _cache:
        from export.reference.testing import save_random_checkpoint
        from export.to_onnx import export_checkpoint

        root = tmp_path_factory.mktemp("random_small")
        ckpt = root / "small.pth"
        save_random_checkpoint(ckpt, SMALL, seed=5)
        result = export_checkpoint(ckpt, root / "build", input_size_hw=SMALL.input_size_hw, batches=(2,), sizes=(9,),
                                   log=lambda *a: None)
        assert result["ok"], result["checks"]
        _cache["random"] = (ckpt, root / "build")
    return _cache["random"]


def fresh_copy(model_dir: Path, dst: Path) -> Path:
    """A private copy of an export (variants and engines are written into the model directory)."""
    shutil.copytree(model_dir, dst)
    return dst
