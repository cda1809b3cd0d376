"""The ReciprocalNeighbors operation: CUDA kernels (``*.cu``), TensorRT glue (``*Plugin.cpp``) and the
ctypes bridge to the kernels (:mod:`plugins.reciprocal_neighbors.cuda`, imports torch when called).

Its meaning is ``export.reference.reciprocal_neighbors.reciprocal_neighbors``; README.md beside this file has the
table of inputs, outputs, attributes, types, limits and the workspace formula.
"""
from export.contract.ops import MAX_K, OP_TYPE, PLUGIN_NAMESPACE, PLUGIN_VERSION  # noqa: F401
