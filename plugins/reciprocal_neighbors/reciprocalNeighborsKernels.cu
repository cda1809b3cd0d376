/*
 * CUDA kernels of the reciprocal top-k neighbour step (see reciprocalNeighborsKernels.h and README.md).
 *
 * The key is export/contract/neighbor_key.py's canonical key: key[i, j] = dot(x_i, x_j) / n_j, dot the exact
 * fp64 products summed by a fixed pairwise double-double tree over Dp = next power of two >= D slots,
 * n = max(sqrt(dot(x, x)), 1e-12) (warpCanonicalDot; prepare stores the canonical n). One value for a pair of
 * rows wherever they sit and whatever the call's shape, so the lists equal every other implementation's.
 *
 * Exactness argument, in the cosine units a = (x_i . x_j) / (n_i n_j):
 *   - the candidate pass computes s~_ij from y = fp16(256 x / n) with fp32 accumulation, and
 *     |s~_ij - a_ij| <= E (errorBound(), about 1.1e-3 for D = 256: fp16 rounding of both operands plus a
 *     pessimistic tensor-core accumulation term);
 *   - each row keeps, per column split, the c best s~ seen; every column it never kept or later evicted
 *     scored <= the list's final minimum T_s, so a non-candidate j has a_ij <= T + E, T = max_s T_s;
 *   - the rescore computes a fast fp64 key F (|F - key| <= delta_i = (D + 8) 2^-53 n_i, the contract's
 *     key_error_bound) of the candidates that can still matter and picks the best k_eff-1 by F; where two
 *     picks, or the last pick and the next candidate, lie within 2 delta_i, the canonical keys of the
 *     candidates near the top decide instead (duplicates, near-duplicates). The row is accepted only when
 *     the last pick's key K > n_i (T + E) + 1e-12 n_i (K >= F - delta_i): then every non-candidate's key
 *     is strictly below K (the canonical key is within ~2^-52 relative of the exact value, far inside
 *     the slack) and the picks are the canonical lists;
 *   - rows that fail go to a scan of all N columns: fast keys skip the columns that cannot enter the
 *     running list, canonical keys rank the rest.
 * Exact duplicates have bitwise equal canonical keys, so ties go to the lower index as in the contract.
 */
#include "reciprocalNeighborsKernels.h"
#include "canonicalDot.cuh"
#include "reciprocalNeighborsDevice.cuh"
#include "reciprocalNeighborsWgmma.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <mutex>

namespace nformer
{
namespace
{

constexpr double kNormEps = 1e-12; // export/reciprocal_neighbors.py NORM_EPS
constexpr int kThreads = 256;      // every kernel: 8 warps
constexpr int kWarps = kThreads / 32;
constexpr int kBN = 64;            // columns per tile of the candidate pass
constexpr int kBK = 32;            // K chunk (fp16 elements) per pipeline stage
constexpr int kLds = kBK + 8;      // smem row stride (80 bytes: ldmatrix rows hit distinct banks)
constexpr int kCStride = kBN + 4;  // smem stride of the fp32 score tile
constexpr int kMaxSplits = 4;
constexpr int kTargetBlocks = 512; // blocks of 128 rows x split aimed at by the column splitting
constexpr int kMaxUnion = 256;     // S * c cap (rescore keeps the union in shared memory)
constexpr int kMaxCandidates = 256;
constexpr int kMaxDim = 65536;
constexpr int kMaxBatch = 65535;   // gridDim.z of the candidate pass
constexpr int kCounterBytes = 256; // int32 counters at the start of the workspace
constexpr size_t kAlign = 256;

size_t alignUp(size_t v, size_t a)
{
    return (v + a - 1) / a * a;
}

int roundUp32(int v)
{
    return (v + 31) / 32 * 32;
}

int roundUp64(int v)
{
    return (v + 63) / 64 * 64;
}

// ---------------------------------------------------------------- device helpers

template <typename T>
__device__ __forceinline__ double toDouble(T v);

template <>
__device__ __forceinline__ double toDouble<float>(float v)
{
    return static_cast<double>(v);
}

template <>
__device__ __forceinline__ double toDouble<__half>(__half v)
{
    return static_cast<double>(__half2float(v));
}

//! Ranking order of the reference: larger key first, equal keys by lower index.
__device__ __forceinline__ bool ranksBefore(double ka, int ia, double kb, int ib)
{
    return ka > kb || (ka == kb && ia < ib);
}

__device__ __forceinline__ double warpSum(double v)
{
#pragma unroll
    for (int off = 16; off > 0; off >>= 1)
    {
        v += __shfl_xor_sync(0xffffffffu, v, off);
    }
    return v;
}

//! A fast fp64 dot product (the filter F in front of the canonical key, see warpCanonicalDot): lane l sums
//! t = l, l + 32, ... with fma, then a xor butterfly adds the 32 partial sums; every lane ends with the same
//! value. It is one fp64 summation order of the exact products, so |F / n_j - key[i, j]| <= keyErrorBound().
template <typename T>
__device__ __forceinline__ double warpFastDot(T const* __restrict__ a, T const* __restrict__ b, int dim, int lane)
{
    double acc = 0.0;
    for (int t = lane; t < dim; t += 32)
    {
        acc = fma(toDouble(a[t]), toDouble(b[t]), acc);
    }
    return warpSum(acc);
}

using canonical::kNarrowTreeDim;
using canonical::kTreeCarryLevels;
static_assert(canonical::kTreeMaxDim >= kMaxDim, "the canonical dot's carry levels must cover kMaxDim");

//! __launch_bounds__ blocks per SM of the kernels that evaluate the canonical dot: 0 (no minimum, what the
//! kernels had) for D <= 256; 2 for wider rows, whose carry registers would otherwise take ~160 registers.
constexpr int minBlocksFor(int carry)
{
    return carry > 0 ? 2 : 0;
}

//! The canonical dot product (export/contract/neighbor_key.py: dot) of two rows, by a whole warp; every lane
//! returns the same value. canonical::laneNode runs the tree's levels w >= 32 in each lane (lane l owns the
//! slots l + 32 m); the levels w = 16 ... 1 (those with w < Dp) are shuffle-downs of (hi, lo), after which
//! lane 0 holds the root, and hi + lo (one rounded add) is the dot. kCarry: 0 for D <= 256, else
//! kTreeCarryLevels (canonicalDot.cuh).
template <int kCarry, typename T>
__device__ __forceinline__ double warpCanonicalDot(T const* __restrict__ a, T const* __restrict__ b, int dim, int lane)
{
    canonical::DDCombine const combine;
    canonical::DDNode node = canonical::laneNode<kCarry>(
        lane, dim, [&](int d) { return __dmul_rn(toDouble(a[d]), toDouble(b[d])); }, combine); // exact products
    int const dp = 1 << canonical::treeLevels(dim);
#pragma unroll
    for (int w = 16; w >= 1; w >>= 1)
    {
        if (w < dp)
        {
            canonical::DDNode const other{
                __shfl_down_sync(0xffffffffu, node.hi, w), __shfl_down_sync(0xffffffffu, node.lo, w)};
            node = combine(node, other);
        }
    }
    return __shfl_sync(0xffffffffu, __dadd_rn(node.hi, node.lo), 0);
}

//! delta_i of export/contract/neighbor_key.py key_error_bound: |F - key[i, j]| <= delta_i for every fast key
//! F = warpFastDot(x_i, x_j) / n_j of row i. From n_i (>= ||x_i||; the bound grows with the length, so the
//! clamped norm is a safe stand-in for it).
__device__ __forceinline__ double keyErrorBound(int dim, double ni)
{
    return static_cast<double>(dim + 8) * 0x1p-53 * 1.0001 * ni + 0x1p-1000;
}

//! Warp-wide best (key, index, slot) by ranksBefore; every lane ends with the same answer.
__device__ __forceinline__ void warpBest(double& key, int& index, int& slot)
{
#pragma unroll
    for (int off = 16; off > 0; off >>= 1)
    {
        double ok = __shfl_xor_sync(0xffffffffu, key, off);
        int oi = __shfl_xor_sync(0xffffffffu, index, off);
        int os = __shfl_xor_sync(0xffffffffu, slot, off);
        if (ranksBefore(ok, oi, key, index) || (ok == key && oi == index && os < slot))
        {
            key = ok;
            index = oi;
            slot = os;
        }
    }
}

//! Smallest score of a candidate list of c entries in shared memory and its slot (lowest slot on ties).
__device__ __forceinline__ void warpArgMin(float const* scores, int c, int lane, float& minValue, int& minSlot)
{
    float best = INFINITY;
    int slot = INT_MAX;
    for (int q = lane; q < c; q += 32)
    {
        float v = scores[q];
        if (v < best)
        {
            best = v;
            slot = q;
        }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1)
    {
        float ov = __shfl_xor_sync(0xffffffffu, best, off);
        int os = __shfl_xor_sync(0xffffffffu, slot, off);
        if (ov < best || (ov == best && os < slot))
        {
            best = ov;
            slot = os;
        }
    }
    minValue = best;
    minSlot = slot;
}

__device__ __forceinline__ void ldmatrixX4(uint32_t (&r)[4], void const* smemPtr)
{
    unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smemPtr));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}

__device__ __forceinline__ void mmaF16(float (&d)[4], uint32_t const (&a)[4], uint32_t b0, uint32_t b1)
{
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ---------------------------------------------------------------- 1. prepare

//! One warp per row: the canonical norm n = max(sqrt(dot(x, x)), 1e-12) (the keys divide by it), and the
//! fp16 candidate operand y = 256 x / n (zero-padded).
template <typename T, int kCarry>
__global__ void __launch_bounds__(kThreads, minBlocksFor(kCarry)) prepareRowsKernel(
    T const* __restrict__ x, int64_t totalRows, int dim, int paddedDim, double* __restrict__ norms, __half* __restrict__ y)
{
    int64_t row = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (row >= totalRows)
    {
        return;
    }
    T const* xr = x + row * dim;
    double const n = fmax(__dsqrt_rn(warpCanonicalDot<kCarry>(xr, xr, dim, lane)), kNormEps);
    if (lane == 0)
    {
        norms[row] = n;
    }
    if (y != nullptr)
    {
        __half* yr = y + row * paddedDim;
        for (int t = lane; t < paddedDim; t += 32)
        {
            float v = t < dim ? static_cast<float>(toDouble(xr[t]) / n) * kYScale : 0.0f;
            yr[t] = __float2half_rn(v);
        }
    }
}

// ---------------------------------------------------------------- 2. candidates

__host__ __device__ constexpr size_t candidateStageBytes(int bm)
{
    return static_cast<size_t>(2 * (bm + kBN) * kLds) * sizeof(__half);
}

__host__ __device__ constexpr size_t candidateTileBytes(int bm)
{
    return static_cast<size_t>(bm * kCStride) * sizeof(float);
}

__host__ __device__ constexpr size_t candidateUnionBytes(int bm)
{
    return candidateStageBytes(bm) > candidateTileBytes(bm) ? candidateStageBytes(bm) : candidateTileBytes(bm);
}

size_t candidateSmemBytes(int bm, int c)
{
    return candidateUnionBytes(bm) + static_cast<size_t>(bm) * c * (sizeof(float) + sizeof(int)) + bm * sizeof(float);
}

//! Block = BM rows x one column split of one batch item. Streams 64-column tiles of y_rows . y_cols^T
//! (mma.sync m16n8k16, fp16 in, fp32 accumulate) and keeps each row's best c approximate scores.
//! Outputs per (row, split): c candidate indices (-1 = empty), their scores, and the final threshold
//! T (the list minimum; -inf while the list never filled, i.e. every column of the split was kept).
template <int BM, int WARPS_M>
__global__ void __launch_bounds__(kThreads) candidateKernel(__half const* __restrict__ y, int rows, int paddedDim,
    int splits, int c, int* __restrict__ candIdx, float* __restrict__ candScore, float* __restrict__ candThresh)
{
    constexpr int WARPS_N = kWarps / WARPS_M;
    constexpr int WM = BM / WARPS_M;
    constexpr int WN = kBN / WARPS_N;
    constexpr int MF = WM / 16;
    constexpr int NF = WN / 8;
    static_assert(WM % 16 == 0 && WN % 16 == 0, "warp tile must be a multiple of 16 x 16");

    extern __shared__ __align__(16) unsigned char smem[];
    __half* aStage = reinterpret_cast<__half*>(smem);   // [2][BM][kLds]
    __half* bStage = aStage + 2 * BM * kLds;            // [2][kBN][kLds]
    float* tile = reinterpret_cast<float*>(smem);       // [BM][kCStride], aliases the stages
    float* listScore = reinterpret_cast<float*>(smem + candidateUnionBytes(BM)); // [BM][c]
    int* listIdx = reinterpret_cast<int*>(listScore + BM * c);                   // [BM][c]
    float* listMin = reinterpret_cast<float*>(listIdx + BM * c);                 // [BM]

    int const tid = threadIdx.x;
    int const lane = tid & 31;
    int const warp = tid >> 5;
    int const wm = warp / WARPS_N;
    int const wn = warp % WARPS_N;
    int const batch = blockIdx.z;
    int const split = blockIdx.y;
    int const row0 = blockIdx.x * BM;
    __half const* yb = y + static_cast<size_t>(batch) * rows * paddedDim;

    for (int q = tid; q < BM * c; q += kThreads)
    {
        listScore[q] = -INFINITY;
        listIdx[q] = -1;
    }
    for (int q = tid; q < BM; q += kThreads)
    {
        listMin[q] = -INFINITY;
    }

    int const tiles = (rows + kBN - 1) / kBN;
    int const tBegin = static_cast<int>(static_cast<int64_t>(split) * tiles / splits);
    int const tEnd = static_cast<int>(static_cast<int64_t>(split + 1) * tiles / splits);
    int const nk = paddedDim / kBK;

    auto loadStage = [&](int stage, int col0, int kc) {
        for (int q = tid; q < BM * 4; q += kThreads)
        {
            int r = q >> 2;
            int ch = q & 3;
            int g = row0 + r;
            __half const* src = yb + static_cast<size_t>(min(g, rows - 1)) * paddedDim + kc * kBK + ch * 8;
            cpAsync16(aStage + (stage * BM + r) * kLds + ch * 8, src, g < rows ? 16 : 0);
        }
        for (int q = tid; q < kBN * 4; q += kThreads)
        {
            int r = q >> 2;
            int ch = q & 3;
            int g = col0 + r;
            __half const* src = yb + static_cast<size_t>(min(g, rows - 1)) * paddedDim + kc * kBK + ch * 8;
            cpAsync16(bStage + (stage * kBN + r) * kLds + ch * 8, src, g < rows ? 16 : 0);
        }
        cpAsyncCommit();
    };

    for (int t = tBegin; t < tEnd; ++t)
    {
        int const col0 = t * kBN;
        float acc[MF][NF][4];
#pragma unroll
        for (int mf = 0; mf < MF; ++mf)
#pragma unroll
            for (int nf = 0; nf < NF; ++nf)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    acc[mf][nf][e] = 0.0f;

        loadStage(0, col0, 0);
        for (int kc = 0; kc < nk; ++kc)
        {
            if (kc + 1 < nk)
            {
                loadStage((kc + 1) & 1, col0, kc + 1);
                cpAsyncWait<1>();
            }
            else
            {
                cpAsyncWait<0>();
            }
            __syncthreads();
            __half const* as = aStage + (kc & 1) * BM * kLds;
            __half const* bs = bStage + (kc & 1) * kBN * kLds;
#pragma unroll
            for (int k16 = 0; k16 < kBK; k16 += 16)
            {
                uint32_t a[MF][4];
                uint32_t b[NF][2];
#pragma unroll
                for (int mf = 0; mf < MF; ++mf)
                {
                    int r = wm * WM + mf * 16 + (lane & 15);
                    ldmatrixX4(a[mf], as + r * kLds + k16 + (lane >> 4) * 8);
                }
#pragma unroll
                for (int p = 0; p < NF / 2; ++p)
                {
                    uint32_t rr[4];
                    int n = wn * WN + p * 16 + (lane & 7) + ((lane >> 4) << 3);
                    ldmatrixX4(rr, bs + n * kLds + k16 + ((lane >> 3) & 1) * 8);
                    b[2 * p][0] = rr[0];
                    b[2 * p][1] = rr[1];
                    b[2 * p + 1][0] = rr[2];
                    b[2 * p + 1][1] = rr[3];
                }
#pragma unroll
                for (int mf = 0; mf < MF; ++mf)
#pragma unroll
                    for (int nf = 0; nf < NF; ++nf)
                        mmaF16(acc[mf][nf], a[mf], b[nf][0], b[nf][1]);
            }
            __syncthreads(); // the stage just read is refilled by the next iteration's prefetch
        }

        // Scores (unscaled back to cosine units: an exact power-of-two scaling) into the shared tile.
#pragma unroll
        for (int mf = 0; mf < MF; ++mf)
        {
#pragma unroll
            for (int nf = 0; nf < NF; ++nf)
            {
                int r = wm * WM + mf * 16 + (lane >> 2);
                int cc = wn * WN + nf * 8 + (lane & 3) * 2;
                tile[r * kCStride + cc] = acc[mf][nf][0] * kScoreUnscale;
                tile[r * kCStride + cc + 1] = acc[mf][nf][1] * kScoreUnscale;
                tile[(r + 8) * kCStride + cc] = acc[mf][nf][2] * kScoreUnscale;
                tile[(r + 8) * kCStride + cc + 1] = acc[mf][nf][3] * kScoreUnscale;
            }
        }
        __syncthreads();

        // Each warp owns rows warp, warp + 8, ...: only it touches their lists, so no block sync there.
        for (int r = warp; r < BM; r += kWarps)
        {
            int const g = row0 + r;
            if (g >= rows)
            {
                break;
            }
            int const c0 = col0 + lane;
            int const c1 = col0 + 32 + lane;
            float const s0 = tile[r * kCStride + lane];
            float const s1 = tile[r * kCStride + 32 + lane];
            float const th = listMin[r];
            unsigned m0 = __ballot_sync(0xffffffffu, c0 < rows && c0 != g && s0 > th);
            unsigned m1 = __ballot_sync(0xffffffffu, c1 < rows && c1 != g && s1 > th);
            if ((m0 | m1) == 0u)
            {
                continue;
            }
            float* ls = listScore + r * c;
            int* li = listIdx + r * c;
            float curMin;
            int minSlot;
            warpArgMin(ls, c, lane, curMin, minSlot);
            while ((m0 | m1) != 0u)
            {
                float v;
                int col;
                if (m0 != 0u)
                {
                    int src = __ffs(m0) - 1;
                    m0 &= m0 - 1u;
                    v = __shfl_sync(0xffffffffu, s0, src);
                    col = col0 + src;
                }
                else
                {
                    int src = __ffs(m1) - 1;
                    m1 &= m1 - 1u;
                    v = __shfl_sync(0xffffffffu, s1, src);
                    col = col0 + 32 + src;
                }
                if (v > curMin)
                {
                    __syncwarp(); // every lane's reads of the list (warpArgMin) precede the write
                    if (lane == 0)
                    {
                        ls[minSlot] = v;
                        li[minSlot] = col;
                    }
                    __syncwarp();
                    warpArgMin(ls, c, lane, curMin, minSlot);
                }
            }
            if (lane == 0)
            {
                listMin[r] = curMin;
            }
            __syncwarp();
        }
        __syncthreads(); // the tile aliases the stages that the next tile's loads overwrite
    }
    __syncthreads();

    for (int r = warp; r < BM; r += kWarps)
    {
        int const g = row0 + r;
        if (g >= rows)
        {
            break;
        }
        size_t const rowSplit = (static_cast<size_t>(batch) * rows + g) * splits + split;
        for (int q = lane; q < c; q += 32)
        {
            candIdx[rowSplit * c + q] = listIdx[r * c + q];
            candScore[rowSplit * c + q] = listScore[r * c + q];
        }
        if (lane == 0)
        {
            candThresh[rowSplit] = listMin[r];
        }
    }
}

// ---------------------------------------------------------------- 2b. candidates, resident rows (fast path)

// For D <= 256 and c <= 64 (k <= 33) on GPUs with >= 223 KB of shared memory per block (H100/H200):
// the block's 128 rows of y stay in shared memory for the whole column sweep, so only the column
// operand streams from L2 (three-stage cp.async pipeline running across tile boundaries), and the
// per-row lists are filled lazily: a column that beats the row's threshold is appended to a buffer of
// 128 entries; when an append would overflow it, the buffer is sorted and cut back to the best c, and
// the threshold becomes the c-th best score. Every dropped or rejected column scored <= the final
// threshold, which is what the certification needs; the lists are the same best-c sets as v1's.
constexpr int kRBM = 128;           // rows per block
constexpr int kRBK = 64;            // K chunk per pipeline stage
constexpr int kRLdb = kRBK + 8;     // 144-byte rows: ldmatrix conflict-free
constexpr int kRStages = 3;
constexpr int kRMaxDim = 256;
constexpr int kRCap = 128;          // per-row buffer (a power of two for the sort); c + 64 <= kRCap
constexpr int kRMaxCandidates = kRCap - kBN;

size_t residentSmemBytes(int paddedDim)
{
    return static_cast<size_t>(kRBM) * (paddedDim + 8) * sizeof(__half)
        + static_cast<size_t>(kRStages) * kBN * kRLdb * sizeof(__half)
        + static_cast<size_t>(kRBM) * kRCap * sizeof(unsigned long long) + static_cast<size_t>(kRBM) * 3 * sizeof(int);
}

//! Sort a row's buffer (n valid entries; the rest padded with the smallest key) descending and keep the
//! best c; the threshold becomes the c-th best score. Called by one whole warp, with n > c.
__device__ __forceinline__ void compactRow(unsigned long long* buf, int n, int c, int lane, float* thr, int* cnt)
{
    for (int e = n + lane; e < kRCap; e += 32)
    {
        buf[e] = 0ull;
    }
    __syncwarp();
    for (int size = 2; size <= kRCap; size <<= 1)
    {
        for (int stride = size >> 1; stride > 0; stride >>= 1)
        {
#pragma unroll
            for (int e = lane; e < kRCap / 2; e += 32)
            {
                int const i = ((e & ~(stride - 1)) << 1) | (e & (stride - 1));
                int const j = i + stride;
                unsigned long long const vi = buf[i];
                unsigned long long const vj = buf[j];
                bool const descending = (i & size) == 0;
                if (descending ? vi < vj : vi > vj)
                {
                    buf[i] = vj;
                    buf[j] = vi;
                }
            }
            __syncwarp();
        }
    }
    if (lane == 0)
    {
        *thr = entryScore(buf[c - 1]);
        *cnt = c;
    }
    __syncwarp();
}

__global__ void __launch_bounds__(kThreads, 1) candidateResidentKernel(__half const* __restrict__ y, int rows,
    int paddedDim, int splits, int c, int* __restrict__ candIdx, float* __restrict__ candScore,
    float* __restrict__ candThresh)
{
    constexpr int WARPS_N = 2;
    constexpr int WM = 32;
    constexpr int WN = 32;
    constexpr int MF = 2;
    constexpr int NF = 4;
    constexpr int kRowsPerWarp = kRBM / kWarps; // 16
    extern __shared__ __align__(16) unsigned char smem[];
    int const lda = paddedDim + 8;
    __half* aRes = reinterpret_cast<__half*>(smem);                                          // [kRBM][lda]
    __half* bStage = aRes + kRBM * lda;                                                      // [kRStages][kBN][kRLdb]
    auto* buf = reinterpret_cast<unsigned long long*>(bStage + kRStages * kBN * kRLdb);     // [kRBM][kRCap]
    float* thr = reinterpret_cast<float*>(buf + kRBM * kRCap); // [kRBM], in the scaled units of the accumulators
    int* cnt = reinterpret_cast<int*>(thr + kRBM);             // [kRBM]
    int* pend = cnt + kRBM;                                    // [kRBM]

    int const tid = threadIdx.x;
    int const lane = tid & 31;
    int const warp = tid >> 5;
    int const wm = warp / WARPS_N;
    int const wn = warp % WARPS_N;
    int const batch = blockIdx.z;
    int const split = blockIdx.y;
    int const row0 = blockIdx.x * kRBM;
    __half const* yb = y + static_cast<size_t>(batch) * rows * paddedDim;

    for (int r = tid; r < kRBM; r += kThreads)
    {
        thr[r] = -INFINITY;
        cnt[r] = 0;
        pend[r] = 0;
    }
    int const chunksPerRow = paddedDim / 8;
    for (int q = tid; q < kRBM * chunksPerRow; q += kThreads)
    {
        int const r = q / chunksPerRow;
        int const ch = q - r * chunksPerRow;
        int const g = row0 + r;
        cpAsync16(aRes + r * lda + ch * 8, yb + static_cast<size_t>(min(g, rows - 1)) * paddedDim + ch * 8,
            g < rows ? 16 : 0);
    }
    cpAsyncCommit();

    int const tiles = (rows + kBN - 1) / kBN;
    int const tBegin = static_cast<int>(static_cast<int64_t>(split) * tiles / splits);
    int const tEnd = static_cast<int>(static_cast<int64_t>(split + 1) * tiles / splits);
    int const nk = paddedDim / kRBK;
    int const total = (tEnd - tBegin) * nk;

    auto issue = [&](int q) {
        if (q < total)
        {
            int const t = tBegin + q / nk;
            int const kc = q - (q / nk) * nk;
            int const col0 = t * kBN;
            __half* dst = bStage + (q % kRStages) * kBN * kRLdb;
            for (int e = tid; e < kBN * (kRBK / 8); e += kThreads)
            {
                int const r = e >> 3;
                int const ch = e & 7;
                int const g = col0 + r;
                cpAsync16(dst + r * kRLdb + ch * 8,
                    yb + static_cast<size_t>(min(g, rows - 1)) * paddedDim + kc * kRBK + ch * 8, g < rows ? 16 : 0);
            }
        }
        cpAsyncCommit(); // an empty group past the end keeps the wait arithmetic uniform
    };
    issue(0);
    issue(1);

    float acc[MF][NF][4];
    for (int q = 0; q < total; ++q)
    {
        int const tq = q / nk;
        int const kc = q - tq * nk;
        if (kc == 0)
        {
#pragma unroll
            for (int mf = 0; mf < MF; ++mf)
#pragma unroll
                for (int nf = 0; nf < NF; ++nf)
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        acc[mf][nf][e] = 0.0f;
        }
        cpAsyncWait<1>(); // chunk q (and the resident rows) landed
        __syncthreads();  // ... for every thread; and chunk q-1's stage is free again
        issue(q + 2);
        __half const* bs = bStage + (q % kRStages) * kBN * kRLdb;
#pragma unroll
        for (int k16 = 0; k16 < kRBK; k16 += 16)
        {
            uint32_t a[MF][4];
            uint32_t b[NF][2];
#pragma unroll
            for (int mf = 0; mf < MF; ++mf)
            {
                int const r = wm * WM + mf * 16 + (lane & 15);
                ldmatrixX4(a[mf], aRes + r * lda + kc * kRBK + k16 + (lane >> 4) * 8);
            }
#pragma unroll
            for (int p = 0; p < NF / 2; ++p)
            {
                uint32_t rr[4];
                int const n = wn * WN + p * 16 + (lane & 7) + ((lane >> 4) << 3);
                ldmatrixX4(rr, bs + n * kRLdb + k16 + ((lane >> 3) & 1) * 8);
                b[2 * p][0] = rr[0];
                b[2 * p][1] = rr[1];
                b[2 * p + 1][0] = rr[2];
                b[2 * p + 1][1] = rr[3];
            }
#pragma unroll
            for (int mf = 0; mf < MF; ++mf)
#pragma unroll
                for (int nf = 0; nf < NF; ++nf)
                    mmaF16(acc[mf][nf], a[mf], b[nf][0], b[nf][1]);
        }
        if (kc != nk - 1)
        {
            continue;
        }

        // Tile done. Scores stay in the accumulators' scaled units (x 2^16) until the final write.
        int const col0 = (tBegin + tq) * kBN;
        bool const interior = col0 + kBN <= rows && row0 + kRBM <= rows && (col0 + kBN <= row0 || col0 >= row0 + kRBM);
        if (!interior) // rows or columns past N, or the diagonal: never candidates
        {
#pragma unroll
            for (int mf = 0; mf < MF; ++mf)
#pragma unroll
                for (int h = 0; h < 2; ++h)
#pragma unroll
                    for (int nf = 0; nf < NF; ++nf)
#pragma unroll
                        for (int e = 0; e < 2; ++e)
                        {
                            int const g = row0 + wm * WM + mf * 16 + h * 8 + (lane >> 2);
                            int const col = col0 + wn * WN + nf * 8 + (lane & 3) * 2 + e;
                            if (g >= rows || col >= rows || col == g)
                            {
                                acc[mf][nf][h * 2 + e] = -INFINITY;
                            }
                        }
        }
        float rowMax[MF][2];
        bool any = false;
#pragma unroll
        for (int mf = 0; mf < MF; ++mf)
        {
#pragma unroll
            for (int h = 0; h < 2; ++h)
            {
                float m = -INFINITY;
#pragma unroll
                for (int nf = 0; nf < NF; ++nf)
                {
                    m = fmaxf(m, fmaxf(acc[mf][nf][h * 2], acc[mf][nf][h * 2 + 1]));
                }
                rowMax[mf][h] = m;
                int const r = wm * WM + mf * 16 + h * 8 + (lane >> 2);
                float const th = thr[r];
                if (m > th)
                {
                    int passing = 0;
#pragma unroll
                    for (int nf = 0; nf < NF; ++nf)
                    {
                        passing += (acc[mf][nf][h * 2] > th ? 1 : 0) + (acc[mf][nf][h * 2 + 1] > th ? 1 : 0);
                    }
                    atomicAdd(&pend[r], passing);
                    any = true;
                }
            }
        }
        if (!__syncthreads_or(any))
        {
            continue;
        }
        {
            // Make room: a row whose buffer cannot take this tile's arrivals is cut back to its best c.
            // Warp w owns rows w, w + 8, ..., w + 120.
            int const myRow = warp + kWarps * lane;
            int const myPend = lane < kRowsPerWarp ? pend[myRow] : 0;
            unsigned m = __ballot_sync(0xffffffffu, myPend > 0);
            while (m != 0u)
            {
                int const l = __ffs(m) - 1;
                m &= m - 1u;
                int const r = warp + kWarps * l;
                int const p = __shfl_sync(0xffffffffu, myPend, l);
                int const n = cnt[r];
                if (n + p > kRCap)
                {
                    compactRow(buf + r * kRCap, n, c, lane, &thr[r], &cnt[r]);
                }
            }
            if (myPend > 0)
            {
                pend[myRow] = 0;
            }
        }
        __syncthreads();
#pragma unroll
        for (int mf = 0; mf < MF; ++mf)
        {
#pragma unroll
            for (int h = 0; h < 2; ++h)
            {
                int const r = wm * WM + mf * 16 + h * 8 + (lane >> 2);
                float const th = thr[r]; // possibly raised by the cut: fewer arrivals, never more
                if (rowMax[mf][h] > th)
                {
#pragma unroll
                    for (int nf = 0; nf < NF; ++nf)
                    {
#pragma unroll
                        for (int e = 0; e < 2; ++e)
                        {
                            float const sc = acc[mf][nf][h * 2 + e];
                            if (sc > th)
                            {
                                int const col = col0 + wn * WN + nf * 8 + (lane & 3) * 2 + e;
                                buf[r * kRCap + atomicAdd(&cnt[r], 1)] = packEntry(sc, col);
                            }
                        }
                    }
                }
            }
        }
    }
    cpAsyncWait<0>();
    __syncthreads();

    for (int r = warp; r < kRBM; r += kWarps)
    {
        int const g = row0 + r;
        if (g >= rows)
        {
            break;
        }
        int const n0 = cnt[r];
        if (n0 > c)
        {
            compactRow(buf + r * kRCap, n0, c, lane, &thr[r], &cnt[r]);
        }
        int const n = min(n0, c);
        size_t const rowSplit = (static_cast<size_t>(batch) * rows + g) * splits + split;
        for (int q = lane; q < c; q += 32)
        {
            unsigned long long const e = q < n ? buf[r * kRCap + q] : 0ull;
            candIdx[rowSplit * c + q] = q < n ? entryColumn(e) : -1;
            candScore[rowSplit * c + q] = q < n ? entryScore(e) * kScoreUnscale : -INFINITY;
        }
        if (lane == 0)
        {
            candThresh[rowSplit] = thr[r] * kScoreUnscale; // -inf stays -inf: nothing was dropped
        }
    }
}

// ---------------------------------------------------------------- 3. rescore and certify

//! The best kk of a warp's (key, id) slots in shared memory by ranksBefore, written to out[1..kk]; a picked
//! slot's id becomes -1 - id (ids < 0 are skipped, keys stay). Returns the kk-th key. With tieWindow >= 0
//! also reports whether two consecutive picks, or the last pick and the best slot left, lie within
//! tieWindow of each other (then fast keys do not decide the order). Every lane returns the same values.
__device__ __forceinline__ double warpSelectBest(double const* key, int* id, int unionSize, int kk, int lane,
    int32_t* out, double tieWindow, bool& nearTie)
{
    double kth = -INFINITY;
    bool tie = false;
    int const rounds = tieWindow >= 0.0 ? kk + 1 : kk;
    for (int r = 0; r < rounds; ++r)
    {
        double best = -INFINITY;
        int bestId = INT_MAX;
        int slot = INT_MAX;
        for (int p = lane; p < unionSize; p += 32)
        {
            int const q = id[p];
            if (q >= 0 && ranksBefore(key[p], q, best, bestId))
            {
                best = key[p];
                bestId = q;
                slot = p;
            }
        }
        warpBest(best, bestId, slot);
        if (r > 0 && tieWindow >= 0.0)
        {
            tie |= !(kth - best > tieWindow); // fl(gap) > window implies gap > window; NaN (-inf - -inf) = tie
        }
        if (r == kk)
        {
            break; // the extra round only looks at the best slot left
        }
        if (lane == 0)
        {
            out[1 + r] = bestId;
        }
        if (slot != INT_MAX && lane == (slot & 31))
        {
            id[slot] = -1 - bestId;
        }
        kth = best;
        __syncwarp();
    }
    __syncwarp();
    nearTie = tie;
    return kth;
}

//! One warp per row. Writes idx[i, 0] = i and the ranking of the candidates by the canonical key; rows whose
//! result is not certified are appended to the fallback list (their slots are rewritten by the fallback).
//! Keys: the fast F = warpFastDot / n_j of every candidate that can still matter, |F - key| <= delta_i; the
//! picks by F are the picks by the canonical key when consecutive picks, and the last pick and the best
//! candidate left, are more than 2 delta_i apart. Otherwise (duplicates, near-duplicates) the canonical key
//! of every candidate with F >= F_kk - 4 delta_i decides (the others lie below kk of them in any case).
//! canonicalAll: canonical keys for every candidate, no filter (tests).
template <typename T, int kCarry>
__global__ void __launch_bounds__(kThreads, minBlocksFor(kCarry)) rescoreKernel(T const* __restrict__ x,
    double const* __restrict__ norms, int64_t totalRows, int rows, int dim, int kEff, int unionSize, int splits,
    int const* __restrict__ candIdx, float const* __restrict__ candScore, float const* __restrict__ candThresh,
    double errorBound, int exactOnly, int canonicalAll, int32_t* __restrict__ outIdx, int* __restrict__ fallbackRows,
    int* __restrict__ counters)
{
    extern __shared__ __align__(16) unsigned char smem[];
    int const lane = threadIdx.x & 31;
    int const warp = threadIdx.x >> 5;
    int64_t const gi = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
    if (gi >= totalRows)
    {
        return;
    }
    int64_t const b = gi / rows;
    int const i = static_cast<int>(gi - b * rows);
    int32_t* out = outIdx + gi * kEff;
    if (lane == 0)
    {
        out[0] = i;
    }
    int const kk = kEff - 1;
    if (kk == 0)
    {
        return;
    }
    if (exactOnly)
    {
        if (lane == 0)
        {
            fallbackRows[atomicAdd(&counters[0], 1)] = static_cast<int>(gi);
        }
        return;
    }

    // shared memory: keys [kWarps][U] double, ids [kWarps][U] int, approximate scores [kWarps][U] float
    double* keyBase = reinterpret_cast<double*>(smem);
    int* idBase = reinterpret_cast<int*>(keyBase + kWarps * unionSize);
    float* approxBase = reinterpret_cast<float*>(idBase + kWarps * unionSize);
    double* key = keyBase + warp * unionSize;
    int* id = idBase + warp * unionSize;
    float* approx = approxBase + warp * unionSize;

    int const* ci = candIdx + gi * unionSize;
    float const* cs = candScore + gi * unionSize;
    int validCount = 0; // unionSize is a multiple of 32: every lane runs every iteration
    for (int p = lane; p < unionSize; p += 32)
    {
        int j = ci[p];
        approx[p] = j >= 0 ? cs[p] : -INFINITY;
        validCount += __popc(__ballot_sync(0xffffffffu, j >= 0));
    }
    __syncwarp();

    float threshold = -INFINITY; // T = max over splits (a split whose list never filled kept every column)
    for (int s = 0; s < splits; ++s)
    {
        threshold = fmaxf(threshold, candThresh[gi * splits + s]);
    }

    bool certified = validCount >= kk;
    // A_kk: the kk-th best approximate score. A candidate whose score is below A_kk - 2E cannot beat the
    // kk candidates at or above A_kk in exact terms, so it needs no exact key.
    float akk = -INFINITY;
    if (certified)
    {
        for (int r = 0; r < kk; ++r)
        {
            float best = -INFINITY;
            int slot = INT_MAX;
            for (int p = lane; p < unionSize; p += 32)
            {
                float v = approx[p];
                if (v > best || (v == best && p < slot))
                {
                    best = v;
                    slot = p;
                }
            }
#pragma unroll
            for (int off = 16; off > 0; off >>= 1)
            {
                float ov = __shfl_xor_sync(0xffffffffu, best, off);
                int os = __shfl_xor_sync(0xffffffffu, slot, off);
                if (ov > best || (ov == best && os < slot))
                {
                    best = ov;
                    slot = os;
                }
            }
            akk = best;
            if (lane == (slot & 31))
            {
                approx[slot] = -INFINITY; // taken (restored below from candScore)
            }
            __syncwarp();
        }
    }
    double const ni = norms[gi];
    double const delta = keyErrorBound(dim, ni);
    double const pruneBelow = static_cast<double>(akk) - 2.02 * errorBound;
    T const* xi = x + gi * dim;
    T const* xb = x + b * rows * static_cast<int64_t>(dim);
    double const* nb = norms + b * rows;
    bool violation = false;
    for (int p0 = 0; p0 < unionSize; p0 += 32)
    {
        int const p = p0 + lane;
        int const j = ci[p];
        float const s = j >= 0 ? cs[p] : -INFINITY;
        bool const need = j >= 0 && static_cast<double>(s) >= pruneBelow;
        key[p] = -INFINITY;
        id[p] = INT_MAX;
        unsigned m = __ballot_sync(0xffffffffu, need);
        while (m != 0u)
        {
            int const src = __ffs(m) - 1;
            m &= m - 1u;
            int const jj = __shfl_sync(0xffffffffu, j, src);
            double const sj = static_cast<double>(__shfl_sync(0xffffffffu, s, src));
            double const kj = __ddiv_rn(warpFastDot(xi, xb + static_cast<int64_t>(jj) * dim, dim, lane), nb[jj]);
            violation |= fabs(sj * ni - kj) > errorBound * ni;
            if (lane == src)
            {
                key[p] = kj;
                id[p] = jj;
            }
        }
    }
    violation = __any_sync(0xffffffffu, violation);
    __syncwarp();

    bool nearTie = false;
    double kthKey = warpSelectBest(key, id, unionSize, kk, lane, out, 2.0 * delta, nearTie);
    if ((nearTie || canonicalAll) && kthKey != -INFINITY)
    {
        // The canonical key of every candidate that can still be among the best kk: the picks, and the rest
        // with F >= F_kk - 4 delta (canonicalAll: every rescored one). One below that has a key
        // < F_kk - delta <= every pick's key.
        double const floorKey = canonicalAll ? -INFINITY : kthKey - 4.0 * delta;
        for (int p0 = 0; p0 < unionSize; p0 += 32)
        {
            int const p = p0 + lane;
            int const q = id[p];
            bool const relevant = q < 0 || (q != INT_MAX && key[p] >= floorKey); // q == INT_MAX: not rescored
            int const j = q < 0 ? -1 - q : q;
            key[p] = -INFINITY;
            id[p] = INT_MAX;
            unsigned m = __ballot_sync(0xffffffffu, relevant);
            while (m != 0u)
            {
                int const src = __ffs(m) - 1;
                m &= m - 1u;
                int const jj = __shfl_sync(0xffffffffu, j, src);
                double const kj
                    = __ddiv_rn(warpCanonicalDot<kCarry>(xi, xb + static_cast<int64_t>(jj) * dim, dim, lane), nb[jj]);
                if (lane == src)
                {
                    key[p] = kj;
                    id[p] = jj;
                }
            }
        }
        __syncwarp();
        bool unused = false;
        kthKey = warpSelectBest(key, id, unionSize, kk, lane, out, -1.0, unused);
    }

    // Certificate: every non-candidate j has a_ij <= T + E, so key[i, j] <= n_i (T + E) up to the canonical
    // key's rounding (|dot - exact| <= 2^-53 |exact| + 2 log2(Dp) 2^-106 ||x_i|| ||x_j||, a few 1e-16 n_i
    // here), far inside the 1e-12 n_i slack; the kk-th key is >= kthKey - delta whichever key it is.
    bool const complete = threshold == -INFINITY; // every other row of the item is a candidate
    certified = certified && !violation && kthKey != -INFINITY
        && (complete || kthKey - delta > ni * (static_cast<double>(threshold) + errorBound) + 1e-12 * ni);
    if (!certified && lane == 0)
    {
        fallbackRows[atomicAdd(&counters[0], 1)] = static_cast<int>(gi);
        if (violation)
        {
            atomicAdd(&counters[1], 1);
        }
    }
}

// ---------------------------------------------------------------- 4. exact fallback

//! Persistent blocks over the fallback list: each row is ranked by a scan of all N columns. Warp w scores
//! columns w, w + 8, ... and its lane 0 keeps a sorted top-kk by the canonical key; thread 0 merges the 8
//! lists. A column's fast key F (one warp-wide fast dot) that is below the list's last key - 2 delta_i puts
//! it below that key (|F - key| <= delta_i) and the column is skipped; every other column gets its
//! canonical key (a full list's last key only rises). canonicalAll: the canonical key of every column.
template <typename T, int kCarry>
__global__ void __launch_bounds__(kThreads, minBlocksFor(kCarry)) fallbackKernel(T const* __restrict__ x,
    double const* __restrict__ norms, int rows, int dim, int kEff, int canonicalAll,
    int const* __restrict__ fallbackRows, int const* __restrict__ counters, int32_t* __restrict__ outIdx)
{
    __shared__ double listKey[kWarps][kReciprocalNeighborsMaxK];
    __shared__ int listId[kWarps][kReciprocalNeighborsMaxK];
    __shared__ int listLen[kWarps];
    __shared__ int head[kWarps];
    int const lane = threadIdx.x & 31;
    int const warp = threadIdx.x >> 5;
    int const kk = kEff - 1;
    int const count = counters[0];
    for (int w = blockIdx.x; w < count; w += gridDim.x)
    {
        int64_t const gi = fallbackRows[w];
        int64_t const b = gi / rows;
        int const i = static_cast<int>(gi - b * rows);
        T const* xi = x + gi * dim;
        T const* xb = x + b * rows * static_cast<int64_t>(dim);
        double const* nb = norms + b * rows;
        double const window = 2.0 * keyErrorBound(dim, norms[gi]);
        if (lane == 0)
        {
            listLen[warp] = 0;
        }
        __syncwarp();
        for (int j = warp; j < rows; j += kWarps)
        {
            if (j == i)
            {
                continue;
            }
            T const* xj = xb + static_cast<int64_t>(j) * dim;
            double kj;
            if (canonicalAll)
            {
                kj = __ddiv_rn(warpCanonicalDot<kCarry>(xi, xj, dim, lane), nb[j]);
            }
            else
            {
                double const fj = __ddiv_rn(warpFastDot(xi, xj, dim, lane), nb[j]);
                int enter = 0;
                if (lane == 0)
                {
                    int const n = listLen[warp];
                    enter = n < kk || !(fj < listKey[warp][n - 1] - window);
                }
                if (__shfl_sync(0xffffffffu, enter, 0) == 0)
                {
                    continue; // key[i, j] <= fj + delta_i < the list's last key
                }
                kj = __ddiv_rn(warpCanonicalDot<kCarry>(xi, xj, dim, lane), nb[j]);
            }
            if (lane == 0)
            {
                int const n = listLen[warp];
                if (n < kk || ranksBefore(kj, j, listKey[warp][n - 1], listId[warp][n - 1]))
                {
                    int pos = n < kk ? n : kk - 1;
                    while (pos > 0 && ranksBefore(kj, j, listKey[warp][pos - 1], listId[warp][pos - 1]))
                    {
                        listKey[warp][pos] = listKey[warp][pos - 1];
                        listId[warp][pos] = listId[warp][pos - 1];
                        --pos;
                    }
                    listKey[warp][pos] = kj;
                    listId[warp][pos] = j;
                    listLen[warp] = n < kk ? n + 1 : kk;
                }
            }
        }
        __syncthreads();
        if (threadIdx.x == 0)
        {
            for (int q = 0; q < kWarps; ++q)
            {
                head[q] = 0;
            }
            int32_t* out = outIdx + gi * kEff;
            for (int r = 0; r < kk; ++r)
            {
                int bestW = -1;
                for (int q = 0; q < kWarps; ++q)
                {
                    if (head[q] < listLen[q]
                        && (bestW < 0
                            || ranksBefore(listKey[q][head[q]], listId[q][head[q]], listKey[bestW][head[bestW]],
                                listId[bestW][head[bestW]])))
                    {
                        bestW = q;
                    }
                }
                out[1 + r] = bestW >= 0 ? listId[bestW][head[bestW]++] : -1;
            }
        }
        __syncthreads();
    }
}

// ---------------------------------------------------------------- 5. reciprocal validity

__global__ void __launch_bounds__(kThreads) validityKernel(
    int32_t const* __restrict__ idx, int64_t total, int rows, int kEff, int32_t* __restrict__ valid)
{
    for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < total;
         e += static_cast<int64_t>(gridDim.x) * kThreads)
    {
        int64_t const gi = e / kEff;
        int64_t const b = gi / rows;
        int const i = static_cast<int>(gi - b * rows);
        int const j = idx[e];
        int found = 0;
        if (j >= 0 && j < rows)
        {
            int32_t const* back = idx + (b * rows + j) * kEff;
            for (int t = 0; t < kEff; ++t)
            {
                found |= back[t] == i;
            }
        }
        valid[e] = found;
    }
}

// ---------------------------------------------------------------- host side

//! |s~ - a| bound of the candidate pass (cosine units) for padded dimension dp; see the file comment.
double candidateErrorBound(int dp)
{
    double const delta = std::ldexp(1.0, -11) + std::ldexp(1.0, -23); // fp16 rounding of an fp32 value
    double const eta = std::ldexp(1.0, -22); // |y| < 2^-14 / 256: flushed or subnormal, absolute error
    double const q = delta + eta * std::sqrt(static_cast<double>(dp));
    double const quantisation = 2.0 * q + q * q;
    // fp32 accumulation of dp exact products, with truncation and per-MMA alignment: bounded by
    // (dp + 16) 2^-22 sum |p| (twice the round-to-nearest recursive-summation bound), sum |p| <= (1 + q)^2.
    double const accumulation = (dp + 16) * std::ldexp(1.0, -22) * (1.0 + q) * (1.0 + q);
    return 1.01 * (quantisation + accumulation) + 1e-30;
}

struct Layout
{
    size_t counters, norms, y, candIdx, candScore, candThresh, fallback, total;
};

//! candidateRows = rows x splits of candidate lists to hold.
Layout layoutFor(int64_t totalRows, int paddedDim, int64_t candidateRows, int c)
{
    Layout l{};
    size_t off = 0;
    auto take = [&](size_t bytes) {
        size_t at = off;
        off = alignUp(off + bytes, kAlign);
        return at;
    };
    size_t const rs = static_cast<size_t>(totalRows);
    l.counters = take(kCounterBytes);
    l.norms = take(rs * sizeof(double));
    l.y = take(rs * paddedDim * sizeof(__half));
    size_t const cr = static_cast<size_t>(candidateRows);
    l.candIdx = take(cr * c * sizeof(int));
    l.candScore = take(cr * c * sizeof(float));
    l.candThresh = take(cr * sizeof(float));
    l.fallback = take(rs * sizeof(int));
    l.total = off + kAlign; // room to align the caller's base pointer
    return l;
}

template <int BM, int WM>
cudaError_t launchCandidates(ReciprocalNeighborsPlan const& p, __half const* y, int* candIdx, float* candScore,
    float* candThresh, cudaStream_t stream)
{
    size_t const smemBytes = candidateSmemBytes(BM, p.candidates);
    dim3 grid((p.rows + BM - 1) / BM, p.splits, p.batch);
    candidateKernel<BM, WM><<<grid, kThreads, smemBytes, stream>>>(
        y, p.rows, p.paddedDim, p.splits, p.candidates, candIdx, candScore, candThresh);
    return cudaGetLastError();
}

// ---------------------------------------------------------------- the device table

//! Device ordinals the table holds (CUDA enumerates far fewer per process in practice).
constexpr int kDeviceTableSize = 256;

struct DeviceSlot
{
    std::atomic<bool> ready{false};
    ReciprocalNeighborsDevice info{};
};

DeviceSlot gDeviceTable[kDeviceTableSize];
std::mutex gDeviceTableMutex; // serialises first uses; a prepared slot is read without it

//! What the launches need from the driver, asked once per device instead of on every call: the attributes
//! they depend on, and the dynamic shared-memory limit of every kernel with dynamic shared memory (raised to
//! the device's maximum, so that no launch size needs a cudaFuncSetAttribute of its own).
cudaError_t fillDevice(int device, ReciprocalNeighborsDevice& info)
{
    info.device = device;
    cudaError_t err = cudaSuccess;
    if ((err = cudaDeviceGetAttribute(&info.smCount, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess
        || (err = cudaDeviceGetAttribute(&info.smemOptin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device))
            != cudaSuccess
        || (err = cudaDeviceGetAttribute(&info.ccMajor, cudaDevAttrComputeCapabilityMajor, device)) != cudaSuccess
        || (err = cudaDeviceGetAttribute(&info.ccMinor, cudaDevAttrComputeCapabilityMinor, device)) != cudaSuccess)
    {
        return err;
    }
    int const optin = info.smemOptin;
    if ((err = allowMaxDynamicSharedMemory(candidateKernel<128, 4>, optin)) != cudaSuccess
        || (err = allowMaxDynamicSharedMemory(candidateKernel<64, 2>, optin)) != cudaSuccess
        || (err = allowMaxDynamicSharedMemory(candidateKernel<32, 2>, optin)) != cudaSuccess
        || (err = allowMaxDynamicSharedMemory(candidateResidentKernel, optin)) != cudaSuccess
        || (err = allowMaxDynamicSharedMemory(rescoreKernel<float, 0>, optin)) != cudaSuccess
        || (err = allowMaxDynamicSharedMemory(rescoreKernel<float, kTreeCarryLevels>, optin)) != cudaSuccess
        || (err = allowMaxDynamicSharedMemory(rescoreKernel<__half, 0>, optin)) != cudaSuccess
        || (err = allowMaxDynamicSharedMemory(rescoreKernel<__half, kTreeCarryLevels>, optin)) != cudaSuccess)
    {
        return err;
    }
#if NFORMER_HAVE_WGMMA
    if (info.ccMajor == 9 && info.ccMinor == 0 && (err = prepareWgmmaCandidates(optin)) != cudaSuccess)
    {
        return err;
    }
#endif
    return cudaSuccess;
}

//! kCarry: the canonical dot's carry levels, 0 for D <= kNarrowTreeDim, else kTreeCarryLevels.
//! Only stream work from here on (two cudaMemsetAsync, the launches, cudaGetLastError): `dev` holds what the
//! launches need to know about the device.
template <typename T, int kCarry>
int32_t run(T const* x, ReciprocalNeighborsPlan const& p, int32_t* outIdx, int32_t* outValid, unsigned char* ws,
    cudaStream_t stream, int flags, ReciprocalNeighborsDevice const& dev)
{
    int64_t const totalRows = static_cast<int64_t>(p.batch) * p.rows;
    Layout const l = layoutFor(totalRows, p.paddedDim, totalRows * p.splits, p.candidates);
    int* counters = reinterpret_cast<int*>(ws + l.counters);
    double* norms = reinterpret_cast<double*>(ws + l.norms);
    __half* y = reinterpret_cast<__half*>(ws + l.y);
    int* candIdx = reinterpret_cast<int*>(ws + l.candIdx);
    float* candScore = reinterpret_cast<float*>(ws + l.candScore);
    float* candThresh = reinterpret_cast<float*>(ws + l.candThresh);
    int* fallbackRows = reinterpret_cast<int*>(ws + l.fallback);
    int const kk = p.kEff - 1;
    bool const exactOnly = (flags & kFLAG_EXACT_ONLY) != 0;
    bool const canonicalAll = (flags & kFLAG_CANONICAL_KEYS) != 0;
    bool const needCandidates = kk > 0 && !exactOnly;

    int const smCount = dev.smCount;
    int const smemOptin = dev.smemOptin;
    cudaError_t err = cudaMemsetAsync(counters, 0, kCounterBytes, stream);
    if (err != cudaSuccess)
    {
        return static_cast<int32_t>(err);
    }

    if (kk > 0)
    {
        unsigned const blocks = static_cast<unsigned>((totalRows + kWarps - 1) / kWarps);
        prepareRowsKernel<T, kCarry><<<blocks, kThreads, 0, stream>>>(
            x, totalRows, p.dim, p.paddedDim, norms, needCandidates ? y : nullptr);
        if ((err = cudaGetLastError()) != cudaSuccess)
        {
            return static_cast<int32_t>(err);
        }
    }
    if (needCandidates)
    {
        bool const tile64 = (flags & kFLAG_TILE_64) != 0;
        bool const tile32 = (flags & kFLAG_TILE_32) != 0;
        bool const generic = tile64 || tile32 || (flags & kFLAG_GENERIC_CANDIDATES) != 0;
        size_t const residentBytes = residentSmemBytes(p.paddedDim);
        CandidateKernel used = kCANDIDATES_GENERIC;
#if NFORMER_HAVE_WGMMA
        // sm_90a machine code runs on compute capability 9.0 exactly (H100, H200, GH200)
        bool const wgmma = !generic && (flags & kFLAG_NO_WGMMA) == 0 && dev.ccMajor == 9 && dev.ccMinor == 0
            && p.paddedDim <= kWgmmaMaxPaddedDim && p.candidates <= kWgmmaMaxCandidates
            && wgmmaCandidateSmemBytes(p.paddedDim) <= static_cast<size_t>(smemOptin);
#else
        bool const wgmma = false;
#endif
        if (wgmma)
        {
            used = kCANDIDATES_WGMMA;
            err = launchWgmmaCandidates(
                y, p.batch, p.rows, p.paddedDim, p.splits, p.candidates, candIdx, candScore, candThresh, stream);
        }
        else if (!generic && p.paddedDim <= kRMaxDim && p.candidates <= kRMaxCandidates
            && residentBytes <= static_cast<size_t>(smemOptin))
        {
            used = kCANDIDATES_RESIDENT;
            dim3 grid((p.rows + kRBM - 1) / kRBM, p.splits, p.batch);
            candidateResidentKernel<<<grid, kThreads, residentBytes, stream>>>(
                y, p.rows, p.paddedDim, p.splits, p.candidates, candIdx, candScore, candThresh);
            err = cudaGetLastError();
        }
        else if (!tile64 && !tile32 && candidateSmemBytes(128, p.candidates) <= static_cast<size_t>(smemOptin))
        {
            err = launchCandidates<128, 4>(p, y, candIdx, candScore, candThresh, stream);
        }
        else if (!tile32 && candidateSmemBytes(64, p.candidates) <= static_cast<size_t>(smemOptin))
        {
            err = launchCandidates<64, 2>(p, y, candIdx, candScore, candThresh, stream);
        }
        else
        {
            err = launchCandidates<32, 2>(p, y, candIdx, candScore, candThresh, stream);
        }
        if (err != cudaSuccess)
        {
            return static_cast<int32_t>(err);
        }
        // counters[2]: which candidate kernel ran (one byte; the counters were zeroed above)
        if ((err = cudaMemsetAsync(counters + 2, static_cast<int>(used), 1, stream)) != cudaSuccess)
        {
            return static_cast<int32_t>(err);
        }
    }
    {
        int const unionSize = p.splits * p.candidates;
        size_t const smemBytes = static_cast<size_t>(kWarps) * unionSize * (sizeof(double) + sizeof(int) + sizeof(float));
        unsigned const blocks = static_cast<unsigned>((totalRows + kWarps - 1) / kWarps);
        rescoreKernel<T, kCarry><<<blocks, kThreads, smemBytes, stream>>>(x, norms, totalRows, p.rows, p.dim,
            p.kEff, unionSize, p.splits, candIdx, candScore, candThresh, p.errorBound, exactOnly ? 1 : 0,
            canonicalAll ? 1 : 0, outIdx, fallbackRows, counters);
        if ((err = cudaGetLastError()) != cudaSuccess)
        {
            return static_cast<int32_t>(err);
        }
    }
    if (kk > 0)
    {
        int64_t const blocks = std::min<int64_t>(totalRows, static_cast<int64_t>(smCount) * 4);
        fallbackKernel<T, kCarry><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
            x, norms, p.rows, p.dim, p.kEff, canonicalAll ? 1 : 0, fallbackRows, counters, outIdx);
        if ((err = cudaGetLastError()) != cudaSuccess)
        {
            return static_cast<int32_t>(err);
        }
    }
    {
        int64_t const total = totalRows * p.kEff;
        int64_t const blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, static_cast<int64_t>(smCount) * 64);
        validityKernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(outIdx, total, p.rows, p.kEff, outValid);
        if ((err = cudaGetLastError()) != cudaSuccess)
        {
            return static_cast<int32_t>(err);
        }
    }
    return kSTATUS_SUCCESS;
}

} // namespace

int32_t planReciprocalNeighbors(int32_t batch, int32_t rows, int32_t dim, int32_t k, int32_t candidates,
    size_t workspaceLimit, ReciprocalNeighborsPlan* plan)
{
    if (plan == nullptr)
    {
        return kSTATUS_NULL_POINTER;
    }
    if (batch < 1 || batch > kMaxBatch || rows < 1 || dim < 1 || dim > kMaxDim
        || static_cast<int64_t>(batch) * rows > INT32_MAX)
    {
        return kSTATUS_BAD_SHAPE;
    }
    if (k < 1 || k > kReciprocalNeighborsMaxK)
    {
        return kSTATUS_BAD_K;
    }
    ReciprocalNeighborsPlan p{};
    p.batch = batch;
    p.rows = rows;
    p.dim = dim;
    p.paddedDim = roundUp64(dim);
    p.k = k;
    p.kEff = std::min(k, rows);
    int const kk = p.kEff - 1;
    if (candidates == 0)
    {
        p.candidates = kk == 0 ? 32 : roundUp32(kk + std::max(16, std::min(kk, 64)));
    }
    else if (candidates <= kk || candidates > kMaxCandidates)
    {
        return kSTATUS_BAD_CANDIDATES;
    }
    else
    {
        p.candidates = roundUp32(candidates);
    }
    int64_t const rowBlocks = static_cast<int64_t>(batch) * ((rows + 127) / 128);
    int64_t const tiles = (rows + kBN - 1) / kBN;
    int64_t splits = (kTargetBlocks + rowBlocks - 1) / rowBlocks; // a few waves of blocks on a big GPU
    splits = std::min<int64_t>({splits, kMaxSplits, kMaxUnion / p.candidates, tiles});
    p.splits = static_cast<int32_t>(std::max<int64_t>(splits, 1));
    if (candidates == 0 && kk > 0 && p.splits > 1)
    {
        // With S column splits the threshold T = max over splits of each split's c-th best is still at
        // most the row's c-th best, so certification's worst case is that of one list of c; typically T
        // is far lower. A smaller slack per split (kk + max(8, kk / S)) halves the list upkeep and the
        // rescore at small N, where S > 1 and a row that cannot be certified costs one exact N-column scan.
        p.candidates = roundUp32(kk + std::max(8, (std::min(kk, 64) + p.splits - 1) / p.splits));
    }
    p.errorBound = candidateErrorBound(p.paddedDim);
    int64_t const totalRows = static_cast<int64_t>(batch) * rows;
    p.workspaceBytes = layoutFor(totalRows, p.paddedDim, totalRows * p.splits, p.candidates).total;
    while (p.workspaceBytes > workspaceLimit && p.splits > 1)
    {
        --p.splits;
        p.workspaceBytes = layoutFor(totalRows, p.paddedDim, totalRows * p.splits, p.candidates).total;
    }
    *plan = p;
    return p.workspaceBytes > workspaceLimit ? kSTATUS_WORKSPACE_TOO_SMALL : kSTATUS_SUCCESS;
}

size_t reciprocalNeighborsWorkspaceSize(int32_t batch, int32_t rows, int32_t dim, int32_t k, int32_t candidates)
{
    ReciprocalNeighborsPlan p{};
    if (planReciprocalNeighbors(batch, rows, dim, k, candidates, SIZE_MAX, &p) != kSTATUS_SUCCESS)
    {
        return 0;
    }
    // Declared size: a bound on rows x splits that grows with B and N (splits = ceil(512 / row blocks)
    // gives rows x splits <= 128 * 512 + rows + 127 B), so the workspace a TensorRT profile declares for
    // its largest shape also holds every smaller shape. It is >= the plan's exact size.
    int64_t const totalRows = static_cast<int64_t>(batch) * rows;
    int64_t const candidateRows
        = std::min<int64_t>(kMaxSplits * totalRows, 128LL * kTargetBlocks + totalRows + 127LL * batch);
    // ... with the default c of one split (>= the smaller c the plan takes where S > 1), so the size grows
    // with N across the N where S drops to 1.
    int const kk = p.kEff - 1;
    int const cBound = candidates != 0 ? p.candidates : kk == 0 ? 32 : roundUp32(kk + std::max(16, std::min(kk, 64)));
    size_t const bound = layoutFor(totalRows, p.paddedDim, candidateRows, std::max(p.candidates, cBound)).total;
    return std::max(bound, p.workspaceBytes);
}

int32_t prepareReciprocalNeighborsDevice(ReciprocalNeighborsDevice const** device)
{
    if (device == nullptr)
    {
        return kSTATUS_NULL_POINTER;
    }
    int ordinal = 0;
    cudaError_t err = cudaGetDevice(&ordinal);
    if (err != cudaSuccess)
    {
        return static_cast<int32_t>(err);
    }
    if (ordinal < 0 || ordinal >= kDeviceTableSize)
    {
        return static_cast<int32_t>(cudaErrorInvalidDevice);
    }
    DeviceSlot& slot = gDeviceTable[ordinal];
    if (!slot.ready.load(std::memory_order_acquire))
    {
        std::lock_guard<std::mutex> lock(gDeviceTableMutex);
        if (!slot.ready.load(std::memory_order_relaxed))
        {
            // a failure leaves the slot empty: the next call tries again and reports its own error
            if ((err = fillDevice(ordinal, slot.info)) != cudaSuccess)
            {
                return static_cast<int32_t>(err);
            }
            slot.ready.store(true, std::memory_order_release);
        }
    }
    *device = &slot.info;
    return kSTATUS_SUCCESS;
}

int32_t reciprocalNeighbors(void const* features, FeatureType type, int32_t batch, int32_t rows, int32_t dim,
    int32_t k, int32_t* neighborIndex, int32_t* neighborValid, void* workspace, size_t workspaceBytes,
    cudaStream_t stream, int32_t candidates, int32_t flags, ReciprocalNeighborsDevice const* device)
{
    if (type != FeatureType::kFLOAT32 && type != FeatureType::kFLOAT16)
    {
        return kSTATUS_BAD_TYPE;
    }
    ReciprocalNeighborsPlan p{};
    int32_t status = planReciprocalNeighbors(batch, rows, dim, k, candidates, workspaceBytes, &p);
    if (status != kSTATUS_SUCCESS)
    {
        return status;
    }
    if (features == nullptr || neighborIndex == nullptr || neighborValid == nullptr || workspace == nullptr)
    {
        return kSTATUS_NULL_POINTER;
    }
    if (device == nullptr && (status = prepareReciprocalNeighborsDevice(&device)) != kSTATUS_SUCCESS)
    {
        return status;
    }
    ReciprocalNeighborsDevice const& dev = *device;
    auto* ws = reinterpret_cast<unsigned char*>(alignUp(reinterpret_cast<uintptr_t>(workspace), kAlign));
    bool const narrow = p.dim <= kNarrowTreeDim;
    if (type == FeatureType::kFLOAT32)
    {
        auto const* xf = static_cast<float const*>(features);
        return narrow ? run<float, 0>(xf, p, neighborIndex, neighborValid, ws, stream, flags, dev)
                      : run<float, kTreeCarryLevels>(xf, p, neighborIndex, neighborValid, ws, stream, flags, dev);
    }
    auto const* xh = static_cast<__half const*>(features);
    return narrow ? run<__half, 0>(xh, p, neighborIndex, neighborValid, ws, stream, flags, dev)
                  : run<__half, kTreeCarryLevels>(xh, p, neighborIndex, neighborValid, ws, stream, flags, dev);
}

char const* reciprocalNeighborsStatusString(int32_t status)
{
    switch (status)
    {
    case kSTATUS_SUCCESS: return "success";
    case kSTATUS_BAD_SHAPE: return "features must be [B, N, D] with 1 <= B <= 65535, N >= 1, B*N < 2^31, 1 <= D <= 65536";
    case kSTATUS_BAD_K: return "k must be between 1 and 128";
    case kSTATUS_BAD_TYPE: return "features must be float32 (dtype 0) or float16 (dtype 1)";
    case kSTATUS_WORKSPACE_TOO_SMALL: return "workspace is smaller than nformer_reciprocal_neighbors_workspace() asks for";
    case kSTATUS_NULL_POINTER: return "a required pointer (features, outputs or workspace) is null";
    case kSTATUS_BAD_CANDIDATES: return "candidates must be 0 (default) or in (min(k, N) - 1, 256]";
    default: break;
    }
    return status > 0 ? cudaGetErrorString(static_cast<cudaError_t>(status)) : "unknown status";
}

} // namespace nformer
