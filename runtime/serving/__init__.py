"""Serving integrations: the Triton model repository and the DeepStream configuration written from a
model directory (and, next, the service itself)."""
