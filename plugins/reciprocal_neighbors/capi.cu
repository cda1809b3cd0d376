/* The C entry points of libnformer_kernels.so: thin wrappers over nformer::reciprocalNeighbors. */
#include "capi.h"
#include "reciprocalNeighborsKernels.h"

#include <cstdint>

using nformer::FeatureType;

extern "C"
{

int nformer_reciprocal_neighbors_ex(const void* features, int dtype, int B, int N, int D, int k, int* idx, int* valid,
    void* workspace, size_t ws_bytes, cudaStream_t stream, int candidates, int flags)
{
    return nformer::reciprocalNeighbors(features, static_cast<FeatureType>(dtype), B, N, D, k, idx, valid, workspace,
        ws_bytes, stream, candidates, flags);
}

int nformer_reciprocal_neighbors(const void* features, int dtype, int B, int N, int D, int k, int* idx, int* valid,
    void* workspace, size_t ws_bytes, cudaStream_t stream)
{
    return nformer_reciprocal_neighbors_ex(features, dtype, B, N, D, k, idx, valid, workspace, ws_bytes, stream, 0, 0);
}

int nformer_reciprocal_neighbors_prepare_device(void)
{
    nformer::ReciprocalNeighborsDevice const* device = nullptr;
    return nformer::prepareReciprocalNeighborsDevice(&device);
}

size_t nformer_reciprocal_neighbors_workspace_ex(int B, int N, int D, int k, int candidates)
{
    return nformer::reciprocalNeighborsWorkspaceSize(B, N, D, k, candidates);
}

size_t nformer_reciprocal_neighbors_workspace(int B, int N, int D, int k)
{
    return nformer::reciprocalNeighborsWorkspaceSize(B, N, D, k, 0);
}

int nformer_reciprocal_neighbors_plan(int B, int N, int D, int k, int candidates, int* c_out, int* splits_out,
    double* error_bound_out, size_t* workspace_out)
{
    nformer::ReciprocalNeighborsPlan plan{};
    int status = nformer::planReciprocalNeighbors(B, N, D, k, candidates, SIZE_MAX, &plan);
    if (status == 0)
    {
        if (c_out) *c_out = plan.candidates;
        if (splits_out) *splits_out = plan.splits;
        if (error_bound_out) *error_bound_out = plan.errorBound;
        if (workspace_out) *workspace_out = plan.workspaceBytes;
    }
    return status;
}

int nformer_reciprocal_neighbors_max_k(void)
{
    return nformer::kReciprocalNeighborsMaxK;
}

const char* nformer_status_string(int status)
{
    return nformer::reciprocalNeighborsStatusString(status);
}

const char* nformer_kernels_version(void)
{
    return "ReciprocalNeighbors 1";
}

} // extern "C"
