"""``runtime build``: precision-specific ONNX files and TensorRT engines, each with a build record.

Place in the flow: the last step before serving.  ``calibration.variants`` writes the FP16 / INT8
ONNX files beside the export's fp32 ones; this module turns the pair a precision needs (encoder +
refinement) into TensorRT engines, where TensorRT is available:

* with ``trtexec`` when it is on PATH (the command line is printed and stored in the record, with the
  final paths: trtexec writes the engine, its log and an updated copy of the timing cache into a
  private work folder ``.trtexec-*`` of the model directory, renamed into place only once it
  succeeded, so a killed build never leaves half an engine under its name):
  ``--onnx``, ``--saveEngine``, ``--minShapes/--optShapes/--maxShapes``, ``--timingCacheFile``,
  ``--dynamicPlugins=<plugin library>`` when it is built (``plugins.plugin_library_path()``),
  ``--stronglyTyped`` on TensorRT 10 (11 is always strongly typed and marks the flag a no-op),
  ``--skipInference``;
* else through the TensorRT Python API: a strongly typed network (the flag where the enum still has
  it), the ONNX parser, one optimisation profile per network, the timing cache (``set_timing_cache``'s
  result checked: a cache TensorRT rejects is replaced by an empty one, with a warning), the plugin
  library loaded once per process through the builder's plugin registry and its creator looked up
  (:func:`runtime.tensorrt.lib.load_plugin_library`).

TensorRT parses a **TensorRT copy** of each ONNX file that carries the local function
(FunctionProto) ``nformer::ReciprocalNeighbors``: ``<stem>.trt.onnx`` beside it (``nformer.trt.onnx``,
``nformer.fp16.trt.onnx``), the same model without the function, written atomically and named in the
build record (``parsed_onnx``).  The function body is ONNX Runtime's implementation: TensorRT cannot
run its DOUBLE tensors and casts them to FLOAT, so an engine built from it ranks neighbours in fp32,
not exactly.  TensorRT 10.0 - 10.6 import a local function before a plugin of the same name (10.7
reversed the order), and every version imports the function when the plugin did not load; without
the function in the parsed file the node can only become the plugin, and a missing plugin is a parse
error instead of a silently different engine.  So 10.0 - 10.6 are supported, through that copy.  A
network that uses the op is not built at all when the plugin library is not built.

No precision flag is ever passed (TensorRT 11 removed ``--fp16/--int8``, ``BuilderFlag.FP16/INT8`` and
the calibrators): the precision is in the ONNX file, so the same code builds on TensorRT 10 and 11.
Without TensorRT the command still writes the ONNX files and says how to build the engines elsewhere.
A CPU precision (``int8-cpu``: uint8 activations, which TensorRT rejects) writes its ONNX file and
never an engine.

Shape profiles: encoder ``images`` [batch, 3, H, W] with batch min/opt/max 1/32/128 (at most 4,096);
refinement ``features`` [1, N, D] with N 1/20,000/100,000 (at most 1,000,000) and ``landmarks`` [n_layer, l] with l from 1 to the
model's landmark count (l <= N).  One timing cache per model directory, device and TensorRT version
(``timing.<gpu-name-slug>.<compute capability>.trt<version>.cache``, e.g.
``timing.nvidia-h100-80gb-hbm3.9.0.trt10.13.0.cache``): a model directory copied to another GPU never
feeds it another device's cache.

Engine files: ``<network>.<precision>.engine`` with the build record ``<network>.<precision>.engine.json``
beside it.  **Build record** (``format`` ``nformer-trt/engine-record``, version 1)::

    {"format": "nformer-trt/engine-record", "format_version": 1,
     "engine": "encoder.int8.engine", "engine_sha256": "...", "network": "encoder", "precision": "int8",
     "source_onnx": {"path": "encoder.int8.onnx", "sha256": "..."},
     "parsed_onnx": {"path": "nformer.trt.onnx", "sha256": "...",
                     "removed_local_functions": ["nformer::ReciprocalNeighbors"]} | null,
     "custom_op": {"op": "nformer::ReciprocalNeighbors", "implementation": "plugin"} | null,
     "tensorrt": {"version": "10.8.0", "full_version": "10.8.0.43"},
     "gpu": {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"},
     "profiles": {"images": {"min": [1, 3, 256, 128], "opt": [32, ...], "max": [128, ...]}},
     "plugin_library": {"path": "/.../libnformer_plugins.so", "sha256": "..."} | null,
     "builder": {"tool": "trtexec", "command": [...], "command_line": "trtexec --onnx=...", "log": "....engine.log",
                 "staged_outputs": ["--saveEngine", "--timingCacheFile"]}
              | {"tool": "tensorrt-python", "calls": ["Builder.create_network(flags=...)", ...]},
     "timing_cache": "timing.nvidia-h100-80gb-hbm3.9.0.trt10.8.0.cache",
     "rebuild": "runtime build build/ --precision int8 ...",
     "created": "..."}

**Manifest section** ``"engines"`` (written here; what the runtime's TensorRT backend reads), one
entry per engine keyed ``"<network>.<precision>"``::

    "engines": {
      "encoder.int8": {"network": "encoder", "precision": "int8", "path": "encoder.int8.engine",
                       "record": "encoder.int8.engine.json", "onnx": "encoder.int8.onnx",
                       "sha256": "<engine sha256>", "tensorrt": "10.8.0",
                       "gpu": {"name": ..., "compute_capability": ...},
                       "profiles": {...}, "plugin_library_sha256": "..." | null,
                       "build": {"tensorrt": "10.8.0.43", "gpu": "NVIDIA H100 80GB HBM3",
                                 "compute_capability": "9.0", "plugin_sha256": "..." | null}},
      "nformer.fp16": {...}
    }

(``build`` repeats the record's facts in the shape ``runtime.tensorrt.backend`` reads; its
``tensorrt`` is the full version, as ``tensorrt.__version__`` prints it.)

Before deserialising an engine, call :func:`check_engine` (``model_dir`` given): it refuses, with an
:class:`~runtime.tensorrt.lib.EngineUnusable` (also importable here under its former name
``EngineMismatchError``) that says which fact differs and the command that rebuilds it, an engine
whose record does not match the running TensorRT version, GPU (name or compute capability) or plugin
library, or whose engine / source ONNX file changed since the build.  :func:`running_facts` gathers
the running facts; tests pass fake ones.

Imports no torch; imports ``tensorrt`` (through :func:`runtime.tensorrt.lib.import_tensorrt`) only for
the Python-API build and :func:`running_facts`; asks CUDA for the GPU only through
:func:`runtime.tensorrt.cuda_memory.device_facts`.  Files are written with ``export.contract.files``.
"""
from __future__ import annotations

import datetime
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import plugins
from export.contract.config import MAX_BATCH
from export.contract.errors import InputError, NFormerError
from export.contract.files import (check_target, copy_file_atomic, publish_files, sha256_file, staged_file, work_dir,
                                   write_bytes_atomic, write_json_atomic)
from export.contract.manifest import load_manifest
from export.contract.ops import OP_DOMAIN, OP_TYPE
from export.contract.variants import CALIBRATED_PRECISIONS, CPU_PRECISIONS

from runtime.tensorrt.lib import EngineUnusable, import_tensorrt, load_plugin_library, parser_prefers_local_functions

RECORD_FORMAT = "nformer-trt/engine-record"
RECORD_FORMAT_VERSION = 1
ENGINES_KEY = "engines"
TRT_ONNX_SUFFIX = ".trt.onnx"
CUSTOM_OP = f"{OP_DOMAIN}::{OP_TYPE}"
ENGINE_TOOLS = ("auto", "trtexec", "python", "none")
DEFAULT_BATCH = (1, 32, 128)
DEFAULT_N = (1, 20_000, 100_000)
#: largest encoder batch of a profile (the serving batchers' largest, ``runtime serve --max-batch``): a
#: value past TensorRT's 32-bit dimensions would otherwise reach trtexec's command line and overflow there
MAX_PROFILE_BATCH = MAX_BATCH
#: largest refinement set N of a profile: the largest set refined on a GPU (N = 1,000,000, README)
MAX_PROFILE_N = 1_000_000
MIN_TENSORRT_MAJOR = 10
#: the private work folders of trtexec builds in a model directory (export.contract.files.work_dir)
TRTEXEC_WORK_PREFIX = ".trtexec-"


#: the former name of :class:`~runtime.tensorrt.lib.EngineUnusable` (one type: an engine that cannot be used here)
EngineMismatchError = EngineUnusable


@dataclass(frozen=True)
class ProfileRange:
    min: int
    opt: int
    max: int

    @classmethod
    def of(cls, values, what: str, largest: int) -> "ProfileRange":
        lo, opt, hi = (int(v) for v in values)
        if not 1 <= lo <= opt <= hi:
            raise InputError(f"{what} profile must satisfy 1 <= min <= opt <= max, got min={lo} opt={opt} max={hi}")
        if hi > largest:
            raise InputError(f"{what} profile max must be at most {largest:,}, got {hi:,}; give a smaller max")
        return cls(lo, opt, hi)


def shape_profiles(config: dict, batch=DEFAULT_BATCH, n=DEFAULT_N) -> dict[str, dict[str, dict[str, list[int]]]]:
    """``{network: {input: {"min": shape, "opt": shape, "max": shape}}}`` for both networks (batch up
    to :data:`MAX_PROFILE_BATCH`, N up to :data:`MAX_PROFILE_N`)."""
    b = ProfileRange.of(batch, "encoder batch", MAX_PROFILE_BATCH)
    rows = ProfileRange.of(n, "refinement N", MAX_PROFILE_N)
    h, w = config["input_size_hw"]
    d, n_layer, l = config["n_embd"], config["n_layer"], config["landmarks"]
    return {
        "encoder": {"images": {k: [getattr(b, k), 3, h, w] for k in ("min", "opt", "max")}},
        "nformer": {"features": {k: [1, getattr(rows, k), d] for k in ("min", "opt", "max")},
                    # l <= N: the runtime draws min(landmarks, N) rows per layer
                    "landmarks": {"min": [n_layer, 1], "opt": [n_layer, min(l, rows.opt)],
                                  "max": [n_layer, min(l, rows.max)]}},
    }


def engine_file(network: str, precision: str) -> str:
    return f"{network}.{precision}.engine"


def timing_cache_file(gpu: dict | None, tensorrt_version: str) -> str:
    """``timing.<gpu-name-slug>.<compute capability>.trt<major.minor.patch>.cache``: a timing cache
    holds measurements of one device and one TensorRT version (TensorRT rejects it elsewhere);
    ``timing.unknown-gpu.trt<version>.cache`` while the GPU is not known yet."""
    version = _short_version(tensorrt_version)
    if not gpu:
        return f"timing.unknown-gpu.trt{version}.cache"
    slug = re.sub(r"[^a-z0-9]+", "-", str(gpu["name"]).lower()).strip("-") or "gpu"
    cc = re.sub(r"[^0-9.]+", "", str(gpu["compute_capability"])) or "unknown"
    return f"timing.{slug}.{cc}.trt{version}.cache"


def _custom_op_nodes(graph) -> int:
    """How many ``nformer::ReciprocalNeighbors`` nodes ``graph`` has, subgraphs included."""
    count = 0
    for node in graph.node:
        if node.op_type == OP_TYPE and node.domain == OP_DOMAIN:
            count += 1
        for attr in node.attribute:
            if attr.HasField("g"):
                count += _custom_op_nodes(attr.g)
            for sub in attr.graphs:
                count += _custom_op_nodes(sub)
    return count


def tensorrt_onnx(onnx_path: Path) -> tuple[Path, dict]:
    """The file TensorRT parses for ``onnx_path`` and what it holds.

    Returns ``(path, {"uses_custom_op": bool, "parsed_onnx": {...} | None})``: ``onnx_path`` itself
    when it has no local function ``nformer::ReciprocalNeighbors``, else its TensorRT copy
    ``<stem>.trt.onnx`` beside it (written atomically), the same model without that function, so
    that TensorRT can import the node only as the plugin (module docstring).
    """
    import onnx

    onnx_path = Path(onnx_path)
    # external data (if any) stays where it is: the copy lies in the same folder and keeps the references
    model = onnx.load(str(onnx_path), load_external_data=False)
    uses = _custom_op_nodes(model.graph) > 0
    keep = [f for f in model.functions if not (f.domain == OP_DOMAIN and f.name == OP_TYPE)]
    if len(keep) == len(model.functions):
        return onnx_path, {"uses_custom_op": uses, "parsed_onnx": None}
    del model.functions[:]
    model.functions.extend(keep)
    stem = onnx_path.name[:-len(".onnx")] if onnx_path.name.endswith(".onnx") else onnx_path.name
    out = onnx_path.with_name(stem + TRT_ONNX_SUFFIX)
    with staged_file(out) as tmp:
        onnx.save(model, str(tmp))
    return out, {"uses_custom_op": uses,
                 "parsed_onnx": {"path": out.name, "sha256": sha256_file(out), "removed_local_functions": [CUSTOM_OP]}}


def record_file(engine: str | Path) -> str:
    return f"{Path(engine).name}.json"


# ---------------------------------------------------------------------------------------------------
# trtexec


@dataclass
class Trtexec:
    """A trtexec executable and what its ``--help`` says about it."""
    path: str
    version: tuple[int, int, int]
    help_text: str = ""
    build_number: int | None = None

    @property
    def version_string(self) -> str:
        return ".".join(map(str, self.version))

    @property
    def full_version(self) -> str:
        """``10.13.0.35``: what ``tensorrt.__version__`` says for the same release."""
        return self.version_string + (f".{self.build_number}" if self.build_number is not None else "")

    @property
    def strongly_typed_flag(self) -> bool:
        """Pass ``--stronglyTyped`` on TensorRT 10 (which has it); 11 is always strongly typed."""
        return self.version[0] < 11 and "--stronglyTyped" in self.help_text


def parse_trtexec_version(text: str) -> tuple[int, int, int] | None:
    """trtexec's banner ``[TensorRT v101300]`` (NV_TENSORRT_VERSION = major*10000 + minor*100 + patch)."""
    m = re.search(r"\[TensorRT v(\d+)\]", text)
    if not m:
        return None
    v = int(m.group(1))
    return v // 10000, (v // 100) % 100, v % 100


def parse_trtexec_build(text: str) -> int | None:
    """The build number of the banner's ``[TensorRT v101300] [b35]``."""
    m = re.search(r"\[TensorRT v\d+\] \[b(\d+)\]", text)
    return int(m.group(1)) if m else None


def find_trtexec(path: str | None = None) -> Trtexec | None:
    if path is not None and not Path(path).is_file():
        raise InputError(f"trtexec not found: {path} is not a file; pass the trtexec executable of a TensorRT >= "
                         f"{MIN_TENSORRT_MAJOR} installation")
    exe = path or shutil.which("trtexec")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise NFormerError(f"cannot run {exe} --help: {err}") from None
    text = out.stdout + out.stderr
    version = parse_trtexec_version(text)
    if version is None:
        raise NFormerError(f"{exe} --help printed no '[TensorRT vNNNNNN]' banner; is it TensorRT's trtexec?")
    return Trtexec(exe, version, text, parse_trtexec_build(text))


def shapes_arg(profile: dict, which: str) -> str:
    """``features:1x20000x256,landmarks:4x5`` for trtexec's --minShapes/--optShapes/--maxShapes."""
    return ",".join(f"{name}:{'x'.join(map(str, ranges[which]))}" for name, ranges in profile.items())


def trtexec_command(trtexec: Trtexec, onnx_path: Path, engine_path: Path, profile: dict, timing_cache: Path,
                    plugin_library: Path | None) -> list[str]:
    """The argument list of one engine build (no precision flags: the ONNX file carries the precision)."""
    cmd = [trtexec.path, f"--onnx={onnx_path}", f"--saveEngine={engine_path}",
           f"--minShapes={shapes_arg(profile, 'min')}", f"--optShapes={shapes_arg(profile, 'opt')}",
           f"--maxShapes={shapes_arg(profile, 'max')}", f"--timingCacheFile={timing_cache}"]
    if plugin_library is not None:
        cmd.append(f"--dynamicPlugins={plugin_library}")
    if trtexec.strongly_typed_flag:
        cmd.append("--stronglyTyped")
    cmd.append("--skipInference")
    return cmd


def parse_trtexec_device(log: str) -> dict | None:
    """GPU name and compute capability from trtexec's '=== Device Information ===' lines."""
    name = re.search(r"Selected Device: (.+)", log)
    cc = re.search(r"Compute Capability: (\d+\.\d+)", log)
    if not (name and cc):
        return None
    return {"name": name.group(1).strip(), "compute_capability": cc.group(1)}


def build_with_trtexec(trtexec: Trtexec, onnx_path: Path, engine_path: Path, profile: dict, timing_cache: Path,
                       plugin_library: Path | None, log: Callable[[str], None]) -> dict:
    """Run trtexec (output in ``<engine>.log``); the record keeps the argument list.

    trtexec writes its outputs by name and in place, so it gets a private work folder in the model
    directory (:func:`~export.contract.files.work_dir`, prefix :data:`TRTEXEC_WORK_PREFIX`): the
    engine and the log are written there, and the timing cache, which trtexec reads and updates,
    is a copy of the existing one.  Only after trtexec succeeded and the engine exists are they
    renamed over their final names (fsynced, umask permissions); a failed run publishes its log
    alone.  A killed build leaves the previous engine and cache as they were; its work folder is
    removed by the next build.  Two builds at once into one model directory each update their own
    copy of the cache: the one that finishes last publishes its copy, and the other's new entries are
    lost (only later builds' speed: a timing cache holds measurements, never results).  The command printed and recorded names the final paths (the
    command that builds this engine by hand); ``staged_outputs`` says which arguments pointed
    into the work folder when it ran.
    """
    shown = trtexec_command(trtexec, onnx_path, engine_path, profile, timing_cache, plugin_library)
    line = shlex.join(shown)
    log(f"$ {line}")
    log_path = engine_path.with_name(engine_path.name + ".log")
    for target in (engine_path, timing_cache, log_path):
        check_target(target)            # before the build, not after it
    with work_dir(engine_path.parent, TRTEXEC_WORK_PREFIX) as work:
        staged = {engine_path: work / engine_path.name, timing_cache: work / timing_cache.name,
                  log_path: work / log_path.name}
        if timing_cache.is_file():
            copy_file_atomic(timing_cache, staged[timing_cache])
        cmd = trtexec_command(trtexec, onnx_path, staged[engine_path], profile, staged[timing_cache], plugin_library)
        with open(staged[log_path], "w") as fh:
            result = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
        text = staged[log_path].read_text(errors="replace")
        ok = result.returncode == 0 and staged[engine_path].is_file()
        # a failed run publishes its log only (the message points at it); a cache trtexec did not write stays as it is
        publish_files({final: tmp for final, tmp in staged.items() if (ok or final == log_path) and tmp.is_file()})
    if not ok:
        tail = " | ".join(text.strip().splitlines()[-5:])
        raise NFormerError(f"trtexec failed (exit {result.returncode}) building {engine_path.name} from "
                           f"{onnx_path.name}: {tail}; full log: {log_path}")
    return {"tool": "trtexec", "command": shown, "command_line": line, "log": log_path.name,
            "staged_outputs": ["--saveEngine", "--timingCacheFile"],
            "tensorrt_version": trtexec.full_version, "gpu_from_log": parse_trtexec_device(text)}


# ---------------------------------------------------------------------------------------------------
# TensorRT Python API


def network_flags(trt) -> int:
    """Strongly typed where the enum still has the flag (TensorRT 10; 11 keeps it as a no-op or drops it)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def build_with_python_api(trt, onnx_path: Path, engine_path: Path, profile: dict, timing_cache: Path,
                          plugin_library: Path | None, log: Callable[[str], None]) -> dict:
    """Build one engine with the TensorRT Python API (``trt`` is the imported module)."""
    calls = []
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if plugin_library is not None:
        # once per process; EngineUnusable unless the ReciprocalNeighbors creator is registered afterwards
        loaded = load_plugin_library(trt, plugin_library, builder.get_plugin_registry())
        calls.append(f"IPluginRegistry.load_library({plugin_library})" if loaded["loaded_now"] else
                     f"IPluginRegistry.load_library({plugin_library}): already registered in this process")
        calls.append(f"IPluginRegistry.get_creator({OP_TYPE!r}, ...): registered")
    flags = network_flags(trt)
    network = builder.create_network(flags)
    calls.append(f"Builder.create_network(flags={flags})")
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        hint = ""
        if OP_TYPE in errors:
            hint = (f" ({onnx_path.name} has no local function for {CUSTOM_OP} by design, so TensorRT can import the "
                    "node only as the plugin: the plugin library must be built and load)")
        raise NFormerError(f"TensorRT's ONNX parser rejected {onnx_path.name}: {errors}{hint}")
    calls.append(f"OnnxParser.parse_from_file({onnx_path.name})")
    config = builder.create_builder_config()
    opt_profile = builder.create_optimization_profile()
    for name, ranges in profile.items():
        opt_profile.set_shape(name, ranges["min"], ranges["opt"], ranges["max"])
        calls.append(f"IOptimizationProfile.set_shape({name}, {ranges['min']}, {ranges['opt']}, {ranges['max']})")
    if config.add_optimization_profile(opt_profile) < 0:
        raise NFormerError(f"TensorRT rejected the optimisation profile {profile} for {onnx_path.name}")
    cache_status = _set_timing_cache(config, timing_cache, log)
    calls.append(f"IBuilderConfig.set_timing_cache({timing_cache.name}, ignore_mismatch=False): {cache_status}")
    plan = builder.build_serialized_network(network, config)
    calls.append("Builder.build_serialized_network(network, config)")
    if plan is None:
        raise NFormerError(f"TensorRT could not build an engine from {onnx_path.name} (see the messages above)")
    write_bytes_atomic(engine_path, memoryview(plan))
    write_bytes_atomic(timing_cache, memoryview(config.get_timing_cache().serialize()))
    for c in calls:
        log(f"  {c}")
    return {"tool": "tensorrt-python", "calls": calls, "tensorrt_version": str(trt.__version__),
            "timing_cache_status": cache_status}


def _set_timing_cache(config, timing_cache: Path, log: Callable[[str], None]) -> str:
    """Give ``config`` the timing cache in ``timing_cache`` (an empty one when there is none, or when
    TensorRT rejects it); returns what happened.  ``set_timing_cache`` returns False for a cache of
    another device or TensorRT version; that is never ignored."""
    data = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(data)
    if data and cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return "loaded"
    if data:
        log(f"warning: TensorRT rejected the timing cache {timing_cache.name} ("
            + ("unreadable" if cache is None else "IBuilderConfig.set_timing_cache returned False: written on another "
               "device or TensorRT version") + "); building with an empty cache, which then replaces it")
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        raise NFormerError("TensorRT refused an empty timing cache (IBuilderConfig.set_timing_cache returned False); "
                           "this TensorRT installation is not usable for builds")
    return "rejected, replaced by a new one" if data else "new"


# ---------------------------------------------------------------------------------------------------
# facts about the running machine, build records and the loader check


def _short_version(version: str) -> str:
    return ".".join(str(version).split(".")[:3])


def gpu_facts(device: int | None = None) -> dict | None:
    """Name and compute capability of the GPU (``nvidia-smi``, else pycuda through
    ``runtime.tensorrt.cuda_memory``); None without one."""
    if device is None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
        device = int(visible) if visible.isdigit() else 0
    exe = shutil.which("nvidia-smi")
    if exe:
        try:
            out = subprocess.run([exe, "--query-gpu=name,compute_cap", "--format=csv,noheader", "-i", str(device)],
                                 capture_output=True, text=True, timeout=30)
            if out.returncode == 0 and "," in out.stdout:
                name, cc = (s.strip() for s in out.stdout.strip().splitlines()[0].rsplit(",", 1))
                return {"name": name, "compute_capability": cc}
        except (OSError, subprocess.TimeoutExpired):
            pass
    from runtime.tensorrt.cuda_memory import device_facts

    return device_facts(device)


def plugin_library_facts() -> dict | None:
    """The built plugin library (``plugins.plugin_library_path()``) and its sha256, or None when absent."""
    path = plugins.plugin_library_path()
    return None if path is None else {"path": str(path), "sha256": sha256_file(path)}


def running_facts() -> dict:
    """What an engine must match to load here: TensorRT version, GPU, plugin library
    (:class:`~runtime.tensorrt.lib.EngineUnusable` when TensorRT is not installed)."""
    trt = import_tensorrt()
    return {"tensorrt": _short_version(trt.__version__), "gpu": gpu_facts(), "plugin_library": plugin_library_facts()}


def read_record(engine_path: str | Path) -> dict:
    import json

    engine_path = Path(engine_path)
    path = engine_path.with_name(record_file(engine_path))
    if not engine_path.is_file():
        raise InputError(f"engine not found: {engine_path}; build it with `runtime build`")
    if not path.is_file():
        raise EngineUnusable(f"{engine_path.name} has no build record ({path.name}) beside it, so nothing says "
                                  "which TensorRT, GPU and plugin library it is for; rebuild it with `runtime build "
                                  f"{engine_path.parent} --precision ...`")
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as err:
        raise EngineUnusable(f"cannot read the build record {path}: {err}; rebuild the engine with `runtime build "
                             f"{engine_path.parent} --precision ...`") from None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT \
            or record.get("format_version") != RECORD_FORMAT_VERSION:
        raise EngineUnusable(f"{path} is not a build record of this version ({RECORD_FORMAT} "
                                  f"v{RECORD_FORMAT_VERSION}); rebuild the engine with `runtime build "
                                  f"{engine_path.parent} --precision ...`")
    return record


def check_engine(engine_path: str | Path, running: dict | None = None, model_dir: str | Path | None = None,
                 verify_engine_checksum: bool = True) -> dict:
    """Return the engine's build record, or raise EngineUnusable saying what differs and how to rebuild.

    ``running``: ``{"tensorrt": "10.8.0", "gpu": {"name", "compute_capability"} | None,
    "plugin_library": {"path", "sha256"} | None}`` (default: :func:`running_facts`).
    """
    engine_path = Path(engine_path)
    record = read_record(engine_path)
    running = running_facts() if running is None else running
    problems = []
    built_trt = record["tensorrt"]["version"]
    if _short_version(running["tensorrt"]) != _short_version(built_trt):
        problems.append(f"it was built with TensorRT {built_trt} but this process runs TensorRT "
                        f"{running['tensorrt']} (an engine loads only in the TensorRT version that built it)")
    built_gpu, gpu = record.get("gpu"), running.get("gpu")
    if gpu is None:
        problems.append(f"it was built for {_gpu_words(built_gpu)} but no GPU is visible here")
    elif built_gpu is None or built_gpu["compute_capability"] != gpu["compute_capability"] \
            or built_gpu["name"] != gpu["name"]:
        problems.append(f"it was built for {_gpu_words(built_gpu)} but this machine's GPU is {_gpu_words(gpu)} "
                        "(engines are compiled and tuned for one GPU model)")
    built_lib, lib = record.get("plugin_library"), running.get("plugin_library")
    if built_lib is not None:
        if lib is None:
            problems.append(f"it was built with the plugin library {built_lib['path']} (sha256 "
                            f"{built_lib['sha256'][:12]}) but no plugin library is built here "
                            "(plugins.plugin_library_path())")
        elif lib["sha256"] != built_lib["sha256"]:
            problems.append(f"the plugin library {lib['path']} (sha256 {lib['sha256'][:12]}) is not the one it was "
                            f"built with (sha256 {built_lib['sha256'][:12]})")
    if verify_engine_checksum and sha256_file(engine_path) != record["engine_sha256"]:
        problems.append("the engine file changed after its build record was written")
    if model_dir is not None:
        src = Path(model_dir) / record["source_onnx"]["path"]
        if src.is_file() and sha256_file(src) != record["source_onnx"]["sha256"]:
            problems.append(f"{src.name} changed since the engine was built from it (a new export or calibration)")
    if problems:
        raise EngineUnusable(f"refusing engine {engine_path}: " + "; ".join(problems)
                                  + f". Rebuild it on this machine with: {record.get('rebuild', 'runtime build')}")
    return record


def _gpu_words(gpu: dict | None) -> str:
    return "an unknown GPU" if not gpu else f"{gpu['name']} (compute capability {gpu['compute_capability']})"


# ---------------------------------------------------------------------------------------------------
# the build command


@dataclass
class BuildOptions:
    precision: str = "fp16"
    refine_precision: str | None = None
    calib_data: Path | None = None
    calib_method: str = "entropy"
    calib_images: int = 512
    calib_seed: int = 0
    batch: tuple[int, int, int] = DEFAULT_BATCH
    n: tuple[int, int, int] = DEFAULT_N
    engine_tool: str = "auto"
    trtexec: str | None = None
    extra: dict = field(default_factory=dict)

    def rebuild_command(self, model_dir: Path) -> str:
        args = ["runtime", "build", str(model_dir), "--precision", self.precision]
        if self.refine_precision:
            args += ["--refine-precision", self.refine_precision]
        if self.precision in CALIBRATED_PRECISIONS:
            args += ["--calib-data", str(self.calib_data), "--calib-method", self.calib_method,
                     "--calib-images", str(self.calib_images)]
        if tuple(self.batch) != DEFAULT_BATCH:
            args += ["--min-batch", str(self.batch[0]), "--opt-batch", str(self.batch[1]), "--max-batch", str(self.batch[2])]
        if tuple(self.n) != DEFAULT_N:
            args += ["--min-n", str(self.n[0]), "--opt-n", str(self.n[1]), "--max-n", str(self.n[2])]
        return shlex.join(args)


def choose_tool(engine_tool: str, trtexec_path: str | None = None):
    """``("trtexec", Trtexec)``, ``("python", tensorrt module)`` or ``("none", reason)``."""
    if engine_tool not in ENGINE_TOOLS:
        raise InputError(f"--engine-tool must be one of {', '.join(ENGINE_TOOLS)}, got {engine_tool!r}")
    if engine_tool == "none":
        return "none", "--engine-tool none"
    if engine_tool in ("auto", "trtexec"):
        found = find_trtexec(trtexec_path)
        if found is not None:
            if found.version[0] < MIN_TENSORRT_MAJOR:
                raise NFormerError(f"{found.path} is TensorRT {found.version_string}; strongly typed builds of these "
                                   f"files need TensorRT >= {MIN_TENSORRT_MAJOR}")
            return "trtexec", found
        if engine_tool == "trtexec":
            raise InputError("trtexec is not on PATH (nor given with --trtexec); install TensorRT or use "
                             "--engine-tool python / auto")
    try:
        trt = import_tensorrt()
    except EngineUnusable:
        if engine_tool == "python":
            raise InputError("the TensorRT Python package does not import here; pip install -e \".[tensorrt]\" "
                             "or use --engine-tool trtexec") from None
        return "none", "TensorRT is not available here (no trtexec on PATH, `import tensorrt` fails)"
    if int(trt.__version__.split(".")[0]) < MIN_TENSORRT_MAJOR:
        raise NFormerError(f"TensorRT {trt.__version__} is too old; these builds need TensorRT >= {MIN_TENSORRT_MAJOR}")
    return "python", trt


def build(model_dir: str | Path, options: BuildOptions, log: Callable[[str], None] = print) -> dict:
    """Write the ONNX files for ``options.precision`` and, where TensorRT is available, the engines.

    Returns ``{"variants": {network: entry}, "engines": {name: manifest entry}, "tool": str,
    "skipped_engines": reason | None}``.
    """
    from calibration.variants import update_manifest_section, write_variants

    model_dir = Path(model_dir)
    manifest = load_manifest(model_dir)
    profiles = shape_profiles(manifest["model"], options.batch, options.n)  # validate before any work
    if options.precision in CPU_PRECISIONS:
        # uint8 activations (non-zero zero points): TensorRT's explicit quantisation cannot build the file
        if options.engine_tool not in ("auto", "none"):
            raise InputError(f"--precision {options.precision} writes a file for ONNX Runtime on x86 CPUs, which "
                             f"TensorRT cannot build (--engine-tool {options.engine_tool} asks for an engine); "
                             "TensorRT's INT8 file is --precision int8")
        kind, tool = "none", f"--precision {options.precision} is for ONNX Runtime on x86 CPUs"
    else:
        kind, tool = choose_tool(options.engine_tool, options.trtexec)
    if options.calib_data is not None and options.precision not in CALIBRATED_PRECISIONS:
        log(f"note: --calib-data is used by --precision {' and '.join(CALIBRATED_PRECISIONS)} only; ignored for "
            f"{options.precision}")
    if options.calib_data is not None and options.precision in CALIBRATED_PRECISIONS:
        from calibration.images import check_calib_dir

        check_calib_dir(options.calib_data)          # before "writing ..." is printed
    variants = write_variants(model_dir, options.precision, refine_precision=options.refine_precision,
                              calib_data=options.calib_data, calib_method=options.calib_method,
                              calib_images=options.calib_images, calib_seed=options.calib_seed, log=log)
    result = {"variants": variants, "engines": {}, "tool": kind, "skipped_engines": None}
    if kind == "none":
        result["skipped_engines"] = tool
        if options.precision in CPU_PRECISIONS:
            log(f"engines: none ({tool}; TensorRT builds --precision int8); serve the files above with "
                f"Pipeline.load(..., precision={options.precision!r}) or `runtime parity`")
        else:
            log(f"engines: not built ({tool}); the ONNX files above are ready. On a machine with TensorRT >= "
                f"{MIN_TENSORRT_MAJOR} run: {options.rebuild_command(model_dir)}")
        return result
    plugin = plugin_library_facts()
    log(f"plugin library: {plugin['path']}" if plugin else "plugin library: not built (plugins.plugin_library_path())")
    trt_version = tool.full_version if kind == "trtexec" else str(tool.__version__)
    # what TensorRT parses: the file itself, or its copy without the op's local function (module docstring)
    parsed = {}
    for network in ("encoder", "nformer"):
        parsed[network] = tensorrt_onnx(model_dir / variants[network]["path"])
        path, facts = parsed[network]
        if facts["uses_custom_op"] and plugin is None:
            raise NFormerError(
                f"{variants[network]['path']} uses the custom op {CUSTOM_OP}, which TensorRT runs exactly only as "
                f"the project's plugin, and the plugin library is not built (plugins.plugin_library_path() found "
                f"none). Without it TensorRT would build the op's ONNX function body, which it runs in float32 "
                f"(not the exact neighbour ranking). Build the plugin library with: {plugins.BUILD_COMMAND} "
                f"(or set {plugins.ENV_DIR}), then run: {options.rebuild_command(model_dir)}")
        if facts["parsed_onnx"]:
            log(f"{path.name}: {variants[network]['path']} without its local function {CUSTOM_OP}, so TensorRT can "
                "import the node only as the plugin (a missing plugin is a parse error)")
    if parser_prefers_local_functions(trt_version):
        log(f"note: TensorRT {_short_version(trt_version)}'s ONNX parser takes a local function before a plugin "
            "(10.0 - 10.6); supported because the TensorRT copies above have no local function")
    gpu_known = gpu_facts()
    timing_cache = model_dir / timing_cache_file(gpu_known, trt_version)
    if gpu_known is None and timing_cache.exists():
        # a cache whose device is not known is never fed to a build
        log(f"removing {timing_cache.name}: the GPU is not known before the build, so its origin is not either")
        timing_cache.unlink()
    entries = {}
    for network in ("encoder", "nformer"):
        variant = variants[network]
        onnx_path = model_dir / variant["path"]
        parse_path, facts = parsed[network]
        name = f"{network}.{variant['precision']}"
        engine_path = model_dir / engine_file(network, variant["precision"])
        log(f"building {engine_path.name} from {parse_path.name} ({kind}) ...")
        plugin_path = Path(plugin["path"]) if plugin else None
        if kind == "trtexec":
            # trtexec writes into a work folder; the engine, cache and log are renamed into place after it succeeded
            info = build_with_trtexec(tool, parse_path, engine_path, profiles[network], timing_cache, plugin_path, log)
        else:
            # writes the engine atomically (export.contract.files) once TensorRT has built it
            info = build_with_python_api(tool, parse_path, engine_path, profiles[network], timing_cache, plugin_path,
                                         log)
        gpu = gpu_known or info.get("gpu_from_log")
        if gpu_known is None and gpu is not None:
            # the GPU is known now (trtexec's log): the cache of this build gets its device's name
            keyed = model_dir / timing_cache_file(gpu, trt_version)
            if timing_cache.is_file() and keyed != timing_cache:
                copy_file_atomic(timing_cache, keyed)
                timing_cache.unlink()
            timing_cache, gpu_known = keyed, gpu
        record = {
            "format": RECORD_FORMAT, "format_version": RECORD_FORMAT_VERSION,
            "engine": engine_path.name, "engine_sha256": sha256_file(engine_path),
            "network": network, "precision": variant["precision"],
            "source_onnx": {"path": variant["path"], "sha256": sha256_file(onnx_path)},
            "parsed_onnx": facts["parsed_onnx"],
            "custom_op": {"op": CUSTOM_OP, "implementation": "plugin"} if facts["uses_custom_op"] else None,
            "tensorrt": {"version": _short_version(info["tensorrt_version"]), "full_version": info["tensorrt_version"]},
            "gpu": gpu, "profiles": profiles[network], "plugin_library": plugin,
            "builder": {k: v for k, v in info.items() if k not in ("tensorrt_version", "gpu_from_log")},
            "timing_cache": timing_cache.name, "rebuild": options.rebuild_command(model_dir),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        write_json_atomic(engine_path.with_name(record_file(engine_path)), record)
        entries[name] = {"network": network, "precision": variant["precision"], "path": engine_path.name,
                         "record": record_file(engine_path), "onnx": variant["path"], "sha256": record["engine_sha256"],
                         "tensorrt": record["tensorrt"]["version"], "gpu": gpu, "profiles": profiles[network],
                         "plugin_library_sha256": plugin["sha256"] if plugin else None,
                         # the same facts in the shape runtime.tensorrt.backend reads
                         "build": {"tensorrt": info["tensorrt_version"], "gpu": gpu["name"] if gpu else None,
                                   "compute_capability": gpu["compute_capability"] if gpu else None,
                                   "plugin_sha256": plugin["sha256"] if plugin else None}}
        log(f"wrote {engine_path.name} and {record_file(engine_path)}")
    update_manifest_section(model_dir, ENGINES_KEY, entries)
    result["engines"] = entries
    return result
