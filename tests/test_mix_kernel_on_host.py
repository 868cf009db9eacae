"""csrc/mix.cuh's kernel run on the CPU, thread by thread (mix_kernel_on_host.cpp says why that is
sound), against the reference: blocks cut at odd group offsets, the vector and scalar paths,
misaligned views, K across the unrolled and runtime loops, and outputs poisoned with NaN around
and inside the written range; and bf16 rounding bit for bit against torch's."""
import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from scoremerge import ref
from scoremerge.backend import cuda as cuda_backend
from scoremerge.ops.mixing import cuda as cuda_mix
from scoremerge.ops.mixing.plan import plan

from conftest import rel_err
from test_mix import case, exact

ROOT = Path(__file__).parents[1]
CXX = shutil.which("c++") or shutil.which("g++")
PAIRS = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
         (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
         (torch.float64, torch.float64)]                  # mix_on_host's pair codes, in order
BLOCK = cuda_backend.header_constant("MIX_BLOCK_ELEMS")

pytestmark = pytest.mark.skipif(CXX is None, reason="no host C++ compiler")


class Args(ctypes.Structure):
    _fields_ = [("experts", ctypes.c_void_p), ("coeffs", ctypes.c_void_p),
                ("out", ctypes.c_void_p), ("block_group", ctypes.c_void_p),
                ("block_start", ctypes.c_void_p), ("block_end", ctypes.c_void_p),
                ("K", ctypes.c_int), ("row_stride", ctypes.c_longlong),
                ("n_blocks", ctypes.c_int)]


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    lib = tmp_path_factory.mktemp("mix_host") / "mix_host.so"
    done = subprocess.run([CXX, "-O1", "-std=c++17", "-shared", "-fPIC", "-I", str(ROOT / "csrc"),
                           str(ROOT / "tests" / "mix_kernel_on_host.cpp"), "-o", str(lib)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = ctypes.CDLL(str(lib)).mix_on_host
    run.argtypes = [ctypes.c_int, ctypes.c_int, Args]

    def mix(experts, coeffs, bounds, out, vector=None, block=BLOCK):
        """The launch, on the host: the vector path where ops/mixing/cuda.py would take it. The
        kernel takes any block length (it loops over tiles), not only the table's usual one."""
        K, N = experts.shape
        row_stride = experts.stride(0) if K > 1 else N
        if vector is None:
            vector = cuda_mix.instantiation(
                cuda_mix.DTYPE_NAMES[experts.dtype], cuda_mix.DTYPE_NAMES[out.dtype], K,
                row_stride, experts.data_ptr(), out.data_ptr())[1] > 1
        wide = experts.dtype == torch.float64
        coeffs = coeffs.to(torch.float64 if wide else torch.float32).contiguous()
        table = plan(tuple(bounds), torch.device("cpu"), block)
        run(PAIRS.index((experts.dtype, out.dtype)), int(vector),
            Args(experts.data_ptr(), coeffs.data_ptr(), out.data_ptr(),
                 *(t.data_ptr() for t in table), K, row_stride, len(table[0])))
        return vector
    return mix


def aligned(n, dtype, fill=0.0):
    """A 64-byte aligned [n] tensor (torch's CPU allocator aligns, but do not rely on it)."""
    buf = torch.full((n + 32,), fill, dtype=dtype)
    skip = (-buf.data_ptr() // buf.element_size()) % (64 // buf.element_size())
    return buf[skip:skip + n]


@pytest.mark.parametrize("dtype, out_dtype", PAIRS, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("layout",
                         ["aligned", "aligned_scalar", "experts+1", "out+1", "odd_stride"])
def test_the_kernel_matches_the_reference_on_the_host(kernel, dtype, out_dtype, layout):
    for K, G, N in [(1, 1, 7), (3, 2, 2 * BLOCK + 4097), (5, 5, 20011), (16, 2, BLOCK + 3),
                    (17, 1, 9), (17, 5, 2 * BLOCK + 4097)]:
        values, coeffs, bounds = case(K, N, G, dtype, seed=K * N + G)
        cols = (N + 7) // 8 * 8 + (9 if layout == "odd_stride" else 8)   # 9: rows misaligned
        rows = aligned(K * cols, dtype).view(K, cols)
        experts = rows[:, 1:N + 1] if layout == "experts+1" else rows[:, :N]
        experts.copy_(values)
        poisoned = aligned(N + 2, out_dtype, fill=float("nan"))
        lo = 1 if layout == "out+1" else 0
        vector = kernel(experts, coeffs, bounds, poisoned[lo:lo + N],
                        vector=False if layout == "aligned_scalar" else None,
                        block=BLOCK if K % 2 else 3 * BLOCK + 5)
        assert vector == (layout == "aligned" or layout == "odd_stride" and K == 1)
        got = poisoned[lo:lo + N]
        answer = exact(values, coeffs, bounds)
        reference = ref.mixing.mix(values, coeffs, bounds, out_dtype=out_dtype)
        assert not got.isnan().any(), (K, G, N)
        assert rel_err(got, answer) <= 2 * rel_err(reference, answer) + 1e-7, (K, G, N)
        assert poisoned[lo + N].isnan() and (lo == 0 or poisoned[0].isnan())    # nothing beyond


@pytest.mark.parametrize("vector", [True, False])
def test_bf16_rounds_to_nearest_even_like_torch(kernel, vector):
    """One expert, coefficient 1: out is the input cast to bf16, over random bit patterns and the
    edge cases (ties both ways, the largest finite values, subnormals, infinities, NaN)."""
    g = torch.Generator().manual_seed(0)
    edges = torch.tensor([0x3F808000, 0x3F818000, 0x7F7FFFFF, 0x7F7F8000, 0xFF7F8000, 0x00008000,
                          0x00018000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFFFFFFFF,
                          0], dtype=torch.int64)
    bits = torch.cat([torch.randint(0, 1 << 32, (50000,), generator=g), edges])
    x = aligned(len(bits), torch.float32)
    signed = torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32)
    x.copy_(signed.view(torch.float32))
    out = aligned(len(bits), torch.bfloat16)
    kernel(x[None], torch.ones(1, 1), [0, len(bits)], out, vector=vector)
    want = x.to(torch.bfloat16)
    same = (out.view(torch.int16) == want.view(torch.int16)) | (out.isnan() & want.isnan())
    assert same.all(), x[~same]
