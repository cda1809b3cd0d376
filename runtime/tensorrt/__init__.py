"""Everything TensorRT: the engine backend, the CUDA memory helper, engine builds and their build
record.  Importing this package imports neither TensorRT nor a CUDA binding: each module imports
them when it needs them, through :func:`runtime.tensorrt.backend.import_tensorrt`."""
