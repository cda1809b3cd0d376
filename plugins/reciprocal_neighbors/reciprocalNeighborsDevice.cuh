/*
 * Device helpers shared by the candidate kernels of reciprocalNeighborsKernels.cu (mma.sync, any sm_80+)
 * and reciprocalNeighborsWgmma.cu (wgmma, sm_90a): the candidate operand's scaling, cp.async, and the
 * 64-bit (score, column) entries of the per-row candidate buffers; on the host, the shared-memory limit
 * that the device table (prepareReciprocalNeighborsDevice) raises once per device. Internal to the kernels library.
 */
#ifndef NFORMER_RECIPROCAL_NEIGHBORS_DEVICE_CUH
#define NFORMER_RECIPROCAL_NEIGHBORS_DEVICE_CUH

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace nformer
{
namespace
{

constexpr float kYScale = 256.0f; // y = 256 x / n keeps the fp16 operand far from subnormals
constexpr float kScoreUnscale = 1.0f / (kYScale * kYScale);

__device__ __forceinline__ void cpAsync16(void* smemPtr, void const* globalPtr, int srcBytes)
{
    unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smemPtr));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(globalPtr), "r"(srcBytes));
}

__device__ __forceinline__ void cpAsyncCommit()
{
    asm volatile("cp.async.commit_group;\n" ::);
}

template <int N>
__device__ __forceinline__ void cpAsyncWait()
{
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

//! Buffer entries pack (score, column) in 64 bits so that unsigned order = score order: the float's
//! bits mapped to an order-preserving unsigned key in the high word, the column in the low word.
__device__ __forceinline__ unsigned long long packEntry(float score, int column)
{
    unsigned u = __float_as_uint(score);
    unsigned k = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return (static_cast<unsigned long long>(k) << 32) | static_cast<unsigned>(column);
}

__device__ __forceinline__ float entryScore(unsigned long long e)
{
    unsigned k = static_cast<unsigned>(e >> 32);
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

__device__ __forceinline__ int entryColumn(unsigned long long e)
{
    return static_cast<int>(static_cast<unsigned>(e & 0xffffffffull));
}

//! Host side, once per device (the kernels library's device table): let `kernel` take as much dynamic shared
//! memory as the device allows a block (its opt-in maximum less the kernel's static shared memory), so that
//! no launch needs cudaFuncSetAttribute afterwards, whatever its size.
template <typename Kernel>
cudaError_t allowMaxDynamicSharedMemory(Kernel kernel, int smemOptin)
{
    cudaFuncAttributes attributes{};
    cudaError_t err = cudaFuncGetAttributes(&attributes, kernel);
    if (err != cudaSuccess)
    {
        return err;
    }
    int const room = smemOptin - static_cast<int>(attributes.sharedSizeBytes);
    return room > 0 ? cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, room) : cudaSuccess;
}

} // namespace
} // namespace nformer

#endif // NFORMER_RECIPROCAL_NEIGHBORS_DEVICE_CUH
