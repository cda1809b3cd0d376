"""Stage 3 of the flow: run the exported files (ONNX Runtime now; TensorRT engines later).

The serving path imports no torch: a deployment box has ONNX Runtime or TensorRT, numpy and Pillow.
"""
from export.errors import InputError, NFormerError

__all__ = ["InputError", "NFormerError"]
