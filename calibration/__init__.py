"""Stage 2 of the flow: precision variants of the exported ONNX files (FP16, INT8 Q/DQ).

Reads crops through ``runtime.preprocess`` (the one preprocessing) and writes ONNX files beside
the FP32 ones; imports no torch.  Its contents arrive with the engines-and-precisions issue.
"""
