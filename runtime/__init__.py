"""Stage 3 of the flow: run the exported files, on ONNX Runtime or on TensorRT engines built from them
(``runtime.tensorrt``), and serve them (``runtime.serving``).

The serving path imports no torch: a deployment box has ONNX Runtime or TensorRT, numpy and Pillow.
``from runtime import Pipeline`` is the entry point for programs that embed it.
"""
from export.contract.errors import InputError, NFormerError

__all__ = ["InputError", "NFormerError", "Pipeline"]


def __getattr__(name):  # import ONNX Runtime only when a Pipeline is asked for
    if name == "Pipeline":
        from runtime.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
