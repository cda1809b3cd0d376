/*
 * The candidate pass on Hopper's warpgroup tensor-core instructions (wgmma, sm_90a only).
 *
 * Same contract as the other candidate kernels (reciprocalNeighborsKernels.cu, "2. candidates"): for each
 * row and column split, the c best approximate cosines s~ = (y_i . y_j) / 2^16, y = fp16(256 x / ||x||),
 * accumulated in fp32, plus the threshold T that every column not kept scored at most (-inf when every
 * column of the split was kept). The error bound of the fp16 pass is the same (fp16 operands, fp32
 * accumulation of k16 products per instruction), and the rescore checks it on every candidate it scores.
 *
 * Layout (one block = 128 rows x one column split, 256 threads = 2 warpgroups):
 *   - A (the block's rows) lives in registers for the whole sweep: warp w holds rows 16w..16w+15 as
 *     wgmma's register fragments (the layout of mma.sync m16n8k16's A), all D / 16 k-steps of them;
 *   - B (64 columns x D) streams through three shared-memory stages by cp.async, stored K-major with the
 *     128-byte swizzle (8 K-chunks of 16 bytes per 128-byte row segment, chunk j of row n at j ^ (n & 7));
 *   - per tile, each warpgroup issues D / 16 wgmma.m64n64k16 back to back, waits for them and filters the
 *     scores; the only block-wide barriers are the two per tile that guard the stages;
 *   - each warp owns its 16 rows' candidate buffers (128 entries each): a score above the row's threshold
 *     is appended; a buffer that would overflow is cut back to between 3c/4 and c of its best entries
 *     (a warp-wide bisection of the score keys), and the threshold rises to the cut. Everything dropped
 *     scored <= the final threshold; the lists may hold fewer than c entries, which the rescore allows.
 */
#include "reciprocalNeighborsDevice.cuh"
#include "reciprocalNeighborsWgmma.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace nformer
{
namespace
{

constexpr int kWThreads = 256;    // 2 warpgroups
constexpr int kWBM = 128;         // rows per block
constexpr int kWBN = 64;          // columns per tile (wgmma N)
constexpr int kWStages = 3;       // B stages
constexpr int kWCap = 128;        // per-row candidate buffer; c + kWBN <= kWCap
constexpr int kChunkBytes = kWBN * 128; // one 64-element K chunk of a B tile: 64 rows x 128 bytes
constexpr unsigned kFull = 0xffffffffu;

static_assert(kWgmmaMaxCandidates + kWBN <= kWCap, "a tile's arrivals must fit after a cut");

constexpr size_t stageBytes(int paddedDim)
{
    return static_cast<size_t>(paddedDim / 64) * kChunkBytes;
}

// ---------------------------------------------------------------- wgmma helpers

//! Shared-memory matrix descriptor of a K-major operand with the 128-byte swizzle: start address,
//! leading byte offset 16 (unused by swizzled K-major layouts), stride byte offset 1024 (between
//! 8-row groups), layout type 1 (128B swizzle). Addresses are encoded >> 4.
__device__ __forceinline__ uint64_t swizzle128Descriptor(uint32_t smemAddress)
{
    return static_cast<uint64_t>((smemAddress & 0x3FFFF) >> 4) | (static_cast<uint64_t>(16 >> 4) << 16)
        | (static_cast<uint64_t>(1024 >> 4) << 32) | (static_cast<uint64_t>(1) << 62);
}

__device__ __forceinline__ void wgmmaFence()
{
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}

__device__ __forceinline__ void wgmmaCommit()
{
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}

template <int N>
__device__ __forceinline__ void wgmmaWait()
{
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

//! Orders this thread's completed cp.async writes (generic proxy) before the tensor cores' reads (async proxy).
__device__ __forceinline__ void fenceProxyAsyncShared()
{
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

//! Keeps the compiler from moving accesses of the accumulators across the asynchronous wgmma.
__device__ __forceinline__ void fenceAccumulators(float (&d)[32])
{
#pragma unroll
    for (int i = 0; i < 32; ++i)
    {
        asm volatile("" : "+f"(d[i])::"memory");
    }
}

//! D (64 x 64, fp32) = A (64 x 16, fp16, registers) * B (16 x 64, fp16, shared memory) + (ScaleD ? D : 0).
template <int ScaleD>
__device__ __forceinline__ void wgmmaM64N64K16(float (&d)[32], uint32_t const (&a)[4], uint64_t descB)
{
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "{%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(descB), "r"(ScaleD));
}

// ---------------------------------------------------------------- candidate buffers

//! Cut a row's buffer of n > c entries back to at most c of its best: bisect the order-preserving score
//! keys for a cut T with c - c/4 <= #(key > T) <= c (fewer only where ties straddle every such T), keep
//! the entries above T, and raise the row's threshold to T's score, so every dropped entry scored <= the
//! threshold. A handful of warp reductions: an exact c-th-largest select (32 rounds) made the cuts of the
//! first tiles of every split dominate the pass at N ~ 20k. Called by one whole warp.
__device__ __noinline__ void cutToBest(unsigned long long* rowBuf, int n, int c, int lane, int* count, float* threshold)
{
    unsigned long long e[kWCap / 32];
    unsigned key[kWCap / 32];
    unsigned lowLocal = 0xffffffffu;
    unsigned highLocal = 0u;
#pragma unroll
    for (int q = 0; q < kWCap / 32; ++q)
    {
        int const i = lane + 32 * q;
        e[q] = i < n ? rowBuf[i] : 0ull; // key 0 ranks below every stored score and is never kept
        key[q] = static_cast<unsigned>(e[q] >> 32);
        if (i < n)
        {
            lowLocal = min(lowLocal, key[q]);
            highLocal = max(highLocal, key[q]);
        }
    }
    auto countAbove = [&](unsigned t) {
        unsigned local = 0;
#pragma unroll
        for (int q = 0; q < kWCap / 32; ++q)
        {
            local += key[q] > t ? 1u : 0u;
        }
        return __reduce_add_sync(kFull, local);
    };
    unsigned lo = __reduce_min_sync(kFull, lowLocal); // #(key > lo) may exceed c
    unsigned hi = __reduce_max_sync(kFull, highLocal); // #(key > hi) = 0 <= c
    unsigned const want = static_cast<unsigned>(c - c / 4);
    unsigned cut = lo;
    if (countAbove(lo) > static_cast<unsigned>(c))
    {
        while (hi - lo > 1u) // invariant: #(key > lo) > c >= #(key > hi)
        {
            unsigned const mid = lo + (hi - lo) / 2u;
            unsigned const above = countAbove(mid);
            if (above > static_cast<unsigned>(c))
            {
                lo = mid;
            }
            else
            {
                hi = mid;
                if (above >= want)
                {
                    break;
                }
            }
        }
        cut = hi;
    }
    __syncwarp(); // every lane has read the buffer before any lane rewrites it
    unsigned const lower = (1u << lane) - 1u;
    int written = 0;
#pragma unroll
    for (int q = 0; q < kWCap / 32; ++q)
    {
        bool const keep = key[q] > cut;
        unsigned const keepMask = __ballot_sync(kFull, keep);
        if (keep)
        {
            rowBuf[written + __popc(keepMask & lower)] = e[q];
        }
        written += __popc(keepMask);
    }
    if (lane == 0)
    {
        *count = written;
        *threshold = entryScore(static_cast<unsigned long long>(cut) << 32);
    }
    __syncwarp();
}

//! Append the scores of one row held by a quad of lanes (16 per lane: acc[4j + half*2 + e]) that beat
//! the threshold, at slots reserved by a prefix sum over the quad. The caller guarantees room.
__device__ __forceinline__ void appendRow(float const (&acc)[32], int half, float threshold, int col0, int quadLane,
    unsigned long long* rowBuf, int* count)
{
    int mine = 0;
#pragma unroll
    for (int j = 0; j < kWBN / 8; ++j)
    {
        mine += (acc[4 * j + 2 * half] > threshold ? 1 : 0) + (acc[4 * j + 2 * half + 1] > threshold ? 1 : 0);
    }
    int inclusive = mine;
    int v = __shfl_up_sync(kFull, inclusive, 1, 4);
    inclusive += quadLane >= 1 ? v : 0;
    v = __shfl_up_sync(kFull, inclusive, 2, 4);
    inclusive += quadLane >= 2 ? v : 0;
    int const total = __shfl_sync(kFull, inclusive, 3, 4);
    int const base = *count;
    int pos = base + inclusive - mine;
#pragma unroll
    for (int j = 0; j < kWBN / 8; ++j)
    {
#pragma unroll
        for (int e = 0; e < 2; ++e)
        {
            float const s = acc[4 * j + 2 * half + e];
            if (s > threshold)
            {
                rowBuf[pos++] = packEntry(s, col0 + 8 * j + 2 * quadLane + e);
            }
        }
    }
    __syncwarp(); // the quad has read *count
    if (quadLane == 0 && total > 0)
    {
        *count = base + total;
    }
    __syncwarp();
}

// ---------------------------------------------------------------- the kernel

template <int KSTEPS>
__global__ void __launch_bounds__(kWThreads, 1) candidateWgmmaKernel(__half const* __restrict__ y, int rows,
    int splits, int c, int* __restrict__ candIdx, float* __restrict__ candScore, float* __restrict__ candThresh)
{
    constexpr int kPaddedDim = KSTEPS * 16;
    constexpr int kChunks = kPaddedDim / 64;
    constexpr int kStage = kChunks * kChunkBytes;
    constexpr int kUnitsPerThread = kWBN * kChunks * 8 / kWThreads; // 16-byte units of one B tile

    extern __shared__ unsigned char smemRaw[];
    // the 128-byte swizzle repeats every 1024 bytes: stage bases must be 1024-byte aligned
    uint32_t const rawAddress = static_cast<uint32_t>(__cvta_generic_to_shared(smemRaw));
    unsigned char* const smem = smemRaw + ((1024u - (rawAddress & 1023u)) & 1023u);
    uint32_t const stagesAddress = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
    auto* const buf = reinterpret_cast<unsigned long long*>(smem + kWStages * kStage); // [kWBM][kWCap]
    int* const count = reinterpret_cast<int*>(buf + kWBM * kWCap);                     // [kWBM]
    float* const thrShared = reinterpret_cast<float*>(count + kWBM);                   // [kWBM], scaled units

    int const tid = threadIdx.x;
    int const lane = tid & 31;
    int const warp = tid >> 5;
    int const quadRow = lane >> 2;
    int const quadLane = lane & 3;
    int const batch = blockIdx.z;
    int const split = blockIdx.y;
    int const row0 = blockIdx.x * kWBM;
    __half const* const yb = y + static_cast<size_t>(batch) * rows * kPaddedDim;

    int const tiles = (rows + kWBN - 1) / kWBN;
    int const tBegin = static_cast<int>(static_cast<int64_t>(split) * tiles / splits);
    int const tEnd = static_cast<int>(static_cast<int64_t>(split + 1) * tiles / splits);
    int const tileCount = tEnd - tBegin;

    for (int r = tid; r < kWBM; r += kWThreads)
    {
        count[r] = 0;
        thrShared[r] = -INFINITY;
    }

    auto issueLoad = [&](int q) {
        if (q < tileCount)
        {
            int const col0 = (tBegin + q) * kWBN;
            unsigned char* const dst = smem + (q % kWStages) * kStage;
#pragma unroll
            for (int i = 0; i < kUnitsPerThread; ++i)
            {
                int const unit = tid + i * kWThreads; // consecutive threads: consecutive 16 bytes of a row
                int const n = unit / (kChunks * 8);
                int const u = unit - n * (kChunks * 8);
                int const chunk = u >> 3;
                int const j = u & 7;
                int const g = col0 + n;
                __half const* src = yb + static_cast<size_t>(min(g, rows - 1)) * kPaddedDim + u * 8;
                cpAsync16(dst + chunk * kChunkBytes + n * 128 + ((j ^ (n & 7)) << 4), src, g < rows ? 16 : 0);
            }
        }
        cpAsyncCommit(); // an empty group past the end keeps the wait arithmetic uniform
    };
    for (int q = 0; q < kWStages; ++q)
    {
        issueLoad(q);
    }

    // A: this warp's 16 rows as register fragments (row quadRow and quadRow + 8; columns 2 quadLane + {0, 1}
    // and + 8 of each k-step). Rows past N read as zeros; their scores are masked below anyway.
    int const localRow0 = warp * 16 + quadRow;
    int const localRow1 = localRow0 + 8;
    int const globalRow0 = row0 + localRow0;
    int const globalRow1 = row0 + localRow1;
    uint32_t a[KSTEPS][4];
    {
        uint32_t const* p0 = reinterpret_cast<uint32_t const*>(yb + static_cast<size_t>(min(globalRow0, rows - 1)) * kPaddedDim);
        uint32_t const* p1 = reinterpret_cast<uint32_t const*>(yb + static_cast<size_t>(min(globalRow1, rows - 1)) * kPaddedDim);
        bool const ok0 = globalRow0 < rows;
        bool const ok1 = globalRow1 < rows;
#pragma unroll
        for (int s = 0; s < KSTEPS; ++s)
        {
            int const w = s * 8 + quadLane; // 32-bit word of elements 16 s + 2 quadLane, + 1
            a[s][0] = ok0 ? __ldg(p0 + w) : 0u;
            a[s][1] = ok1 ? __ldg(p1 + w) : 0u;
            a[s][2] = ok0 ? __ldg(p0 + w + 4) : 0u;
            a[s][3] = ok1 ? __ldg(p1 + w + 4) : 0u;
        }
    }
    float thr0 = -INFINITY; // this lane's copies of its two rows' thresholds (scaled units)
    float thr1 = -INFINITY;
    unsigned long long* const rowBuf0 = buf + localRow0 * kWCap;
    unsigned long long* const rowBuf1 = buf + localRow1 * kWCap;
    __syncthreads(); // counts and thresholds initialised

    auto issueMma = [&](int q, float (&acc)[32]) {
        uint32_t const base = stagesAddress + (q % kWStages) * kStage;
        wgmmaFence(); // the accumulators were read (and A written) by ordinary instructions before
#pragma unroll
        for (int s = 0; s < KSTEPS; ++s)
        {
            uint64_t const desc = swizzle128Descriptor(base + (s >> 2) * kChunkBytes + (s & 3) * 32);
            if (s == 0)
            {
                wgmmaM64N64K16<0>(acc, a[s], desc);
            }
            else
            {
                wgmmaM64N64K16<1>(acc, a[s], desc);
            }
        }
        wgmmaCommit();
    };

    auto filterTile = [&](int q, float (&acc)[32]) {
        int const col0 = (tBegin + q) * kWBN;
        bool const interior = col0 + kWBN <= rows && row0 + kWBM <= rows && (col0 + kWBN <= row0 || col0 >= row0 + kWBM);
        if (!interior) // columns or rows past N, or the diagonal: never candidates
        {
#pragma unroll
            for (int j = 0; j < kWBN / 8; ++j)
            {
#pragma unroll
                for (int e = 0; e < 2; ++e)
                {
                    int const col = col0 + 8 * j + 2 * quadLane + e;
                    if (globalRow0 >= rows || col >= rows || col == globalRow0)
                    {
                        acc[4 * j + e] = -INFINITY;
                    }
                    if (globalRow1 >= rows || col >= rows || col == globalRow1)
                    {
                        acc[4 * j + 2 + e] = -INFINITY;
                    }
                }
            }
        }
        float m0 = -INFINITY;
        float m1 = -INFINITY;
#pragma unroll
        for (int j = 0; j < kWBN / 8; ++j)
        {
            m0 = fmaxf(m0, fmaxf(acc[4 * j], acc[4 * j + 1]));
            m1 = fmaxf(m1, fmaxf(acc[4 * j + 2], acc[4 * j + 3]));
        }
        if (!__any_sync(kFull, m0 > thr0 || m1 > thr1))
        {
            return; // the common case once the thresholds have risen
        }
        int n0 = 0;
        int n1 = 0;
#pragma unroll
        for (int j = 0; j < kWBN / 8; ++j)
        {
            n0 += (acc[4 * j] > thr0 ? 1 : 0) + (acc[4 * j + 1] > thr0 ? 1 : 0);
            n1 += (acc[4 * j + 2] > thr1 ? 1 : 0) + (acc[4 * j + 3] > thr1 ? 1 : 0);
        }
        n0 += __shfl_xor_sync(kFull, n0, 1);
        n0 += __shfl_xor_sync(kFull, n0, 2);
        n1 += __shfl_xor_sync(kFull, n1, 1);
        n1 += __shfl_xor_sync(kFull, n1, 2);
        // Make room: a row whose buffer cannot take this tile's arrivals is cut back to at most c of its best.
        unsigned cut = __ballot_sync(kFull, quadLane == 0 && n0 > 0 && count[localRow0] + n0 > kWCap);
        while (cut != 0u)
        {
            int const r = warp * 16 + ((__ffs(cut) - 1) >> 2);
            cut &= cut - 1u;
            cutToBest(buf + r * kWCap, count[r], c, lane, &count[r], &thrShared[r]);
        }
        cut = __ballot_sync(kFull, quadLane == 0 && n1 > 0 && count[localRow1] + n1 > kWCap);
        while (cut != 0u)
        {
            int const r = warp * 16 + 8 + ((__ffs(cut) - 1) >> 2);
            cut &= cut - 1u;
            cutToBest(buf + r * kWCap, count[r], c, lane, &count[r], &thrShared[r]);
        }
        __syncwarp();
        thr0 = thrShared[localRow0]; // possibly raised by a cut: fewer arrivals, never more
        thr1 = thrShared[localRow1];
        appendRow(acc, 0, thr0, col0, quadLane, rowBuf0, &count[localRow0]);
        appendRow(acc, 1, thr1, col0, quadLane, rowBuf1, &count[localRow1]);
    };

    // Per tile: wait for its stage, run its D / 16 wgmma (issued back to back, one wait), filter the
    // scores, and refill the stage with the tile three ahead once both warpgroups are done with it.
    // (Overlapping the filter with the next tile's wgmma through two accumulator sets and a partial
    // wait made ptxas serialise every wgmma, C7514, so each tile waits for its own chain.)
    float acc[32];
    for (int q = 0; q < tileCount; ++q)
    {
        cpAsyncWait<kWStages - 1>(); // tile q's group (this thread's copies) landed
        fenceProxyAsyncShared();
        __syncthreads(); // ... every thread's copies of tile q
        fenceAccumulators(acc);
        issueMma(q, acc);
        wgmmaWait<0>();
        fenceAccumulators(acc);
        filterTile(q, acc);
        __syncthreads(); // both warpgroups are done reading tile q's stage
        issueLoad(q + kWStages);
    }
    cpAsyncWait<0>();
    __syncwarp();

    for (int rr = 0; rr < 16; ++rr)
    {
        int const r = warp * 16 + rr;
        int const g = row0 + r;
        if (g >= rows)
        {
            break;
        }
        if (count[r] > c)
        {
            cutToBest(buf + r * kWCap, count[r], c, lane, &count[r], &thrShared[r]);
        }
        int const n = count[r]; // <= c
        size_t const rowSplit = (static_cast<size_t>(batch) * rows + g) * splits + split;
        for (int p = lane; p < c; p += 32)
        {
            unsigned long long const e = p < n ? buf[r * kWCap + p] : 0ull;
            candIdx[rowSplit * c + p] = p < n ? entryColumn(e) : -1;
            candScore[rowSplit * c + p] = p < n ? entryScore(e) * kScoreUnscale : -INFINITY;
        }
        if (lane == 0)
        {
            candThresh[rowSplit] = thrShared[r] * kScoreUnscale; // -inf stays -inf: nothing was dropped
        }
    }
}

template <int KSTEPS>
cudaError_t launchFor(__half const* y, int batch, int rows, int splits, int c, int* candIdx, float* candScore,
    float* candThresh, cudaStream_t stream)
{
    // the shared-memory limit was raised once for this device (prepareWgmmaCandidates)
    size_t const smemBytes = wgmmaCandidateSmemBytes(KSTEPS * 16);
    dim3 grid((rows + kWBM - 1) / kWBM, splits, batch);
    candidateWgmmaKernel<KSTEPS><<<grid, kWThreads, smemBytes, stream>>>(
        y, rows, splits, c, candIdx, candScore, candThresh);
    return cudaGetLastError();
}

} // namespace

size_t wgmmaCandidateSmemBytes(int paddedDim)
{
    return 1024 + kWStages * stageBytes(paddedDim) + static_cast<size_t>(kWBM) * kWCap * sizeof(unsigned long long)
        + static_cast<size_t>(kWBM) * (sizeof(int) + sizeof(float));
}

cudaError_t prepareWgmmaCandidates(int smemOptin)
{
    cudaError_t err = cudaSuccess;
    if ((err = allowMaxDynamicSharedMemory(candidateWgmmaKernel<4>, smemOptin)) != cudaSuccess
        || (err = allowMaxDynamicSharedMemory(candidateWgmmaKernel<8>, smemOptin)) != cudaSuccess
        || (err = allowMaxDynamicSharedMemory(candidateWgmmaKernel<12>, smemOptin)) != cudaSuccess
        || (err = allowMaxDynamicSharedMemory(candidateWgmmaKernel<16>, smemOptin)) != cudaSuccess)
    {
        return err;
    }
    return cudaSuccess;
}

cudaError_t launchWgmmaCandidates(__half const* y, int batch, int rows, int paddedDim, int splits, int c,
    int* candIdx, float* candScore, float* candThresh, cudaStream_t stream)
{
    if (c > kWgmmaMaxCandidates || c % 32 != 0)
    {
        return cudaErrorInvalidValue;
    }
    switch (paddedDim)
    {
    case 64: return launchFor<4>(y, batch, rows, splits, c, candIdx, candScore, candThresh, stream);
    case 128: return launchFor<8>(y, batch, rows, splits, c, candIdx, candScore, candThresh, stream);
    case 192: return launchFor<12>(y, batch, rows, splits, c, candIdx, candScore, candThresh, stream);
    case 256: return launchFor<16>(y, batch, rows, splits, c, candIdx, candScore, candThresh, stream);
    default: return cudaErrorInvalidValue;
    }
}

} // namespace nformer
