"""`runtime build`'s engine side: trtexec command lines, TensorRT Python-API calls, build records and
the loader check that refuses a mismatched engine.

On a CPU machine the command lines and API calls are checked as constructed (a stand-in ``trtexec``
script and a recording stand-in for the ``tensorrt`` module: they test this project's orchestration,
not TensorRT).  The tests marked ``tensorrt`` build real engines and skip, with the reason, where
TensorRT is missing.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest

import plugins
from export.contract.files import STALE_GRACE_S
from runtime.tensorrt import build as eb
from runtime.tensorrt import cuda_memory
from runtime.tensorrt.build import (BuildOptions, EngineMismatchError, Trtexec, build, build_with_python_api,
                                    check_engine, parse_trtexec_build, parse_trtexec_version, shape_profiles,
                                    trtexec_command)
from runtime.tensorrt import lib as trt_lib
from runtime.tensorrt.lib import EngineUnusable, import_tensorrt

from precision_support import fresh_copy, random_small_export

CONFIG = {"input_size_hw": [256, 128], "n_embd": 256, "n_layer": 4, "landmarks": 5}
BANNER_10 = "&&&& RUNNING TensorRT.trtexec [TensorRT v101300] [b35] # trtexec --help"
BANNER_11 = "&&&& RUNNING TensorRT.trtexec [TensorRT v110100] [b106] # trtexec --help"
CACHE = "timing.fake-gpu-80gb.9.0.trt10.13.0.cache"


@pytest.fixture(autouse=True)
def _fresh_plugin_registry(monkeypatch):
    """Each test is a new process as far as the once-per-process plugin load is concerned."""
    monkeypatch.setattr(trt_lib, "_plugin_state", trt_lib._PluginState())


def test_trtexec_banner_gives_the_tensorrt_version():
    assert parse_trtexec_version(BANNER_10) == (10, 13, 0) and parse_trtexec_build(BANNER_10) == 35
    assert parse_trtexec_version(BANNER_11) == (11, 1, 0)
    assert parse_trtexec_version("no banner here") is None
    assert Trtexec("trtexec", (10, 13, 0), BANNER_10, 35).full_version == "10.13.0.35"


def test_shape_profiles_defaults_and_validation():
    p = shape_profiles(CONFIG)
    assert p["encoder"] == {"images": {"min": [1, 3, 256, 128], "opt": [32, 3, 256, 128], "max": [128, 3, 256, 128]}}
    assert p["nformer"]["features"] == {"min": [1, 1, 256], "opt": [1, 20000, 256], "max": [1, 100000, 256]}
    assert p["nformer"]["landmarks"] == {"min": [4, 1], "opt": [4, 5], "max": [4, 5]}
    assert shape_profiles(CONFIG, n=(1, 3, 4))["nformer"]["landmarks"]["opt"] == [4, 3]  # l <= N
    with pytest.raises(eb.InputError, match="min <= opt <= max"):
        shape_profiles(CONFIG, batch=(8, 4, 16))
    # TensorRT's dimensions are 32-bit: sizes past the largest profile are refused before any work
    largest = shape_profiles(CONFIG, batch=(1, 1, eb.MAX_PROFILE_BATCH), n=(1, 1, eb.MAX_PROFILE_N))
    assert largest["nformer"]["features"]["max"] == [1, 1_000_000, 256]
    assert largest["encoder"]["images"]["max"] == [4096, 3, 256, 128]
    with pytest.raises(eb.InputError, match="refinement N profile max must be at most 1,000,000, got 1,000,001"):
        shape_profiles(CONFIG, n=(1, 1, eb.MAX_PROFILE_N + 1))
    with pytest.raises(eb.InputError, match="encoder batch profile max must be at most 4,096"):
        shape_profiles(CONFIG, batch=(1, 32, 10**20))


@pytest.mark.parametrize("version,help_text,strongly", [
    ((10, 13, 0), BANNER_10 + "\n  --stronglyTyped   Create a strongly typed network.", True),
    ((11, 1, 0), BANNER_11 + "\n  --stronglyTyped   [Deprecated] ... This flag is a no-op.", False),
    ((10, 0, 1), "[TensorRT v100001]", False)])
def test_trtexec_command_line(version, help_text, strongly, tmp_path):
    tool = Trtexec("/opt/trt/bin/trtexec", version, help_text)
    profile = shape_profiles(CONFIG)["nformer"]
    cmd = trtexec_command(tool, tmp_path / "nformer.fp16.onnx", tmp_path / "nformer.fp16.engine", profile,
                          tmp_path / "timing.cache", Path("/libs/libnformer_plugins.so"))
    assert cmd[:3] == ["/opt/trt/bin/trtexec", f"--onnx={tmp_path}/nformer.fp16.onnx",
                       f"--saveEngine={tmp_path}/nformer.fp16.engine"]
    assert "--minShapes=features:1x1x256,landmarks:4x1" in cmd
    assert "--optShapes=features:1x20000x256,landmarks:4x5" in cmd
    assert "--maxShapes=features:1x100000x256,landmarks:4x5" in cmd
    assert f"--timingCacheFile={tmp_path}/timing.cache" in cmd
    assert "--dynamicPlugins=/libs/libnformer_plugins.so" in cmd
    assert ("--stronglyTyped" in cmd) is strongly
    assert cmd[-1] == "--skipInference"
    # TensorRT 11 removed the precision flags: precision is in the ONNX file, never on the command line
    assert not {"--fp16", "--int8", "--best", "--bf16"} & set(cmd) and not any(a.startswith("--calib") for a in cmd)
    no_plugin = trtexec_command(tool, Path("a.onnx"), Path("a.engine"), profile, Path("t.cache"), None)
    assert not any(a.startswith("--dynamicPlugins") for a in no_plugin)


class _Recorder:
    """A stand-in for the ``tensorrt`` module that records what is called with which arguments."""

    def __init__(self, strongly_typed=True, version="10.13.0.35"):
        self.calls = []
        rec = self
        self.__version__ = version
        self.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda s, level: rec.calls.append(("Logger", level))})
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(**({"STRONGLY_TYPED": 1} if strongly_typed else {}))

        class Obj:
            def __init__(self, kind):
                self.kind = kind

            def __getattr__(self, name):
                def method(*args, **kwargs):
                    rec.calls.append((f"{self.kind}.{name}", args, kwargs))
                    return {"build_serialized_network": b"PLAN", "serialize": b"CACHE", "parse_from_file": True,
                            "load_library": object(), "add_optimization_profile": 0}.get(name, Obj(name))
                return method

        self.Builder = lambda logger: Obj("Builder")
        self.OnnxParser = lambda network, logger: Obj("OnnxParser")

    def names(self):
        return [c[0] for c in self.calls]


@pytest.mark.parametrize("strongly_typed,flags", [(True, 2), (False, 0)])
def test_python_api_calls(strongly_typed, flags, tmp_path):
    trt = _Recorder(strongly_typed)
    (tmp_path / "timing.cache").write_bytes(b"OLD")
    profile = shape_profiles(CONFIG)["encoder"]
    info = build_with_python_api(trt, tmp_path / "encoder.int8.onnx", tmp_path / "e.engine", profile,
                                 tmp_path / "timing.cache", Path("/libs/libnformer_plugins.so"), log=lambda m: None)
    calls = {c[0]: c for c in trt.calls if len(c) == 3}
    assert calls["get_plugin_registry.load_library"][1] == ("/libs/libnformer_plugins.so",)
    assert calls["Builder.create_network"][1] == (flags,)
    assert calls["OnnxParser.parse_from_file"][1] == (str(tmp_path / "encoder.int8.onnx"),)
    assert calls["create_optimization_profile.set_shape"][1] == ("images", [1, 3, 256, 128], [32, 3, 256, 128],
                                                                 [128, 3, 256, 128])
    assert calls["create_builder_config.create_timing_cache"][1] == (b"OLD",)
    assert calls["create_builder_config.set_timing_cache"][2] == {"ignore_mismatch": False}
    assert "create_builder_config.set_flag" not in calls  # no precision flag (removed in TensorRT 11)
    assert (tmp_path / "e.engine").read_bytes() == b"PLAN" and (tmp_path / "timing.cache").read_bytes() == b"CACHE"
    assert info["tool"] == "tensorrt-python" and info["tensorrt_version"] == "10.13.0.35"


FAKE_TRTEXEC = '''\
#!{python}
"""Stand-in for trtexec: prints TensorRT's banner and device lines, writes --saveEngine (mode 0600, as
a writer that ignores the umask would) and appends to --timingCacheFile in place, as trtexec does.
FAKE_TRTEXEC_HANG=<file>: write half of the engine and of the cache update, then write <file> and
wait to be killed (a build interrupted while trtexec writes)."""
import json, os, sys, time
print("&&&& RUNNING TensorRT.trtexec [TensorRT v101300] [b35] # trtexec " + " ".join(sys.argv[1:]))
if "--help" in sys.argv:
    print("  --stronglyTyped   Create a strongly typed network.")
    sys.exit(0)
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if "=" in a)
with open(os.environ["FAKE_TRTEXEC_CALLS"], "a") as f:
    f.write(json.dumps(sys.argv) + "\\n")
if os.environ.get("FAKE_TRTEXEC_FAIL"):
    print("[E] Error[4]: fake parse failure")
    sys.exit(1)
print("[I] Selected Device: Fake GPU 80GB")
print("[I] Compute Capability: 9.0", flush=True)
engine = b"ENGINE:" + open(args["onnx"], "rb").read()[:64]
with open(os.open(args["saveEngine"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out, \\
        open(os.open(args["timingCacheFile"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as cache:
    if os.environ.get("FAKE_TRTEXEC_HANG"):
        out.write(engine[:len(engine) // 2]); out.flush()
        cache.write(b"half"); cache.flush()
        open(os.environ["FAKE_TRTEXEC_HANG"], "w").write(str(os.getpid()))
        time.sleep(600)
    out.write(engine)
    cache.write(b"t")
'''


@pytest.fixture()
def fake_trtexec(tmp_path, monkeypatch):
    exe = tmp_path / "bin" / "trtexec"
    exe.parent.mkdir()
    exe.write_text(textwrap.dedent(FAKE_TRTEXEC.format(python=sys.executable)))
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{exe.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_TRTEXEC_CALLS", str(tmp_path / "calls.jsonl"))
    monkeypatch.setattr(eb, "gpu_facts", lambda device=None: None)  # the GPU comes from trtexec's log
    lib = tmp_path / "libnformer_plugins.so"
    lib.write_bytes(b"plugin v1")
    monkeypatch.setattr(eb, "plugin_library_facts", lambda: {"path": str(lib), "sha256": eb.sha256_file(lib)})
    return tmp_path


@pytest.fixture()
def model_dir(tmp_path_factory, tmp_path):
    return fresh_copy(random_small_export(tmp_path_factory)[1], tmp_path / "build")


def _running(record, **change):
    facts = {"tensorrt": record["tensorrt"]["full_version"], "gpu": dict(record["gpu"]),
             "plugin_library": dict(record["plugin_library"]) if record["plugin_library"] else None}
    facts.update(change)
    return facts


def test_build_with_trtexec_writes_engines_records_and_manifest(fake_trtexec, model_dir):
    messages = []
    result = build(model_dir, BuildOptions(precision="fp16", engine_tool="auto", batch=(1, 8, 64)), log=messages.append)
    assert result["tool"] == "trtexec"
    calls = [json.loads(line) for line in (fake_trtexec / "calls.jsonl").read_text().splitlines()]
    assert len(calls) == 2
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert set(manifest["engines"]) == {"encoder.fp16", "nformer.fp16"}
    for argv, name in zip(calls, ("encoder.fp16", "nformer.fp16")):
        entry = manifest["engines"][name]
        record = json.loads((model_dir / entry["record"]).read_text())
        # trtexec wrote into a private work folder of the model directory; the command stored and printed
        # is the one that ran with the final paths in place of that folder's (the work folder is gone)
        work = Path(next(a for a in argv if a.startswith("--saveEngine=")).split("=", 1)[1]).parent
        assert work.parent == model_dir and work.name.startswith(eb.TRTEXEC_WORK_PREFIX) and not work.exists()
        assert record["builder"]["command"] == [a.replace(f"{work}/", f"{model_dir}/") for a in argv]
        assert record["builder"]["staged_outputs"] == ["--saveEngine", "--timingCacheFile"]
        assert f"$ {record['builder']['command_line']}" in messages
        argv = record["builder"]["command"]
        assert f"--saveEngine={model_dir / entry['path']}" in argv and "--stronglyTyped" in argv
        # the encoder's build learns the GPU from trtexec's log; the refinement's uses the keyed cache
        cache = "timing.unknown-gpu.trt10.13.0.cache" if name == "encoder.fp16" else CACHE
        assert f"--timingCacheFile={model_dir / cache}" in argv
        # the refinement is parsed from its TensorRT copy without the op's local function (see build.py)
        parsed = "nformer.fp16.trt.onnx" if name.startswith("nformer") else "encoder.fp16.onnx"
        assert f"--onnx={model_dir / parsed}" in argv
        assert (record["parsed_onnx"] or {}).get("path") == (parsed if name.startswith("nformer") else None)
        assert any(a.startswith("--dynamicPlugins=") for a in argv)
        assert record["tensorrt"] == {"version": "10.13.0", "full_version": "10.13.0.35"}
        assert record["gpu"] == {"name": "Fake GPU 80GB", "compute_capability": "9.0"}
        assert record["source_onnx"]["path"] == f"{name}.onnx"
        assert record["engine_sha256"] == entry["sha256"] == eb.sha256_file(model_dir / entry["path"])
        assert record["plugin_library"]["sha256"] == entry["plugin_library_sha256"]
        assert entry["build"] == {"tensorrt": "10.13.0.35", "gpu": "Fake GPU 80GB", "compute_capability": "9.0",
                                  "plugin_sha256": entry["plugin_library_sha256"]}
        assert record["rebuild"].startswith(f"runtime build {model_dir} --precision fp16 --min-batch 1 --opt-batch 8")
        assert check_engine(model_dir / entry["path"], _running(record), model_dir=model_dir) == record
    enc = json.loads((model_dir / "encoder.fp16.engine.json").read_text())
    assert enc["profiles"]["images"]["opt"] == [8, 3, 128, 64]
    # one timing cache per device and TensorRT version, used by both builds; the GPU came from trtexec's log
    assert (model_dir / "timing.fake-gpu-80gb.9.0.trt10.13.0.cache").read_bytes() == b"tt"
    assert not list(model_dir.glob("timing.unknown-gpu*")) and not (model_dir / "timing.cache").exists()
    assert enc["timing_cache"] == "timing.fake-gpu-80gb.9.0.trt10.13.0.cache"


def test_failed_trtexec_build_is_an_error_with_the_log(fake_trtexec, model_dir, monkeypatch):
    monkeypatch.setenv("FAKE_TRTEXEC_FAIL", "1")
    with pytest.raises(eb.NFormerError, match=r"trtexec failed \(exit 1\).*fake parse failure.*full log"):
        build(model_dir, BuildOptions(precision="fp32"), log=lambda m: None)
    assert "engines" not in json.loads((model_dir / "manifest.json").read_text())
    # the log the message points at is published; nothing else of the failed run is left
    assert "fake parse failure" in (model_dir / "encoder.fp32.engine.log").read_text()
    assert not list(model_dir.glob("*.engine")) and not list(model_dir.glob("timing.*"))
    assert not _leftovers(model_dir)


def _leftovers(model_dir: Path) -> list[str]:
    """Work folders and temporary files of the writers in ``model_dir``."""
    return sorted(p.name for p in model_dir.iterdir()
                  if p.name.startswith((eb.TRTEXEC_WORK_PREFIX, ".")) or p.name.endswith(".tmp"))


def test_trtexec_outputs_are_published_with_the_umask(fake_trtexec, model_dir):
    """trtexec writes its files 0600 into the work folder; engine, log and timing cache arrive at their
    final names with the umask's permissions, and no work folder or temporary file stays behind."""
    old = os.umask(0o027)
    try:
        result = build(model_dir, BuildOptions(precision="fp32", engine_tool="trtexec"), log=lambda m: None)
    finally:
        os.umask(old)
    assert set(result["engines"]) == {"encoder.fp32", "nformer.fp32"}
    for entry in result["engines"].values():
        engine = model_dir / entry["path"]
        assert engine.read_bytes().startswith(b"ENGINE:")
        log = engine.with_name(engine.name + ".log")
        assert "Selected Device: Fake GPU 80GB" in log.read_text()
        for path in (engine, log, model_dir / entry["record"]):
            assert stat.S_IMODE(path.stat().st_mode) == 0o640, path.name
    cache = model_dir / CACHE
    assert cache.read_bytes() == b"tt" and stat.S_IMODE(cache.stat().st_mode) == 0o640
    assert not _leftovers(model_dir)


KILLABLE_BUILD = '''\
import sys
from pathlib import Path
from runtime.tensorrt import build as eb
from runtime.cli import main

lib = Path(sys.argv[2])
eb.gpu_facts = lambda device=None: {"name": "Fake GPU 80GB", "compute_capability": "9.0"}
eb.plugin_library_facts = lambda: {"path": str(lib), "sha256": eb.sha256_file(lib)}
main(["build", sys.argv[1], "--precision", "fp32", "--engine-tool", "trtexec"])
'''


@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGTERM"])
def test_a_build_killed_while_trtexec_writes_keeps_the_previous_engine(signal_name, fake_trtexec, model_dir,
                                                                       monkeypatch):
    """`runtime build` interrupted while trtexec writes the engine and updates the timing cache: the
    previous engine, cache, log, record and manifest are untouched.  SIGTERM unwinds (trtexec is
    stopped, the work folder removed at once); SIGKILL of the whole process group leaves the work
    folder, which the next build removes once it is no longer locked."""
    # the GPU is known before the build (as with nvidia-smi), so trtexec is given the existing cache to update
    monkeypatch.setattr(eb, "gpu_facts", lambda device=None: {"name": "Fake GPU 80GB", "compute_capability": "9.0"})
    build(model_dir, BuildOptions(precision="fp32", engine_tool="trtexec"), log=lambda m: None)
    before = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}
    assert {"encoder.fp32.engine", "encoder.fp32.engine.log", CACHE} <= set(before)
    hidden_before = _leftovers(model_dir)
    script = fake_trtexec / "killable_build.py"
    script.write_text(KILLABLE_BUILD)
    marker = fake_trtexec / "trtexec_writing"
    monkeypatch.setenv("FAKE_TRTEXEC_HANG", str(marker))
    proc = subprocess.Popen([sys.executable, str(script), str(model_dir), str(fake_trtexec / "libnformer_plugins.so")],
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() or not marker.read_text():
            assert proc.poll() is None, proc.stdout.read().decode(errors="replace")
            assert time.monotonic() < deadline, "the stand-in trtexec never started writing"
            time.sleep(0.05)
        trtexec_pid = int(marker.read_text())
        work = [p for p in model_dir.iterdir() if p.name.startswith(eb.TRTEXEC_WORK_PREFIX)]
        # half an engine and a half-updated copy of the cache, in the work folder
        assert len(work) == 1 and (work[0] / "encoder.fp32.engine").is_file()
        assert (work[0] / CACHE).read_bytes() == before[CACHE] + b"half"
        if signal_name == "SIGKILL":
            os.killpg(proc.pid, signal.SIGKILL)   # the build and trtexec, as a container stop or the OOM killer would
        else:
            proc.send_signal(signal.SIGTERM)     # the build alone, as `timeout` would
        proc.wait(timeout=60)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=60)
    after = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}
    assert after == before  # the previous engine, cache, log, records and manifest, byte for byte
    if signal_name == "SIGTERM":
        assert proc.returncode == 128 + signal.SIGTERM
        with pytest.raises(ProcessLookupError):   # subprocess.run stopped trtexec on the way out
            os.kill(trtexec_pid, 0)
        assert _leftovers(model_dir) == hidden_before
    else:
        assert [p.name for p in model_dir.iterdir() if p.name.startswith(eb.TRTEXEC_WORK_PREFIX)] == [work[0].name]
        # the next build sweeps the killed run's folder (once older than the grace period for new folders)
        old = time.time() - 2 * STALE_GRACE_S
        os.utime(work[0], (old, old))
    monkeypatch.delenv("FAKE_TRTEXEC_HANG")
    result = build(model_dir, BuildOptions(precision="fp32", engine_tool="trtexec"), log=lambda m: None)
    assert _leftovers(model_dir) == hidden_before
    assert (model_dir / CACHE).read_bytes() == before[CACHE] + b"tt"  # updated by both builds, never "half"
    for entry in result["engines"].values():
        record = json.loads((model_dir / entry["record"]).read_text())
        assert check_engine(model_dir / entry["path"], _running(record), model_dir=model_dir) == record


@pytest.mark.parametrize("case", ["tensorrt", "gpu_name", "compute_capability", "no_gpu", "plugin_changed",
                                  "plugin_missing", "engine_changed", "onnx_changed", "no_record", "record_nested",
                                  "record_list"])
def test_loader_refuses_an_engine_that_does_not_match(case, fake_trtexec, model_dir):
    build(model_dir, BuildOptions(precision="fp32"), log=lambda m: None)
    engine = model_dir / "encoder.fp32.engine"
    record = json.loads((model_dir / "encoder.fp32.engine.json").read_text())
    running = _running(record)
    expect = {"tensorrt": "TensorRT 10.13.0", "gpu_name": "Other GPU", "compute_capability": "compute capability 8.9",
              "no_gpu": "no GPU", "plugin_changed": "plugin library", "plugin_missing": "no plugin library",
              "engine_changed": "engine file changed", "onnx_changed": "encoder.onnx changed",
              "no_record": "no build record", "record_nested": "cannot read the build record",
              "record_list": "not a build record"}[case]
    if case == "tensorrt":
        running["tensorrt"] = "10.8.0.43"
    elif case == "gpu_name":
        running["gpu"]["name"] = "Other GPU"
    elif case == "compute_capability":
        running["gpu"]["compute_capability"] = "8.9"
    elif case == "no_gpu":
        running["gpu"] = None
    elif case == "plugin_changed":
        running["plugin_library"]["sha256"] = "0" * 64
    elif case == "plugin_missing":
        running["plugin_library"] = None
    elif case == "engine_changed":
        engine.write_bytes(engine.read_bytes() + b"x")
    elif case == "onnx_changed":
        (model_dir / "encoder.onnx").write_bytes((model_dir / "encoder.onnx").read_bytes() + b"\0")
    elif case == "no_record":
        (model_dir / "encoder.fp32.engine.json").unlink()
    elif case == "record_nested":          # nested past the recursion limit: was a raw RecursionError
        (model_dir / "encoder.fp32.engine.json").write_text("[" * 100000 + "]" * 100000)
    elif case == "record_list":            # JSON but no object: was an AttributeError
        (model_dir / "encoder.fp32.engine.json").write_text("[1]")
    with pytest.raises(EngineUnusable) as err:
        check_engine(engine, running, model_dir=model_dir)
    message = str(err.value)
    assert expect in message and "runtime build" in message and "\n" not in message


def test_an_engine_without_the_plugin_loads_with_or_without_one(fake_trtexec, model_dir):
    build(model_dir, BuildOptions(precision="fp32"), log=lambda m: None)
    # a record that names no plugin library (an engine of a network without the custom op)
    record_path = model_dir / "encoder.fp32.engine.json"
    record = json.loads(record_path.read_text())
    record["plugin_library"] = None
    record_path.write_text(json.dumps(record))
    check_engine(model_dir / "encoder.fp32.engine", _running(record), model_dir=model_dir)
    check_engine(model_dir / "encoder.fp32.engine",
                 _running(record, plugin_library={"path": "/x.so", "sha256": "1" * 64}), model_dir=model_dir)


def test_without_the_plugin_library_the_refinement_is_not_built(fake_trtexec, model_dir, monkeypatch):
    """Without the plugin TensorRT would build the op's function body (fp32 ranking): refused, with
    the command that builds the plugin, before any engine is built."""
    monkeypatch.setattr(eb, "plugin_library_facts", lambda: None)
    with pytest.raises(eb.NFormerError, match=r"nformer.onnx uses the custom op nformer::ReciprocalNeighbors.*"
                                              r"not built.*float32.*cmake -S plugins"):
        build(model_dir, BuildOptions(precision="fp32"), log=lambda m: None)
    assert not (fake_trtexec / "calls.jsonl").exists() and not list(model_dir.glob("*.engine"))
    assert "engines" not in json.loads((model_dir / "manifest.json").read_text())


def test_without_tensorrt_the_build_writes_onnx_files_only(model_dir, monkeypatch):
    monkeypatch.setattr(eb, "find_trtexec", lambda path=None: None)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` fails
    messages = []
    result = build(model_dir, BuildOptions(precision="fp16"), log=messages.append)
    assert result["tool"] == "none" and not result["engines"]
    assert (model_dir / "encoder.fp16.onnx").is_file() and (model_dir / "nformer.fp16.onnx").is_file()
    assert any("engines: not built" in m and "runtime build" in m for m in messages)
    with pytest.raises(eb.NFormerError, match="TensorRT is not installed"):
        eb.running_facts()


def test_one_error_type_for_an_engine_that_cannot_be_used_here():
    from runtime.tensorrt import backend

    assert EngineMismatchError is EngineUnusable and backend.EngineUnusable is EngineUnusable
    assert issubclass(EngineUnusable, eb.NFormerError)


def test_import_tensorrt_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` fails
    with pytest.raises(EngineUnusable, match="TensorRT is not installed.*nformer-trt\\[tensorrt\\]"):
        import_tensorrt()
    # a folder named tensorrt on sys.path (a namespace package, e.g. tests/runtime/tensorrt) is not TensorRT
    shadow = types.ModuleType("tensorrt")
    shadow.__path__ = ["/somewhere/tensorrt"]
    monkeypatch.setitem(sys.modules, "tensorrt", shadow)
    with pytest.raises(EngineUnusable, match="TensorRT is not installed.*/somewhere/tensorrt"):
        import_tensorrt()
    with pytest.raises(eb.InputError, match="does not import here"):
        eb.choose_tool("python")
    assert eb.choose_tool("none") == ("none", "--engine-tool none")
    fake = types.ModuleType("tensorrt")
    fake.__version__ = "10.13.0.35"
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    assert import_tensorrt() is fake


def test_python_api_build_writes_the_engine_atomically_with_the_umask(model_dir, tmp_path, monkeypatch):
    """The Python-API build through `build`: the engine and timing cache are written by
    export.contract.files (no temporary file left, umask permissions), the plugin library is the one
    plugins.plugin_library_path() finds."""
    trt = _Recorder()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(eb, "gpu_facts", lambda device=None: {"name": "Fake GPU", "compute_capability": "9.0"})
    lib_dir = tmp_path / "libs"
    lib_dir.mkdir()
    (lib_dir / plugins.PLUGIN_LIBRARY).write_bytes(b"plugin v1")
    monkeypatch.setenv(plugins.ENV_DIR, str(lib_dir))
    monkeypatch.setattr(plugins, "DEFAULT_BUILD_DIR", tmp_path / "no_build")
    old = os.umask(0o027)
    try:
        result = build(model_dir, BuildOptions(precision="fp32", engine_tool="python"), log=lambda m: None)
    finally:
        os.umask(old)
    assert result["tool"] == "python" and set(result["engines"]) == {"encoder.fp32", "nformer.fp32"}
    loaded = [c[1] for c in trt.calls if c[0] == "get_plugin_registry.load_library"]
    assert loaded == [(str((lib_dir / plugins.PLUGIN_LIBRARY).resolve()),)]  # once per process
    for entry in result["engines"].values():
        engine = model_dir / entry["path"]
        assert engine.read_bytes() == b"PLAN" and stat.S_IMODE(engine.stat().st_mode) == 0o640
        record = json.loads((model_dir / entry["record"]).read_text())
        assert record["plugin_library"]["path"] == str((lib_dir / plugins.PLUGIN_LIBRARY).resolve())
        assert record["builder"]["tool"] == "tensorrt-python"
        assert check_engine(engine, _running(record), model_dir=model_dir) == record
    cache = model_dir / "timing.fake-gpu.9.0.trt10.13.0.cache"
    assert cache.read_bytes() == b"CACHE"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o640
    copy = model_dir / "nformer.trt.onnx"
    assert stat.S_IMODE(copy.stat().st_mode) == 0o640 and not __import__("onnx").load(str(copy)).functions
    assert not [p.name for p in model_dir.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]


def test_without_a_plugin_library_the_lookup_gives_none(tmp_path, monkeypatch):
    monkeypatch.setenv(plugins.ENV_DIR, str(tmp_path))
    monkeypatch.setattr(plugins, "DEFAULT_BUILD_DIR", tmp_path / "build" / "plugins")
    assert plugins.plugin_library_path() is None and eb.plugin_library_facts() is None
    with pytest.raises(plugins.PluginNotBuiltError, match="cmake -S plugins"):
        plugins.plugin_library_path(required=True)
    (tmp_path / plugins.PLUGIN_LIBRARY).write_bytes(b"v2")
    assert plugins.plugin_library_path() == (tmp_path / plugins.PLUGIN_LIBRARY).resolve()
    assert eb.plugin_library_facts() == {"path": str((tmp_path / plugins.PLUGIN_LIBRARY).resolve()),
                                         "sha256": eb.sha256_file(tmp_path / plugins.PLUGIN_LIBRARY)}


def test_gpu_facts_ask_cuda_through_the_cuda_module(monkeypatch):
    monkeypatch.setattr(eb.shutil, "which", lambda name: None)  # no nvidia-smi
    asked = []
    monkeypatch.setattr(cuda_memory, "device_facts",
                        lambda index=0: asked.append(index) or {"name": "Fake GPU", "compute_capability": "8.9"})
    assert eb.gpu_facts(1) == {"name": "Fake GPU", "compute_capability": "8.9"} and asked == [1]


def test_device_facts_without_pycuda_is_none(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycuda", None)
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    assert cuda_memory.device_facts(0) is None


# ---------------------------------------------------------------------------------------------------
# real TensorRT (skipped where it is missing)

def _tensorrt_or_skip():
    try:
        return import_tensorrt()
    except EngineUnusable as err:
        pytest.skip(f"TensorRT's Python package does not import here ({err}): engine builds through the Python API "
                    "not run")


@pytest.mark.tensorrt
def test_real_trtexec_build(model_dir):
    if shutil.which("trtexec") is None:
        pytest.skip("trtexec is not on PATH: engine builds with trtexec not run")
    result = build(model_dir, BuildOptions(precision="fp16", engine_tool="trtexec", batch=(1, 4, 8), n=(1, 64, 256)))
    for entry in result["engines"].values():
        check_engine(model_dir / entry["path"], model_dir=model_dir)


@pytest.mark.tensorrt
def test_real_python_api_build_and_run(model_dir, tmp_path_factory):
    _tensorrt_or_skip()
    import numpy as np

    result = build(model_dir, BuildOptions(precision="fp16", engine_tool="python", batch=(1, 4, 8), n=(1, 64, 256)))
    for entry in result["engines"].values():
        check_engine(model_dir / entry["path"], model_dir=model_dir)
    from runtime.backends import OnnxRuntimeBackend
    from runtime.tensorrt.backend import TensorRTBackend

    images = np.random.default_rng(0).standard_normal((4, 3, 128, 64)).astype(np.float32)
    ours = TensorRTBackend(model_dir / "encoder.fp16.engine").run({"images": images})["embeddings"]
    ref = OnnxRuntimeBackend(model_dir / "encoder.onnx", ["CPUExecutionProvider"]).run({"images": images})["embeddings"]
    from export.contract.parity import cosine_rows

    assert cosine_rows(ours, ref).mean() >= 0.999
