"""The torch-free contract of the exported files: what export/, calibration/, runtime/ and plugins/
all agree on, importable on a deployment box that has no PyTorch."""
