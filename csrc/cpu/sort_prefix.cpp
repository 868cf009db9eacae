// The partition replay of scoremerge/methods/sort_prefix.py in a scalar loop (module.cpp
// binds it into scoremerge._cpu).
//
// prefix_mask(values, n, k, mask) sets mask[i] = 1 (a bool array of n, zeroed by the caller)
// at the positions of torch.argsort(values, descending=True)[:k] on a CPU, float32 values
// permuted in place as scratch. It replays the partition steps libstdc++'s std::sort (under
// torch's descending comparison x > y) takes on the part of the array that holds position k,
// exactly as that introsort does them (__move_median_to_first, then __unguarded_partition),
// then settles the last part of at most 16 as the final insertion sort does, stably. Returns
// OK, HAS_NAN (the sort's NaN order is not replayed; checked before anything moves) or
// TOO_DEEP (where the introsort would have switched to heapsort; the values are put back in
// their places); mask is then untouched. depth: the introsort's depth limit, -1 for its own
// (2 floor(log2 n)); tests pass a small one to reach TOO_DEEP. sort_prefix.py checks this module
// against torch's own argsort before it trusts it. Pointers come as Python ints (no torch
// linkage); the GIL is released while it runs, so rows of a TIES merge rank on several
// threads.
#include "cpu.h"

#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <stdexcept>
#include <utility>
#include <vector>

namespace py = pybind11;
using namespace scoremerge_cpu;

namespace {

constexpr int64_t INSERTION = 16;   // libstdc++'s _S_threshold

inline bool before(float x, float y) { return x > y; }

template <typename Tag>
inline void swap_at(float* a, Tag* tag, int64_t i, int64_t j) {
  std::swap(a[i], a[j]);
  std::swap(tag[i], tag[j]);
}

template <typename Tag>
std::pair<int64_t, int64_t> narrow(float* a, Tag* tag, int64_t n, int64_t k, int64_t depth) {
  int64_t first = 0, last = n;
  while (last - first > INSERTION && first < k && k < last) {
    if (depth == 0) return {-1, -1};
    --depth;
    const int64_t i = first + 1, j = first + (last - first) / 2, m = last - 1;
    int64_t median;
    if (before(a[i], a[j])) {
      median = before(a[j], a[m]) ? j : (before(a[i], a[m]) ? m : i);
    } else if (before(a[i], a[m])) {
      median = i;
    } else {
      median = before(a[j], a[m]) ? m : j;
    }
    swap_at(a, tag, first, median);
    const float pivot = a[first];
    int64_t lo = first + 1, hi = last;
    while (true) {
      while (before(a[lo], pivot)) ++lo;
      --hi;
      while (before(pivot, a[hi])) --hi;
      if (!(lo < hi)) break;
      swap_at(a, tag, lo, hi);
      ++lo;
    }
    if (k <= lo) last = lo; else first = lo;
  }
  return {first, last};
}

template <typename Tag>
Status prefix_mask(float* a, int64_t n, int64_t k, uint8_t* mask, int64_t depth) {
  std::vector<Tag> tag(n);
  std::iota(tag.begin(), tag.end(), Tag(0));
  auto [first, last] = narrow(a, tag.data(), n, k, depth);
  if (first < 0) {                      // put the values back where they were, for the sort
    std::vector<float> moved(a, a + n);
    for (int64_t i = 0; i < n; ++i) a[tag[i]] = moved[i];
    return TOO_DEEP;
  }
  if (first < k && k < last) {
    std::vector<std::pair<float, Tag>> part(last - first);
    for (int64_t i = first; i < last; ++i) part[i - first] = {a[i], tag[i]};
    std::stable_sort(part.begin(), part.end(),
                     [](const auto& x, const auto& y) { return before(x.first, y.first); });
    for (int64_t i = first; i < last; ++i) tag[i] = part[i - first].second;
  }
  for (int64_t i = 0; i < k; ++i) mask[tag[i]] = 1;
  return OK;
}

}  // namespace

namespace scoremerge_cpu {

int prefix_mask_py(uintptr_t values, int64_t n, int64_t k, uintptr_t mask, int64_t depth) {
  if (!values || !mask) throw std::invalid_argument("prefix_mask: null pointer");
  if (n < 1 || k < 1 || k > n) throw std::invalid_argument("prefix_mask: need 1 <= k <= n");
  float* a = reinterpret_cast<float*>(values);
  uint8_t* out = reinterpret_cast<uint8_t*>(mask);
  py::gil_scoped_release release;
  for (int64_t i = 0; i < n; ++i)
    if (std::isnan(a[i])) return HAS_NAN;
  if (depth < 0) {
    depth = 0;
    for (int64_t m = n; m > 1; m >>= 1) depth += 2;        // std::__lg(n) * 2
  }
  return n < (int64_t(1) << 31) ? prefix_mask<int32_t>(a, n, k, out, depth)
                                : prefix_mask<int64_t>(a, n, k, out, depth);
}

}  // namespace scoremerge_cpu

