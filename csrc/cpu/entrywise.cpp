// Fused float32 entry-wise merges: one pass over the inputs instead of a torch op per step.
//
// Each reproduces, rounding for rounding, the torch path of scoremerge/methods/entrywise.py
// (its reference, which scoremerge checks this against before using it):
//   task_arithmetic: acc = +0; acc += (e_t - b) [* w_t] for t in order; out = b + acc [* alpha]
//     (torch's sum over the task dim accumulates from +0, task by task, for the T it checks)
//   linear:          acc = +0; acc = fma(e_t, w_t, acc) for t in order (torch's addcmul_ fuses
//                    the product into the sum); out = acc / divisor (or acc)
// Every other operation is rounded to float32 on its own: built with -ffp-contract=off, so that
// the compiler fuses no multiply and add into an FMA of its own. Blocks of entries keep the accumulators
// in cache while each input streams through once.
#include "cpu.h"

#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace py = pybind11;

namespace {

constexpr int64_t BLOCK = 2048;

// std::fma without the FMA instructions is a slow library call: on x86-64 the loops that use it
// get an FMA build too, picked at load time where the CPU has it (the results are the same).
#if defined(__x86_64__) && defined(__GNUC__)
#define SCOREMERGE_FMA_CLONES __attribute__((target_clones("fma", "default")))
#else
#define SCOREMERGE_FMA_CLONES
#endif

int64_t count_nonfinite(const float* o, int64_t len) {
  int64_t bad = 0;
  for (int64_t i = 0; i < len; ++i) bad += !std::isfinite(o[i]);
  return bad;
}

int64_t task_arithmetic(const float* base, const std::vector<const float*>& experts,
                        const std::vector<float>& weights, float alpha, float* out, int64_t n) {
  float acc[BLOCK];
  int64_t bad = 0;
  for (int64_t lo = 0; lo < n; lo += BLOCK) {
    const int64_t len = std::min(BLOCK, n - lo);
    const float* b = base + lo;
    std::fill(acc, acc + len, 0.0f);
    for (size_t t = 0; t < experts.size(); ++t) {
      const float* e = experts[t] + lo;
      if (weights.empty()) {
        for (int64_t i = 0; i < len; ++i) acc[i] += e[i] - b[i];
      } else {
        const float w = weights[t];
        for (int64_t i = 0; i < len; ++i) acc[i] += (e[i] - b[i]) * w;
      }
    }
    float* o = out + lo;
    if (alpha == 1.0f) {
      for (int64_t i = 0; i < len; ++i) o[i] = b[i] + acc[i];
    } else {
      for (int64_t i = 0; i < len; ++i) o[i] = b[i] + acc[i] * alpha;
    }
    bad += count_nonfinite(o, len);
  }
  return bad;
}

SCOREMERGE_FMA_CLONES
int64_t linear(const std::vector<const float*>& experts, const std::vector<float>& weights,
               float divisor, float* out, int64_t n) {
  float acc[BLOCK];
  int64_t bad = 0;
  for (int64_t lo = 0; lo < n; lo += BLOCK) {
    const int64_t len = std::min(BLOCK, n - lo);
    std::fill(acc, acc + len, 0.0f);
    for (size_t t = 0; t < experts.size(); ++t) {
      const float* e = experts[t] + lo;
      const float w = weights[t];
      for (int64_t i = 0; i < len; ++i) acc[i] = std::fma(e[i], w, acc[i]);
    }
    float* o = out + lo;
    if (divisor == 1.0f) {
      std::copy(acc, acc + len, o);
    } else {
      for (int64_t i = 0; i < len; ++i) o[i] = acc[i] / divisor;
    }
    bad += count_nonfinite(o, len);
  }
  return bad;
}

std::vector<const float*> pointers(const std::vector<uintptr_t>& addresses) {
  std::vector<const float*> out;
  for (uintptr_t a : addresses) {
    if (!a) throw std::invalid_argument("entrywise: null pointer");
    out.push_back(reinterpret_cast<const float*>(a));
  }
  if (out.empty()) throw std::invalid_argument("entrywise: no experts");
  return out;
}

}  // namespace

namespace scoremerge_cpu {

int64_t task_arithmetic_py(uintptr_t base, const std::vector<uintptr_t>& experts,
                           const std::vector<float>& weights, float alpha, uintptr_t out,
                           int64_t n) {
  auto e = pointers(experts);
  if (!base || !out || n < 0) throw std::invalid_argument("task_arithmetic: bad arguments");
  if (!weights.empty() && weights.size() != e.size())
    throw std::invalid_argument("task_arithmetic: one weight per expert");
  py::gil_scoped_release release;
  return task_arithmetic(reinterpret_cast<const float*>(base), e, weights, alpha,
                         reinterpret_cast<float*>(out), n);
}

int64_t linear_py(const std::vector<uintptr_t>& experts, const std::vector<float>& weights,
                  float divisor, uintptr_t out, int64_t n) {
  auto e = pointers(experts);
  if (!out || n < 0 || weights.size() != e.size())
    throw std::invalid_argument("linear: bad arguments");
  py::gil_scoped_release release;
  return linear(e, weights, divisor, reinterpret_cast<float*>(out), n);
}

}  // namespace scoremerge_cpu
