// csrc/mix.cuh's kernel compiled by a host C++ compiler and run thread by thread on the CPU, so
// its index arithmetic (block heads and tails, vector tiles, MAXK predication, the runtime K loop,
// bf16 rounding) is tested without a GPU. Sound because the kernel has no shared memory and no
// barriers: its threads are independent, and any order of running them gives the same result.
// The fp16 conversions are PTX (asm is stubbed out here), so fp16 is left to the GPU tests.
#include <cmath>
#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define asm(...) (void)0

struct Index { unsigned x; };
static Index threadIdx, blockIdx;
static inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
static inline float __fmaf_rn(float a, float b, float c) { return std::fmaf(a, b, c); }
static inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
template <class T> static inline T __ldg(const T* p) { return *p; }

#include "mix.cuh"

using namespace scoremerge;

struct Args {
    const void *experts, *coeffs;
    void* out;
    const int* block_group;
    const long long *block_start, *block_end;
    int K;
    long long row_stride;
    int n_blocks;
};

template <class Tin, class Tout, class Acc, int MAXK, int EPT>
void run(const Args& a) {
    for (unsigned b = 0; b < (unsigned)a.n_blocks; ++b)
        for (unsigned t = 0; t < (unsigned)MIX_THREADS; ++t) {
            blockIdx.x = b;
            threadIdx.x = t;
            mix_kernel<Tin, Tout, Acc, MAXK, EPT>(
                (const Tin*)a.experts, (const Acc*)a.coeffs, (Tout*)a.out, a.block_group,
                a.block_start, a.block_end, a.K, a.row_stride);
        }
}

template <class Tin, class Tout, class Acc, int MAXK>
void run_ept(bool vector, const Args& a) {
    if (vector) run<Tin, Tout, Acc, MAXK, 16 / sizeof(Tin)>(a);
    else run<Tin, Tout, Acc, MAXK, 1>(a);
}

template <class Tin, class Tout, class Acc>
void run_maxk(bool vector, const Args& a) {
    if (a.K <= 4) run_ept<Tin, Tout, Acc, 4>(vector, a);
    else if (a.K <= 8) run_ept<Tin, Tout, Acc, 8>(vector, a);
    else if (a.K <= 16) run_ept<Tin, Tout, Acc, 16>(vector, a);
    else run_ept<Tin, Tout, Acc, 0>(vector, a);
}

// pair: 0 float32 -> float32, 1 float32 -> bfloat16, 2 bfloat16 -> float32,
//       3 bfloat16 -> bfloat16, 4 float64 -> float64
extern "C" void mix_on_host(int pair, int vector, Args a) {
    switch (pair) {
        case 0: return run_maxk<float, float, float>(vector, a);
        case 1: return run_maxk<float, bf16, float>(vector, a);
        case 2: return run_maxk<bf16, float, float>(vector, a);
        case 3: return run_maxk<bf16, bf16, float>(vector, a);
        case 4: return run_maxk<double, double, double>(vector, a);
    }
}
