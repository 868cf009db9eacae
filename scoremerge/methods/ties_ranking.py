"""TIES's ranking: what TIES must know about a whole scope (the model, or one key) before it can
merge any entry, found from the scope in memory or from one key read span by span (a key
larger than the streaming merge's memory budget).

Per task t, which entries survive the trim: with trim="threshold", every entry whose magnitude
is at least the k_t-th largest; with trim="exact" (mergekit's), exactly k_t entries, the first
of a descending argsort of the float32 magnitudes, which is the same threshold test where no
magnitude ties across the cut, and otherwise a mask of the argsort's own choice (sort_prefix).
With zero_sign other than "zero", also the sign the scope's entries elect most often.

Once that is known, every merged entry depends only on the same entry of the task vectors, so
TIES merges in chunks or spans with the same arithmetic, to the same bits (elementwise.ties).

From spans, a threshold is the k-th largest found by radix selection: histograms of the
magnitudes' bit patterns (non-negative floats order as their bits do as integers), 16 bits per
pass, so two passes over the key in float32, four in float64, in memory of two histograms per
task. The exact trim's mask needs the sort's order, a function of the whole array, so each task
in turn has its float32 magnitudes gathered whole (4 bytes per entry) and keeps a mask of its
kept entries (one bit per entry, PackedMask).
"""
import math

import torch

from ..parallel import parallel_map
from .sort_prefix import argsort_prefix_mask, compiled

# kth_largest: from this many entries on, bracket the answer with a sample of about _SAMPLE
_SAMPLED_SELECTION, _SAMPLE = 1 << 20, 1 << 16
_DIGIT = 16                         # bits per radix pass
_BITS = {torch.float32: (torch.int32, 32), torch.float64: (torch.int64, 64)}


class Ranking:
    """The trim of each task over a scope of keys laid end to end (offsets: where each key
    starts): per task a magnitude threshold, or for a task in masks a keep mask (PackedMask)
    over the whole scope. exact: magnitudes compared in float32 and trimmed entries multiplied
    by 0 (mergekit's arithmetic), else compared in the compute dtype and replaced by 0.0.
    majority: the sign an entry whose kept values sum to zero elects (None: it elects none)."""

    def __init__(self, thresholds, masks, offsets, exact, majority=None):
        self.thresholds, self.masks, self.offsets = thresholds[:, None], masks, offsets
        self.exact, self.majority = exact, majority

    def kept(self, key, x, start, weights=None):
        """x [T, L], the key's entries start .. start + L, with each task's trimmed entries
        zeroed and its kept values times its weight (weights: a [T] tensor or None)."""
        if self.exact:
            keep = x.abs().float() >= self.thresholds
            at = self.offsets[key] + start
            for t, mask in self.masks.items():
                keep[t] = mask[at:at + x.shape[1]]
            # a product with the 0/1 mask, as mergekit's, so a dropped negative entry is -0.0
            kept = x * keep
        else:
            kept = torch.where(x.abs() >= self.thresholds, x, 0.0)
        return kept if weights is None else kept * weights.to(x.dtype)[:, None]


def counts(densities, n, trim):
    """How many entries each task keeps of a scope of n: round(d * n) (threshold) or int(d * n)
    (exact), at least 1; None for an exact trim that keeps every entry (d >= 1)."""
    if trim == "threshold":
        return [max(1, round(d * n)) for d in densities]
    return [None if d >= 1 else max(1, int(d * n)) for d in densities]


def rank_in_memory(flat, densities, trim, offsets):
    """The Ranking of the scope flat [T, N] (its keys laid end to end at offsets), without the
    majority sign. The tasks are ranked in parallel on a CPU."""
    keep = counts(densities, flat.shape[1], trim)
    if trim == "threshold":
        thresholds = torch.stack([kth_largest(row.abs(), k) for row, k in zip(flat, keep)])
        return Ranking(thresholds, {}, offsets, exact=False)

    def rank(t):
        return (0.0, None) if keep[t] is None else exact_rank(flat[t].abs().float(), keep[t])

    ranked = parallel_map(rank, range(flat.shape[0])) if flat.device.type == "cpu" else \
        [rank(t) for t in range(flat.shape[0])]
    return _exact_ranking(ranked, offsets, flat.device)


def rank_streamed(key, read, spans, n, densities, trim, dtype, device):
    """The Ranking of one key of n entries, read span by span, without the majority sign.
    read(tasks, start, stop): the task vectors of those tasks over entries [start, stop), as
    [len(tasks), stop - start] in the compute dtype `dtype` (on `device`). spans: the (start,
    stop) that cover the key."""
    keep = counts(densities, n, trim)
    tasks = list(range(len(keep)))
    if trim == "threshold":
        thresholds = _radix_select(read, spans, tasks, keep, dtype, device)
        return Ranking(thresholds, {}, {key: 0}, exact=False)
    ranked = []
    for t in tasks:
        if keep[t] is None:
            ranked.append((0.0, None))
            continue
        magnitude = torch.empty(n, dtype=torch.float32, device=device)
        for lo, hi in spans:
            magnitude[lo:hi] = read([t], lo, hi)[0].abs()        # then rounded to float32
        ranked.append(exact_rank(magnitude, keep[t]))
        del magnitude
    return _exact_ranking(ranked, {key: 0}, device)


def exact_rank(magnitude, keep):
    """(threshold, None), or (0.0, PackedMask) where a threshold cannot say it: which of the float32
    magnitudes (a fresh 1-D tensor, used as scratch) mergekit keeps, exactly `keep` of them, the
    first of a descending argsort. Where the k-th largest is the only way to pick k entries (no
    tie across the cut), "magnitude >= threshold" is that very set, found by a selection in O(N)
    instead of a sort; a tie across the cut takes the argsort's own choice (sort_prefix). Where
    the compiled replay runs, every task takes its mask, which costs less than the selection."""
    if magnitude.device.type == "cpu" and compiled():
        return 0.0, PackedMask(argsort_prefix_mask(magnitude, keep, scratch=True))
    threshold = kth_largest(magnitude, keep)
    if int(torch.count_nonzero(magnitude >= threshold)) == keep:
        return threshold, None
    # quantized task vectors (a difference of bf16 or nearby fp32 weights) tie at the cut
    # almost always
    return 0.0, PackedMask(argsort_prefix_mask(magnitude, keep, scratch=True))


class PackedMask:
    """A bool mask of n entries at one bit per entry, an eighth of torch.bool's memory; packed
    and read in pieces, so that no byte-per-entry temporary of the whole mask is made."""
    _PIECE = 1 << 23                    # entries packed at once (a multiple of 8)

    def __init__(self, mask):
        self.n = mask.numel()
        shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
        self.bits = torch.empty(-(-self.n // 8), dtype=torch.uint8, device=mask.device)
        for lo in range(0, self.n, self._PIECE):
            piece = mask[lo:lo + self._PIECE].to(torch.uint8)
            if piece.numel() % 8:
                piece = torch.cat([piece, piece.new_zeros(8 - piece.numel() % 8)])
            self.bits[lo // 8:lo // 8 + piece.numel() // 8] = \
                (piece.view(-1, 8) << shifts).sum(1, dtype=torch.uint8)

    def __getitem__(self, entries):
        """The bool mask of entries[start:stop] (a slice with both ends given)."""
        lo, hi = entries.start, entries.stop
        first = lo // 8
        shifts = torch.arange(8, dtype=torch.uint8, device=self.bits.device)
        unpacked = (self.bits[first:-(-hi // 8), None] >> shifts) & 1
        return unpacked.view(-1)[lo - 8 * first:hi - 8 * first].bool()


def _exact_ranking(ranked, offsets, device):
    thresholds = torch.tensor([float(threshold) for threshold, _ in ranked],
                              dtype=torch.float32, device=device)
    return Ranking(thresholds, {t: mask for t, (_, mask) in enumerate(ranked)
                                if mask is not None}, offsets, exact=True)


def kth_largest(values, k):
    """The k-th largest of the 1-D tensor `values` (1 <= k <= n), exactly. For large n a
    strided sample brackets it first, and only the entries inside the bracket are selected from
    (a few cheap passes instead of one slow full selection: 65M float32 entries, kthvalue
    1.4 s on the 2-core Xeon); when the bracket misses, the full selection runs."""
    n = values.numel()
    if n >= _SAMPLED_SELECTION:
        sample = values[::n // _SAMPLE].sort().values
        s = sample.numel()
        below = (n - k) / n                             # the fraction under the k-th largest
        margin = 4.0 / math.sqrt(s)
        lo = sample[max(0, int((below - margin) * s))]
        hi = sample[min(s - 1, int((below + margin) * s))]
        above = int(torch.count_nonzero(values > hi))
        if above < k:
            band = values[(values >= lo) & (values <= hi)]
            need = k - above                            # the need-th largest of the band
            if need <= band.numel():
                return band.kthvalue(band.numel() - need + 1).values
    return values.kthvalue(n - k + 1).values


def _radix_select(read, spans, tasks, keep, dtype, device):
    """[len(tasks)] in dtype: each task's keep[t]-th largest magnitude, exactly, the key read
    once per 16 bits of the dtype. Per task, `prefix` holds the bits settled so far and `need`
    the rank still sought among the entries that share them."""
    as_int, width = _BITS[dtype]
    prefix = [0] * len(tasks)
    need = list(keep)
    for shift in range(width - _DIGIT, -1, -_DIGIT):
        hist = torch.zeros(len(tasks), 1 << _DIGIT, dtype=torch.int64, device=device)
        for lo, hi in spans:
            x = read(tasks, lo, hi)
            if device.type == "cpu":
                parts = x.tensor_split(torch.get_num_threads(), dim=1)
                for counted in parallel_map(
                        lambda part: _digit_counts(part, as_int, width, shift, prefix), parts):
                    hist += counted
            else:
                hist += _digit_counts(x, as_int, width, shift, prefix)
        # from the top: the digit where the running count of entries reaches need
        from_top = hist.flip(1).cumsum(1)
        for t in range(len(tasks)):
            at = int(torch.searchsorted(from_top[t], need[t]))
            digit = (1 << _DIGIT) - 1 - at
            need[t] -= int(from_top[t, at] - hist[t, digit])
            prefix[t] = (prefix[t] << _DIGIT) | digit
    return torch.tensor(prefix, dtype=as_int, device=device).view(dtype)


def _digit_counts(x, as_int, width, shift, prefix):
    """[T, 2^16]: per row of x [T, L], how many magnitudes have each value of bits
    shift .. shift + 16, among those whose higher bits are the row's prefix."""
    counts = torch.zeros(x.shape[0], 1 << _DIGIT, dtype=torch.int64, device=x.device)
    for t, row in enumerate(x):
        bits = row.abs().view(as_int)
        if shift + _DIGIT < width:                      # only the entries with the bits settled
            bits = bits[(bits >> (shift + _DIGIT)) == prefix[t]]
        counts[t] = torch.bincount((bits >> shift) & ((1 << _DIGIT) - 1),
                                   minlength=1 << _DIGIT)
    return counts


def votes(elected):
    """Entries electing + minus entries electing -, counted exactly (a float sum of 2^24 or
    more signs is not)."""
    return int(torch.count_nonzero(elected > 0)) - int(torch.count_nonzero(elected < 0))


def majority_sign(zero_sign, vote_count):
    """The sign an entry whose kept values sum to zero elects: + for zero_sign="plus", else the
    sign of the scope's vote count (0.0 on a draw)."""
    if zero_sign == "plus":
        return 1.0
    return float((vote_count > 0) - (vote_count < 0))
