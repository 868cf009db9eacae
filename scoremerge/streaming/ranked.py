"""Keys merged in spans after a ranking of the whole key: TIES per tensor, for a key larger than
the memory budget. Before the key's first span merges, the method's in_spans.rank reads the key
again, span by span, as many times as its ranking needs (methods.ties_ranking); each span then
merges with that ranking, to the bits of the whole key merged at once."""
import time

import torch

from .. import api
from ..methods.routing import excluded
from ..validate import check_models

PIECE = 1 << 22                     # entries of a key read at once while ranking it


class KeyRankings:
    """The ranking of the key whose spans are merging, made when its first span comes and
    dropped when another key's does (a key's spans are consecutive batches)."""

    def __init__(self, plan, batches, spec, opts, weights, exclude, device, dtype):
        """plan: the merge's streaming.plan.Plan, whose models are read and whose stats count
        the ranking's bytes read and seconds (ranking_s, part of compute_s)."""
        self.models, self.names, self.stats = plan.models, plan.names, plan.stats
        self.spec, self.opts = spec, opts
        self.weights, self.exclude, self.device, self.dtype = weights, exclude, device, dtype
        self.spans = {}
        for batch in batches:
            if batch.span is not None:
                self.spans.setdefault(batch.keys[0], []).append(batch.span)
        self.key = self.ranking = None

    def of(self, batch):
        """(ranking, start) for api.merge_checked's `ranked`, or None where the batch is not a
        span of a ranked key (a whole key, an integer key, copied from the base, or a key
        excluded from the method, which takes the mean path)."""
        key = batch.keys[0]
        if batch.span is None or excluded(key, self.exclude) or \
                not self.models[0].infos[key].dtype.is_floating_point:
            return None
        if key != self.key:
            self.key, self.ranking = None, None          # the last key's ranking, freed first
            start = time.perf_counter()
            self.ranking, self.key = self._rank(key), key
            self.stats["ranking_s"] += time.perf_counter() - start
        return self.ranking, batch.span[0]

    def _rank(self, key):
        infos = [m.infos[key] for m in self.models]
        dtype = api.compute_dtype(self.dtype, any(i.dtype == torch.float64 for i in infos))
        weights = None if self.weights is None else \
            torch.tensor(self.weights, dtype=dtype, device=self.device)
        n = self.spans[key][-1][1]
        # pieces far smaller than a batch: the ranking's memory stays small beside the two
        # batches the pipeline holds, and reused buffers are not faulted in again per read
        piece = min(PIECE, max(hi - lo for lo, hi in self.spans[key]))
        pieces = [(lo, min(n, lo + piece)) for lo in range(0, n, piece)]
        raw = [torch.empty(piece, dtype=info.dtype) for info in infos]
        taus = torch.empty(len(infos) - 1, piece, dtype=dtype, device=self.device)
        checked = set()                 # (model, start): a piece's values are scanned once

        def read(tasks, start, stop):
            chosen = [0] + [1 + t for t in tasks]
            spans = [{key: self.models[m].read(key, start, stop, out=raw[m][:stop - start])}
                     for m in chosen]
            self.stats["bytes_read"] += sum(s[key].nbytes for s in spans)
            fresh = [i for i, m in enumerate(chosen) if (m, start) not in checked]
            # NaN and Inf, named, before any value is used (the span merge checks again)
            if fresh:
                check_models([spans[i] for i in fresh], [self.names[chosen[i]] for i in fresh])
                checked.update((chosen[i], start) for i in fresh)
            return api.stacked_task_vectors(spans[0][key], [s[key] for s in spans[1:]], dtype,
                                            self.device, out=taus[:len(tasks), :stop - start])

        return self.spec.in_spans.rank(key, read, pieces, n, len(infos) - 1, self.opts, weights,
                                       dtype, self.device)
