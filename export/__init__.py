"""Stage 1 of the flow: checkpoint -> PyTorch reference -> ONNX files + manifest.

Importing this package is cheap and pulls in no torch: ``export.contract.errors`` and ``export.contract.manifest``
describe the artefacts that later stages (calibration, runtime) read on machines without PyTorch.
"""
