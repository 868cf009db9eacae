"""Multi-expert mixing over a flat arena in torch: per group, one matrix-vector product per chunk.

Chunks bound the float32 copy of a bf16/fp16 arena to _CHUNK columns at a time (a 1B-parameter
arena is never converted whole); float32 and float64 arenas multiply in place."""
import torch

_CHUNK = 1 << 22


def mix(experts, coeffs, bounds, out):
    """out[lo:hi] = coeffs[g] @ experts[:, lo:hi] for each group; see ops.mix."""
    acc_dtype = torch.float64 if torch.float64 in (experts.dtype, coeffs.dtype, out.dtype) \
        else torch.float32
    c = coeffs.to(acc_dtype)
    for g in range(len(bounds) - 1):
        for lo in range(bounds[g], bounds[g + 1], _CHUNK):
            hi = min(lo + _CHUNK, bounds[g + 1])
            block = experts[:, lo:hi]
            if block.dtype != acc_dtype:
                block = block.to(acc_dtype)
            if out.dtype == acc_dtype:
                torch.mv(block.T, c[g], out=out[lo:hi])
            else:
                out[lo:hi] = torch.mv(block.T, c[g])
    return out
