// scoremerge._cpu's entry points (module.cpp binds them). Pointers come as Python ints (no
// torch linkage); each releases the GIL while it runs.
#pragma once

#include <cstdint>
#include <vector>

namespace scoremerge_cpu {

constexpr int ABI_VERSION = 3;
enum Status { OK = 0, HAS_NAN = 1, TOO_DEEP = 2 };

// sort_prefix.cpp: mask the positions torch.argsort(values, descending=True)[:k] keeps.
int prefix_mask_py(uintptr_t values, int64_t n, int64_t k, uintptr_t mask, int64_t depth);

// entrywise.cpp: fused float32 task arithmetic and linear over [0, n); the count of non-finite
// outputs.
int64_t task_arithmetic_py(uintptr_t base, const std::vector<uintptr_t>& experts,
                           const std::vector<float>& weights, float alpha, uintptr_t out,
                           int64_t n);
int64_t linear_py(const std::vector<uintptr_t>& experts, const std::vector<float>& weights,
                  float divisor, uintptr_t out, int64_t n);

}  // namespace scoremerge_cpu
