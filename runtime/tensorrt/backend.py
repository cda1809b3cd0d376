"""TensorRT engines behind the Backend interface (tensor-name API), and the engine lookup.

Place in the flow: ``Pipeline.load`` opens an engine listed in the manifest (key ``"engines"``,
written by the engine-build step) when it is usable here, else the ONNX file in ONNX Runtime.
The plugin library (``plugins.plugin_library_path()``) is loaded into TensorRT's plugin registry
once per process (:func:`runtime.tensorrt.lib.load_plugin_library`, which checks that the creator is
registered) before an engine is deserialised; device memory and streams come from
``runtime.tensorrt.cuda_memory``, TensorRT itself from ``runtime.tensorrt.lib.import_tensorrt``.

Concurrency: a bounded pool of execution slots (:class:`ContextPool`), each an execution context
with its own optimisation profile, CUDA stream and pinned / device buffers.  A ``run`` acquires a
slot, owns it until it returns, and releases it; when every slot is busy it waits.  The pool holds at
most ``max_contexts`` slots (default :data:`DEFAULT_CONTEXTS`) and never more than the engine has
optimisation profiles: TensorRT requires each execution context in concurrent use of a
dynamic-shape engine to use its own profile (``runtime build`` builds one profile, so its engines
run one call at a time per backend; calls from other threads wait for the slot).  ``close`` refuses
new calls, waits for the calls in flight and only then frees the buffers.

The manifest's ``"engines"`` section is read in the one format ``runtime build`` writes
(``runtime.tensorrt.build``: an object keyed ``"<network>.<precision>"`` whose entries carry
``network``, ``precision``, ``path`` and a build record beside each engine); any other format is an
InputError saying what was expected, and an absent key means no engines (nothing changes).  Whether
an engine can run here is decided by ``runtime.tensorrt.build.check_engine`` (TensorRT version, GPU,
plugin library, checksums), the one implementation of that check; every "cannot be used here" is a
:class:`~runtime.tensorrt.lib.EngineUnusable`.

Not verified on this project's machines (no GPU, no TensorRT): written against the documented
TensorRT 10 Python API; its tests carry the ``tensorrt`` marker and skip.  The orchestration (pool
bound, profile per context, close, plugin loading, fallbacks) is tested against a stand-in that
mirrors the API's signatures and failure returns (tests/runtime/tensorrt/fake_tensorrt.py).
"""
from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path

import numpy as np

import plugins
from export.contract.errors import InputError, NFormerError

from runtime.backends import Backend
from runtime.tensorrt.build import ENGINES_KEY, check_engine
from runtime.tensorrt.lib import EngineUnusable, import_tensorrt, load_plugin_library

__all__ = ["BackendClosed", "ContextPool", "DEFAULT_CONTEXTS", "EngineUnusable", "PRECISION_PREFERENCE",
           "TensorRTBackend", "engine_problem", "find_engine", "import_tensorrt", "listed_engines"]

log = logging.getLogger(__name__)

#: execution contexts a backend may run concurrently (one per CUDA stream), before the engine's
#: optimisation-profile count bounds it
DEFAULT_CONTEXTS = 2
#: seconds ``close`` waits for calls in flight before it refuses to free their buffers
CLOSE_TIMEOUT_S = 60.0

#: the engine entry keys ``runtime build`` writes that the lookup needs
_ENTRY_KEYS = ("network", "precision", "path")
_EXPECTED = ('an object keyed "<network>.<precision>" whose entries are objects with string "network", '
             '"precision" and "path", as `runtime build` writes it (runtime.tensorrt.build)')


def listed_engines(manifest: dict) -> list[dict]:
    """The manifest's engine entries ([] when it lists none), each a dict with ``network``,
    ``precision`` and ``path``; InputError when the section is not in the format ``runtime build`` writes."""
    engines = manifest.get(ENGINES_KEY)
    if engines is None:
        return []
    fix = "rebuild the engines with `runtime build MODEL_DIR --precision ...`"
    if not isinstance(engines, dict):
        raise InputError(f'the manifest\'s "{ENGINES_KEY}" section is a {type(engines).__name__}, expected '
                         f"{_EXPECTED}; {fix}")
    out = []
    for key, entry in engines.items():
        if not isinstance(entry, dict):
            raise InputError(f'the manifest\'s "{ENGINES_KEY}" entry {key!r} is a {type(entry).__name__}, expected '
                             f"{_EXPECTED}; {fix}")
        bad = [k for k in _ENTRY_KEYS if not isinstance(entry.get(k), str) or not entry.get(k)]
        if bad:
            raise InputError(f'the manifest\'s "{ENGINES_KEY}" entry {key!r} has no string {", ".join(bad)}, expected '
                             f"{_EXPECTED}; {fix}")
        if key != f"{entry['network']}.{entry['precision']}":
            raise InputError(f'the manifest\'s "{ENGINES_KEY}" entry {key!r} is for {entry["network"]} '
                             f'{entry["precision"]}, expected it keyed "{entry["network"]}.{entry["precision"]}" '
                             f"({_EXPECTED}); {fix}")
        out.append(dict(entry))
    return out


def engine_problem(entry: dict, model_dir: Path) -> str | None:
    """Why the engine ``entry`` cannot run here, or None when it can."""
    path = Path(model_dir) / entry.get("path", "")
    if not entry.get("path") or not path.is_file():
        return f"engine file {path} is missing"
    try:
        import_tensorrt()
        from runtime.tensorrt.cuda_memory import cuda_driver

        cuda_driver()  # pycuda present and CUDA initialised: the backend needs both
        check_engine(path, model_dir=model_dir)
    except NFormerError as err:
        return str(err)
    return None


#: which engine to take when the manifest lists several precisions and none is asked for
PRECISION_PREFERENCE = ("fp16", "fp32", "int8")


def find_engine(manifest: dict, model_dir: Path, network: str, precision: str | None = None
                ) -> tuple[dict | None, list[str]]:
    """The usable engine for ``network`` (of ``precision``, else by PRECISION_PREFERENCE) and the
    reasons the others were passed over."""
    entries = [e for e in listed_engines(manifest) if e["network"] == network
               and (precision is None or e.get("precision") == precision)]
    rank = {p: i for i, p in enumerate(PRECISION_PREFERENCE)}
    entries.sort(key=lambda e: rank.get(e.get("precision"), len(rank)))
    reasons = []
    for entry in entries:
        problem = engine_problem(entry, Path(model_dir))
        if problem is None:
            return entry, reasons
        reasons.append(problem)
    return None, reasons


class BackendClosed(NFormerError, RuntimeError):
    """A TensorRT backend was used after ``close``."""


class _Slot:
    """What one call needs to run the engine: execution context (with its own optimisation
    profile), stream, device and pinned host buffers."""

    def __init__(self, engine, device, names, profile: int):
        from runtime.tensorrt.cuda_memory import DeviceBuffer, PinnedBuffer

        self.profile = profile
        self.context = engine.create_execution_context()
        if self.context is None:
            raise EngineUnusable("TensorRT could not create an execution context (out of GPU memory?)")
        self.stream = device.stream()
        # each context in concurrent use must have its own profile (TensorRT's rule for dynamic shapes)
        if not self.context.set_optimization_profile_async(profile, self.stream.handle):
            raise EngineUnusable(f"TensorRT refused optimisation profile {profile} for a new execution context")
        self.device_buffers = {n: DeviceBuffer(device) for n in names}
        self.host_buffers = {n: PinnedBuffer(device) for n in names}

    def free(self) -> None:
        for buf in self.device_buffers.values():
            buf.free()
        self.context = None


class ContextPool:
    """At most ``size`` slots, created on first need (``create(index)``), each owned by one caller
    between :meth:`acquire` and :meth:`release`; :meth:`acquire` waits while all are busy."""

    def __init__(self, create, size: int):
        if size < 1:
            raise InputError(f"a context pool needs at least one slot, got {size}")
        self.size = size
        self._create = create
        self._cond = threading.Condition()
        self._free: list = []
        self._all: list = []
        self._creating = 0
        self._in_use = 0
        self._closed = False

    @property
    def created(self) -> int:
        return len(self._all)

    @property
    def in_use(self) -> int:
        return self._in_use

    def acquire(self, timeout: float | None = None):
        with self._cond:
            while True:
                if self._closed:
                    raise BackendClosed("the TensorRT backend is closed")
                if self._free:
                    self._in_use += 1
                    return self._free.pop()
                if len(self._all) + self._creating < self.size:
                    index = len(self._all) + self._creating
                    self._creating += 1
                    self._in_use += 1
                    break
                if not self._cond.wait(timeout):
                    raise TimeoutError(f"no TensorRT execution context became free within {timeout} s "
                                       f"({self.size} in use)")
        try:
            slot = self._create(index)
        except BaseException:
            with self._cond:
                self._creating -= 1
                self._in_use -= 1
                self._cond.notify_all()
            raise
        with self._cond:
            self._creating -= 1
            self._all.append(slot)
        return slot

    def release(self, slot) -> None:
        with self._cond:
            self._in_use -= 1
            self._free.append(slot)
            self._cond.notify_all()

    @contextlib.contextmanager
    def slot(self, timeout: float | None = None):
        slot = self.acquire(timeout)
        try:
            yield slot
        finally:
            self.release(slot)

    def prewarm(self, count: int = 1) -> None:
        """Create ``count`` slots now (errors surface at load, not at the first call)."""
        slots = [self.acquire() for _ in range(min(count, self.size))]
        for slot in slots:
            self.release(slot)

    def close(self, timeout: float | None = CLOSE_TIMEOUT_S) -> list:
        """Refuse new acquires (they raise :class:`BackendClosed`), wait up to ``timeout`` s for the
        slots in use, and return every slot (the caller frees them).  Raises NFormerError, leaving
        all slots intact, when calls are still running after ``timeout``."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            if not self._cond.wait_for(lambda: self._in_use == 0, timeout):
                raise NFormerError(f"{self._in_use} TensorRT call(s) still running after {timeout} s; their buffers "
                                   "were not freed (close again once they return)")
            slots, self._all, self._free = self._all, [], []
            return slots


class TensorRTBackend(Backend):
    """A serialized TensorRT engine, run with the tensor-name API (set_input_shape,
    set_tensor_address, execute_async_v3) from a bounded pool of execution contexts."""

    name = "tensorrt"

    def __init__(self, engine_path: str | Path, device_index: int = 0, precision: str = "fp32",
                 load_plugins: bool = True, max_contexts: int = DEFAULT_CONTEXTS):
        """``max_contexts``: calls that may run at once (one execution context and CUDA stream each),
        bounded by the engine's optimisation profiles.  Raises :class:`EngineUnusable` (TensorRT,
        pycuda or a GPU missing, plugin library not loadable, deserialisation refused)."""
        trt = import_tensorrt()
        from runtime.tensorrt.cuda_memory import Device

        self.trt = trt
        self.path = Path(engine_path)
        if not self.path.is_file():
            raise InputError(f"engine file not found: {self.path}")
        if max_contexts < 1:
            raise InputError(f"max_contexts must be >= 1, got {max_contexts}")
        self.precision = precision
        self.device = Device(index=device_index)
        try:
            self._open(trt, load_plugins, max_contexts)
        except BaseException:
            self.device.close()
            raise

    def _open(self, trt, load_plugins: bool, max_contexts: int) -> None:
        self.logger = trt.Logger(trt.Logger.WARNING)
        plugin_note = ""
        with self.device.active():
            trt.init_libnvinfer_plugins(self.logger, "")
            if load_plugins:
                try:
                    lib = plugins.plugin_library_path(required=True)
                except plugins.PluginNotBuiltError as err:
                    plugin_note = f" (the project's plugin library was not loaded: {err})"
                else:
                    load_plugin_library(trt, lib)  # once per process; EngineUnusable without the creator
            self.runtime = trt.Runtime(self.logger)
            self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise EngineUnusable(f"TensorRT could not deserialize {self.path}: it was built with another TensorRT "
                                 f"version or GPU, or needs a plugin that is not registered{plugin_note}; rebuild "
                                 "the engine on this machine")
        engine = self.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if n not in self._inputs]
        self._dtype = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        profiles = max(1, int(getattr(engine, "num_optimization_profiles", 1)))
        size = min(max_contexts, profiles)
        if size < max_contexts:
            log.info("%s: %d concurrent execution context(s), not %d: the engine has %d optimisation profile(s) and "
                     "TensorRT needs one per context in concurrent use", self.path.name, size, max_contexts, profiles)
        self._profiles = {n: {p: [tuple(s) for s in engine.get_tensor_profile_shape(n, p)] for p in range(size)}
                          for n in self._inputs}
        names_all = self._inputs + self._outputs
        self._pool = ContextPool(lambda index: self._new_slot(index, names_all), size)
        self._pool.prewarm(1)  # a context that cannot be created fails the load, not the first call

    def _new_slot(self, index: int, names: list[str]) -> _Slot:
        with self.device.active():
            return _Slot(self.engine, self.device, names, profile=index)

    @property
    def max_contexts(self) -> int:
        return self._pool.size

    @property
    def input_names(self) -> list[str]:
        return list(self._inputs)

    @property
    def output_names(self) -> list[str]:
        return list(self._outputs)

    def profile_shapes(self, name: str, profile: int = 0):
        """(min, opt, max) shapes of input ``name`` in optimisation profile ``profile``."""
        return self._profiles[name][profile]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self._inputs if n not in feeds]
        if missing:
            raise InputError(f"{self.path.name}: missing input(s) {', '.join(missing)}")
        with self._pool.slot() as slot, self.device.active():
            ctx, stream = slot.context, slot.stream
            for name in self._inputs:
                arr = np.ascontiguousarray(feeds[name], dtype=self._dtype[name])
                lo, _, hi = self.profile_shapes(name, slot.profile)
                if len(arr.shape) != len(lo) or any(s < a or s > b for s, a, b in zip(arr.shape, lo, hi)):
                    raise InputError(f"{self.path.name}: input {name} has shape {arr.shape}, the engine accepts "
                                     f"{lo} to {hi}; rebuild the engine with a larger profile or split the input")
                if not ctx.set_input_shape(name, arr.shape):
                    raise InputError(f"{self.path.name}: TensorRT refused shape {arr.shape} for input {name}")
                host = slot.host_buffers[name].view(arr.shape, arr.dtype)
                host[...] = arr
                dev = slot.device_buffers[name].ensure(arr.nbytes)
                stream.to_device(dev, host)
                if not ctx.set_tensor_address(name, dev.ptr):
                    raise RuntimeError(f"{self.path.name}: TensorRT refused the address of input {name}")
            results = {}
            for name in self._outputs:
                shape = tuple(ctx.get_tensor_shape(name))
                if any(s < 0 for s in shape):
                    raise RuntimeError(f"{self.path.name}: output {name} has an unresolved shape {shape}")
                host = slot.host_buffers[name].view(shape, self._dtype[name])
                dev = slot.device_buffers[name].ensure(host.nbytes)
                if not ctx.set_tensor_address(name, dev.ptr):
                    raise RuntimeError(f"{self.path.name}: TensorRT refused the address of output {name}")
                results[name] = host
            if not ctx.execute_async_v3(stream.handle):
                stream.synchronize()  # what was queued finishes before the slot is handed on
                raise RuntimeError(f"{self.path.name}: TensorRT execution failed (see the TensorRT log above)")
            for name, host in results.items():
                stream.to_host(host, slot.device_buffers[name])
            stream.synchronize()
            # the pinned buffers belong to the slot, which the next call reuses: hand out copies
            return {name: host.copy() for name, host in results.items()}

    def close(self, timeout: float | None = CLOSE_TIMEOUT_S) -> None:
        """Refuse new calls, wait (up to ``timeout`` s) for those in flight, then free every slot's
        buffers and the engine.  Raises NFormerError, freeing nothing, while calls are still running
        after ``timeout``; calling it again later finishes the job.  Idempotent."""
        if getattr(self, "engine", None) is None:
            return
        slots = self._pool.close(timeout)
        with self.device.active():
            for slot in slots:
                slot.free()
            self.engine = None
        self.device.close()
