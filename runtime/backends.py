"""Backends: one small interface that every way of running an exported network implements.

ONNX Runtime (CPU, or CUDA where onnxruntime-gpu is installed) is here; TensorRT engines implement
the same interface in ``runtime.tensorrt.backend.TensorRTBackend``.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from export.contract.errors import InputError, check_count


_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
              "tensor(int32)": "int32", "tensor(uint8)": "uint8", "tensor(int8)": "int8"}


def max_threads() -> int:
    """The most intra-op threads an ONNX Runtime session may be given: four per CPU here, at least
    64.  ONNX Runtime starts them all when a session opens (2**31 was a TypeError from its binding,
    20,000 aborted the process, 1,024 took 86 s to open on 2 cores)."""
    return max(64, 4 * (os.cpu_count() or 1))


def session_threads(threads) -> int | None:
    """``threads`` checked (an integer in 1..:func:`max_threads`), or, when None, the environment's
    ``NFORMER_ORT_THREADS`` (None when unset: ONNX Runtime's default)."""
    why = (f"ONNX Runtime starts every thread when a session opens: at most 4 per CPU ({os.cpu_count() or 1} "
           "here) or 64")
    if threads is not None:
        threads = check_count(threads, "threads")
        if threads > max_threads():
            raise InputError(f"threads must be an integer in 1..{max_threads()}, found {threads}; {why}")
        return threads
    text = os.environ.get("NFORMER_ORT_THREADS")
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        value = None
    if value == 0:                 # ONNX Runtime's own meaning of 0: its default
        return None
    if value is None or not 1 <= value <= max_threads():
        raise InputError(f"NFORMER_ORT_THREADS must be an integer in 1..{max_threads()} (0: ONNX Runtime's default), "
                         f"found {text[:40]!r}; {why}: fix or unset it")
    return value


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
        threads = session_threads(threads)
        if threads:
            opts.intra_op_num_threads = threads
        if isinstance(providers, (str, bytes)):
            raise InputError(f"providers must be a list of ONNX Runtime provider names, found one string "
                             f"{providers!r:.60}; pass [{providers!r:.60}]")
        available = ort.get_available_providers()
        missing = [p for p in providers or [] if p not in available]
        if missing:   # ONNX Runtime would only warn and run on what it has: the caller asked for these
            raise InputError(f"ONNX Runtime here offers {available}; asked for {list(providers)}, of which {missing} "
                             "are not available: install the package that has them (onnxruntime-gpu for CUDA), or "
                             "leave providers out to take the best one available")
        wanted = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=wanted)
        except Exception as err:  # noqa: BLE001 - ONNX Runtime's own exception types (InvalidProtobuf, Fail ...)
            text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise InputError(f"ONNX Runtime cannot open {path} as a model ({text[:300]}); it is not an ONNX file "
                             "this runtime can run: re-export the model directory") from None
        self.providers = self.session.get_providers()
        self.precision = precision
        self.path = path

    def interface(self) -> dict[str, dict[str, tuple[str, list]]]:
        """``{"inputs"|"outputs": {name: (dtype, shape)}}`` as the session sees the file (symbolic
        dimensions as strings), comparable with ``export.contract.manifest.network_interface``."""
        def spec(arg):
            dtype = _ORT_TYPES.get(arg.type, arg.type)
            return dtype, [d if isinstance(d, int) else str(d) for d in (arg.shape or [])]
        return {"inputs": {a.name: spec(a) for a in self.session.get_inputs()},
                "outputs": {a.name: spec(a) for a in self.session.get_outputs()}}

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, outputs))
