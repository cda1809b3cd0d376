"""The one import of TensorRT and the one error for "this engine cannot be used here".

Every module of ``runtime.tensorrt`` (and anything else that needs TensorRT) gets the module from
:func:`import_tensorrt`, which imports it lazily: importing this module imports neither TensorRT nor
a CUDA binding.  CUDA itself (pycuda) is reached only through ``runtime.tensorrt.cuda_memory``.
"""
from __future__ import annotations

from export.contract.errors import NFormerError

INSTALL_HINT = ("install it with pip install 'nformer-trt[tensorrt]' on a machine with an NVIDIA GPU, or use the "
                "ONNX Runtime backend")


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
