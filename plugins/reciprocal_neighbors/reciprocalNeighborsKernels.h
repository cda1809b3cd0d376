/*
 * The reciprocal top-k neighbour step of NFormer as plain CUDA functions (no TensorRT).
 *
 * Contract: export/contract/neighbor_key.py (the key) and export/reciprocal_neighbors.py. For features x [B, N, D]:
 *   key[i, j] = dot(x_i, x_j) / max(sqrt(dot(x_j, x_j)), 1e-12), dot = the exact fp64 products of the
 *   fp32/fp16 input summed by the contract's fixed pairwise double-double tree (one value everywhere),
 *   idx[i, 0] = i, idx[i, 1..k_eff-1] = the other rows by key descending, equal keys to the lower index,
 *   valid[i, t] = (i in idx[idx[i, t]]),  k_eff = min(k, N).
 *
 * How it stays exact without an N x N matrix (see README.md beside this file):
 *   1. prepare: canonical row norms, and y = fp16(256 * x / ||x||) as the candidate operand;
 *   2. candidates: tensor-core tiles of y y^T (fp16 in, fp32 accumulate) stream over all columns while
 *      each row keeps its best c approximate scores (c = candidates per row) in shared memory;
 *   3. rescore: the candidates' keys (fast fp64, canonical where near-ties leave the order open); the row is
 *      certified when the k_eff-1'th key beats every non-candidate's largest possible key (threshold + a
 *      proven error bound of the fp16 pass);
 *   4. fallback: rows that cannot be certified (duplicate groups larger than c, zero rows, near-ties)
 *      are ranked by canonical keys over the whole row;
 *   5. validity: the reciprocal check on the final lists.
 * All scratch memory comes from one caller-provided workspace; nothing allocates or synchronises.
 */
#ifndef NFORMER_RECIPROCAL_NEIGHBORS_KERNELS_H
#define NFORMER_RECIPROCAL_NEIGHBORS_KERNELS_H

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace nformer
{

//! Element type of the features input.
enum class FeatureType : int32_t
{
    kFLOAT32 = 0,
    kFLOAT16 = 1,
};

//! Largest supported k (the neighbour lists and per-row candidate lists live in shared memory).
constexpr int32_t kReciprocalNeighborsMaxK = 128;

//! Flags of reciprocalNeighbors().
enum ReciprocalNeighborsFlags : int32_t
{
    kFLAG_NONE = 0,
    //! Skip the candidate pass: every row takes the exact fp64 scan (tests and debugging).
    kFLAG_EXACT_ONLY = 1,
    //! Use the 64-row (2) or 32-row (4) candidate tiles even where 128-row tiles fit (tests the variants
    //! that GPUs with less shared memory per block, sm_86 / sm_89, select for large k).
    kFLAG_TILE_64 = 2,
    kFLAG_TILE_32 = 4,
    //! Use the generic candidate kernel (any D and c) where the resident-rows kernel would run.
    kFLAG_GENERIC_CANDIDATES = 8,
    //! Use the mma.sync resident-rows kernel where the wgmma kernel (sm_90a builds on H100/H200) would run.
    kFLAG_NO_WGMMA = 16,
    //! Compute the canonical key of every rescored candidate and every fallback column, without the fast
    //! fp64 filter in front of it (tests: the lists must not change; slower).
    kFLAG_CANONICAL_KEYS = 32,
};

//! Which candidate kernel a call ran (workspace counter [2]).
enum CandidateKernel : int32_t
{
    kCANDIDATES_NONE = 0,     //!< k_eff = 1 or exact-only: no candidate pass
    kCANDIDATES_GENERIC = 1,  //!< mma.sync, rows and columns streamed (any D, any c)
    kCANDIDATES_RESIDENT = 2, //!< mma.sync, the block's rows resident in shared memory (D <= 256, c <= 64)
    kCANDIDATES_WGMMA = 3,    //!< wgmma (sm_90a), the block's rows in registers (D <= 256, c <= 64)
};

//! Status codes: 0 success, negative = invalid arguments (nothing was launched), positive = a cudaError_t.
enum ReciprocalNeighborsStatus : int32_t
{
    kSTATUS_SUCCESS = 0,
    kSTATUS_BAD_SHAPE = -1,
    kSTATUS_BAD_K = -2,
    kSTATUS_BAD_TYPE = -3,
    kSTATUS_WORKSPACE_TOO_SMALL = -4,
    kSTATUS_NULL_POINTER = -5,
    kSTATUS_BAD_CANDIDATES = -6,
};

//! The sizes the kernels run with (a pure function of the arguments, so it can be shown and tested).
struct ReciprocalNeighborsPlan
{
    int32_t batch{};
    int32_t rows{};
    int32_t dim{};
    int32_t paddedDim{};  //!< D rounded up to a multiple of 64 (fp16 candidate operand row length)
    int32_t k{};
    int32_t kEff{};       //!< min(k, N)
    int32_t candidates{}; //!< c: approximate candidates kept per row and column split (multiple of 32)
    int32_t splits{};     //!< S: column ranges scanned by separate blocks (more blocks for small N)
    double errorBound{};  //!< proven bound on |approximate - exact| cosine of the candidate pass
    size_t workspaceBytes{};
};

//! Plan for the given sizes. candidates = 0 picks the default c; a smaller workspaceLimit lowers S to fit.
//! Returns a status (kSTATUS_SUCCESS or a negative code).
int32_t planReciprocalNeighbors(int32_t batch, int32_t rows, int32_t dim, int32_t k, int32_t candidates,
    size_t workspaceLimit, ReciprocalNeighborsPlan* plan);

//! What the launches need to know about one device: filled once per device and process by
//! prepareReciprocalNeighborsDevice(), never changed afterwards.
struct ReciprocalNeighborsDevice
{
    int32_t device{-1};   //!< the CUDA device ordinal
    int32_t smCount{};    //!< cudaDevAttrMultiProcessorCount (grid sizes of the fallback and validity kernels)
    int32_t smemOptin{};  //!< cudaDevAttrMaxSharedMemoryPerBlockOptin (which candidate kernel and tile fit)
    int32_t ccMajor{};    //!< compute capability (the sm_90a wgmma kernel runs on 9.0 only)
    int32_t ccMinor{};
};

//! The current device's entry of a per-process table (one cudaGetDevice). The first call for a device queries
//! its attributes and raises the kernels' dynamic shared-memory limits to the device's maximum
//! (cudaDeviceGetAttribute, cudaFuncGetAttributes, cudaFuncSetAttribute); every later call only reads the
//! table. Thread-safe; a failure is not remembered (the next call tries again). Status as reciprocalNeighbors().
int32_t prepareReciprocalNeighborsDevice(ReciprocalNeighborsDevice const** device);

//! Workspace bytes needed for these sizes (0 for invalid arguments). Enough for any smaller B, N or D
//! with the same k: a smaller problem given this workspace lowers its column splits to fit.
size_t reciprocalNeighborsWorkspaceSize(int32_t batch, int32_t rows, int32_t dim, int32_t k, int32_t candidates = 0);

//! Enqueue the whole step on `stream`. features [B, N, D] (fp32 or fp16, contiguous, device);
//! neighborIndex / neighborValid int32 [B, N, min(k, N)] (device). Never allocates or synchronises.
//! `device`: the current device's prepareReciprocalNeighborsDevice() entry; nullptr looks it up (one
//! cudaGetDevice, and on a device's first use the preparation). With a prepared device the call is stream
//! work only (two cudaMemsetAsync, the kernel launches, cudaGetLastError), so it can be captured in a CUDA graph.
//! The first 16 bytes of the workspace hold int32 counters after the call: [0] rows that took the exact
//! fallback scan, [1] candidate scores that broke the error bound (0 expected; such rows also fall back),
//! [2] the candidate kernel that ran (CandidateKernel).
int32_t reciprocalNeighbors(void const* features, FeatureType type, int32_t batch, int32_t rows, int32_t dim,
    int32_t k, int32_t* neighborIndex, int32_t* neighborValid, void* workspace, size_t workspaceBytes,
    cudaStream_t stream, int32_t candidates = 0, int32_t flags = kFLAG_NONE,
    ReciprocalNeighborsDevice const* device = nullptr);

//! A one-line description of a status code.
char const* reciprocalNeighborsStatusString(int32_t status);

} // namespace nformer

#endif // NFORMER_RECIPROCAL_NEIGHBORS_KERNELS_H
