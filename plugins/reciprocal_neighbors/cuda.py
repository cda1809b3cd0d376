"""The reciprocal-neighbour CUDA kernels on torch CUDA tensors, through ctypes and libnformer_kernels.so.

Used by the GPU tests and benchmarks (no TensorRT involved).  The result equals
``export.reference.reciprocal_neighbors.reciprocal_neighbors`` exactly, with int32 outputs as in the ONNX node::

    from plugins.reciprocal_neighbors.cuda import reciprocal_neighbors
    idx, valid = reciprocal_neighbors(features_cuda, k=20)     # int32 [B, N, min(k, N)] each

torch is imported inside the functions, so importing this module is cheap.
"""
from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

from export.contract.errors import InputError
from plugins import kernels_library_path

DTYPE_FLOAT32 = 0
DTYPE_FLOAT16 = 1
FLAG_EXACT_ONLY = 1
FLAG_TILE_ROWS = {128: 0, 64: 2, 32: 4}
FLAG_GENERIC_CANDIDATES = 8
FLAG_NO_WGMMA = 16
FLAG_CANONICAL_KEYS = 32
CANDIDATE_KERNELS = {0: "none", 1: "generic", 2: "resident", 3: "wgmma"}  # workspace counter [2]

_lock = threading.Lock()
_lib = None


def load_kernels(path=None) -> ctypes.CDLL:
    """Load libnformer_kernels.so (``plugins.kernels_library_path()`` unless ``path`` is given) once."""
    global _lib
    with _lock:
        if _lib is not None and path is None:
            return _lib
        lib = ctypes.CDLL(str(path or kernels_library_path()))
        c_int, c_size, vp = ctypes.c_int, ctypes.c_size_t, ctypes.c_void_p
        lib.nformer_reciprocal_neighbors_ex.argtypes = [
            vp, c_int, c_int, c_int, c_int, c_int, vp, vp, vp, c_size, vp, c_int, c_int]
        lib.nformer_reciprocal_neighbors_ex.restype = c_int
        lib.nformer_reciprocal_neighbors.argtypes = [vp, c_int, c_int, c_int, c_int, c_int, vp, vp, vp, c_size, vp]
        lib.nformer_reciprocal_neighbors.restype = c_int
        lib.nformer_reciprocal_neighbors_workspace_ex.argtypes = [c_int, c_int, c_int, c_int, c_int]
        lib.nformer_reciprocal_neighbors_workspace_ex.restype = c_size
        lib.nformer_reciprocal_neighbors_workspace.argtypes = [c_int, c_int, c_int, c_int]
        lib.nformer_reciprocal_neighbors_workspace.restype = c_size
        lib.nformer_reciprocal_neighbors_plan.argtypes = [
            c_int, c_int, c_int, c_int, c_int, ctypes.POINTER(c_int), ctypes.POINTER(c_int),
            ctypes.POINTER(ctypes.c_double), ctypes.POINTER(c_size)]
        lib.nformer_reciprocal_neighbors_plan.restype = c_int
        lib.nformer_reciprocal_neighbors_prepare_device.argtypes = []
        lib.nformer_reciprocal_neighbors_prepare_device.restype = c_int
        lib.nformer_reciprocal_neighbors_max_k.argtypes = []
        lib.nformer_reciprocal_neighbors_max_k.restype = c_int
        lib.nformer_status_string.argtypes = [c_int]
        lib.nformer_status_string.restype = ctypes.c_char_p
        lib.nformer_kernels_version.argtypes = []
        lib.nformer_kernels_version.restype = ctypes.c_char_p
        if path is None:
            _lib = lib
        return lib


def status_string(status: int) -> str:
    return load_kernels().nformer_status_string(int(status)).decode()


@dataclass(frozen=True)
class Plan:
    """What the kernels will run with: c candidates per row and split, S column splits, the proven
    error bound of the fp16 candidate pass (cosine units) and the workspace of this exact call."""

    candidates: int
    splits: int
    error_bound: float
    workspace_bytes: int


def plan(batch: int, rows: int, dim: int, k: int, candidates: int = 0) -> Plan:
    c, s, e, w = ctypes.c_int(), ctypes.c_int(), ctypes.c_double(), ctypes.c_size_t()
    status = load_kernels().nformer_reciprocal_neighbors_plan(
        batch, rows, dim, k, candidates, ctypes.byref(c), ctypes.byref(s), ctypes.byref(e), ctypes.byref(w))
    if status != 0:
        raise InputError(f"reciprocal_neighbors: {status_string(status)} (B={batch}, N={rows}, D={dim}, k={k})")
    return Plan(c.value, s.value, e.value, w.value)


def workspace_size(batch: int, rows: int, dim: int, k: int, candidates: int = 0) -> int:
    """Bytes of workspace for these sizes; also enough for any smaller B, N or D with the same k."""
    size = load_kernels().nformer_reciprocal_neighbors_workspace_ex(batch, rows, dim, k, candidates)
    if size == 0:
        plan(batch, rows, dim, k, candidates)  # raises with the reason
    return int(size)


def reciprocal_neighbors(features, k: int, *, out=None, workspace=None, candidates: int = 0,
                         exact_only: bool = False, tile_rows: int | None = None, generic: bool = False,
                         no_wgmma: bool = False, canonical_keys: bool = False, stats: bool = False):
    """Run the kernels on ``features`` [B, N, D] (float32 or float16 CUDA tensor) on the current stream.

    Args:
        k: neighbours per row; the outputs have ``min(k, N)`` slots.
        out: optional ``(idx, valid)`` int32 CUDA tensors [B, N, min(k, N)] to write into.
        workspace: optional uint8 CUDA tensor of at least :func:`workspace_size` bytes.
        candidates: approximate candidates kept per row (0: the kernels' default).
        exact_only: rank every row by the exact scan of all columns (skips the candidate pass).
        tile_rows: force 64- or 32-row candidate tiles of the generic kernel (default: the largest that fits).
        generic: use the generic candidate kernel where the wgmma or the resident-rows kernel (D <= 256,
            k <= 33, >= 223 KB shared memory per block) would run.
        no_wgmma: use the mma.sync resident-rows kernel where the wgmma kernel (sm_90a builds on compute
            capability 9.0) would run.
        canonical_keys: compute the contract's canonical key of every rescored candidate and every column
            the fallback scans, without the fast fp64 filter in front of it (tests: the lists must not change).
        stats: also return ``{"fallback_rows", "bound_violations", "candidate_kernel"}`` (synchronises
            to read them); ``candidate_kernel`` is "wgmma", "resident", "generic" or "none".

    Returns:
        ``(idx, valid)`` int32 tensors, plus the stats dict when ``stats`` is true.
    """
    import torch

    if not isinstance(features, torch.Tensor) or not features.is_cuda:
        raise InputError("reciprocal_neighbors: features must be a CUDA torch.Tensor "
                         f"(got {type(features).__name__} on {getattr(features, 'device', 'no device')})")
    if features.dim() != 3:
        raise InputError(f"reciprocal_neighbors: features must be [B, N, D], got shape {tuple(features.shape)}")
    dtypes = {torch.float32: DTYPE_FLOAT32, torch.float16: DTYPE_FLOAT16}
    if features.dtype not in dtypes:
        raise InputError(f"reciprocal_neighbors: features must be float32 or float16, got {features.dtype}")
    x = features.contiguous()
    b, n, d = x.shape
    p = plan(b, n, d, k, candidates)
    k_eff = min(k, n)
    device = x.device
    if out is None:
        idx = torch.empty((b, n, k_eff), dtype=torch.int32, device=device)
        valid = torch.empty((b, n, k_eff), dtype=torch.int32, device=device)
    else:
        idx, valid = out
        for name, t in (("idx", idx), ("valid", valid)):
            if (t.dtype != torch.int32 or t.device != device or tuple(t.shape) != (b, n, k_eff)
                    or not t.is_contiguous()):
                raise InputError(f"reciprocal_neighbors: out {name} must be a contiguous int32 tensor "
                                 f"{(b, n, k_eff)} on {device}, got {t.dtype} {tuple(t.shape)} on {t.device}")
    need = workspace_size(b, n, d, k, candidates)
    if workspace is None:
        workspace = torch.empty(need, dtype=torch.uint8, device=device)
    elif workspace.device != device or workspace.numel() * workspace.element_size() < p.workspace_bytes:
        raise InputError(f"reciprocal_neighbors: workspace must hold {need} bytes on {device}, "
                         f"got {workspace.numel() * workspace.element_size()} on {workspace.device}")
    if tile_rows not in (None, *FLAG_TILE_ROWS):
        raise InputError(f"reciprocal_neighbors: tile_rows must be one of {sorted(FLAG_TILE_ROWS)}, got {tile_rows}")
    flags = ((FLAG_EXACT_ONLY if exact_only else 0) | FLAG_TILE_ROWS.get(tile_rows, 0)
             | (FLAG_GENERIC_CANDIDATES if generic else 0) | (FLAG_NO_WGMMA if no_wgmma else 0)
             | (FLAG_CANONICAL_KEYS if canonical_keys else 0))
    lib = load_kernels()
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device).cuda_stream
        status = lib.nformer_reciprocal_neighbors_ex(
            x.data_ptr(), dtypes[x.dtype], b, n, d, k, idx.data_ptr(), valid.data_ptr(),
            workspace.data_ptr(), workspace.numel() * workspace.element_size(), stream,
            candidates, flags)
    if status < 0:
        raise InputError(f"reciprocal_neighbors: {status_string(status)}")
    if status > 0:
        raise RuntimeError(f"reciprocal_neighbors: CUDA error {status}: {status_string(status)}")
    if not stats:
        return idx, valid
    # the counters sit at the workspace base rounded up to 256 bytes
    offset = (-workspace.data_ptr()) % 256
    counters = workspace.view(torch.uint8)[offset:offset + 12].clone().view(torch.int32).tolist()
    return idx, valid, {"fallback_rows": counters[0], "bound_violations": counters[1],
                        "candidate_kernel": CANDIDATE_KERNELS.get(counters[2], str(counters[2]))}
