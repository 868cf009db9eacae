// Batched symmetric eigensolver for the truncated SVD and polar factor (issue 6): cuSOLVER's
// cusolverDnXsyevBatched over a batch of float64 (or float32) Gram matrices, one call for the
// whole batch. torch.linalg.eigh uses the batched solver only up to 32x32 and loops a per-matrix
// solver above that, which is what makes the Gram route slow there.
//
// cuSOLVER is opened at run time (dlopen), preferring the copy the process has already loaded
// (torch's), and the few declarations needed are written out below, not included: the build
// needs only nvcc and cudart (a minimal toolkit has no cuSOLVER headers), and importing _C never
// fails for want of the library -- eigh_error() says why the solver is unavailable instead.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <dlfcn.h>

#include <climits>
#include <cstdint>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "eigh.h"

namespace py = pybind11;

namespace {

// cuSOLVER's ABI, as documented (cusolverDn.h, cublas_api.h, library_types.h).
using Handle = void*;                       // cusolverDnHandle_t
using Params = void*;                       // cusolverDnParams_t
using Status = int;                         // cusolverStatus_t; 0 is success
constexpr int EIG_MODE_VECTOR = 1;          // CUSOLVER_EIG_MODE_VECTOR
constexpr int FILL_MODE_LOWER = 0;          // CUBLAS_FILL_MODE_LOWER
constexpr int R_32F = 0, R_64F = 1;         // CUDA_R_32F, CUDA_R_64F

struct Cusolver {
    Status (*create)(Handle*);
    Status (*set_stream)(Handle, cudaStream_t);
    Status (*create_params)(Params*);
    Status (*buffer_size)(Handle, Params, int, int, int64_t, int, const void*, int64_t, int,
                          const void*, int, size_t*, size_t*, int64_t);
    Status (*syev_batched)(Handle, Params, int, int, int64_t, int, void*, int64_t, int, void*,
                           int, void*, size_t, void*, size_t, int*, int64_t);
};

// The sonames of cuSOLVER 12 (CUDA 13), 11 (CUDA 11-12) and an unversioned development link.
const char* const LIBRARIES[] = {"libcusolver.so.12", "libcusolver.so.11", "libcusolver.so"};

// Loaded once; `why` is empty when every symbol was found.
struct Loaded {
    Cusolver api{};
    std::string why;
};

const Loaded& cusolver() {
    static const Loaded loaded = [] {
        Loaded out;
        void* lib = nullptr;
        for (const char* name : LIBRARIES)     // the copy already in the process first
            if ((lib = dlopen(name, RTLD_NOW | RTLD_NOLOAD))) break;
        for (const char* name : LIBRARIES)
            if (!lib && (lib = dlopen(name, RTLD_NOW))) break;
        if (!lib) {
            out.why = "cuSOLVER (libcusolver.so.12 or .11) is not loadable";
            return out;
        }
        auto find = [&](const char* symbol) {
            void* p = dlsym(lib, symbol);
            if (!p && out.why.empty())
                out.why = std::string("cuSOLVER has no ") + symbol +
                          " (cusolverDnXsyevBatched needs CUDA 12.6 update 2 or newer)";
            return p;
        };
        out.api.create = reinterpret_cast<decltype(out.api.create)>(find("cusolverDnCreate"));
        out.api.set_stream =
            reinterpret_cast<decltype(out.api.set_stream)>(find("cusolverDnSetStream"));
        out.api.create_params =
            reinterpret_cast<decltype(out.api.create_params)>(find("cusolverDnCreateParams"));
        out.api.buffer_size = reinterpret_cast<decltype(out.api.buffer_size)>(
            find("cusolverDnXsyevBatched_bufferSize"));
        out.api.syev_batched =
            reinterpret_cast<decltype(out.api.syev_batched)>(find("cusolverDnXsyevBatched"));
        return out;
    }();
    return loaded;
}

// One handle (and params) per device, made on first use in that device's context and kept for
// the process; calls are serialised because a handle is not safe to share between threads.
struct DeviceSolver {
    Handle handle = nullptr;
    Params params = nullptr;
};

std::mutex solver_mutex;

DeviceSolver& solver_for_current_device() {
    static std::map<int, DeviceSolver> solvers;
    int device = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess)
        throw std::runtime_error(std::string("eigh: no CUDA device: ") + cudaGetErrorString(err));
    DeviceSolver& s = solvers[device];
    if (!s.handle) {
        const Cusolver& api = cusolver().api;
        Status st = api.create(&s.handle);
        if (st != 0) {
            s.handle = nullptr;
            throw std::runtime_error("eigh: cusolverDnCreate failed with status " +
                                     std::to_string(st));
        }
        st = api.create_params(&s.params);
        if (st != 0)
            throw std::runtime_error("eigh: cusolverDnCreateParams failed with status " +
                                     std::to_string(st));
    }
    return s;
}

int data_type(const std::string& dtype) {
    if (dtype == "float64") return R_64F;
    if (dtype == "float32") return R_32F;
    throw py::value_error("eigh: dtype must be float64 or float32, got '" + dtype + "'");
}

void check_sizes(long long n, long long batch) {
    if (n < 1) throw py::value_error("eigh: n must be >= 1, got " + std::to_string(n));
    if (batch < 1) throw py::value_error("eigh: batch must be >= 1, got " + std::to_string(batch));
    // cuSOLVER's documented limit for the batched solver: n * lda * batch <= INT32_MAX.
    if (n > INT_MAX / n || n * n > INT_MAX / batch)
        throw py::value_error("eigh: n * n * batch = " + std::to_string(n) + " * " +
                              std::to_string(n) + " * " + std::to_string(batch) +
                              " exceeds cuSOLVER's batched limit of 2^31 - 1; split the batch");
}

void require_loaded() {
    const Loaded& l = cusolver();
    if (!l.why.empty()) throw std::runtime_error("eigh: " + l.why);
}

// (device bytes, host bytes) of workspace for eigh_batched with these sizes.
py::tuple workspace(const std::string& dtype, long long n, long long batch) {
    const int type = data_type(dtype);
    check_sizes(n, batch);
    require_loaded();
    std::lock_guard<std::mutex> lock(solver_mutex);
    DeviceSolver& s = solver_for_current_device();
    size_t device_bytes = 0, host_bytes = 0;
    const Status st = cusolver().api.buffer_size(s.handle, s.params, EIG_MODE_VECTOR,
                                                 FILL_MODE_LOWER, n, type, nullptr, n, type,
                                                 nullptr, type, &device_bytes, &host_bytes, batch);
    if (st != 0)
        throw std::runtime_error("eigh: cusolverDnXsyevBatched_bufferSize failed with status " +
                                 std::to_string(st));
    return py::make_tuple(device_bytes, host_bytes);
}

// Eigen-decomposes `batch` symmetric n x n matrices packed at `a` (each read through its lower
// triangle, which for a symmetric matrix is the same in row- and column-major order) in place:
// on return each matrix holds its eigenvectors as columns in column-major order (rows of the
// row-major buffer), and `w` its eigenvalues in ascending order. `info` is a device int32[batch].
// Runs on `stream`, waits for it, and returns the batch indices that did not converge.
std::vector<long long> eigh_batched(const std::string& dtype, long long n, long long batch,
                                    std::uintptr_t a, std::uintptr_t w, std::uintptr_t info,
                                    std::uintptr_t work, long long work_bytes,
                                    std::uintptr_t stream) {
    const int type = data_type(dtype);
    check_sizes(n, batch);
    const std::uintptr_t elt = type == R_64F ? 8 : 4;
    struct Pointer {
        const char* name;
        std::uintptr_t address, alignment;
    };
    for (const Pointer& p : {Pointer{"a", a, elt}, Pointer{"w", w, elt}, Pointer{"info", info, 4}}) {
        if (p.address == 0) throw py::value_error(std::string("eigh: ") + p.name + " is null");
        if (p.address % p.alignment)
            throw py::value_error(std::string("eigh: ") + p.name + " is not aligned to " +
                                  std::to_string(p.alignment) + " bytes");
    }
    if (work_bytes < 0)
        throw py::value_error("eigh: work_bytes must be >= 0, got " + std::to_string(work_bytes));
    if (work_bytes > 0 && work == 0) throw py::value_error("eigh: work is null");
    require_loaded();

    std::lock_guard<std::mutex> lock(solver_mutex);
    const Cusolver& api = cusolver().api;
    DeviceSolver& s = solver_for_current_device();
    auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
    size_t device_bytes = 0, host_bytes = 0;
    Status st = api.buffer_size(s.handle, s.params, EIG_MODE_VECTOR, FILL_MODE_LOWER, n, type,
                                reinterpret_cast<void*>(a), n, type, reinterpret_cast<void*>(w),
                                type, &device_bytes, &host_bytes, batch);
    if (st != 0)
        throw std::runtime_error("eigh: cusolverDnXsyevBatched_bufferSize failed with status " +
                                 std::to_string(st));
    if ((size_t)work_bytes < device_bytes)
        throw py::value_error("eigh: work holds " + std::to_string(work_bytes) + " bytes, the "
                              "solver needs " + std::to_string(device_bytes));
    std::vector<char> host(host_bytes);
    st = api.set_stream(s.handle, cuda_stream);
    if (st == 0)
        st = api.syev_batched(s.handle, s.params, EIG_MODE_VECTOR, FILL_MODE_LOWER, n, type,
                              reinterpret_cast<void*>(a), n, type, reinterpret_cast<void*>(w),
                              type, reinterpret_cast<void*>(work), device_bytes,
                              host_bytes ? host.data() : nullptr, host_bytes,
                              reinterpret_cast<int*>(info), batch);
    if (st != 0)
        throw std::runtime_error("eigh: cusolverDnXsyevBatched failed with status " +
                                 std::to_string(st));
    // The host workspace lives until the stream is done with it; the info flags are read here.
    std::vector<int> flags(batch);
    cudaError_t err = cudaMemcpyAsync(flags.data(), reinterpret_cast<void*>(info),
                                      batch * sizeof(int), cudaMemcpyDeviceToHost, cuda_stream);
    if (err == cudaSuccess) err = cudaStreamSynchronize(cuda_stream);
    if (err != cudaSuccess)
        throw std::runtime_error(std::string("eigh: ") + cudaGetErrorString(err));
    std::vector<long long> failed;
    for (long long i = 0; i < batch; ++i)
        if (flags[i] != 0) failed.push_back(i);
    return failed;
}

// Why the batched eigensolver cannot run here ("" when it can): cuSOLVER missing or too old.
std::string eigh_error() { return cusolver().why; }

}  // namespace

void register_eigh(py::module_& m) {
    m.def("eigh_error", &eigh_error,
          "'' when cuSOLVER's batched eigensolver can be used, else why not");
    m.def("eigh_workspace", &workspace, py::arg("dtype"), py::arg("n"), py::arg("batch"),
          "(device bytes, host bytes) of workspace eigh_batched needs (current device)");
    m.def("eigh_batched", &eigh_batched, py::arg("dtype"), py::arg("n"), py::arg("batch"),
          py::arg("a"), py::arg("w"), py::arg("info"), py::arg("work"), py::arg("work_bytes"),
          py::arg("stream"),
          "in place: batch symmetric n x n matrices at a -> eigenvectors (rows of the row-major "
          "buffer), eigenvalues ascending at w; waits for the stream; returns the indices that "
          "did not converge");
}
