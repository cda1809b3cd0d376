"""Custom operations of NFormer for TensorRT: the plugin library and its CUDA kernels.

``plugins/`` serves both ends of the flow: the ONNX node ``nformer::ReciprocalNeighbors`` that
``export/`` writes is implemented here for TensorRT (``reciprocal_neighbors/``), and ``runtime/`` loads
the built library when it builds or runs an engine.  Build once with CMake::

    cmake -S plugins -B build/plugins -DTENSORRT_ROOT=/path/to/TensorRT && cmake --build build/plugins -j

Importing this package is cheap (no torch, no CUDA): it only locates the built libraries.
"""
from __future__ import annotations

import os
from pathlib import Path

from export.contract.errors import NFormerError

PLUGIN_LIBRARY = "libnformer_plugins.so"
#: The same plugin, registered with TensorRT's registry when the library is loaded: for hosts that only dlopen
#: plugin libraries (Triton's TensorRT backend, DeepStream's nvinfer).  Never load both in one process.
AUTOREG_LIBRARY = "libnformer_plugins_autoreg.so"
KERNELS_LIBRARY = "libnformer_kernels.so"
#: Directory searched first for the built libraries.
ENV_DIR = "NFORMER_PLUGIN_DIR"
REPO_ROOT = Path(__file__).resolve().parent.parent
#: Where the documented CMake command puts the libraries.
DEFAULT_BUILD_DIR = REPO_ROOT / "build" / "plugins"
BUILD_COMMAND = (
    "cmake -S plugins -B build/plugins -DTENSORRT_ROOT=/path/to/TensorRT && cmake --build build/plugins -j"
)

__all__ = [
    "AUTOREG_LIBRARY",
    "BUILD_COMMAND",
    "ENV_DIR",
    "KERNELS_LIBRARY",
    "PLUGIN_LIBRARY",
    "PluginNotBuiltError",
    "autoreg_library_path",
    "kernels_library_path",
    "library_path",
    "linked_tensorrt_major",
    "plugin_library_path",
    "search_dirs",
]


class PluginNotBuiltError(NFormerError, RuntimeError):
    """A plugin library was asked for but has not been built (or not where it is looked for)."""


def search_dirs() -> list[Path]:
    """Directories searched for the libraries, in order: ``$NFORMER_PLUGIN_DIR``, then build/plugins."""
    dirs = []
    env = os.environ.get(ENV_DIR)
    if env:
        dirs.append(Path(env).expanduser())
    dirs.append(DEFAULT_BUILD_DIR)
    return dirs


def _find(name: str, what: str, hint: str) -> Path:
    dirs = search_dirs()
    for d in dirs:
        candidate = d / name
        if candidate.is_file():
            return candidate.resolve()
    looked = ", ".join(str(d / name) for d in dirs)
    raise PluginNotBuiltError(
        f"{what} ({name}) is not built: looked for {looked}. {hint} "
        f"Build it from the repository root with: {BUILD_COMMAND} "
        f"(or set {ENV_DIR} to the directory that holds it)."
    )


def library_path() -> Path:
    """Path of ``libnformer_plugins.so``, the TensorRT plugin library.

    Load it with ``trtexec --dynamicPlugins=<path>`` or, in Python, with
    ``runtime.tensorrt.lib.load_plugin_library`` (once per process, then the creator is looked up:
    ``IPluginRegistry.load_library`` returns None on failure and when already loaded).  TensorRT must
    parse a file without the op's local function (``runtime build`` writes ``nformer.trt.onnx``), or
    it may import the function body instead (reciprocal_neighbors/README.md).
    Raises :class:`PluginNotBuiltError` when it has not been built.
    """
    hint = "It needs TensorRT's headers at build time (not libnvinfer)."
    for d in search_dirs():
        if (d / KERNELS_LIBRARY).is_file() and not (d / PLUGIN_LIBRARY).is_file():
            hint = (
                f"{d / KERNELS_LIBRARY} exists, so CMake ran without finding TensorRT's headers (NvInfer.h); "
                "pass -DTENSORRT_ROOT=<directory whose include/ holds NvInfer.h>."
            )
            break
    return _find(PLUGIN_LIBRARY, "The TensorRT plugin library", hint)


def kernels_library_path() -> Path:
    """Path of ``libnformer_kernels.so``: the CUDA kernels behind a plain C API (no TensorRT needed).

    Raises :class:`PluginNotBuiltError` when it has not been built.
    """
    return _find(KERNELS_LIBRARY, "The CUDA kernels library", "It needs CUDA's nvcc and CMake >= 3.18.")


def plugin_library_path(required: bool = False) -> Path | None:
    """The TensorRT plugin library as every TensorRT user finds it (engine builds, the TensorRT
    backend, the serving exports): its path, or None when it is not built.

    ``required=True``: raise :class:`PluginNotBuiltError` (where it looked and the build command)
    instead of returning None.  The one lookup is :func:`library_path`.
    """
    try:
        return library_path()
    except PluginNotBuiltError:
        if required:
            raise
        return None


def autoreg_library_path(required: bool = False) -> Path | None:
    """Path of ``libnformer_plugins_autoreg.so``, the plugin library that registers its creator when it is
    loaded: what Triton (``--backend-config=tensorrt,plugins=<path>`` or ``LD_PRELOAD=<path>``) and
    DeepStream (``custom-lib-path``) load, since they only dlopen plugin libraries.  None when not built.

    It is looked for beside the :func:`library_path` in use (the same build, so the plugin code that the
    engines' build records name), never elsewhere.  CMake builds it only when it finds libnvinfer, which it
    links (``-DTENSORRT_NVINFER_LIBRARY=/path/to/libnvinfer.so.N``: the server's TensorRT major version).
    ``required=True``: raise :class:`PluginNotBuiltError` saying why instead of returning None.
    """
    try:
        plugin = library_path()
    except PluginNotBuiltError:
        if required:
            raise
        return None
    # the directory library_path() took it from (its first search directory that holds it)
    build_dir = next((d for d in search_dirs() if (d / PLUGIN_LIBRARY).is_file()), plugin.parent)
    candidate = build_dir / AUTOREG_LIBRARY
    if candidate.is_file():
        return candidate.resolve()
    if not required:
        return None
    raise PluginNotBuiltError(
        f"The self-registering plugin library ({AUTOREG_LIBRARY}, what Triton and DeepStream load) is not built: "
        f"looked for {candidate}, beside the plugin library in use. CMake builds it only when it finds TensorRT's "
        "libnvinfer, which it links: re-run the build with -DTENSORRT_NVINFER_LIBRARY=/path/to/libnvinfer.so.N (the serving "
        f"machine's TensorRT major version) or a TENSORRT_ROOT whose lib/ holds it. Build command: {BUILD_COMMAND}"
    )


def linked_tensorrt_major(path: str | Path) -> int | None:
    """The TensorRT major version a built library links (its ``libnvinfer.so.N`` dependency, as the dynamic
    loader will look for it), or None when it names none (``libnformer_plugins.so`` links no libnvinfer)
    or cannot be read.  ``libnformer_plugins_autoreg.so`` loads only beside that major version."""
    import re

    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    found = re.search(rb"\x00libnvinfer\.so\.(\d+)\x00", data)  # a NUL-separated name of .dynstr
    return int(found.group(1)) if found else None
