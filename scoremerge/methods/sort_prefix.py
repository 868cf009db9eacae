"""Which entries `torch.argsort(values, descending=True)[:k]` picks on a CPU, without the sort.

mergekit keeps the first k of exactly that argsort. When several magnitudes tie at the cut,
which of them are kept is decided by the sort's own order of equal values; torch's CPU sort is
libstdc++'s std::sort (an introsort, not stable), so that order is a function of the whole
array. It can still be had in O(n): replay the introsort's partition steps, but only on the
part of the array that holds position k (a part left of the cut lands wholly before k, a part
right of it wholly after, and nothing crosses a cut later), then settle the last small part as
the sort's final insertion pass does, stably.

One partition step of libstdc++ (__unguarded_partition_pivot) moves the median of
a[first + 1], a[mid], a[last - 1] to a[first] and runs Hoare's scan on [first + 1, last): the
j-th entry from the left that is not above the pivot swaps with the j-th from the right that
is not below it, while the first lies left of the second; the cut is where the left scan
stops. With L (ascending) and R (descending) the positions of those two kinds, the swaps are
the pairs (L[j], R[j]) for j < J, J the first j with L[j] >= R[j], and the cut is
min(L[J], R[J - 1]). The compiled replay (csrc/cpu/sort_prefix.cpp) runs those steps as the
sort does, in a scalar loop; the torch one here, a few vectorised passes per step, is its
reference and stands in where the extension was not built.

This reproduces an implementation, not a specification, so it is checked against torch's own
argsort on a tie-heavy probe once per process; on any disagreement (another torch build, a
future sort), on NaN (the sort's NaN order) and where the introsort would switch to heapsort
(past its depth limit), argsort itself answers.
"""
import functools

import torch

from ..backend.cpu import extension as cpu_extension

# libstdc++'s _S_threshold: parts of at most this many entries are left to the final insertion
_INSERTION = 16


def argsort_prefix_mask(values, k, *, scratch=False):
    """bool [n]: True at the positions of torch.argsort(values, descending=True)[:k], for a
    1-D float tensor values and 1 <= k <= n. scratch: values may be left permuted (saves a
    copy)."""
    if values.device.type == "cpu" and values.dtype == torch.float32 and compiled():
        values = values.contiguous() if scratch else values.contiguous().clone()
        mask = torch.zeros(values.numel(), dtype=torch.bool)
        if _compiled_mask(values, k, mask):
            return mask
    elif values.device.type == "cpu" and not torch.isnan(values).any() and _torch_agrees():
        mask = _replayed(values, k)
        if mask is not None:
            return mask
    return _sorted(values, k)


# 65M tie-heavy float32 magnitudes on the 2-core machine: argsort 6.1-6.5 s, the torch replay
# 1.5-1.6 s, the compiled one 0.65-0.76 s (tests/test_sort_prefix.py checks the sets, not times).
@functools.cache
def compiled():
    """Whether the compiled replay (csrc/cpu/sort_prefix.cpp, scoremerge._cpu) was built and
    picks what this torch's argsort picks: argsort_prefix_mask is then a few scalar passes."""
    return cpu_extension()[0] is not None and _agrees(_compiled_prefix)


@functools.cache
def _torch_agrees():
    return _agrees(_replayed)


def _compiled_mask(values, k, mask, depth=-1):
    """Fills the zeroed mask by the compiled replay, permuting values; False where it cannot
    (a NaN, or past the introsort's depth limit: values are then as they were). depth: the
    depth limit, -1 for the introsort's own."""
    _cpu = cpu_extension()[0]
    return _cpu.prefix_mask(values.data_ptr(), values.numel(), k, mask.data_ptr(),
                            depth) == _cpu.OK


def _compiled_prefix(values, k):
    mask = torch.zeros(values.numel(), dtype=torch.bool)
    return mask if _compiled_mask(values.clone(), k, mask) else None


def _sorted(values, k):
    mask = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    mask[torch.argsort(values, descending=True)[:k]] = True
    return mask


def _agrees(prefix):
    """Whether prefix(values, k) (a mask, or None where it declines) is what this torch's
    argsort picks, on tie-heavy probes (rounded normals, all kinds of k), past the insertion
    threshold and through several partitions."""
    g = torch.Generator().manual_seed(0)
    for n, k in ((40, 17), (1000, 333), (4099, 2048), (50_000, 12_345), (50_000, 49_990)):
        values = (torch.randn(n, generator=g) * 4).round().abs()
        mask = prefix(values, k)
        if mask is None or not torch.equal(mask, _sorted(values, k)):
            return False
    return True


def _replayed(values, k):
    """The replay in vectorised torch (the reference of the compiled one): the partition
    steps, then the insertion sort's stable order on the last part; None past the introsort's
    depth limit."""
    n = values.numel()
    a = values.contiguous().clone()
    where = torch.arange(n, dtype=torch.int32 if n < 2**31 else torch.int64)
    first, last = 0, n
    depth = 2 * (n.bit_length() - 1)                 # std::__lg(n) * 2
    while last - first > _INSERTION and first < k < last:
        if depth == 0:
            return None                              # the introsort's heapsort: not replayed
        depth -= 1
        _median_to_first(a, where, first, last)
        cut = _partition(a, where, first, last)
        if k <= cut:
            last = cut
        else:
            first = cut
    if first < k < last:
        order = torch.sort(a[first:last], descending=True, stable=True).indices
        where[first:last] = where[first:last][order]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[where[:k].long()] = True
    return mask


def _median_to_first(a, where, first, last):
    """std::__move_median_to_first(first, first + 1, mid, last - 1) under the descending
    comparison x > y: swaps a[first] with the median of the three."""
    i, j, m = first + 1, first + (last - first) // 2, last - 1
    x, y, z = a[i].item(), a[j].item(), a[m].item()
    if x > y:
        median = j if y > z else (m if x > z else i)
    elif x > z:
        median = i
    else:
        median = m if y > z else j
    swap = torch.tensor([first, median])
    a[swap] = a[swap.flip(0)]
    where[swap] = where[swap.flip(0)]


def _partition(a, where, first, last):
    """std::__unguarded_partition(first + 1, last, pivot at first) in place; returns the cut."""
    pivot = a[first].item()
    part, tags = a[first + 1:last], where[first + 1:last]
    left = (part <= pivot).nonzero().squeeze(1)          # where the left scan stops
    right = (part >= pivot).nonzero().squeeze(1).flip(0)  # where the right scan stops
    swaps = _crossing(left, right)
    stops = ([left[swaps].item()] if swaps < left.numel() else []) + \
        ([right[swaps - 1].item()] if swaps else [])
    lo, hi = left[:swaps], right[:swaps]
    for x in (part, tags):
        x_lo, x_hi = x[lo], x[hi]
        x.index_copy_(0, lo, x_hi)
        x.index_copy_(0, hi, x_lo)
    return first + 1 + min(stops)


def _crossing(left, right):
    """The first j with left[j] >= right[j] (left ascending, right descending, so the test is
    monotone in j), or the shorter length."""
    lo, hi = 0, min(left.numel(), right.numel())
    while lo < hi:
        mid = (lo + hi) // 2
        if left[mid].item() >= right[mid].item():
            hi = mid
        else:
            lo = mid + 1
    return lo
