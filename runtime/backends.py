"""Backends: one small interface that every way of running an exported network implements.

ONNX Runtime (CPU, or CUDA where onnxruntime-gpu is installed) is here; TensorRT engines implement
the same interface in ``runtime.tensorrt.backend.TensorRTBackend``.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from export.contract.errors import InputError


class Backend(ABC):
    """Runs one network: named numpy inputs in, named numpy outputs out."""

    name: str = "backend"
    precision: str = "fp32"

    @property
    @abstractmethod
    def input_names(self) -> list[str]: ...

    @property
    @abstractmethod
    def output_names(self) -> list[str]: ...

    @abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int | None = None,
                 precision: str = "fp32", dynamic_shapes: bool = False):
        """``dynamic_shapes``: inputs change shape from call to call (the refinement's N).  ONNX
        Runtime's memory-pattern planner then allocates a new block per shape on top of its arena
        (measured: peak 2.8 GB instead of 1.4 GB for two calls at N = 19,281), so it is switched off."""
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise InputError(f"ONNX file not found: {path}; run `python -m export.to_onnx` first")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.enable_mem_pattern = not dynamic_shapes
        if threads or os.environ.get("NFORMER_ORT_THREADS"):
            opts.intra_op_num_threads = int(threads or os.environ["NFORMER_ORT_THREADS"])
        available = ort.get_available_providers()
        wanted = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.session = ort.InferenceSession(str(path), opts, providers=wanted)
        self.providers = self.session.get_providers()
        self.precision = precision
        self.path = path

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, outputs))
