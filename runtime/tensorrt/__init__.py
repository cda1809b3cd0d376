"""Everything TensorRT: the engine backend, the CUDA memory helper, engine builds and their build
record.  Importing this package imports neither TensorRT nor a CUDA binding: TensorRT is imported
when needed through :func:`runtime.tensorrt.lib.import_tensorrt` (which also defines the one error
for an engine that cannot be used here, :class:`runtime.tensorrt.lib.EngineUnusable`), and every
CUDA call goes through :mod:`runtime.tensorrt.cuda_memory`.  The plugin library is found by
:func:`plugins.plugin_library_path`."""
