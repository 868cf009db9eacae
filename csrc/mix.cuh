// Multi-expert mixing over a flat arena (ALGORITHMS.md, last section):
//   out[j] = sum_k coeffs[g, k] * experts[k * row_stride + j]   for j in a block of group g.
//
// Compiled two ways from this one file: by nvcc into scoremerge._C (csrc/bindings.cu), and at run
// time by NVRTC through CuPy (scoremerge/kernels/cuda.py). So it includes nothing: NVRTC has no
// standard library and CuPy does not ship cuda_bf16.h; the 16-bit types are storage-only structs
// converted with a bit-exact round-to-nearest-even (bf16) and the PTX cvt instructions (fp16).
#pragma once

namespace scoremerge {

constexpr int MIX_THREADS = 256;
// Elements per block (the host-built table's block length). 8192 gives each of 256 threads 32
// elements per expert row: eight independent 16-byte fp32 loads in flight per row (four for
// bf16/fp16), enough bytes in flight per SM to cover HBM latency at two or three resident
// blocks, while one block of a small group (a bias, a norm) still wastes little.
constexpr int MIX_BLOCK_ELEMS = 8192;
// Vector loads in flight per thread per row, at most: more only adds registers (fp64, scalar).
constexpr int MIX_MAX_VECTORS = 8;

struct bf16 { unsigned short bits; };
struct f16 { unsigned short bits; };

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec { T v[N]; };

__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ double widen(double x) { return x; }
__device__ __forceinline__ float widen(bf16 x) { return __uint_as_float((unsigned)x.bits << 16); }
__device__ __forceinline__ float widen(f16 x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
}

__device__ __forceinline__ void narrow(float a, float& o) { o = a; }
__device__ __forceinline__ void narrow(double a, double& o) { o = a; }
__device__ __forceinline__ void narrow(float a, f16& o) {
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(o.bits) : "f"(a));
}
// Round to nearest even on the bits: same result as cvt.rn.bf16.f32, which needs sm_80.
__device__ __forceinline__ void narrow(float a, bf16& o) {
    unsigned u = __float_as_uint(a);
    if ((u & 0x7fffffffu) > 0x7f800000u) {            // NaN stays NaN (quiet), sign kept
        o.bits = (unsigned short)((u >> 16) | 0x40u);
        return;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    o.bits = (unsigned short)(u >> 16);
}

__device__ __forceinline__ float fma_acc(float c, float x, float acc) {
    return __fmaf_rn(c, x, acc);
}
__device__ __forceinline__ double fma_acc(double c, double x, double acc) {
    return __fma_rn(c, x, acc);
}

// The group's coefficients. MAXK > 0: all in registers (the unrolled loops index them with
// constants); MAXK == 0 (K > 16): read per use, every thread the same address, so the read-only
// cache serves them and K is unbounded.
template <typename Acc, int MAXK>
struct Coeffs {
    Acc c[MAXK];
    __device__ __forceinline__ Coeffs(const Acc* __restrict__ row, int K) {
#pragma unroll
        for (int k = 0; k < MAXK; ++k) c[k] = k < K ? row[k] : Acc(0);
    }
    __device__ __forceinline__ Acc operator[](int k) const { return c[k]; }
};

template <typename Acc>
struct Coeffs<Acc, 0> {
    const Acc* __restrict__ row;
    __device__ __forceinline__ Coeffs(const Acc* __restrict__ r, int) : row(r) {}
    __device__ __forceinline__ Acc operator[](int k) const { return __ldg(row + k); }
};

template <typename Tout, typename Tin, typename Acc, int MAXK>
__device__ __forceinline__ void mix_one(const Tin* __restrict__ x, Tout* __restrict__ o,
                                        const Coeffs<Acc, MAXK>& c, int K, long long row_stride) {
    Acc acc = Acc(0);
#pragma unroll
    for (int k = 0; k < (MAXK > 0 ? MAXK : K); ++k) {
        if (MAXK > 0 && k >= K) break;
        acc = fma_acc(c[k], widen(x[k * row_stride]), acc);
    }
    narrow(acc, *o);
}

// Stores of at most 16 bytes each: a bf16 -> fp32 vector of 8 is two 16-byte stores.
template <int EPT, typename Tout, typename Acc>
__device__ __forceinline__ void store_vec(Tout* __restrict__ p, const Acc (&a)[EPT]) {
    constexpr int W = EPT * (int)sizeof(Tout) > 16 ? 16 / (int)sizeof(Tout) : EPT;
#pragma unroll
    for (int w = 0; w < EPT; w += W) {
        Vec<Tout, W> o;
#pragma unroll
        for (int e = 0; e < W; ++e) narrow(a[w + e], o.v[e]);
        *reinterpret_cast<Vec<Tout, W>*>(p + w) = o;
    }
}

// One block per table entry: g = block_group[b], range [block_start[b], block_end[b]) inside one
// group. EPT = 16 / sizeof(Tin) needs experts, out and row_stride aligned to whole vectors;
// EPT = 1 takes anything. The unaligned head and tail of the range go element by element.
template <typename Tin, typename Tout, typename Acc, int MAXK, int EPT>
__global__ void __launch_bounds__(MIX_THREADS, 2)
mix_kernel(const Tin* __restrict__ experts, const Acc* __restrict__ coeffs, Tout* __restrict__ out,
           const int* __restrict__ block_group, const long long* __restrict__ block_start,
           const long long* __restrict__ block_end, int K, long long row_stride) {
    constexpr int V = MIX_BLOCK_ELEMS / (MIX_THREADS * EPT) < MIX_MAX_VECTORS
                          ? MIX_BLOCK_ELEMS / (MIX_THREADS * EPT) : MIX_MAX_VECTORS;
    constexpr long long TILE = (long long)MIX_THREADS * EPT * V;
    const long long start = block_start[blockIdx.x], end = block_end[blockIdx.x];
    const Coeffs<Acc, MAXK> c(coeffs + (long long)block_group[blockIdx.x] * K, K);
    const int t = threadIdx.x;

    long long lo = (start + EPT - 1) / EPT * EPT, hi = end / EPT * EPT;
    if (lo > end) lo = end;                            // the whole range inside one vector
    if (hi < lo) hi = lo;
    if (EPT > 1 && t < 2 * EPT) {                      // head [start, lo), tail [hi, end)
        const long long j = t < EPT ? start + t : hi + (t - EPT);
        if (j < (t < EPT ? lo : end)) mix_one(experts + j, out + j, c, K, row_stride);
    }

    for (long long tile = lo; tile < hi; tile += TILE) {
        Acc acc[V][EPT];
#pragma unroll
        for (int v = 0; v < V; ++v)
#pragma unroll
            for (int e = 0; e < EPT; ++e) acc[v][e] = Acc(0);
        const long long j0 = tile + (long long)t * EPT;
#pragma unroll
        for (int k = 0; k < (MAXK > 0 ? MAXK : K); ++k) {
            if (MAXK > 0 && k >= K) break;
            const Tin* __restrict__ row = experts + k * row_stride;
            const Acc ck = c[k];
            Vec<Tin, EPT> x[V];
#pragma unroll
            for (int v = 0; v < V; ++v) {              // all V loads issue before any use
                const long long j = j0 + (long long)v * MIX_THREADS * EPT;
                if (j < hi) x[v] = *reinterpret_cast<const Vec<Tin, EPT>*>(row + j);
            }
#pragma unroll
            for (int v = 0; v < V; ++v) {
                if (j0 + (long long)v * MIX_THREADS * EPT < hi) {
#pragma unroll
                    for (int e = 0; e < EPT; ++e)
                        acc[v][e] = fma_acc(ck, widen(x[v].v[e]), acc[v][e]);
                }
            }
        }
#pragma unroll
        for (int v = 0; v < V; ++v) {
            const long long j = j0 + (long long)v * MIX_THREADS * EPT;
            if (j < hi) store_vec<EPT>(out + j, acc[v]);
        }
    }
}

}  // namespace scoremerge
