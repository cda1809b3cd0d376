"""Shared fixtures: random checkpoints in the original's layout and their exported files.

Exports are session-scoped: exporting resnet50 takes a while on the 2-core CI machine.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")
# the tests mirror the packages in subfolders; shared test helpers (neighbor_oracle, precision_support)
# live here
sys.path.insert(0, str(Path(__file__).resolve().parent))

from export.contract.config import ModelConfig  # noqa: E402
from export.reference.testing import save_random_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def resnet50_checkpoint(checkpoint_dir):
    path = checkpoint_dir / "resnet50.pth"
    model = save_random_checkpoint(path, ModelConfig(arch="resnet50"), seed=1)
    return path, model


@pytest.fixture(scope="session")
def resnet18_checkpoint(checkpoint_dir):
    path = checkpoint_dir / "resnet18.pth"
    model = save_random_checkpoint(path, ModelConfig(arch="resnet18"), seed=2)
    return path, model


def _export(path, out_dir):
    from export.to_onnx import export_checkpoint

    result = export_checkpoint(path, out_dir, batches=(2,), sizes=(9,), log=lambda *a: None)
    assert result["ok"], result["checks"]
    return out_dir


@pytest.fixture(scope="session")
def resnet50_export(resnet50_checkpoint, tmp_path_factory):
    path, model = resnet50_checkpoint
    return _export(path, tmp_path_factory.mktemp("build50")), model


@pytest.fixture(scope="session")
def resnet18_export(resnet18_checkpoint, tmp_path_factory):
    path, model = resnet18_checkpoint
    return _export(path, tmp_path_factory.mktemp("build18")), model


@pytest.fixture(params=["resnet50", "resnet18"])
def exported(request):
    return request.getfixturevalue(f"{request.param}_export")
