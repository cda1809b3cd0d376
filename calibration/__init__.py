"""Stage 2 of the flow: precision variants of the exported ONNX files (FP16, INT8 Q/DQ).

Reads crops through ``export.contract.preprocess`` and ``export.contract.market1501`` (the one preprocessing and the
one reader) and writes ONNX files beside the FP32 ones, listed in the manifest's ``"variants"``:

* ``images``   -- which crops calibrate, read and preprocessed (bad files reported and skipped);
* ``cache``    -- activation ranges kept per (model, method, image list): a rebuild reads only the check crops;
* ``quantize`` -- the INT8 encoder: ONNX Runtime's ``quantize_static`` in QDQ format, symmetric
  int8 activations (entropy, percentile or min-max ranges) and per-channel weights, as TensorRT's
  explicit quantisation needs;
* ``fp16``     -- FP16 encoder and refinement, the refinement's neighbour ranking kept fp32;
* ``variants`` -- writes the files a precision needs and records them in the manifest.

Imports no torch (a deployment box calibrates with ONNX Runtime, numpy and Pillow); importing the
package itself is cheap: submodules load ONNX Runtime when they are used.
"""
