"""The one import of TensorRT, the one error for "this engine cannot be used here", and the one
way the project's plugin library is loaded into TensorRT's plugin registry.

Every module of ``runtime.tensorrt`` (and anything else that needs TensorRT) gets the module from
:func:`import_tensorrt`, which imports it lazily: importing this module imports neither TensorRT nor
a CUDA binding.  CUDA itself (pycuda) is reached only through ``runtime.tensorrt.cuda_memory``.

:func:`load_plugin_library` loads the library once per process (a lock and a flag: the registry is
process-wide, and a second ``load_library`` of the same library fails because its creators are
already registered) and then asks the registry for the ``ReciprocalNeighbors`` creator: that
lookup, not ``load_library``'s return value, decides whether the plugin is usable.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path

from export.contract.errors import NFormerError
from export.contract.ops import OP_DOMAIN, OP_TYPE, PLUGIN_NAMESPACE, PLUGIN_VERSION

INSTALL_HINT = ("install it with pip install 'nformer-trt[tensorrt]' on a machine with an NVIDIA GPU, or use the "
                "ONNX Runtime backend")
PLUGIN_NAME = f"{OP_TYPE} version {PLUGIN_VERSION!r} namespace {PLUGIN_NAMESPACE!r}"

log = logging.getLogger(__name__)


class EngineUnusable(NFormerError):
    """A TensorRT engine cannot be used here: TensorRT is missing, or the running TensorRT version,
    GPU, plugin library or source ONNX file differ from the engine's build record."""


def import_tensorrt():
    """The ``tensorrt`` module; :class:`EngineUnusable` saying what to install when it does not import.

    A directory named ``tensorrt`` on ``sys.path`` (a namespace package, e.g. a test folder) is not
    TensorRT: it is reported as TensorRT missing rather than failing later on a missing attribute.
    """
    try:
        import tensorrt as trt
    except ImportError:
        raise EngineUnusable(f"TensorRT is not installed (import tensorrt failed): {INSTALL_HINT}") from None
    if getattr(trt, "__version__", None) is None:
        where = ", ".join(str(p) for p in getattr(trt, "__path__", [])) or getattr(trt, "__file__", "?")
        raise EngineUnusable(f"TensorRT is not installed (import tensorrt found {where}, which is not TensorRT's "
                             f"package): {INSTALL_HINT}")
    return trt


def tensorrt_version_tuple(version: str) -> tuple[int, ...]:
    """``"10.5.0.18"`` -> ``(10, 5, 0, 18)`` (non-numeric parts end the tuple)."""
    out = []
    for part in str(version).split("."):
        if not part.isdigit():
            break
        out.append(int(part))
    return tuple(out)


def parser_prefers_local_functions(version: str | tuple) -> bool:
    """TensorRT 10.0 - 10.6: the ONNX parser imports a model's local function (FunctionProto) of a
    node's op type before it looks for a plugin (10.7 changed the order).  The build therefore parses
    a copy without the function (``runtime.tensorrt.build.tensorrt_onnx``) on every version."""
    v = tensorrt_version_tuple(version) if isinstance(version, str) else tuple(version)
    return (10, 0) <= v[:2] < (10, 7)


# ---------------------------------------------------------------------------------------------------
# the plugin library, loaded once per process


class _PluginState:
    def __init__(self):
        self.path: str | None = None      # the library this process loaded (or found registered)
        self.handle = None                # load_library's handle (None: its creators were already registered)


_PLUGIN_LOCK = threading.Lock()
_plugin_state = _PluginState()


def plugin_creator(registry):
    """The ``ReciprocalNeighbors`` creator registered in ``registry``, or None.

    ``IPluginRegistry.get_creator`` (TensorRT >= 10) finds IPluginV3 creators such as this one;
    ``get_plugin_creator`` only finds the deprecated IPluginV2 kind and is used only where
    ``get_creator`` does not exist."""
    get = getattr(registry, "get_creator", None) or registry.get_plugin_creator
    return get(OP_TYPE, PLUGIN_VERSION, PLUGIN_NAMESPACE)


def load_plugin_library(trt, library: str | Path, registry=None) -> dict:
    """Load the plugin library ``library`` into ``registry`` (default ``trt.get_plugin_registry()``)
    once per process and check that the ``ReciprocalNeighbors`` creator is registered.

    Returns ``{"path", "loaded_now": bool, "already_registered": bool}``; raises
    :class:`EngineUnusable` when the creator is not registered afterwards (the library did not load,
    or does not hold the creator), or when another library was loaded before in this process.
    ``IPluginRegistry.load_library`` returns None on failure, including when the library's creators
    are already registered, so its return value alone decides nothing.
    """
    library = str(Path(library))
    with _PLUGIN_LOCK:
        state = _plugin_state
        registry = trt.get_plugin_registry() if registry is None else registry
        if state.path is not None:
            if state.path != library:
                raise EngineUnusable(f"this process already loaded the plugin library {state.path}; it cannot also "
                                     f"load {library} (TensorRT's plugin registry is process-wide and keeps the "
                                     "first creator of a name): use one plugin library per process")
            if plugin_creator(registry) is None:
                raise EngineUnusable(f"the plugin creator {PLUGIN_NAME} loaded from {library} is no longer "
                                     "registered in TensorRT's plugin registry")
            return {"path": library, "loaded_now": False, "already_registered": True}
        registered_before = plugin_creator(registry) is not None
        handle = registry.load_library(library)
        if plugin_creator(registry) is None:
            result = "returned no handle (it failed)" if handle is None else "returned a handle"
            raise EngineUnusable(
                f"TensorRT's plugin registry has no creator {PLUGIN_NAME} after IPluginRegistry.load_library("
                f"{library}), which {result}: the library is not a build of this project's plugins for this "
                f"TensorRT version (rebuild it: {_build_command()}), so the {OP_DOMAIN}::{OP_TYPE} node cannot be "
                "run exactly")
        if handle is None:
            # already registered (by an earlier load in this process, e.g. trtexec-style preloading):
            # the registry keeps those creators, which is what the check above found
            log.info("plugin library %s: load_library returned None because %s was already registered "
                     "(registered before: %s); using the registered creator", library, PLUGIN_NAME,
                     registered_before)
        state.path, state.handle = library, handle
        return {"path": library, "loaded_now": handle is not None, "already_registered": handle is None}


def _build_command() -> str:
    import plugins

    return plugins.BUILD_COMMAND
