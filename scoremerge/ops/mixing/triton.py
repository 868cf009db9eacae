"""Multi-expert mixing in one pass: out[j] = sum_k coeffs[g, k] * experts[k, j].

Each program owns one block of one group (a per-program table says which, built once per
bounds), so blocks never straddle groups and no per-element index is read: a program loads its
group's K coefficients once, then streams K contiguous runs of the arena and writes one. It moves
(K + 1) * N elements and nothing else. K is a compile-time constant (the loop unrolls)."""
import torch
import triton
import triton.language as tl

from ...backend.triton import launch_guard
from .plan import plan

BLOCK = 4096          # elements per program: 16 KB of fp32 per expert row, long coalesced runs


@triton.jit
def _mix_kernel(experts_ptr, coeffs_ptr, out_ptr, block_group_ptr, block_start_ptr,
                block_end_ptr, stride_ek, stride_cg,
                K: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    g = tl.load(block_group_ptr + pid)
    start = tl.load(block_start_ptr + pid)
    end = tl.load(block_end_ptr + pid)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    inside = offs < end
    acc_dtype = tl.float64 if WIDE else tl.float32
    acc = tl.zeros((BLOCK,), dtype=acc_dtype)
    for k in tl.static_range(K):
        c = tl.load(coeffs_ptr + g * stride_cg + k).to(acc_dtype)
        x = tl.load(experts_ptr + k * stride_ek + offs, mask=inside, other=0.0)
        acc += c * x.to(acc_dtype)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"),
             mask=inside)


def mix(experts, coeffs, bounds, out):
    """See ops.mix; experts [K, N] with unit column stride, out [N] contiguous."""
    K = experts.shape[0]
    block_group, block_start, block_end = plan(tuple(bounds), out.device, BLOCK)
    if len(block_group) == 0:
        return out
    wide = torch.float64 in (experts.dtype, coeffs.dtype, out.dtype)
    with launch_guard():
        _mix_kernel[(len(block_group),)](
            experts, coeffs, out, block_group, block_start, block_end,
            experts.stride(0), coeffs.stride(0), K=K, WIDE=wide, BLOCK=BLOCK, num_warps=8)
    return out
