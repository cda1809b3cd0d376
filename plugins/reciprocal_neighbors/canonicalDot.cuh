/*
 * The canonical dot product of export/contract/neighbor_key.py, as the kernels evaluate it: one warp per pair
 * of rows, lane l owning the tree's slots l + 32 m. This header holds the lane-local part (every level of the
 * tree with w >= 32) and the node combine; the kernels add the shuffle levels (w = 16 ... 1). It compiles for
 * the device (CUDA intrinsics: IEEE round-to-nearest adds that are never contracted or reassociated) and for
 * the host, where tests/test_plugin_build.py runs it against the contract's Python definition, bit for bit,
 * with the 32 lanes and their shuffles emulated. Internal to the kernels library.
 */
#ifndef NFORMER_RECIPROCAL_NEIGHBORS_CANONICAL_DOT_CUH
#define NFORMER_RECIPROCAL_NEIGHBORS_CANONICAL_DOT_CUH

#if defined(__CUDACC__)
#define NFORMER_HD __host__ __device__ __forceinline__
#else
#define NFORMER_HD inline
#endif

namespace nformer
{
namespace canonical
{

//! A (hi, lo) slot of the canonical double-double tree.
struct DDNode
{
    double hi;
    double lo;
};

NFORMER_HD double addRn(double a, double b)
{
#if defined(__CUDA_ARCH__)
    return __dadd_rn(a, b);
#else
    return a + b; // host: IEEE binary64 (SSE2 / AArch64), no multiply to contract with
#endif
}

NFORMER_HD double subRn(double a, double b)
{
#if defined(__CUDA_ARCH__)
    return __dsub_rn(a, b);
#else
    return a - b;
#endif
}

//! The canonical combine of slot j (a) with slot j + w (b), export/contract/neighbor_key.py:
//!   s = h1 + h2; v = s - h1; e = (h1 - (s - v)) + (h2 - v); e = e + (l1 + l2); h = s + e; l = e - (h - s)
//! Every step is one IEEE binary64 round-to-nearest addition or subtraction, in this order.
struct DDCombine
{
    NFORMER_HD DDNode operator()(DDNode a, DDNode b) const
    {
        double const s = addRn(a.hi, b.hi);
        double const v = subRn(s, a.hi);
        double e = addRn(subRn(a.hi, subRn(s, v)), subRn(b.hi, v));
        e = addRn(e, addRn(a.lo, b.lo));
        double const h = addRn(s, e);
        return DDNode{h, subRn(e, subRn(h, s))};
    }
};

constexpr int kTreeChunk = 8;                   //!< lane-local slots loaded and combined per step (3 levels)
constexpr int kTreeCarryLevels = 8;             //!< levels above the chunks: Dp <= 32 * 8 * 2^8 = 65536
constexpr int kNarrowTreeDim = 32 * kTreeChunk; //!< D <= 256: one chunk per lane, no carry levels
constexpr int kTreeMaxDim = (32 * kTreeChunk) << kTreeCarryLevels;

//! log2(Dp), Dp = the next power of two >= dim (dim >= 1).
NFORMER_HD int treeLevels(int dim)
{
#if defined(__CUDA_ARCH__)
    return 32 - __clz(dim - 1); // dim = 1 -> 0
#else
    int levels = 0;
    while ((1 << levels) < dim)
    {
        ++levels;
    }
    return levels;
#endif
}

//! The low `bits` bits of v in reverse order.
NFORMER_HD unsigned reverseBits(unsigned v, int bits)
{
#if defined(__CUDA_ARCH__)
    return bits == 0 ? 0u : __brev(v) >> (32 - bits);
#else
    unsigned r = 0;
    for (int i = 0; i < bits; ++i)
    {
        r |= ((v >> i) & 1u) << (bits - 1 - i);
    }
    return r;
#endif
}

//! Lane `lane`'s node after every level of the tree with w >= 32 (its slot `lane` of the levels that remain,
//! w = min(16, Dp / 2) ... 1, which the caller runs across lanes: slot j combines with slot j + w).
//! product(d) returns the exact product of element d < dim. Lane l owns the slots l + 32 m, m < M =
//! max(Dp / 32, 1), slot d >= dim holding 0; the level w (>= 32) combines m with m + w / 32. They run in
//! chunks: chunk b < G = M / C (C = min(M, 8)) holds the slots b + k G, k < C, whose levels w / 32 >= G stay
//! inside it; the chunk roots then meet in the order of bit-reversed b (a binary counter over kCarry register
//! slots): the levels w / 32 < G. A node's value depends only on its subtree, not on when it is evaluated,
//! so this is the contract's tree bit for bit. kCarry = 0 serves dim <= kNarrowTreeDim only (one chunk);
//! kTreeCarryLevels serves every dim <= kTreeMaxDim. Each load step of a warp reads 32 consecutive elements.
template <int kCarry, typename Product, typename Combine>
NFORMER_HD DDNode laneNode(int lane, int dim, Product const& product, Combine const& combine)
{
    constexpr int kStack = kCarry > 0 ? kCarry : 1;
    int const levels = treeLevels(dim);
    int const laneLevels = levels > 5 ? levels - 5 : 0;
    int const chunkLevels = laneLevels < 3 ? laneLevels : 3;
    int const chunk = 1 << chunkLevels;
    int const groupLevels = kCarry == 0 ? 0 : laneLevels - chunkLevels;
    int const groups = 1 << groupLevels;
    DDNode stack[kStack];
#pragma unroll
    for (int lev = 0; lev < kStack; ++lev)
    {
        stack[lev] = DDNode{0.0, 0.0};
    }
    DDNode node{0.0, 0.0};
    for (int g = 0; g < groups; ++g)
    {
        int const base = static_cast<int>(reverseBits(static_cast<unsigned>(g), groupLevels));
        DDNode v[kTreeChunk];
#pragma unroll
        for (int k = 0; k < kTreeChunk; ++k)
        {
            int const d = lane + 32 * (base + k * groups);
            v[k] = DDNode{k < chunk && d < dim ? product(d) : 0.0, 0.0};
        }
#pragma unroll
        for (int h = kTreeChunk / 2; h >= 1; h >>= 1)
        {
            if (h < chunk)
            {
#pragma unroll
                for (int k = 0; k < h; ++k)
                {
                    v[k] = combine(v[k], v[k + h]);
                }
            }
        }
        node = v[0];
        if constexpr (kCarry > 0)
        {
            bool placed = false; // no break: the unrolled levels index the registers statically
#pragma unroll
            for (int lev = 0; lev < kCarry; ++lev)
            {
                if (!placed)
                {
                    if (((g >> lev) & 1) == 0)
                    {
                        stack[lev] = node;
                        placed = true;
                    }
                    else
                    {
                        node = combine(stack[lev], node);
                    }
                }
            }
        }
    }
    return node;
}

} // namespace canonical
} // namespace nformer

#undef NFORMER_HD

#endif // NFORMER_RECIPROCAL_NEIGHBORS_CANONICAL_DOT_CUH
