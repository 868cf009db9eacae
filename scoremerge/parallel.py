"""Spread independent LAPACK-heavy work over the CPU's cores.

torch runs a batched linalg call on CPU as a loop over the batch, each call using every
intra-op thread; for 768-wide eigenproblems that scales poorly (one 768x768 float64 eigh:
50 ms on 2 threads, 70 ms on 1). Independent work on separate threads with one intra-op thread
each measured 1.28x more throughput on a 2-core machine.
"""
from concurrent.futures import ThreadPoolExecutor

import torch


def parallel_map(fn, items):
    """[fn(item) for item in items], on up to torch.get_num_threads() threads with one
    intra-op thread each; in order. Serial when there is one thread or one item.

    Sets the process's intra-op thread count to one for the duration (it is process-wide in
    MKL), so do not run other torch work from other threads meanwhile.
    """
    items = list(items)
    workers = min(torch.get_num_threads(), len(items))
    if workers <= 1:
        return [fn(item) for item in items]

    def on_one_thread(item):
        torch.set_num_threads(1)
        return fn(item)

    threads = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(on_one_thread, items))
    finally:
        torch.set_num_threads(threads)


def thread_shares(n, smallest):
    """[(start, stop)]: n entries cut into one contiguous share per CPU thread, fewer where a
    share would hold less than `smallest` entries (not worth a thread); [] for n = 0."""
    parts = min(torch.get_num_threads(), -(-n // smallest))
    bounds = [n * i // parts for i in range(parts + 1)] if n else []
    return list(zip(bounds, bounds[1:]))


def map_batch(fn, *tensors):
    """fn(*tensors) computed over shards of dim 0, one shard per CPU thread (see parallel_map).

    fn must treat batch items independently and return a tensor or a tuple of tensors whose
    dim 0 is the batch. CUDA tensors go straight to fn.
    """
    if tensors[0].device.type != "cpu":
        return fn(*tensors)
    shards = zip(*(t.tensor_split(min(torch.get_num_threads(), tensors[0].shape[0])) for t in tensors))
    parts = parallel_map(lambda shard: fn(*shard), shards)
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(p) for p in zip(*parts))
    return torch.cat(parts)
