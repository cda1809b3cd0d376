"""TensorRT engines behind the Backend interface (tensor-name API), and the engine lookup.

Place in the flow: ``Pipeline.load`` opens an engine listed in the manifest (key ``"engines"``,
written by the engine-build step) when it is usable here, else the ONNX file in ONNX Runtime.
The plugin library (``plugins.plugin_library_path()``) is loaded into TensorRT's plugin registry
before an engine is deserialised; device memory and streams come from ``runtime.tensorrt.cuda_memory``,
TensorRT itself from ``runtime.tensorrt.lib.import_tensorrt``.  Each thread that runs the backend
gets its own execution context, stream and pinned buffers.

The manifest's ``"engines"`` section is read in the one format ``runtime build`` writes
(``runtime.tensorrt.build``: an object keyed ``"<network>.<precision>"`` whose entries carry
``network``, ``precision``, ``path`` and a build record beside each engine); any other format is an
InputError saying what was expected, and an absent key means no engines (nothing changes).  Whether
an engine can run here is decided by ``runtime.tensorrt.build.check_engine`` (TensorRT version, GPU,
plugin library, checksums), the one implementation of that check; every "cannot be used here" is a
:class:`~runtime.tensorrt.lib.EngineUnusable`.

Not verified on this project's machines (no GPU, no TensorRT): written against the documented
TensorRT 10 Python API; its tests carry the ``tensorrt`` marker and skip.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

import plugins
from export.contract.errors import InputError, NFormerError

from runtime.backends import Backend
from runtime.tensorrt.build import ENGINES_KEY, check_engine
from runtime.tensorrt.lib import EngineUnusable, import_tensorrt

__all__ = ["EngineUnusable", "PRECISION_PREFERENCE", "TensorRTBackend", "engine_problem", "find_engine",
           "import_tensorrt", "listed_engines"]

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


class _Slot:
    """What one thread needs to run the engine: execution context, stream, buffers."""

    def __init__(self, engine, device, names):
        self.context = engine.create_execution_context()
        if self.context is None:
            raise EngineUnusable("TensorRT could not create an execution context (out of GPU memory?)")
        self.stream = device.stream()
        from runtime.tensorrt.cuda_memory import DeviceBuffer, PinnedBuffer

        self.device_buffers = {n: DeviceBuffer(device) for n in names}
        self.host_buffers = {n: PinnedBuffer(device) for n in names}


class TensorRTBackend(Backend):
    """A serialized TensorRT engine, run with the tensor-name API (set_input_shape,
    set_tensor_address, execute_async_v3)."""

    name = "tensorrt"

    def __init__(self, engine_path: str | Path, device_index: int = 0, precision: str = "fp32",
                 load_plugins: bool = True):
        trt = import_tensorrt()
        from runtime.tensorrt.cuda_memory import Device

        self.trt = trt
        self.path = Path(engine_path)
        if not self.path.is_file():
            raise InputError(f"engine file not found: {self.path}")
        self.precision = precision
        self.device = Device(device_index)
        self.logger = trt.Logger(trt.Logger.WARNING)
        plugin_note = ""
        with self.device.active():
            trt.init_libnvinfer_plugins(self.logger, "")
            if load_plugins:
                try:
                    lib = plugins.plugin_library_path(required=True)
                    trt.get_plugin_registry().load_library(str(lib))
                except plugins.PluginNotBuiltError as err:
                    plugin_note = f" (the project's plugin library was not loaded: {err})"
            self.runtime = trt.Runtime(self.logger)
            self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise EngineUnusable(f"TensorRT could not deserialize {self.path}: it was built with another TensorRT "
                                 f"version or GPU, or needs a plugin that is not registered{plugin_note}; rebuild "
                                 "the engine on this machine")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self._inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if n not in self._inputs]
        self._dtype = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self._local = threading.local()
        self._slots: list[_Slot] = []
        self._slots_lock = threading.Lock()

    @property
    def input_names(self) -> list[str]:
        return list(self._inputs)

    @property
    def output_names(self) -> list[str]:
        return list(self._outputs)

    def profile_shapes(self, name: str, profile: int = 0):
        """(min, opt, max) shapes of input ``name`` in optimisation profile ``profile``."""
        return [tuple(s) for s in self.engine.get_tensor_profile_shape(name, profile)]

    def _slot(self) -> _Slot:
        slot = getattr(self._local, "slot", None)
        if slot is None:
            slot = _Slot(self.engine, self.device, self._inputs + self._outputs)
            self._local.slot = slot
            with self._slots_lock:
                self._slots.append(slot)
        return slot

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self._inputs if n not in feeds]
        if missing:
            raise InputError(f"{self.path.name}: missing input(s) {', '.join(missing)}")
        with self.device.active():
            slot = self._slot()
            ctx, stream = slot.context, slot.stream
            for name in self._inputs:
                arr = np.ascontiguousarray(feeds[name], dtype=self._dtype[name])
                lo, _, hi = self.profile_shapes(name)
                if len(arr.shape) != len(lo) or any(s < a or s > b for s, a, b in zip(arr.shape, lo, hi)):
                    raise InputError(f"{self.path.name}: input {name} has shape {arr.shape}, the engine accepts "
                                     f"{lo} to {hi}; rebuild the engine with a larger profile or split the input")
                if not ctx.set_input_shape(name, arr.shape):
                    raise InputError(f"{self.path.name}: TensorRT refused shape {arr.shape} for input {name}")
                host = slot.host_buffers[name].view(arr.shape, arr.dtype)
                host[...] = arr
                dev = slot.device_buffers[name].ensure(arr.nbytes)
                stream.to_device(dev, host)
                ctx.set_tensor_address(name, dev.ptr)
            results = {}
            for name in self._outputs:
                shape = tuple(ctx.get_tensor_shape(name))
                if any(s < 0 for s in shape):
                    raise RuntimeError(f"{self.path.name}: output {name} has an unresolved shape {shape}")
                host = slot.host_buffers[name].view(shape, self._dtype[name])
                dev = slot.device_buffers[name].ensure(host.nbytes)
                ctx.set_tensor_address(name, dev.ptr)
                results[name] = host
            if not ctx.execute_async_v3(stream.handle):
                raise RuntimeError(f"{self.path.name}: TensorRT execution failed (see the TensorRT log above)")
            for name, host in results.items():
                stream.to_host(host, slot.device_buffers[name])
            stream.synchronize()
            # the pinned buffers are reused by the next call: hand out copies
            return {name: host.copy() for name, host in results.items()}

    def close(self) -> None:
        with self._slots_lock:
            slots, self._slots = self._slots, []
        with self.device.active():
            for slot in slots:
                for buf in slot.device_buffers.values():
                    buf.free()
            self.engine = None
        self.device.close()
