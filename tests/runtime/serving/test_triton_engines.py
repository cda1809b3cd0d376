"""``runtime triton-repo --engines``: an engine is copied into the repository only when
``check_engine`` accepts it for the Triton server's TensorRT version, this machine's GPU and plugin
library, and its batch profile covers ``--max-batch``; with the refinement plan comes the library that
registers the plugin when Triton dlopens it (``libnformer_plugins_autoreg.so``) and the exact
``tritonserver`` command lines that load it.  The engines come from ``runtime build`` through the fake
TensorRT of tests/runtime/tensorrt/fake_tensorrt.py (no TensorRT needed)."""
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
# a stand-in of the self-registering library: what plugins.linked_tensorrt_major reads is its dynamic string table
AUTOREG_BYTES = b"\x7fELF stand-in\x00libstdc++.so.6\x00libnvinfer.so.10\x00libc.so.6\x00"


@pytest.fixture()
def built(tmp_path_factory, tmp_path, monkeypatch):
    """A model directory with fp32 engines (batch profile 1/8/64) built for TensorRT 10.13.0 on the
    fake GPU; afterwards TensorRT does not import (a CPU box writing the repository)."""
    model_dir = fresh_copy(random_small_export(tmp_path_factory)[1], tmp_path / "build")
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / plugins.PLUGIN_LIBRARY).write_bytes(fake_tensorrt.plugin_library_bytes())
    (folder / plugins.AUTOREG_LIBRARY).write_bytes(AUTOREG_BYTES)
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


def test_the_repository_loads_the_plugin_the_way_triton_can(built, tmp_path):
    """Triton only dlopens plugin libraries: the repository carries the self-registering one and its README
    gives the exact command lines (backend-config plugins= or LD_PRELOAD) with this repository's paths."""
    repo = tmp_path / "repo"
    record = write_triton_repository(built, repo, engines=True, max_batch=64, tensorrt_version="10.13.0")
    lib = repo / plugins.AUTOREG_LIBRARY
    assert lib.read_bytes() == AUTOREG_BYTES
    assert not (repo / plugins.PLUGIN_LIBRARY).exists()  # it registers nothing when Triton dlopens it
    entry = record["plugin_library"]
    assert entry["file"] == plugins.AUTOREG_LIBRARY and entry["links_tensorrt_major"] == 10
    assert entry["from"] == str(plugins.autoreg_library_path()) and entry["sha256"] == eb.sha256_file(lib)
    assert entry["tritonserver"] == [
        f"tritonserver --model-repository={repo.resolve()} --backend-config=tensorrt,plugins={lib.resolve()}",
        f"LD_PRELOAD={lib.resolve()} tritonserver --model-repository={repo.resolve()}"]
    assert entry["container"].endswith(
        "tritonserver --model-repository=/models --backend-config=tensorrt,plugins=/models/" + plugins.AUTOREG_LIBRARY)
    assert json.loads((repo / "nformer_repository.json").read_text())["plugin_library"] == entry
    readme = (repo / "README.md").read_text()
    for command in entry["tritonserver"] + [entry["container"]]:
        assert f"\n    {command}\n" in readme
    assert "libnvinfer.so.10" in readme
    assert "Serve with `tritonserver --model-repository=<this directory>`" not in readme
    # a space in the path: shell-quoted, and no LD_PRELOAD form (the loader splits LD_PRELOAD at spaces)
    spaced = tmp_path / "my repo"
    commands = write_triton_repository(built, spaced, engines=True, max_batch=64,
                                       tensorrt_version="10.13.0")["plugin_library"]["tritonserver"]
    assert commands == [f"tritonserver --model-repository='{spaced.resolve()}' "
                        f"--backend-config=tensorrt,plugins='{spaced.resolve() / plugins.AUTOREG_LIBRARY}'"]


def test_an_onnx_repository_needs_no_plugin_library(built, tmp_path):
    record = write_triton_repository(built, tmp_path / "repo")
    assert "plugin_library" not in record and not (tmp_path / "repo" / plugins.AUTOREG_LIBRARY).exists()
    readme = (tmp_path / "repo" / "README.md").read_text()
    assert "Serve with `tritonserver --model-repository=<this directory>`." in readme


def test_the_refinement_plan_without_the_self_registering_library_is_refused(built, tmp_path):
    (Path(plugins.autoreg_library_path())).unlink()
    with pytest.raises(plugins.PluginNotBuiltError, match=r"libnformer_plugins_autoreg\.so.*Triton.*"
                                                          r"TENSORRT_NVINFER_LIBRARY"):
        write_triton_repository(built, tmp_path / "repo", engines=True, max_batch=64, tensorrt_version="10.13.0")
    assert not (tmp_path / "repo").exists()


def test_a_plugin_library_of_another_tensorrt_major_is_refused(built, tmp_path):
    Path(plugins.autoreg_library_path()).write_bytes(AUTOREG_BYTES.replace(b"libnvinfer.so.10", b"libnvinfer.so.11"))
    with pytest.raises(InputError, match=r"links libnvinfer\.so\.11.*TensorRT 10\.13\.0.*would not load"):
        write_triton_repository(built, tmp_path / "repo", engines=True, max_batch=64, tensorrt_version="10.13.0")
    assert not (tmp_path / "repo").exists()
