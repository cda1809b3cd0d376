/*
 * The wgmma candidate pass (reciprocalNeighborsWgmma.cu), built only for sm_90a (H100, H200, GH200):
 * NFORMER_HAVE_WGMMA is 1 where the build compiled it (plugins/CMakeLists.txt, when 90 is among the
 * CUDA architectures). Internal to the kernels library; the contract of its outputs is the one of the
 * other candidate kernels (see reciprocalNeighborsKernels.cu, "2. candidates").
 */
#ifndef NFORMER_RECIPROCAL_NEIGHBORS_WGMMA_H
#define NFORMER_RECIPROCAL_NEIGHBORS_WGMMA_H

#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstddef>

#ifndef NFORMER_HAVE_WGMMA
#define NFORMER_HAVE_WGMMA 0
#endif

namespace nformer
{

//! Largest c (candidates per row and split) and padded feature size the wgmma candidate kernel takes.
constexpr int kWgmmaMaxCandidates = 64;
constexpr int kWgmmaMaxPaddedDim = 256;

//! Dynamic shared memory of the wgmma candidate kernel for this padded feature size (a multiple of 64).
size_t wgmmaCandidateSmemBytes(int paddedDim);

//! Once per compute capability 9.0 device, before any launch there (the kernels library's device table):
//! raise the wgmma kernels' dynamic shared-memory limit to the device's opt-in maximum.
cudaError_t prepareWgmmaCandidates(int smemOptin);

//! Launch the candidate pass (the device was prepared): y [batch, rows, paddedDim] fp16, 128-row blocks x `splits` column ranges.
//! Outputs per (row, split): c candidate columns (-1 = empty), their approximate cosines, the threshold.
cudaError_t launchWgmmaCandidates(__half const* y, int batch, int rows, int paddedDim, int splits, int c,
    int* candIdx, float* candScore, float* candThresh, cudaStream_t stream);

} // namespace nformer

#endif // NFORMER_RECIPROCAL_NEIGHBORS_WGMMA_H
