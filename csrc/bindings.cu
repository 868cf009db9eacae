// scoremerge._C: pybind11 bindings of csrc/'s kernels. No torch: raw device pointers, sizes,
// strides and a stream handle come in as Python ints (DESIGN.md), so the module builds against
// any torch and imports on a machine without a GPU. Every argument is checked before anything
// touches the device, so the checks run (and are tested) on a CPU-only machine too.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

#include <cuda_runtime.h>

#include "eigh.h"
#include "mix.cuh"

namespace py = pybind11;
using scoremerge::bf16;
using scoremerge::f16;

namespace {

// Bumped whenever a signature below changes: kernels/cuda.py refuses a stale build.
constexpr int ABI_VERSION = 2;

enum class DType { F32, BF16, F16, F64 };

DType parse_dtype(const std::string& what, const std::string& name) {
    if (name == "float32") return DType::F32;
    if (name == "bfloat16") return DType::BF16;
    if (name == "float16") return DType::F16;
    if (name == "float64") return DType::F64;
    throw py::value_error("mix: unknown " + what + " '" + name +
                          "'; expected float32, bfloat16, float16 or float64");
}

int dtype_size(DType d) { return d == DType::F64 ? 8 : d == DType::F32 ? 4 : 2; }

struct MixArgs {
    std::uintptr_t experts, coeffs, block_group, block_start, block_end, out;
    int K;
    long long row_stride;
    int n_blocks;
    cudaStream_t stream;
};

// The instantiation for these inputs: MAXK (4, 8, 16 unrolled; 0 the runtime loop for K > 16)
// and EPT (16-byte vectors where every row start is on 16 bytes and out on a whole output
// vector, else 1). kernels/cuda.py's `instantiation` makes the same choice for the CuPy path.
struct Choice {
    int maxk, ept;
};

Choice choose(DType in, DType to, long long K, long long row_stride, std::uintptr_t experts,
              std::uintptr_t out) {
    const int ept = 16 / dtype_size(in);
    const int out_vector = std::min(16, ept * dtype_size(to));
    const bool vector = experts % 16 == 0 && out % out_vector == 0 &&
                        (K == 1 || (row_stride * dtype_size(in)) % 16 == 0);
    return {K <= 4 ? 4 : K <= 8 ? 8 : K <= 16 ? 16 : 0, vector ? ept : 1};
}

void check_launch() {
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess)
        throw std::runtime_error(std::string("mix: kernel launch failed: ") +
                                 cudaGetErrorString(err));
}

template <typename Tin, typename Tout, typename Acc, int MAXK, int EPT>
void launch(const MixArgs& a) {
    scoremerge::mix_kernel<Tin, Tout, Acc, MAXK, EPT>
        <<<a.n_blocks, scoremerge::MIX_THREADS, 0, a.stream>>>(
            reinterpret_cast<const Tin*>(a.experts), reinterpret_cast<const Acc*>(a.coeffs),
            reinterpret_cast<Tout*>(a.out), reinterpret_cast<const int*>(a.block_group),
            reinterpret_cast<const long long*>(a.block_start),
            reinterpret_cast<const long long*>(a.block_end), a.K, a.row_stride);
}

template <typename Tin, typename Tout, typename Acc, int MAXK>
void launch_ept(const MixArgs& a, int ept) {
    if (ept > 1) launch<Tin, Tout, Acc, MAXK, 16 / sizeof(Tin)>(a);
    else launch<Tin, Tout, Acc, MAXK, 1>(a);
}

template <typename Tin, typename Tout, typename Acc>
void launch_typed(const MixArgs& a, Choice c) {
    switch (c.maxk) {
        case 4: return launch_ept<Tin, Tout, Acc, 4>(a, c.ept);
        case 8: return launch_ept<Tin, Tout, Acc, 8>(a, c.ept);
        case 16: return launch_ept<Tin, Tout, Acc, 16>(a, c.ept);
        default: return launch_ept<Tin, Tout, Acc, 0>(a, c.ept);
    }
}

template <typename Tin>
void launch_out(DType out, const MixArgs& a, Choice c) {
    switch (out) {
        case DType::F32: return launch_typed<Tin, float, float>(a, c);
        case DType::BF16: return launch_typed<Tin, bf16, float>(a, c);
        case DType::F16: return launch_typed<Tin, f16, float>(a, c);
        default: throw std::logic_error("mix: unreachable output dtype");
    }
}

void require(bool ok, const std::string& message) {
    if (!ok) throw py::value_error("mix: " + message);
}

std::pair<DType, DType> parse_pair(const std::string& in_dtype, const std::string& out_dtype) {
    const DType in = parse_dtype("in_dtype", in_dtype), to = parse_dtype("out_dtype", out_dtype);
    require((in == DType::F64) == (to == DType::F64),
            "no kernel for " + in_dtype + " -> " + out_dtype +
                ": float64 mixes into float64 only, float32/bfloat16/float16 into each other");
    return {in, to};
}

void mix(const std::string& in_dtype, const std::string& out_dtype, std::uintptr_t experts,
         long long row_stride, long long K, long long N, std::uintptr_t coeffs,
         std::uintptr_t block_group, std::uintptr_t block_start, std::uintptr_t block_end,
         long long n_blocks, std::uintptr_t out, std::uintptr_t stream) {
    const auto [in, to] = parse_pair(in_dtype, out_dtype);
    require(K >= 1 && K <= INT_MAX, "K must be in 1.." + std::to_string(INT_MAX) + ", got " +
                                        std::to_string(K));
    require(N >= 0, "N must be >= 0, got " + std::to_string(N));
    require(row_stride >= N, "row_stride must be >= N = " + std::to_string(N) + " (rows may not "
                             "overlap), got " + std::to_string(row_stride));
    require(n_blocks >= 0 && n_blocks <= INT_MAX, "n_blocks must be in 0.." +
                                                      std::to_string(INT_MAX) + ", got " +
                                                      std::to_string(n_blocks));
    const std::pair<const char*, std::uintptr_t> pointers[] = {
        {"experts", experts}, {"coeffs", coeffs}, {"block_group", block_group},
        {"block_start", block_start}, {"block_end", block_end}, {"out", out}};
    for (const auto& p : pointers)
        require(p.second != 0, std::string(p.first) + " is a null pointer");
    require(experts % dtype_size(in) == 0 && out % dtype_size(to) == 0 &&
                coeffs % (in == DType::F64 ? 8 : 4) == 0 && block_group % 4 == 0 &&
                block_start % 8 == 0 && block_end % 8 == 0,
            "a pointer is not aligned to its element size");
    if (n_blocks == 0) return;

    const MixArgs a{experts, coeffs, block_group, block_start, block_end, out, (int)K, row_stride,
                    (int)n_blocks, reinterpret_cast<cudaStream_t>(stream)};
    const Choice c = choose(in, to, K, row_stride, experts, out);
    switch (in) {
        case DType::F32: launch_out<float>(to, a, c); break;
        case DType::BF16: launch_out<bf16>(to, a, c); break;
        case DType::F16: launch_out<f16>(to, a, c); break;
        case DType::F64: launch_typed<double, double, double>(a, c); break;
    }
    check_launch();
}

py::tuple instantiation(const std::string& in_dtype, const std::string& out_dtype, long long K,
                        long long row_stride, std::uintptr_t experts, std::uintptr_t out) {
    const auto [in, to] = parse_pair(in_dtype, out_dtype);
    const Choice c = choose(in, to, K, row_stride, experts, out);
    return py::make_tuple(c.maxk, c.ept);
}

// Why this device cannot run the extension's kernels (no image for its architecture, a driver
// older than the toolkit), or "" when it can; asked once per device, in its current context.
std::string kernel_error() {
    cudaFuncAttributes attr;
    cudaError_t err =
        cudaFuncGetAttributes(&attr, scoremerge::mix_kernel<float, float, float, 4, 4>);
    if (err == cudaSuccess) return "";
    cudaGetLastError();                                // clear it: the next launch starts clean
    return cudaGetErrorString(err);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "scoremerge's CUDA kernels (csrc/); raw device pointers in, no torch linkage";
    m.attr("BLOCK_ELEMS") = scoremerge::MIX_BLOCK_ELEMS;
    m.attr("THREADS") = scoremerge::MIX_THREADS;
    m.def("version", [] { return ABI_VERSION; }, "the bindings' ABI version");
    m.def("cuda_runtime_version", [] {
        int v = 0;
        cudaRuntimeGetVersion(&v);
        return v;
    }, "the CUDA runtime the module was built with, e.g. 13000");
    m.def("instantiation", &instantiation, py::arg("in_dtype"), py::arg("out_dtype"),
          py::arg("K"), py::arg("row_stride"), py::arg("experts"), py::arg("out"),
          "(MAXK, EPT) of the mix_kernel that mix() launches for these arguments");
    m.def("kernel_error", &kernel_error,
          "'' when the current device can run the kernels, else the CUDA error saying why not");
    register_eigh(m);
    m.def("mix", &mix, py::arg("in_dtype"), py::arg("out_dtype"), py::arg("experts"),
          py::arg("row_stride"), py::arg("K"), py::arg("N"), py::arg("coeffs"),
          py::arg("block_group"), py::arg("block_start"), py::arg("block_end"),
          py::arg("n_blocks"), py::arg("out"), py::arg("stream"),
          "out[j] = sum_k coeffs[g, k] * experts[k * row_stride + j] over the block table's "
          "blocks; coeffs float32 [G, K] (float64 for float64 -> float64), pointers as ints");
}
