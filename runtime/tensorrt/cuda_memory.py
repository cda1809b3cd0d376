"""Device memory, pinned host memory, streams and device facts: the one module of the runtime that
talks to CUDA.

Place in the flow: used by ``runtime.tensorrt.backend`` (memory and streams) and
``runtime.tensorrt.build`` (:func:`device_facts`: the GPU a build record names), through pycuda as
the design card names; no other module imports pycuda.  Every CUDA call on device memory or a
stream happens inside ``Device.active()``, which makes the GPU's primary context current on the
calling thread, so the backend can run from any thread (the dynamic batcher's worker, a producer
thread); :func:`device_facts` only queries the device and needs no context.  Buffers grow to the
largest shape seen and are reused: nothing is allocated on the steady-state path.

Not verified on this project's machines (no GPU, no pycuda): written against pycuda's documented
API (``pycuda.driver``: ``Device.retain_primary_context``, ``mem_alloc``, ``pagelocked_empty``,
``memcpy_htod_async`` / ``memcpy_dtoh_async``, ``Stream``).
"""
from __future__ import annotations

import contextlib

import numpy as np

from export.contract.errors import InputError

from runtime.tensorrt.lib import EngineUnusable


class CudaUnavailable(EngineUnusable):
    """pycuda or a CUDA device is missing: a TensorRT engine cannot run here (the one error type for
    that, :class:`~runtime.tensorrt.lib.EngineUnusable`, so ``backend="auto"`` falls back on it)."""


def cuda_driver():
    """``pycuda.driver``, initialised; CudaUnavailable with what to install when it is missing."""
    try:
        import pycuda.driver as cuda
    except ImportError:
        raise CudaUnavailable("pycuda is not installed: the TensorRT backend needs it for device memory and "
                              "streams; install it with pip install 'nformer-trt[tensorrt]' (or use the ONNX "
                              "Runtime backend)") from None
    try:
        cuda.init()
    except Exception as err:  # pycuda raises its own LogicError/RuntimeError types
        raise CudaUnavailable(f"CUDA could not be initialised ({err}); check the NVIDIA driver "
                              "(nvidia-smi) or use the ONNX Runtime backend") from None
    return cuda


def device_facts(index: int = 0) -> dict | None:
    """``{"name", "compute_capability"}`` of GPU ``index`` through pycuda; None without pycuda or the GPU."""
    try:
        cuda = cuda_driver()
        dev = cuda.Device(index)
        major, minor = dev.compute_capability()
        return {"name": dev.name(), "compute_capability": f"{major}.{minor}"}
    except Exception:  # no pycuda, no driver or no such GPU: nothing to report
        return None


class Device:
    """One GPU and its primary context."""

    def __init__(self, index: int = 0):
        self.cuda = cuda = cuda_driver()
        count = cuda.Device.count()
        if count == 0:
            raise CudaUnavailable("CUDA reports no GPU on this machine; use the ONNX Runtime backend")
        if not 0 <= index < count:
            raise InputError(f"GPU {index} does not exist: this machine has {count} CUDA device(s)")
        self.index = index
        try:
            self.device = cuda.Device(index)
            self.context = self.device.retain_primary_context()
            self.name = self.device.name()
            self.compute_capability = "%d.%d" % self.device.compute_capability()
        except Exception as err:  # pycuda raises its own error types
            raise CudaUnavailable(f"GPU {index} could not be opened through CUDA ({err}); check the NVIDIA "
                                  "driver (nvidia-smi) or use the ONNX Runtime backend") from None

    @contextlib.contextmanager
    def active(self):
        """Make this GPU's context current on the calling thread for the duration of the block."""
        self.context.push()
        try:
            yield self
        finally:
            self.cuda.Context.pop()

    def stream(self) -> "Stream":
        return Stream(self)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.context.detach()


class Stream:
    """A CUDA stream with the copies the backend needs (host side must be pinned to be async)."""

    def __init__(self, device: Device):
        self.device = device
        self.stream = device.cuda.Stream()

    @property
    def handle(self) -> int:
        return self.stream.handle

    def to_device(self, dst: "DeviceBuffer", src: np.ndarray) -> None:
        self.device.cuda.memcpy_htod_async(dst.allocation, src, self.stream)

    def to_host(self, dst: np.ndarray, src: "DeviceBuffer") -> None:
        self.device.cuda.memcpy_dtoh_async(dst, src.allocation, self.stream)

    def synchronize(self) -> None:
        self.stream.synchronize()


class DeviceBuffer:
    """Device memory that grows to the largest request and is then reused."""

    def __init__(self, device: Device):
        self.device = device
        self.allocation = None
        self.nbytes = 0

    def ensure(self, nbytes: int) -> "DeviceBuffer":
        if nbytes > self.nbytes:
            self.free()
            self.nbytes = max(int(nbytes), 256)
            self.allocation = self.device.cuda.mem_alloc(self.nbytes)
        return self

    @property
    def ptr(self) -> int:
        return int(self.allocation)

    def free(self) -> None:
        if self.allocation is not None:
            self.allocation.free()
            self.allocation = None
            self.nbytes = 0


class PinnedBuffer:
    """Page-locked host memory that grows to the largest request; ``view`` gives a numpy array."""

    def __init__(self, device: Device):
        self.device = device
        self.host = None

    def view(self, shape, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if self.host is None or self.host.nbytes < nbytes:
            self.host = self.device.cuda.pagelocked_empty(max(nbytes, 256), np.uint8)
        return self.host[:nbytes].view(dtype).reshape(shape)
