"""The ReciprocalNeighbors operation: CUDA kernels (``*.cu``), TensorRT glue (``*Plugin.cpp``) and the
ctypes bridge to the kernels (:mod:`plugins.reciprocal_neighbors.cuda`, imports torch when called).

Its meaning is ``export.reciprocal_neighbors.reciprocal_neighbors``; README.md beside this file has the
table of inputs, outputs, attributes, types, limits and the workspace formula.
"""
OP_TYPE = "ReciprocalNeighbors"
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = ""
#: Largest k the kernels and the plugin accept.
MAX_K = 128
