"""A batched GEMM with SCORE's two epilogues, shared by project_and_mask and reconstruct.

C[z] = A[z // a_div] @ B[z // b_div] for z in range(Z): the shared bases of one key serve all T
of its tasks without being copied (a_div or b_div = T). Epilogues, chosen at compile time:
  STATS: per output tile, the sum and sum of squares of the off-diagonal entries (row != col),
         written to partial[z, tile], so the statistics need no second pass over C and no
         atomics (reduced afterwards in a fixed order: results are the same run after run);
  AXPBY: C = base + alpha * acc, cast to C's dtype on store (the reconstruction).
Accumulation is fp32 for fp32 inputs (fp64 for fp64); PRECISION picks tl.dot's input precision.
On a GPU the tile sizes are autotuned (_gpu_configs); the interpreter uses fixed small tiles.
"""
import os

import torch
import triton
import triton.language as tl

from ...backend.triton import launch_guard


@triton.jit
def _bmm_kernel(a_ptr, b_ptr, c_ptr, base_ptr, partial_ptr, alpha_ptr,
                M, N, K, a_div, b_div,
                stride_az, stride_am, stride_ak,
                stride_bz, stride_bk, stride_bn,
                stride_cz, stride_cm, stride_cn,
                stride_basez, stride_basem, stride_basen,
                STATS: tl.constexpr, AXPBY: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    z = tl.program_id(2).to(tl.int64)
    # int64 offsets: a strided view may put one matrix's elements 2^31 apart
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    a_ptrs = a_ptr + (z // a_div) * stride_az + rm[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + (z // b_div) * stride_bz + rk[:, None] * stride_bk + rn[None, :] * stride_bn
    acc_dtype = tl.float64 if a_ptr.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] + k0 < K), other=0.0)
        b = tl.load(b_ptrs, mask=(rk[:, None] + k0 < K) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc_dtype)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    inside = (rm[:, None] < M) & (rn[None, :] < N)
    if STATS:
        off = tl.where(inside & (rm[:, None] != rn[None, :]), acc, 0.0)
        tile = pid_m * tl.num_programs(1) + pid_n
        n_tiles = tl.num_programs(0) * tl.num_programs(1)
        slot = partial_ptr + (z * n_tiles + tile) * 2
        tl.store(slot, tl.sum(tl.sum(off, axis=1), axis=0))
        tl.store(slot + 1, tl.sum(tl.sum(off * off, axis=1), axis=0))
    if AXPBY:
        base = tl.load(base_ptr + z * stride_basez + rm[:, None] * stride_basem
                       + rn[None, :] * stride_basen, mask=inside, other=0.0)
        alpha = tl.load(alpha_ptr).to(acc_dtype)        # a tensor: a float argument is fp32
        acc = base.to(acc_dtype) + alpha * acc
    c_ptrs = c_ptr + z * stride_cz + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=inside)


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"     # read by triton.jit just above too


def _gpu_configs():
    """Short list for the GPU, autotuned per (M, N, K, precision, epilogue): 128- and 64-wide
    tiles with 32-deep K steps. Four stages of a 128x32 A tile and a 32x128 B tile in fp32 take
    128 KB of shared memory, within Hopper's 228 KB; 8 warps feed the 128x128 tile's tensor-core
    (tf32) or FMA (ieee) work, 4 the smaller ones."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 32}, num_warps=w, num_stages=st)
            for bm, bn, w, st in ((128, 128, 8, 3), (128, 128, 8, 4), (128, 64, 4, 4),
                                  (64, 128, 4, 4), (64, 64, 4, 4))]


# The statistics epilogue writes one slot per output tile, so its tiling is fixed (only warps
# and stages are tuned): the slots are then known before the launch, and every one is written.
STATS_TILE = 128


def _stats_configs():
    return [c for c in _gpu_configs() if c.kwargs["BLOCK_M"] == c.kwargs["BLOCK_N"] == STATS_TILE]


def interpreter_block_sizes(M, N, K, dtype_bytes):
    """Fixed tiles for the interpreter: 16-wide on small sizes so odd shapes waste little."""
    bm = 64 if M > 32 else 16
    bn = 64 if N > 32 else 16
    bk = (32 if dtype_bytes <= 4 else 16) if K > 16 else 16
    return bm, bn, bk


def stats_slots(M, N, dtype_bytes):
    """Number of output tiles of the statistics GEMM, one statistics slot each."""
    if INTERPRETED:
        bm, bn, _ = interpreter_block_sizes(M, N, M, dtype_bytes)
    else:
        bm = bn = STATS_TILE
    return triton.cdiv(M, bm) * triton.cdiv(N, bn)


_KEY = ["M", "N", "K", "STATS", "AXPBY", "PRECISION"]
_bmm_plain = _bmm_kernel if INTERPRETED else triton.autotune(_gpu_configs(), key=_KEY)(_bmm_kernel)
_bmm_stats = _bmm_kernel if INTERPRETED else triton.autotune(_stats_configs(), key=_KEY)(
    _bmm_kernel)


def bmm(a, b, out, *, a_div=1, b_div=1, base=None, alpha=1.0, partial=None, precision="ieee"):
    """out[z] = a[z // a_div] @ b[z // b_div] (+ epilogues, see the module docstring).

    a [Za, M, K], b [Zb, K, N], out [Z, M, N] (any strides); base [Z, M, N] or None; partial: a
    float64 tensor [Z, stats_slots(M, N), 2] to receive each output tile's off-diagonal sum and
    sum of squares, or None."""
    Z, M, N = out.shape
    K = a.shape[-1]
    precision = precision if a.dtype == torch.float32 else "ieee"     # tf32 is for fp32 only
    base_t = base if base is not None else out
    alpha_t = (torch.tensor([alpha], dtype=torch.float64, device=out.device) if base is not None
               else out)
    args = (a, b, out, base_t, partial if partial is not None else out, alpha_t,
            M, N, K, a_div, b_div,
            a.stride(0), a.stride(1), a.stride(2),
            b.stride(0), b.stride(1), b.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            base_t.stride(0), base_t.stride(1), base_t.stride(2))
    flags = dict(STATS=partial is not None, AXPBY=base is not None, PRECISION=precision)
    if INTERPRETED:
        bm, bn, bk = interpreter_block_sizes(M, N, K, a.element_size())
        with launch_guard():
            _bmm_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn), Z)](*args, **flags, BLOCK_M=bm,
                                                                      BLOCK_N=bn, BLOCK_K=bk)
    else:
        kernel = _bmm_stats if partial is not None else _bmm_plain
        kernel[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]), Z)](
            *args, **flags)
    return out
