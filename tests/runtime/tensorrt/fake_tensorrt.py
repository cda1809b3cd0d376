"""A stand-in for the parts of TensorRT's Python API (and pycuda.driver) that nformer-trt calls.

Not TensorRT: it builds no kernels.  What it mirrors is the *contract* of each call the project
makes -- names, argument lists and, above all, the return values that signal failure, as TensorRT
10.x / 11.x's Python bindings define them (checked against the 10.x / 11.1 documentation and headers):

* ``IPluginRegistry.load_library(path)`` returns a handle, or **None** on failure -- including when
  the library's creators are already registered (a second load of the same library);
  ``get_creator(name, version, namespace="")`` returns the creator or **None**;
  ``get_plugin_creator`` finds only IPluginV2 creators (None for this project's IPluginV3 one);
* ``OnnxParser.parse`` / ``parse_from_file`` return **False** and leave ``num_errors`` /
  ``get_error(i)``; a node of a custom domain is imported as a plugin when a creator of its op
  type is registered, else as the model's local function of that name (FunctionProto) when there is
  one, else it is an error.  TensorRT 10.0 - 10.6 try the local function *first* (the plugin only
  when there is no function); 10.7+ try the plugin first.  A function body of this project casts
  DOUBLE to FLOAT in TensorRT: the fake records such a network as ``"function"``, not ``"plugin"``;
* ``IBuilderConfig.set_timing_cache(cache, ignore_mismatch)`` returns **False** for a cache of
  another device or TensorRT version; ``create_timing_cache(bytes)`` returns None for bytes that
  are not a timing cache; ``add_optimization_profile`` returns the index, or -1;
* ``Builder.build_serialized_network`` returns an ``IHostMemory`` (buffer) or **None**;
* ``Runtime.deserialize_cuda_engine`` returns **None** for a plan of another TensorRT version or
  device, one needing a plugin creator that is not registered, or garbage;
* ``ICudaEngine``: ``num_io_tensors``, ``get_tensor_name``, ``get_tensor_mode``,
  ``get_tensor_dtype``, ``get_tensor_profile_shape(name, profile)``, ``num_optimization_profiles``,
  ``create_execution_context()`` (None on failure); the first context of an engine gets profile 0,
  the others none until ``set_optimization_profile_async``, which returns **False** for a profile
  another live context holds (TensorRT: each context in concurrent use needs its own profile);
* ``IExecutionContext.set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3`` return
  bool; a context executing on two threads at once is counted as a violation (it is not
  thread-safe in TensorRT).

Install with :func:`install` (monkeypatches ``sys.modules["tensorrt"]`` and, unless told not to,
``pycuda`` / ``pycuda.driver`` with a fake driver whose "device memory" the fake engines read and
write).  The returned :class:`World` holds the registry, the device, counters and failure knobs.
"""
from __future__ import annotations

import enum
import itertools
import json
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np

PLAN_MAGIC = b"FAKE-TRT-PLAN\n"
CACHE_MAGIC = b"FAKE-TRT-TIMING-CACHE\n"
PLUGIN_MAGIC = b"FAKE-TRT-PLUGIN\n"
STANDARD_DOMAINS = ("", "ai.onnx")


def plugin_library_bytes(creators=(("ReciprocalNeighbors", "1", ""),)) -> bytes:
    """The content of a fake plugin library that registers ``creators`` (name, version, namespace)."""
    return PLUGIN_MAGIC + json.dumps([list(c) for c in creators]).encode()


# ---------------------------------------------------------------------------------------------------
# enums (values as in TensorRT 10)


class Severity(enum.IntEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class NetworkDefinitionCreationFlag(enum.IntEnum):
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 1


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    INT64 = 8


class LayerType(enum.IntEnum):
    OTHER = 0
    PLUGIN_V3 = 1


class ExecutionContextAllocationStrategy(enum.IntEnum):
    STATIC = 0
    ON_PROFILE_CHANGE = 1
    USER_MANAGED = 2


_NP = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8, DataType.INT32: np.int32,
       DataType.BOOL: np.bool_, DataType.UINT8: np.uint8, DataType.INT64: np.int64}
_ONNX_TO_DT = {1: DataType.FLOAT, 10: DataType.HALF, 3: DataType.INT8, 6: DataType.INT32, 9: DataType.BOOL,
               2: DataType.UINT8, 7: DataType.INT64, 11: DataType.FLOAT}  # 11 DOUBLE: TensorRT casts to FLOAT


def nptype(dtype) -> type:
    return _NP[DataType(int(dtype))]


# ---------------------------------------------------------------------------------------------------
# the world: one process's registry, one GPU, counters, failure knobs


class World:
    def __init__(self, version: str, gpu_name: str, compute_capability: tuple[int, int]):
        self.version = version
        self.gpu_name = gpu_name
        self.compute_capability = compute_capability
        self.creators: dict[tuple[str, str, str], str] = {}    # (name, version, namespace) -> library
        self.load_library_calls: list[str] = []
        self.parsed_files: list[str] = []
        self.memory: dict[int, np.ndarray] = {}               # fake device memory: address -> bytes
        self._addresses = itertools.count(0x10000, 0x10000)
        self._streams = itertools.count(1)
        self.lock = threading.Lock()
        self.contexts_created = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.violations: list[str] = []
        self.executions = 0
        # knobs
        self.execute_delay_s = 0.0
        self.execute_gate: threading.Event | None = None     # execute waits for it when set
        self.deserialize_fails = False
        self.context_creation_fails = False
        self.cuda_devices = 1

    @property
    def device_key(self) -> str:
        return f"{self.gpu_name}|{self.compute_capability[0]}.{self.compute_capability[1]}|{self.version}"

    @property
    def short_version(self) -> str:
        return ".".join(self.version.split(".")[:3])

    def register(self, name="ReciprocalNeighbors", version="1", namespace="", library="<preloaded>") -> None:
        self.creators[(name, version, namespace)] = library

    def alloc(self, nbytes: int) -> int:
        address = next(self._addresses)
        self.memory[address] = np.zeros(int(nbytes), np.uint8)
        return address


# ---------------------------------------------------------------------------------------------------
# tensorrt


class Logger:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = (Severity.INTERNAL_ERROR, Severity.ERROR, Severity.WARNING,
                                                     Severity.INFO, Severity.VERBOSE)
    Severity = Severity

    def __init__(self, min_severity: Severity = Severity.WARNING):
        self.min_severity = min_severity
        self.messages: list[tuple[Severity, str]] = []

    def log(self, severity: Severity, msg: str) -> None:
        self.messages.append((severity, msg))


class PluginCreator:
    """Stands for an IPluginCreatorV3One."""

    def __init__(self, name: str, plugin_version: str, plugin_namespace: str):
        self.name, self.plugin_version, self.plugin_namespace = name, plugin_version, plugin_namespace
        self.interface_info = types.SimpleNamespace(kind="PLUGIN CREATOR_V3ONE", major=1, minor=0)


class PluginLibraryHandle:
    def __init__(self, path: str):
        self.path = path


class IPluginRegistry:
    def __init__(self, world: World):
        self._world = world
        self.parent_search_enabled = True

    def load_library(self, plugin_path: str):
        w = self._world
        w.load_library_calls.append(plugin_path)
        try:
            data = Path(plugin_path).read_bytes()
        except OSError:
            return None                      # dlopen failed
        if not data.startswith(PLUGIN_MAGIC):
            return None                      # no getCreators / not a plugin library
        creators = [tuple(c) for c in json.loads(data[len(PLUGIN_MAGIC):])]
        if any(c in w.creators for c in creators):
            return None                      # "already registered": TensorRT refuses the second load
        for c in creators:
            w.creators[c] = plugin_path
        return PluginLibraryHandle(plugin_path)

    def deregister_library(self, handle: PluginLibraryHandle) -> None:
        for key, lib in list(self._world.creators.items()):
            if lib == handle.path:
                del self._world.creators[key]

    def get_creator(self, name: str, version: str, plugin_namespace: str = ""):
        key = (name, version, plugin_namespace)
        return PluginCreator(*key) if key in self._world.creators else None

    def get_plugin_creator(self, type: str, version: str, plugin_namespace: str = ""):  # noqa: A002
        return None                          # IPluginV2 creators only; this project's creator is IPluginV3

    @property
    def all_creators(self) -> list:
        return [PluginCreator(*k) for k in self._world.creators]


class ILayer:
    def __init__(self, name: str, type: LayerType, how: str):  # noqa: A002
        self.name, self.type, self.how = name, type, how


class ITensor:
    def __init__(self, name: str, dtype: DataType, shape: list):
        self.name, self.dtype, self.shape = name, dtype, shape


class INetworkDefinition:
    def __init__(self, flags: int):
        self.flags = flags
        self.layers: list[ILayer] = []
        self.inputs: list[ITensor] = []
        self.outputs: list[ITensor] = []

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def get_layer(self, index: int) -> ILayer:
        return self.layers[index]

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, index: int) -> ITensor:
        return self.inputs[index]

    @property
    def num_outputs(self) -> int:
        return len(self.outputs)

    def get_output(self, index: int) -> ITensor:
        return self.outputs[index]


class ParserError:
    def __init__(self, code: int, desc: str, node: int, node_name: str, op: str):
        self._code, self._desc, self._node, self._node_name, self._op = code, desc, node, node_name, op

    def code(self) -> int:
        return self._code

    def desc(self) -> str:
        return self._desc

    def node(self) -> int:
        return self._node

    def node_name(self) -> str:
        return self._node_name

    def node_operator(self) -> str:
        return self._op

    def __str__(self) -> str:
        return (f"In node {self._node} with name: {self._node_name} and operator: {self._op} "
                f"(importFallbackPluginImporter): UNSUPPORTED_NODE: {self._desc}")


class OnnxParser:
    _world: World

    def __init__(self, network: INetworkDefinition, logger: Logger):
        self.network, self.logger = network, logger
        self._errors: list[ParserError] = []

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, index: int) -> ParserError:
        return self._errors[index]

    def clear_errors(self) -> None:
        self._errors = []

    def parse_from_file(self, model: str) -> bool:
        self._world.parsed_files.append(Path(model).name)
        return self._import(Path(model).read_bytes())

    def parse(self, model: bytes, path: str | None = None) -> bool:
        if path:
            self._world.parsed_files.append(Path(path).name)
        return self._import(bytes(model))

    def _import(self, data: bytes) -> bool:
        import onnx

        model = onnx.load_model_from_string(data)
        functions = {(f.domain, f.name) for f in model.functions}
        registry = IPluginRegistry(self._world)
        functions_first = tuple(int(p) for p in self._world.version.split(".")[:2]) < (10, 7)
        net = self.network
        for i, node in enumerate(model.graph.node):
            if node.domain in STANDARD_DOMAINS:
                net.layers.append(ILayer(node.name or node.op_type, LayerType.OTHER, "standard"))
                continue
            attrs = {a.name: a for a in node.attribute}
            version = attrs["plugin_version"].s.decode() if "plugin_version" in attrs else "1"
            namespace = attrs["plugin_namespace"].s.decode() if "plugin_namespace" in attrs else ""
            has_plugin = registry.get_creator(node.op_type, version, namespace) is not None
            has_function = (node.domain, node.op_type) in functions
            if has_function and (functions_first or not has_plugin):
                # the function body: its DOUBLE tensors become FLOAT in TensorRT
                net.layers.append(ILayer(node.name, LayerType.OTHER, f"function:{node.domain}::{node.op_type}"))
            elif has_plugin:
                net.layers.append(ILayer(node.name, LayerType.PLUGIN_V3, f"plugin:{node.op_type}"))
            else:
                self._errors.append(ParserError(8, f"Plugin not found, are the plugin name, version, and namespace "
                                                   f"correct? ({node.op_type}, {version!r}, {namespace!r})",
                                                i, node.name, node.op_type))
                return False

        def tensors(values):
            out = []
            for v in values:
                t = v.type.tensor_type
                shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
                out.append(ITensor(v.name, _ONNX_TO_DT.get(t.elem_type, DataType.FLOAT), shape))
            return out

        net.inputs, net.outputs = tensors(model.graph.input), tensors(model.graph.output)
        return True


class IOptimizationProfile:
    def __init__(self):
        self.shapes: dict[str, list[list[int]]] = {}

    def set_shape(self, input: str, min, opt, max) -> None:  # noqa: A002
        self.shapes[input] = [list(min), list(opt), list(max)]

    def get_shape(self, input: str):  # noqa: A002
        return self.shapes.get(input, [])


class ITimingCache:
    def __init__(self, device_key: str | None, entries: int = 0):
        self.device_key, self.entries = device_key, entries

    def serialize(self) -> "IHostMemory":
        return IHostMemory(CACHE_MAGIC + json.dumps({"device": self.device_key, "entries": self.entries}).encode())


class IHostMemory(bytes):
    """TensorRT's IHostMemory supports the buffer protocol; a bytes subclass does too."""

    @property
    def nbytes(self) -> int:
        return len(self)


class IBuilderConfig:
    def __init__(self, world: World):
        self._world = world
        self.profiles: list[IOptimizationProfile] = []
        self.timing_cache: ITimingCache | None = None
        self.flags: set = set()

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        if not profile.shapes:
            return -1
        self.profiles.append(profile)
        return len(self.profiles) - 1

    @property
    def num_optimization_profiles(self) -> int:
        return len(self.profiles)

    def create_timing_cache(self, serialized_timing_cache: bytes):
        data = bytes(serialized_timing_cache)
        if not data:
            return ITimingCache(None)
        if not data.startswith(CACHE_MAGIC):
            return None
        facts = json.loads(data[len(CACHE_MAGIC):])
        return ITimingCache(facts["device"], facts["entries"])

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        if cache.device_key is not None and cache.device_key != self._world.device_key and not ignore_mismatch:
            return False
        self.timing_cache = cache
        return True

    def get_timing_cache(self) -> ITimingCache | None:
        return self.timing_cache

    def set_flag(self, flag) -> None:
        self.flags.add(flag)

    def clear_flag(self, flag) -> None:
        self.flags.discard(flag)


class Builder:
    _world: World

    def __init__(self, logger: Logger):
        self.logger = logger

    def get_plugin_registry(self) -> IPluginRegistry:
        return IPluginRegistry(self._world)   # the process-wide registry

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        return INetworkDefinition(flags)

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig(self._world)

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig):
        if not network.inputs or not config.profiles:
            return None
        names = {t.name for t in network.inputs}
        if any(set(p.shapes) != names for p in config.profiles):
            return None                                     # every dynamic input needs a profile
        if config.timing_cache is not None:
            config.timing_cache.device_key = self._world.device_key
            config.timing_cache.entries += 1
        return IHostMemory(make_plan(self._world, network.inputs, network.outputs,
                                     [p.shapes for p in config.profiles],
                                     layers=[layer.how for layer in network.layers]))


def make_plan(world: World, inputs: list[ITensor], outputs: list[ITensor], profiles: list[dict],
              layers: list[str] = (), version: str | None = None, device_key: str | None = None) -> bytes:
    """A serialized fake engine.  An output's dims are ints or the names of an input's dims (resolved
    from the input shapes at run time); its values are ``2 * first input`` when it has the first
    input's shape, else ``sum(first input) + row`` broadcast."""
    spec = {"tensorrt": version or world.version, "device": device_key or world.device_key,
            "inputs": [[t.name, int(t.dtype), t.shape] for t in inputs],
            "outputs": [[t.name, int(t.dtype), t.shape] for t in outputs],
            "profiles": profiles, "layers": list(layers),
            "plugins": [h.split(":", 1)[1] for h in layers if h.startswith("plugin:")]}
    return PLAN_MAGIC + json.dumps(spec).encode()


def read_plan(data: bytes) -> dict:
    assert data.startswith(PLAN_MAGIC), "not a fake plan"
    return json.loads(data[len(PLAN_MAGIC):])


class Runtime:
    _world: World

    def __init__(self, logger: Logger):
        self.logger = logger

    def deserialize_cuda_engine(self, serialized_engine: bytes):
        w = self._world
        data = bytes(serialized_engine)
        if w.deserialize_fails or not data.startswith(PLAN_MAGIC):
            self.logger.log(Severity.ERROR, "IRuntime::deserializeCudaEngine: Error Code 1: Serialization failed")
            return None
        spec = read_plan(data)
        if spec["tensorrt"] != w.version or spec["device"] != w.device_key:
            self.logger.log(Severity.ERROR, "The engine plan file is not compatible with this version / device")
            return None
        for name in spec["plugins"]:
            if (name, "1", "") not in w.creators:
                self.logger.log(Severity.ERROR, f"getCreator: cannot find plugin creator {name}")
                return None
        return ICudaEngine(w, spec)


class ICudaEngine:
    def __init__(self, world: World, spec: dict):
        self._world = world
        self.spec = spec
        self._tensors = {n: (TensorIOMode.INPUT, DataType(d), s) for n, d, s in spec["inputs"]}
        self._tensors.update({n: (TensorIOMode.OUTPUT, DataType(d), s) for n, d, s in spec["outputs"]})
        self._names = list(self._tensors)
        self.profile_owner: dict[int, "IExecutionContext"] = {}
        self.lock = threading.Lock()
        self.contexts = 0

    @property
    def num_io_tensors(self) -> int:
        return len(self._names)

    @property
    def num_optimization_profiles(self) -> int:
        return len(self.spec["profiles"])

    def get_tensor_name(self, index: int) -> str:
        return self._names[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return self._tensors[name][0] if name in self._tensors else TensorIOMode.NONE

    def get_tensor_dtype(self, name: str) -> DataType:
        return self._tensors[name][1]

    def get_tensor_shape(self, name: str) -> list[int]:
        return [d if isinstance(d, int) else -1 for d in self._tensors[name][2]]

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[list[int]]:
        return [list(s) for s in self.spec["profiles"][profile_index][name]]

    def create_execution_context(self, strategy=ExecutionContextAllocationStrategy.STATIC):
        if self._world.context_creation_fails:
            return None
        with self.lock:
            ctx = IExecutionContext(self, first=self.contexts == 0)
            self.contexts += 1
        with self._world.lock:
            self._world.contexts_created += 1
        return ctx


class IExecutionContext:
    def __init__(self, engine: ICudaEngine, first: bool):
        self.engine = engine
        self._profile = -1
        if first and 0 not in engine.profile_owner:
            self._profile = 0
            engine.profile_owner[0] = self
        self._shapes: dict[str, tuple] = {}
        self._addresses: dict[str, int] = {}
        self._busy = threading.Lock()

    @property
    def active_optimization_profile(self) -> int:
        return self._profile

    def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool:
        e = self.engine
        with e.lock:
            if not 0 <= profile_index < e.num_optimization_profiles:
                return False
            owner = e.profile_owner.get(profile_index)
            if owner is not None and owner is not self:
                return False          # "Profile N has been chosen by another IExecutionContext"
            e.profile_owner.pop(self._profile, None)
            e.profile_owner[profile_index] = self
            self._profile = profile_index
            self._shapes.clear()
            return True

    def _range(self, name: str):
        return self.engine.spec["profiles"][self._profile][name]

    def set_input_shape(self, name: str, shape) -> bool:
        if self._profile < 0 or self.engine.get_tensor_mode(name) != TensorIOMode.INPUT:
            return False
        lo, _, hi = self._range(name)
        shape = tuple(int(s) for s in shape)
        if len(shape) != len(lo) or any(s < a or s > b for s, a, b in zip(shape, lo, hi)):
            return False
        self._shapes[name] = shape
        return True

    def _dims(self) -> dict[str, int]:
        dims = {}
        for name, _, spec_shape in self.engine.spec["inputs"]:
            for axis, d in enumerate(spec_shape):
                if isinstance(d, str) and name in self._shapes:
                    dims.setdefault(d, self._shapes[name][axis])
        return dims

    def get_tensor_shape(self, name: str) -> list[int]:
        mode, _, spec_shape = self.engine._tensors[name]
        if mode == TensorIOMode.INPUT:
            return list(self._shapes.get(name, self.engine.get_tensor_shape(name)))
        dims = self._dims()
        return [d if isinstance(d, int) else dims.get(d, -1) for d in spec_shape]

    def set_tensor_address(self, name: str, memory: int) -> bool:
        if name not in self.engine._tensors or int(memory) not in self.engine._world.memory:
            return False
        self._addresses[name] = int(memory)
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        w = self.engine._world
        if not self._busy.acquire(blocking=False):
            with w.lock:
                w.violations.append("one execution context used by two threads at once")
            return False
        try:
            if self._profile < 0:
                return False
            with self.engine.lock:
                owner = self.engine.profile_owner.get(self._profile)
            if owner is not self:
                return False
            inputs = [n for n, _, _ in self.engine.spec["inputs"]]
            if any(n not in self._shapes for n in inputs) or any(n not in self._addresses for n in self.engine._names):
                return False
            with w.lock:
                w.in_flight += 1
                w.max_in_flight = max(w.max_in_flight, w.in_flight)
                w.executions += 1
            try:
                if w.execute_gate is not None:
                    w.execute_gate.wait(10)
                if w.execute_delay_s:
                    time.sleep(w.execute_delay_s)
                self._compute(inputs[0])
            finally:
                with w.lock:
                    w.in_flight -= 1
            return True
        finally:
            self._busy.release()

    def _compute(self, first: str) -> None:
        w = self.engine._world
        in_dtype = nptype(self.engine.get_tensor_dtype(first))
        shape = self._shapes[first]
        n = int(np.prod(shape, dtype=np.int64))
        x = w.memory[self._addresses[first]][:n * np.dtype(in_dtype).itemsize].view(in_dtype).reshape(shape)
        for name, dtype, _ in self.engine.spec["outputs"]:
            out_shape = tuple(self.get_tensor_shape(name))
            out_dtype = nptype(dtype)
            if out_shape == shape:
                y = (x.astype(np.float64) * 2).astype(out_dtype)
            else:
                y = np.full(out_shape, float(x.astype(np.float64).sum()), out_dtype)
            buf = w.memory[self._addresses[name]]
            buf[:y.nbytes] = np.frombuffer(np.ascontiguousarray(y).tobytes(), np.uint8)


def _module(world: World) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = world.version
    trt.__file__ = __file__
    trt.fake_world = world
    for cls in (Builder, OnnxParser, Runtime):
        setattr(trt, cls.__name__, type(cls.__name__, (cls,), {"_world": world}))
    trt.Logger = Logger
    trt.NetworkDefinitionCreationFlag = NetworkDefinitionCreationFlag
    trt.TensorIOMode = TensorIOMode
    trt.DataType = DataType
    trt.LayerType = LayerType
    trt.ExecutionContextAllocationStrategy = ExecutionContextAllocationStrategy
    trt.IPluginRegistry = IPluginRegistry
    trt.nptype = nptype
    trt.get_plugin_registry = lambda: IPluginRegistry(world)
    trt.init_libnvinfer_plugins = lambda logger, namespace: True
    return trt


# ---------------------------------------------------------------------------------------------------
# pycuda.driver


def _driver(world: World) -> types.ModuleType:
    cuda = types.ModuleType("pycuda.driver")

    class Error(Exception):
        pass

    class Context:
        _stack = threading.local()

        def push(self):
            stack = getattr(Context._stack, "items", None)
            if stack is None:
                stack = Context._stack.items = []
            stack.append(self)

        @staticmethod
        def pop():
            stack = getattr(Context._stack, "items", None)
            if not stack:
                raise Error("cuCtxPopCurrent failed: invalid context")
            stack.pop()

        def detach(self):
            pass

    class Device:
        def __init__(self, index):
            if not 0 <= index < world.cuda_devices:
                raise Error("cuDeviceGet failed: invalid device ordinal")
            self.index = index

        @staticmethod
        def count():
            return world.cuda_devices

        def name(self):
            return world.gpu_name

        def compute_capability(self):
            return world.compute_capability

        def retain_primary_context(self):
            return Context()

    class DeviceAllocation:
        def __init__(self, nbytes):
            self.address = world.alloc(nbytes)

        def __int__(self):
            return self.address

        def free(self):
            world.memory.pop(self.address, None)

    class Stream:
        def __init__(self, flags=0):
            self.handle = next(world._streams)

        def synchronize(self):
            pass

    def _current():
        if not getattr(Context._stack, "items", None):
            raise Error("no current CUDA context on this thread")

    def mem_alloc(nbytes):
        _current()
        return DeviceAllocation(nbytes)

    def memcpy_htod_async(dest, src, stream=None):
        _current()
        data = np.ascontiguousarray(src).view(np.uint8).reshape(-1)
        world.memory[int(dest)][:data.size] = data

    def memcpy_dtoh_async(dest, src, stream=None):
        _current()
        flat = dest.view(np.uint8).reshape(-1)
        flat[...] = world.memory[int(src)][:flat.size]

    cuda.Error, cuda.Context, cuda.Device, cuda.Stream = Error, Context, Device, Stream
    cuda.init = lambda flags=0: None
    cuda.mem_alloc = mem_alloc
    cuda.pagelocked_empty = lambda shape, dtype: np.empty(shape, dtype)
    cuda.memcpy_htod_async, cuda.memcpy_dtoh_async = memcpy_htod_async, memcpy_dtoh_async
    return cuda


def install(monkeypatch, version: str = "10.13.0.35", gpu_name: str = "Fake GPU 80GB",
            compute_capability: tuple[int, int] = (9, 0), pycuda: bool = True) -> World:
    """Make ``import tensorrt`` (and ``import pycuda.driver``, or with ``pycuda=False`` make it fail)
    give the fakes for the rest of the test; returns their shared :class:`World`."""
    from runtime.tensorrt import lib

    world = World(version, gpu_name, compute_capability)
    trt = _module(world)
    # a fresh fake registry is a fresh process as far as the plugin library is concerned
    monkeypatch.setattr(lib, "_plugin_state", lib._PluginState())
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    if pycuda:
        driver = _driver(world)
        package = types.ModuleType("pycuda")
        package.__path__ = []
        package.driver = driver
        monkeypatch.setitem(sys.modules, "pycuda", package)
        monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
    else:
        monkeypatch.setitem(sys.modules, "pycuda", None)
        monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    world.trt = trt
    return world


def tensor(name: str, dtype: DataType, shape: list) -> ITensor:
    return ITensor(name, dtype, shape)
