/*
 * Plain C entry points of the reciprocal-neighbour kernels, exported by libnformer_kernels.so (no TensorRT).
 * Python reaches them through ctypes (plugins/reciprocal_neighbors/cuda.py); any C program can too.
 *
 * Status: 0 success; negative = invalid arguments (nothing was launched); positive = a cudaError_t.
 */
#ifndef NFORMER_RECIPROCAL_NEIGHBORS_CAPI_H
#define NFORMER_RECIPROCAL_NEIGHBORS_CAPI_H

#include <stddef.h>

#include <cuda_runtime_api.h>

#if defined(_WIN32)
#define NFORMER_API __declspec(dllexport)
#else
#define NFORMER_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C"
{
#endif

/* dtype: 0 = float32, 1 = float16. features [B, N, D]; idx, valid int32 [B, N, min(k, N)]. */
NFORMER_API int nformer_reciprocal_neighbors(const void* features, int dtype, int B, int N, int D, int k, int* idx,
    int* valid, void* workspace, size_t ws_bytes, cudaStream_t stream);

/* As above; candidates = 0 picks the default c per row. flags: 1 = rank every row by the exact fp64 scan,
 * 2 / 4 = the generic candidate kernel with 64- / 32-row tiles, 8 = the generic kernel where the
 * resident-rows kernel would run, 16 = the mma.sync resident-rows kernel where the wgmma kernel would run,
 * 32 = the canonical key of every rescored candidate and fallback column, no fast-key filter (testing).
 * After the call the workspace's first int32 counters hold [0] fallback rows, [1] error-bound
 * violations, [2] the candidate kernel that ran (0 none, 1 generic, 2 resident mma.sync, 3 wgmma). */
NFORMER_API int nformer_reciprocal_neighbors_ex(const void* features, int dtype, int B, int N, int D, int k, int* idx,
    int* valid, void* workspace, size_t ws_bytes, cudaStream_t stream, int candidates, int flags);

/* Prepares the current device once per process (its attributes, the kernels' shared-memory limits; thread-safe);
 * the calls above do it on a device's first use. After it, a call on this device is stream work only (two
 * cudaMemsetAsync, kernel launches), so call this (or run once) before capturing a call in a CUDA graph. */
NFORMER_API int nformer_reciprocal_neighbors_prepare_device(void);

/* Workspace bytes for these sizes (0 for invalid sizes); enough for any smaller B, N, D with the same k. */
NFORMER_API size_t nformer_reciprocal_neighbors_workspace(int B, int N, int D, int k);
NFORMER_API size_t nformer_reciprocal_neighbors_workspace_ex(int B, int N, int D, int k, int candidates);

/* The plan for these sizes: candidates per row c, column splits S, the candidate pass's error bound. */
NFORMER_API int nformer_reciprocal_neighbors_plan(int B, int N, int D, int k, int candidates, int* c_out,
    int* splits_out, double* error_bound_out, size_t* workspace_out);

NFORMER_API int nformer_reciprocal_neighbors_max_k(void);
NFORMER_API const char* nformer_status_string(int status);
NFORMER_API const char* nformer_kernels_version(void);

#ifdef __cplusplus
}
#endif

#endif /* NFORMER_RECIPROCAL_NEIGHBORS_CAPI_H */
