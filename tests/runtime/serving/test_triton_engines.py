"""``runtime triton-repo --engines``: an engine is copied into the repository only when
``check_engine`` accepts it for the Triton server's TensorRT version, this machine's GPU and plugin
library, and its batch profile covers ``--max-batch``.  The engines come from ``runtime build``
through the fake TensorRT of tests/runtime/tensorrt/fake_tensorrt.py (no TensorRT needed)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

import plugins
from export.contract.errors import InputError
from runtime.serving.exports import write_triton_repository
from runtime.tensorrt import build as eb
from runtime.tensorrt.build import BuildOptions, build

from precision_support import fresh_copy, random_small_export


def _fake_tensorrt():
    if "fake_tensorrt" in sys.modules:
        return sys.modules["fake_tensorrt"]
    path = Path(__file__).resolve().parents[1] / "tensorrt" / "fake_tensorrt.py"
    spec = importlib.util.spec_from_file_location("fake_tensorrt", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fake_tensorrt"] = module
    spec.loader.exec_module(module)
    return module


fake_tensorrt = _fake_tensorrt()
GPU = {"name": "Fake GPU 80GB", "compute_capability": "9.0"}


@pytest.fixture()
def built(tmp_path_factory, tmp_path, monkeypatch):
    """A model directory with fp32 engines (batch profile 1/8/64) built for TensorRT 10.13.0 on the
    fake GPU; afterwards TensorRT does not import (a CPU box writing the repository)."""
    model_dir = fresh_copy(random_small_export(tmp_path_factory)[1], tmp_path / "build")
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / plugins.PLUGIN_LIBRARY).write_bytes(fake_tensorrt.plugin_library_bytes())
    monkeypatch.setenv(plugins.ENV_DIR, str(folder))
    monkeypatch.setattr(plugins, "DEFAULT_BUILD_DIR", tmp_path / "no_build")
    monkeypatch.setattr(eb, "find_trtexec", lambda path=None: None)
    monkeypatch.setattr(eb, "gpu_facts", lambda device=None: dict(GPU))
    fake_tensorrt.install(monkeypatch, version="10.13.0.35")
    build(model_dir, BuildOptions(precision="fp32", engine_tool="python", batch=(1, 8, 64)), log=lambda m: None)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    return model_dir


def test_the_server_tensorrt_version_is_required_when_tensorrt_does_not_import(built, tmp_path):
    with pytest.raises(InputError, match="TensorRT does not import here.*--tensorrt-version"):
        write_triton_repository(built, tmp_path / "repo", engines=True)
    with pytest.raises(InputError, match="major.minor.patch"):
        write_triton_repository(built, tmp_path / "repo", engines=True, tensorrt_version="10.13")
    assert not (tmp_path / "repo").exists()


def test_an_engine_of_another_tensorrt_version_is_refused(built, tmp_path):
    with pytest.raises(InputError, match=r"no encoder engine can be served by a Triton server with TensorRT 10\.8\.0.*"
                                         r"built with TensorRT 10\.13\.0.*runtime build"):
        write_triton_repository(built, tmp_path / "repo", engines=True, tensorrt_version="10.8.0")
    assert not (tmp_path / "repo").exists()


def test_max_batch_beyond_the_engine_profile_is_refused(built, tmp_path):
    with pytest.raises(InputError, match=r"accepts images batches 1 to 64.*--max-batch 128.*--max-batch 64 or lower"):
        write_triton_repository(built, tmp_path / "repo", engines=True, max_batch=128, tensorrt_version="10.13.0")


def test_a_changed_engine_is_refused(built, tmp_path):
    engine = built / "nformer.fp32.engine"
    engine.write_bytes(engine.read_bytes() + b"x")
    with pytest.raises(InputError, match="no nformer engine.*engine file changed"):
        write_triton_repository(built, tmp_path / "repo", engines=True, tensorrt_version="10.13.0.35")


def test_checked_engines_are_served(built, tmp_path):
    record = write_triton_repository(built, tmp_path / "repo", engines=True, max_batch=64, tensorrt_version="10.13.0")
    repo = tmp_path / "repo"
    for name, network in (("nformer_encoder", "encoder"), ("nformer_refine", "nformer")):
        plan = repo / name / "1" / "model.plan"
        assert plan.read_bytes() == (built / f"{network}.fp32.engine").read_bytes()
        assert 'platform: "tensorrt_plan"' in (repo / name / "config.pbtxt").read_text()
        engine = record["models"][name]["engine"]
        assert engine["precision"] == "fp32" and engine["tensorrt"] == "10.13.0" and engine["server_tensorrt"] == "10.13.0"
        assert engine["passed_over"] == []
    assert json.loads((repo / "nformer_repository.json").read_text())["models"]["nformer_encoder"]["engine"]["gpu"] == GPU
