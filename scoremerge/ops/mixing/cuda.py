"""The CUDA backend of ops.mix: csrc/mix.cuh's kernel through the extension scoremerge._C, or
compiled at first use by CuPy's runtime compiler (NVRTC; one instantiation at a time, kept per
process, and CuPy caches the binaries on disk); backend/cuda.py says which runs where.

Both paths launch on torch's current stream: temporaries made here (fp32 coefficients, the block
table) are then freed in stream order by torch's caching allocator, never under a running kernel.
"""
import functools

import torch

from ...backend import cuda as cuda_backend
from .plan import plan

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
               torch.float64: "float64"}
_SIZES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
_CXX = {"float32": "float", "bfloat16": "scoremerge::bf16", "float16": "scoremerge::f16",
        "float64": "double"}


def lacks(experts_dtype, coeffs_dtype, out_dtype):
    """Why the CUDA kernel cannot mix these dtypes as ops.mix defines it, or None. It has
    float32/bfloat16/float16 into each other (fp32 accumulation) and float64 into float64;
    float64 anywhere else means float64 accumulation into or from another dtype."""
    wide = torch.float64 in (experts_dtype, coeffs_dtype, out_dtype)
    if wide and not experts_dtype == out_dtype == torch.float64:
        return (f"no CUDA kernel mixes {experts_dtype} experts with {coeffs_dtype} coefficients "
                f"into {out_dtype} (float64 runs only float64 -> float64)")
    return None


def kernel_name(in_dtype, out_dtype, maxk, ept):
    """The C++ name of one mix_kernel instantiation (CuPy's name expression)."""
    acc = "double" if in_dtype == "float64" else "float"
    return f"scoremerge::mix_kernel<{_CXX[in_dtype]}, {_CXX[out_dtype]}, {acc}, {maxk}, {ept}>"


def instantiations():
    """Every name the CuPy path may ask for: what tests compile ahead of a GPU."""
    small = ("float32", "bfloat16", "float16")
    pairs = [(i, o) for i in small for o in small] + [("float64", "float64")]
    return [kernel_name(i, o, maxk, ept) for i, o in pairs for maxk in (4, 8, 16, 0)
            for ept in (16 // _SIZES[i], 1)]


def instantiation(in_dtype, out_dtype, K, row_stride, experts, out):
    """(MAXK, EPT) for these arguments (pointers as ints), as bindings.cu's `choose`: K unrolled
    up to 4, 8 or 16, else the runtime loop (0); 16-byte vectors where every row start is on 16
    bytes and out on a whole output vector, else scalar."""
    ept = 16 // _SIZES[in_dtype]
    vector = (experts % 16 == 0 and out % min(16, ept * _SIZES[out_dtype]) == 0
              and (K == 1 or row_stride * _SIZES[in_dtype] % 16 == 0))
    return (4 if K <= 4 else 8 if K <= 8 else 16 if K <= 16 else 0), (ept if vector else 1)


def mix(experts, coeffs, bounds, out, via=None):
    """See ops.mix; experts [K, N] with unit column stride, coeffs [G, K], out [N] contiguous.
    via: "extension" or "cupy" forces a path (tests); None takes backend/cuda.py's route()."""
    K, N = experts.shape
    index = cuda_backend.device_index(out.device)
    via = via or cuda_backend.route(index)[0]
    if via == "extension":
        ext, why_not = cuda_backend.extension()
        if ext is None:
            raise RuntimeError(why_not)
        launch, block = ext.mix, ext.BLOCK_ELEMS
    elif via == "cupy":
        launch = functools.partial(_cupy_mix, device=index)
        block = cuda_backend.header_constant("MIX_BLOCK_ELEMS")
    else:
        raise RuntimeError(f"no CUDA path runs on {out.device}: {cuda_backend.route(index)[1]}")
    block_group, block_start, block_end = plan(tuple(bounds), out.device, block)
    if len(block_group) == 0:
        return out
    wide = experts.dtype == torch.float64
    coeffs = coeffs.to(device=out.device, dtype=torch.float64 if wide else torch.float32)
    coeffs = coeffs.contiguous()
    if K > 1 and experts.stride(0) < N:          # overlapping rows (an expanded tensor)
        experts = experts.contiguous()
    with torch.cuda.device(index):
        launch(DTYPE_NAMES[experts.dtype], DTYPE_NAMES[out.dtype], experts.data_ptr(),
               experts.stride(0) if K > 1 else N, K, N, coeffs.data_ptr(),
               block_group.data_ptr(), block_start.data_ptr(), block_end.data_ptr(),
               len(block_group), out.data_ptr(), torch.cuda.current_stream(index).cuda_stream)
    return out


def _cupy_mix(in_dtype, out_dtype, experts, row_stride, K, N, coeffs, block_group, block_start,
              block_end, n_blocks, out, stream, *, device):
    """_C.mix's contract (minus the argument checks ops.mix has already made) through CuPy.
    Pointers go in as numpy.uint64 values: exact for any address, any dtype (torch exports no
    __cuda_array_interface__ for bfloat16) and no interface-driven stream synchronisation."""
    import cupy
    import numpy as np
    choice = instantiation(in_dtype, out_dtype, K, row_stride, experts, out)
    kernel = _cupy_kernel(kernel_name(in_dtype, out_dtype, *choice), device)
    pointers = [np.uint64(p) for p in (experts, coeffs, out, block_group, block_start, block_end)]
    with cupy.cuda.Device(device):
        kernel((n_blocks,), (cuda_backend.header_constant("MIX_THREADS"),),
               (*pointers, np.int32(K), np.int64(row_stride)),
               stream=cupy.cuda.ExternalStream(stream))


@functools.cache
def _cupy_kernel(name, device):
    import cupy
    with cupy.cuda.Device(device):
        module = cupy.RawModule(code=cuda_backend.source(), options=("-std=c++17",),
                                name_expressions=[name])
        return module.get_function(name)
