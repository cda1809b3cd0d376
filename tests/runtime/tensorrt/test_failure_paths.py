"""Every TensorRT failure the project can meet becomes a clear error or a logged fallback, never a
silently different engine: checked without TensorRT against ``fake_tensorrt`` (a stand-in whose
calls return what TensorRT's Python API returns, failures included; see its docstring).

What these tests cannot show: that the real TensorRT behaves as the stand-in says (the signatures
and return values were taken from TensorRT 10.x / 11.1's documentation and headers, and the
function-before-plugin order of 10.0 - 10.6 from onnx-tensorrt's sources and the 10.7 changelog).
"""
from __future__ import annotations

import json
import logging
import threading

import numpy as np
import onnx
import pytest

import fake_tensorrt
import plugins
from export.contract.errors import InputError, NFormerError
from runtime.tensorrt import build as eb
from runtime.tensorrt import lib as trt_lib
from runtime.tensorrt.backend import BackendClosed, TensorRTBackend
from runtime.tensorrt.build import BuildOptions, build, build_with_python_api, shape_profiles
from runtime.tensorrt.lib import EngineUnusable

from precision_support import fresh_copy, random_small_export

GPU = {"name": "Fake GPU 80GB", "compute_capability": "9.0"}
CACHE = "timing.fake-gpu-80gb.9.0.trt10.13.0.cache"


@pytest.fixture()
def model_dir(tmp_path_factory, tmp_path):
    return fresh_copy(random_small_export(tmp_path_factory)[1], tmp_path / "build")


@pytest.fixture()
def plugin_dir(tmp_path, monkeypatch):
    """A built (fake) plugin library where plugins.plugin_library_path() finds it."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / plugins.PLUGIN_LIBRARY).write_bytes(fake_tensorrt.plugin_library_bytes())
    monkeypatch.setenv(plugins.ENV_DIR, str(folder))
    monkeypatch.setattr(plugins, "DEFAULT_BUILD_DIR", tmp_path / "no_build")
    return folder


@pytest.fixture()
def python_build(monkeypatch):
    """Builds go through the (fake) Python API on the fake GPU."""
    monkeypatch.setattr(eb, "find_trtexec", lambda path=None: None)
    monkeypatch.setattr(eb, "gpu_facts", lambda device=None: dict(GPU))


def _layers(engine_path) -> list[str]:
    return fake_tensorrt.read_plan(engine_path.read_bytes())["layers"]


def _custom(layers) -> list[str]:
    return [h for h in layers if h != "standard"]


# ---------------------------------------------------------------------------------------------------
# 2. the build parses a copy without the local function: the plugin, or a parse error


@pytest.mark.parametrize("version", ["10.5.0.18", "10.13.0.35", "11.1.0.106"])
def test_the_build_uses_the_plugin_on_every_version(version, model_dir, plugin_dir, python_build, monkeypatch):
    world = fake_tensorrt.install(monkeypatch, version=version)
    messages = []
    result = build(model_dir, BuildOptions(precision="fp32", engine_tool="python"), log=messages.append)
    assert world.parsed_files == ["encoder.onnx", "nformer.trt.onnx"]
    copy = onnx.load(str(model_dir / "nformer.trt.onnx"))
    original = onnx.load(str(model_dir / "nformer.onnx"))
    assert not copy.functions and [(f.domain, f.name) for f in original.functions] == [("nformer", "ReciprocalNeighbors")]
    assert copy.graph == original.graph
    assert _custom(_layers(model_dir / "nformer.fp32.engine")) == ["plugin:ReciprocalNeighbors"]
    record = json.loads((model_dir / "nformer.fp32.engine.json").read_text())
    assert record["parsed_onnx"] == {"path": "nformer.trt.onnx", "sha256": eb.sha256_file(model_dir / "nformer.trt.onnx"),
                                     "removed_local_functions": ["nformer::ReciprocalNeighbors"]}
    assert record["custom_op"] == {"op": "nformer::ReciprocalNeighbors", "implementation": "plugin"}
    assert record["source_onnx"]["path"] == "nformer.onnx"
    enc = json.loads((model_dir / "encoder.fp32.engine.json").read_text())
    assert enc["parsed_onnx"] is None and enc["custom_op"] is None
    assert set(result["engines"]) == {"encoder.fp32", "nformer.fp32"}
    old_parser = any("10.0 - 10.6" in m for m in messages)
    assert old_parser is version.startswith("10.5")


@pytest.mark.parametrize("version,plugin,expect", [
    ("10.5.0.18", True, "function"),     # 10.0 - 10.6: the local function wins even with the plugin loaded
    ("10.13.0.35", True, "plugin"),
    ("10.13.0.35", False, "function")])  # any version: no plugin -> the function body (fp32 ranking)
def test_the_original_file_would_give_a_silently_different_engine(version, plugin, expect, model_dir, tmp_path,
                                                                    plugin_dir, monkeypatch):
    """The negative control: what parsing nformer.onnx itself (with its local function) gives."""
    fake_tensorrt.install(monkeypatch, version=version)
    lib = plugin_dir / plugins.PLUGIN_LIBRARY if plugin else None
    build_with_python_api(__import__("tensorrt"), model_dir / "nformer.onnx", tmp_path / "x.engine",
                          shape_profiles({"input_size_hw": [128, 64], "n_embd": 128, "n_layer": 4, "landmarks": 5},
                                         n=(1, 64, 256))["nformer"], tmp_path / "t.cache", lib, log=lambda m: None)
    assert _custom(_layers(tmp_path / "x.engine"))[0].startswith(expect)


def test_a_missing_plugin_is_a_parse_error_of_the_copy(model_dir, tmp_path, monkeypatch):
    fake_tensorrt.install(monkeypatch)
    copy, facts = eb.tensorrt_onnx(model_dir / "nformer.onnx")
    assert copy.name == "nformer.trt.onnx" and facts["uses_custom_op"]
    profile = {"features": {"min": [1, 1, 128], "opt": [1, 64, 128], "max": [1, 256, 128]},
               "landmarks": {"min": [4, 1], "opt": [4, 5], "max": [4, 5]}}
    with pytest.raises(NFormerError, match=r"rejected nformer.trt.onnx.*Plugin not found.*ReciprocalNeighbors.*"
                                           r"no local function.*by design"):
        build_with_python_api(__import__("tensorrt"), copy, tmp_path / "x.engine", profile, tmp_path / "t.cache",
                              None, log=lambda m: None)
    assert not (tmp_path / "x.engine").exists()


def test_without_the_plugin_library_no_engine_is_built(model_dir, python_build, tmp_path, monkeypatch):
    fake_tensorrt.install(monkeypatch)
    monkeypatch.setenv(plugins.ENV_DIR, str(tmp_path / "empty"))
    monkeypatch.setattr(plugins, "DEFAULT_BUILD_DIR", tmp_path / "no_build")
    with pytest.raises(NFormerError, match="nformer.onnx uses the custom op.*cmake -S plugins"):
        build(model_dir, BuildOptions(precision="fp32", engine_tool="python"), log=lambda m: None)
    assert not list(model_dir.glob("*.engine"))


# ---------------------------------------------------------------------------------------------------
# 3. load_library's result is not trusted; the creator lookup decides; once per process


def test_a_library_that_does_not_load_is_an_error(model_dir, plugin_dir, python_build, monkeypatch):
    world = fake_tensorrt.install(monkeypatch)
    (plugin_dir / plugins.PLUGIN_LIBRARY).write_bytes(b"\x7fELF not a plugin library")  # load_library -> None
    with pytest.raises(EngineUnusable, match=r"no creator ReciprocalNeighbors .* returned no handle.*cmake -S plugins"):
        build(model_dir, BuildOptions(precision="fp32", engine_tool="python"), log=lambda m: None)
    assert world.load_library_calls and not list(model_dir.glob("*.engine"))


def test_a_library_without_the_creator_is_an_error(plugin_dir, monkeypatch):
    world = fake_tensorrt.install(monkeypatch)
    (plugin_dir / plugins.PLUGIN_LIBRARY).write_bytes(fake_tensorrt.plugin_library_bytes([("Other", "1", "")]))
    with pytest.raises(EngineUnusable, match="returned a handle"):
        trt_lib.load_plugin_library(world.trt, plugin_dir / plugins.PLUGIN_LIBRARY)


def test_an_already_registered_plugin_is_used_and_loaded_once(plugin_dir, monkeypatch, caplog):
    world = fake_tensorrt.install(monkeypatch)
    world.register()  # e.g. loaded by other code in this process: load_library now returns None
    lib = plugin_dir / plugins.PLUGIN_LIBRARY
    with caplog.at_level(logging.INFO, logger="runtime.tensorrt.lib"):
        info = trt_lib.load_plugin_library(world.trt, lib)
    assert info["already_registered"] and world.load_library_calls == [str(lib)]
    assert "already registered" in caplog.text
    assert trt_lib.load_plugin_library(world.trt, lib)["loaded_now"] is False
    assert world.load_library_calls == [str(lib)]  # not asked again
    with pytest.raises(EngineUnusable, match="already loaded the plugin library"):
        trt_lib.load_plugin_library(world.trt, plugin_dir / "other.so")


def test_two_backends_load_the_plugin_once(model_dir, plugin_dir, python_build, monkeypatch):
    """Pipeline.load and parity open two engines: the second load_library would return None
    (already registered); it is not called, and both engines deserialise."""
    world = fake_tensorrt.install(monkeypatch)
    build(model_dir, BuildOptions(precision="fp32", engine_tool="python"), log=lambda m: None)
    world.load_library_calls.clear()
    monkeypatch.setattr(trt_lib, "_plugin_state", trt_lib._PluginState())  # a new process, same registry
    world.creators.clear()
    a = TensorRTBackend(model_dir / "encoder.fp32.engine")
    b = TensorRTBackend(model_dir / "nformer.fp32.engine")
    assert len(world.load_library_calls) == 1
    a.close()
    b.close()


# ---------------------------------------------------------------------------------------------------
# 6. the timing cache: keyed by device, a rejected one never silently used


def test_the_timing_cache_is_keyed_by_device(model_dir, plugin_dir, python_build, monkeypatch):
    fake_tensorrt.install(monkeypatch)
    build(model_dir, BuildOptions(precision="fp32", engine_tool="python"), log=lambda m: None)
    record = json.loads((model_dir / "encoder.fp32.engine.json").read_text())
    assert record["timing_cache"] == CACHE and (model_dir / CACHE).is_file()
    assert record["builder"]["timing_cache_status"] == "new"
    assert json.loads((model_dir / "nformer.fp32.engine.json").read_text())["builder"]["timing_cache_status"] == "loaded"
    assert eb.timing_cache_file({"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}, "10.8.0.43") \
        == "timing.nvidia-h100-80gb-hbm3.9.0.trt10.8.0.cache"


@pytest.mark.parametrize("content", ["other device", "garbage"])
def test_a_rejected_timing_cache_is_replaced_with_a_warning(content, model_dir, plugin_dir, python_build,
                                                            monkeypatch):
    world = fake_tensorrt.install(monkeypatch)
    if content == "other device":  # a timing cache copied from another GPU under this GPU's name
        data = fake_tensorrt.ITimingCache("Other GPU|8.9|10.13.0.35", 7).serialize()
    else:
        data = b"not a timing cache"
    (model_dir / CACHE).write_bytes(data)
    messages = []
    build(model_dir, BuildOptions(precision="fp32", engine_tool="python"), log=messages.append)
    assert any(m.startswith(f"warning: TensorRT rejected the timing cache {CACHE}") for m in messages)
    record = json.loads((model_dir / "encoder.fp32.engine.json").read_text())
    assert record["builder"]["timing_cache_status"] == "rejected, replaced by a new one"
    written = (model_dir / CACHE).read_bytes()
    assert json.loads(written[len(fake_tensorrt.CACHE_MAGIC):])["device"] == world.device_key


def test_a_cache_trt_refuses_even_empty_is_an_error(tmp_path, monkeypatch):
    fake_tensorrt.install(monkeypatch)
    config = __import__("tensorrt").Builder(None).create_builder_config()
    monkeypatch.setattr(type(config), "set_timing_cache", lambda self, cache, ignore_mismatch: False)
    with pytest.raises(NFormerError, match="refused an empty timing cache"):
        eb._set_timing_cache(config, tmp_path / "t.cache", log=lambda m: None)


# ---------------------------------------------------------------------------------------------------
# 5. backend="auto" falls back with a logged reason; "tensorrt" raises one clear error


def _built(model_dir, monkeypatch, **install):
    world = fake_tensorrt.install(monkeypatch, **install)
    build(model_dir, BuildOptions(precision="fp32", engine_tool="python"), log=lambda m: None)
    return world


def test_usable_engines_are_used(model_dir, plugin_dir, python_build, monkeypatch):
    from runtime.pipeline import Pipeline

    _built(model_dir, monkeypatch)
    with Pipeline.load(model_dir) as pipe:
        assert pipe.backend_names == {"encoder": "tensorrt", "nformer": "tensorrt"}
        assert pipe.backend_choice["encoder"] == {"backend": "tensorrt", "engine": "encoder.fp32.engine",
                                                  "reason": None}
        x = np.random.default_rng(0).standard_normal((1, 9, 128)).astype(np.float32)
        out = pipe.refiner.backend.run({"features": x, "landmarks": np.zeros((4, 5), np.int64)})["refined"]
        np.testing.assert_array_equal(out, 2 * x)  # what the fake engine computes


@pytest.mark.parametrize("failure", ["deserialize", "pycuda", "plugin", "context"])
def test_auto_falls_back_to_onnx_runtime_with_the_reason(failure, model_dir, plugin_dir, python_build, monkeypatch,
                                                         caplog):
    from runtime.pipeline import Pipeline

    world = _built(model_dir, monkeypatch)
    expect = {"deserialize": "could not deserialize", "pycuda": "pycuda is not installed",
              "plugin": "no creator ReciprocalNeighbors", "context": "could not create an execution context"}[failure]
    if failure == "deserialize":
        world.deserialize_fails = True
    elif failure == "pycuda":
        world = fake_tensorrt.install(monkeypatch, pycuda=False)
    elif failure == "plugin":  # a new process whose plugin library does not load
        monkeypatch.setattr(trt_lib, "_plugin_state", trt_lib._PluginState())
        world.creators.clear()
        (plugin_dir / plugins.PLUGIN_LIBRARY).write_bytes(b"junk")
        monkeypatch.setattr(eb, "plugin_library_facts", lambda: json.loads(
            (model_dir / "encoder.fp32.engine.json").read_text())["plugin_library"])  # the record still matches
    else:
        world.context_creation_fails = True
    with caplog.at_level(logging.WARNING, logger="runtime.pipeline"):
        pipe = Pipeline.load(model_dir)
    assert pipe.backend_names == {"encoder": "onnxruntime", "nformer": "onnxruntime"}
    for network in ("encoder", "nformer"):
        choice = pipe.backend_choice[network]
        assert choice["backend"] == "onnxruntime" and expect in choice["reason"], choice
    assert expect in caplog.text and "using ONNX Runtime" in caplog.text
    assert any(expect in n for n in pipe.notes)
    pipe.close()
    error = InputError if failure == "pycuda" else EngineUnusable  # pycuda: found before opening (engine_problem)
    with pytest.raises(error, match=expect) as err:
        Pipeline.load(model_dir, backend="tensorrt")
    assert "\n" not in str(err.value)


def test_onnxruntime_asked_for_is_recorded(model_dir):
    from runtime.pipeline import Pipeline

    with Pipeline.load(model_dir, backend="onnxruntime") as pipe:
        assert pipe.backend_choice["encoder"] == {"backend": "onnxruntime", "engine": None,
                                                  "reason": "backend='onnxruntime' was asked for"}
    with Pipeline.load(model_dir) as pipe:
        assert pipe.backend_choice["nformer"]["reason"] == "the manifest lists no TensorRT engine for nformer"


# ---------------------------------------------------------------------------------------------------
# 4. a bounded pool of execution contexts with explicit ownership


def _engine(tmp_path, monkeypatch, profiles: int):
    world = fake_tensorrt.install(monkeypatch)
    t = fake_tensorrt.tensor
    plan = fake_tensorrt.make_plan(world, [t("x", fake_tensorrt.DataType.FLOAT, ["batch", 16])],
                                   [t("y", fake_tensorrt.DataType.FLOAT, ["batch", 16])],
                                   [{"x": [[1, 16], [8, 16], [64, 16]]}] * profiles)
    path = tmp_path / f"pool{profiles}.engine"
    path.write_bytes(plan)
    return world, path


def _hammer(backend, threads=8, calls=6):
    errors, results = [], []

    def worker(seed):
        rng = np.random.default_rng(seed)
        try:
            for _ in range(calls):
                x = rng.standard_normal((int(rng.integers(1, 64)), 16)).astype(np.float32)
                results.append(np.array_equal(backend.run({"x": x})["y"], 2 * x))
        except Exception as err:  # noqa: BLE001  (reported below)
            errors.append(err)

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join(30)
    assert not errors, errors
    assert len(results) == threads * calls and all(results)


@pytest.mark.parametrize("profiles,max_contexts,bound", [(4, 3, 3), (1, 2, 1), (8, 2, 2)])
def test_the_context_pool_is_bounded_under_eight_threads(profiles, max_contexts, bound, tmp_path, monkeypatch):
    world, path = _engine(tmp_path, monkeypatch, profiles)
    world.execute_delay_s = 0.005
    backend = TensorRTBackend(path, load_plugins=False, max_contexts=max_contexts)
    assert backend.max_contexts == bound
    _hammer(backend)
    assert world.contexts_created <= bound and world.max_in_flight <= bound
    assert not world.violations  # no context ever ran on two threads at once
    if bound > 1:
        assert world.max_in_flight > 1  # and the pool does run calls concurrently
    backend.close()
    assert not world.memory  # every device buffer freed


def test_the_fake_refuses_two_contexts_on_one_profile(tmp_path, monkeypatch):
    """Fidelity of the stand-in (TensorRT's rule, which the pool's profile-per-context follows)."""
    world, path = _engine(tmp_path, monkeypatch, 1)
    engine = world.trt.Runtime(None).deserialize_cuda_engine(path.read_bytes())
    first, second = engine.create_execution_context(), engine.create_execution_context()
    assert first.active_optimization_profile == 0 and second.active_optimization_profile == -1
    assert second.set_optimization_profile_async(0, 1) is False
    assert second.set_input_shape("x", (2, 16)) is False


def test_close_waits_for_calls_in_flight_and_refuses_new_ones(tmp_path, monkeypatch):
    world, path = _engine(tmp_path, monkeypatch, 2)
    backend = TensorRTBackend(path, load_plugins=False, max_contexts=2)
    world.execute_gate = threading.Event()
    x = np.ones((2, 16), np.float32)
    done = []
    th = threading.Thread(target=lambda: done.append(backend.run({"x": x})["y"]))
    th.start()
    while world.in_flight == 0:
        threading.Event().wait(0.01)
    with pytest.raises(NFormerError, match="1 TensorRT call.*still running.*not freed"):
        backend.close(timeout=0.2)
    assert world.memory  # the running call's buffers are intact
    with pytest.raises(BackendClosed):
        backend.run({"x": x})
    world.execute_gate.set()
    th.join(10)
    np.testing.assert_array_equal(done[0], 2 * x)
    backend.close()
    assert not world.memory
    backend.close()  # idempotent


def test_a_waiting_caller_gets_the_slot_when_it_is_released(tmp_path, monkeypatch):
    world, path = _engine(tmp_path, monkeypatch, 1)
    backend = TensorRTBackend(path, load_plugins=False)
    slot = backend._pool.acquire()
    got = []
    th = threading.Thread(target=lambda: got.append(backend.run({"x": np.ones((1, 16), np.float32)})))
    th.start()
    th.join(0.2)
    assert th.is_alive() and not got  # waiting: the only context is owned
    backend._pool.release(slot)
    th.join(10)
    assert got and world.contexts_created == 1
    backend.close()
