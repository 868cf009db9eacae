"""The CUDA backend of ops.mix (csrc/mix.cuh, csrc/bindings.cu, ops/mixing/cuda.py).

Without a GPU: the install built scoremerge._C wherever nvcc is present, and the binding rejects
bad arguments before touching a device; the kernel sources compile for Hopper with nvcc and, where
libnvrtc is found, with NVRTC itself (what CuPy runs); the loader finds its sources and says why
it cannot run; dtype pairs without a kernel fall to the next backend. With a GPU: both launch paths
against the reference on odd sizes, misaligned views, every dtype pair, poisoned outputs."""
import ctypes
import ctypes.util
import importlib.util
import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import scoremerge
from scoremerge import BackendUnavailableError, backend, ops, ref
from scoremerge.backend import cuda as cuda_backend
from scoremerge.ops.mixing import cuda as cuda_mix

from conftest import rel_err
from test_mix import case, exact

ROOT = Path(__file__).parents[1]


def _nvcc():                                       # setup.py's rule for building the extension
    if os.environ.get("SCOREMERGE_SKIP_CUDA_BUILD"):
        return None
    return shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                    if os.environ.get("CUDA_HOME") else None)


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (or the CUDA build skipped)")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ---- the extension's host side (no GPU needed) ------------------------------------------------

@needs_nvcc
def test_the_install_built_the_extension():
    ext, why_not = cuda_backend.extension()
    assert ext is not None, why_not
    assert ext.version() == cuda_backend.ABI_VERSION and callable(ext.mix)
    assert ext.BLOCK_ELEMS == cuda_backend.header_constant("MIX_BLOCK_ELEMS")   # not stale
    assert ext.THREADS == cuda_backend.header_constant("MIX_THREADS")
    assert ext.cuda_runtime_version() >= 12000


GOOD = dict(in_dtype="float32", out_dtype="bfloat16", experts=1 << 20, row_stride=1000, K=3,
            N=1000, coeffs=2 << 20, block_group=3 << 20, block_start=4 << 20, block_end=5 << 20,
            n_blocks=0, out=6 << 20, stream=0)


@needs_nvcc
@pytest.mark.parametrize("change, message", [
    ({"in_dtype": "int8"}, "unknown in_dtype 'int8'"),
    ({"out_dtype": "torch.float32"}, "unknown out_dtype 'torch.float32'"),
    ({"out_dtype": "float64"}, "no kernel for float32 -> float64"),
    ({"in_dtype": "float64"}, "no kernel for float64 -> bfloat16"),
    ({"K": 0}, "K must be in 1.."),
    ({"K": 1 << 31}, "K must be in 1.."),
    ({"N": -1}, "N must be >= 0"),
    ({"row_stride": 999}, "row_stride must be >= N = 1000"),
    ({"experts": 0}, "experts is a null pointer"),
    ({"coeffs": 0}, "coeffs is a null pointer"),
    ({"block_end": 0}, "block_end is a null pointer"),
    ({"out": 0}, "out is a null pointer"),
    ({"experts": (1 << 20) + 2}, "not aligned to its element size"),
    ({"n_blocks": -1}, "n_blocks must be in 0.."),
])
def test_the_binding_checks_its_arguments_before_the_device(change, message):
    ext, why_not = cuda_backend.extension()
    assert ext is not None, why_not
    with pytest.raises(ValueError, match=message):
        ext.mix(**{**GOOD, **change})
    assert ext.mix(**GOOD) is None                 # valid, and no blocks: nothing launched


@needs_nvcc
def test_the_extension_and_the_cupy_path_choose_the_same_kernel():
    ext, why_not = cuda_backend.extension()
    assert ext is not None, why_not
    names = set(cuda_mix.instantiations())
    pairs = [(i, o) for i in ("float32", "bfloat16", "float16") for o in ("float32", "bfloat16",
                                                                            "float16")]
    addresses = [4096 + d for d in (0, 2, 4, 8, 12)]
    for (i, o), K, stride, experts, out in itertools.product(
            pairs + [("float64", "float64")], (1, 2, 4, 5, 8, 9, 16, 17, 1000),
            (1024, 1025, 1026, 1028), addresses, addresses):
        choice = ext.instantiation(i, o, K, stride, experts, out)
        assert choice == cuda_mix.instantiation(i, o, K, stride, experts, out)
        assert cuda_mix.kernel_name(i, o, *choice) in names


@needs_nvcc
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a usable GPU")
def test_a_launch_without_a_gpu_raises_the_cuda_error():
    ext, _ = cuda_backend.extension()
    with pytest.raises(RuntimeError, match="mix: kernel launch failed: "):
        ext.mix(**{**GOOD, "n_blocks": 1})
    assert ext.kernel_error()                      # the reason route() would give


# ---- the sources the CuPy path compiles ------------------------------------------------------

@needs_nvcc
def test_every_cupy_instantiation_compiles_for_hopper_with_nvcc(tmp_path):
    """nvcc -cubin (front end and ptxas, no host compiler) of the header CuPy would get."""
    (tmp_path / "mix.cuh").write_text(cuda_backend.source())
    names = cuda_mix.instantiations()
    (tmp_path / "all.cu").write_text('#include "mix.cuh"\nvoid* kernels[] = {\n'
                                     + ",\n".join(f"(void*)&{n}" for n in names) + "};\n")
    command = [NVCC, "-std=c++17", "-arch=sm_90", "-cubin", "all.cu", "-o", "all.cubin"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "all.cubin").stat().st_size > 0


def _libnvrtc():
    """libnvrtc from a pip wheel (torch and CuPy depend on one), the toolkit, or the loader path."""
    found = [p for entry in sys.path if entry and Path(entry).is_dir()
             for p in sorted(Path(entry).glob("nvidia/*/lib/libnvrtc.so*"))]
    if NVCC:
        found += sorted(Path(NVCC).resolve().parents[1].glob("lib*/libnvrtc.so*"))
    return str(found[0]) if found else ctypes.util.find_library("nvrtc")


@pytest.mark.skipif(_libnvrtc() is None, reason="libnvrtc not found")
def test_every_cupy_instantiation_compiles_with_nvrtc():
    """NVRTC is stricter than nvcc (no standard headers, no unannotated host functions): compile
    every name expression the CuPy path may ask for, with CuPy's options, for sm_90."""
    lib = ctypes.CDLL(_libnvrtc())
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), cuda_backend.source().encode(), b"mix.cuh",
                                  0, None, None) == 0
    names = cuda_mix.instantiations()
    for name in names:
        assert lib.nvrtcAddNameExpression(prog, name.encode()) == 0
    options = (ctypes.c_char_p * 2)(b"-std=c++17", b"-arch=sm_90")
    status = lib.nvrtcCompileProgram(prog, 2, options)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    assert status == 0, f"{lib.nvrtcGetErrorString(status).decode()}: {log.value.decode()[-3000:]}"
    for name in names:
        lowered = ctypes.c_char_p()
        assert lib.nvrtcGetLoweredName(prog, name.encode(), ctypes.byref(lowered)) == 0, name
    lib.nvrtcDestroyProgram(ctypes.byref(prog))


def test_the_kernel_sources_travel_with_a_wheel(tmp_path):
    """setup.py's build_py copies csrc/*.cuh into the package, where the loader looks first."""
    command = [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "SCOREMERGE_SKIP_CUDA_BUILD": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "scoremerge" / "_csrc" / "mix.cuh").read_text() == cuda_backend.source()
    assert cuda_backend.SOURCE_DIRS[0] == Path(scoremerge.__file__).resolve().parent / "_csrc"


# ---- the loader and the backend choice (no GPU needed) ---------------------------------------

def test_the_loader_says_why_it_cannot_run(monkeypatch):
    assert "run on CUDA devices; got cpu" in backend.unavailable_reason("cuda", torch.device("cpu"))
    monkeypatch.setattr(cuda_backend, "extension", lambda: (None, "_C was not built"))
    monkeypatch.setitem(sys.modules, "cupy", None)          # import cupy raises ImportError
    via, why = cuda_backend.route.__wrapped__(0)
    assert via is None and "_C was not built" in why and "pip install cupy-cuda13x" in why
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' cannot run mix on cpu"):
        ops.mix(torch.randn(2, 5), torch.ones(2), backend="cuda")


@pytest.mark.parametrize("experts", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("coeffs", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("out", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_dtype_pairs_without_a_kernel_take_the_next_backend(monkeypatch, experts, coeffs, out):
    monkeypatch.setattr(backend, "unavailable_reason", lambda name, device: None)
    wide = torch.float64 in (experts, coeffs, out)
    has_kernel = not wide or experts == out == torch.float64
    why = cuda_mix.lacks(experts, coeffs, out)
    assert (why is None) == has_kernel
    gpu_device, implemented = torch.device("cuda"), ("cuda", "triton", "torch")
    unsupported = {"cuda": why} if why else None
    chosen = backend.resolve("mix", "auto", gpu_device, implemented, unsupported)
    assert chosen == ("cuda" if has_kernel else "triton")
    if not has_kernel:
        with pytest.raises(BackendUnavailableError, match="float64 runs only float64 -> float64"):
            backend.resolve("mix", "cuda", gpu_device, implemented, unsupported)


# ---- on a GPU: both launch paths against the reference ----------------------------------------

PAIRS = [(i, o) for i in (torch.float32, torch.bfloat16, torch.float16)
         for o in (torch.float32, torch.bfloat16, torch.float16)] + [(torch.float64, torch.float64)]
# aligned (the vector path, with unaligned heads and tails where groups start at odd offsets);
# experts or out one element off, or an odd row stride (each forces the scalar path)
LAYOUTS = ["aligned", "experts+1", "out+1", "odd_stride"]


KG = [(1, 1), (3, 2), (5, 5), (16, 2), (17, 1), (17, 5)]


MISSING = {"extension": (cuda_backend.extension()[0] is None, "scoremerge._C not built"),
           "cupy": (importlib.util.find_spec("cupy") is None, "cupy not installed")}


def _path(via):
    return pytest.mark.skipif(MISSING[via][0], reason=MISSING[via][1])


def _gpu_cases():
    """Every pair, layout and (K, G) through the extension; through CuPy a subset that still asks
    for every pair's vector and scalar instantiations, unrolled and runtime-K (each compiles at
    first use)."""
    for via in MISSING:
        for (dtype, out_dtype), layout, (K, G) in itertools.product(PAIRS, LAYOUTS, KG):
            if via == "extension" or layout in ("aligned", "out+1") and K in (3, 17):
                yield pytest.param(via, dtype, out_dtype, layout, K, G, marks=_path(via),
                                   id=f"{via}-{str(dtype)[6:]}-{str(out_dtype)[6:]}-{layout}"
                                      f"-K{K}-G{G}")


def _case(K, N, G, dtype, out_dtype, layout, seed):
    values, coeffs, bounds = case(K, N, G, dtype, seed)
    cols = (N + 7) // 8 * 8 + (9 if layout == "odd_stride" else 8)   # 9: rows misaligned
    buffer = torch.empty(K, cols, dtype=dtype, device="cuda")
    experts = buffer[:, 1:N + 1] if layout == "experts+1" else buffer[:, :N]
    experts.copy_(values)
    poisoned = torch.full((N + 2,), float("nan"), dtype=out_dtype, device="cuda")
    out = poisoned[1:N + 1] if layout == "out+1" else poisoned[:N]
    return values, coeffs, bounds, experts, out, poisoned


def _check(got, values, coeffs, bounds, out_dtype):
    answer = exact(values, coeffs, bounds)
    reference = ref.mixing.mix(values, coeffs, bounds, out_dtype=out_dtype)
    assert not got.isnan().any()
    assert rel_err(got.cpu(), answer) <= 2 * rel_err(reference, answer) + 1e-7


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("via, dtype, out_dtype, layout, K, G", list(_gpu_cases()))
def test_the_cuda_kernel_matches_the_reference(via, dtype, out_dtype, layout, K, G):
    N = 2 * 8192 + 4097                            # blocks of every length, groups at odd offsets
    values, coeffs, bounds, experts, out, poisoned = _case(K, N, G, dtype, out_dtype, layout,
                                                           seed=K + G)
    assert cuda_mix.mix(experts, coeffs.to("cuda"), bounds, out, via=via) is out
    _check(out, values, coeffs, bounds, out_dtype)
    written = slice(1, N + 1) if layout == "out+1" else slice(0, N)
    assert poisoned[:written.start].isnan().all() and poisoned[written.stop:].isnan().all()


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("via", [pytest.param(via, marks=_path(via)) for via in MISSING])
def test_the_kernel_runs_on_torchs_current_stream(via):
    """On a side stream, a read right after the mix sees its result only if the kernel was
    queued on that stream (torch's side streams do not wait for the legacy default one)."""
    N = 50_000_000
    experts = torch.randn(8, N, device="cuda")
    coeffs = torch.full((1, 8), 0.125, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = torch.full((N,), float("nan"), device="cuda")
        cuda_mix.mix(experts, coeffs, [0, N], out, via=via)
        copy = out.clone()
    side.synchronize()
    assert not copy.isnan().any()
    assert torch.allclose(copy, experts.mean(0), atol=1e-6)


@pytest.mark.gpu
@needs_gpu
def test_ops_mix_runs_cuda_where_it_has_a_kernel_and_says_so_where_not():
    values, coeffs, bounds, experts, out, _ = _case(4, 3001, 2, torch.bfloat16, torch.float32,
                                                    "aligned", seed=5)
    assert backend.resolve("mix", "auto", out.device, ("cuda", "triton", "torch")) == "cuda"
    ops.mix(experts, coeffs.cuda(), bounds, out=out, backend="cuda")
    _check(out, values, coeffs, bounds, torch.float32)
    one_hot = torch.tensor([[0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]], device="cuda")
    exact = ops.mix(experts, one_hot, bounds, backend="cuda")
    assert torch.equal(exact[:bounds[1]], experts[2, :bounds[1]])
    assert torch.equal(exact[bounds[1]:], experts[0, bounds[1]:])
    wide = experts.double()
    with pytest.raises(BackendUnavailableError, match="float64 runs only float64 -> float64"):
        ops.mix(wide, coeffs.cuda(), bounds, out=out, backend="cuda")
    _check(ops.mix(wide, coeffs.cuda(), bounds, out=out), wide.cpu(), coeffs.double(), bounds,
           torch.float32)                           # auto: Triton takes it
    empty = ops.mix(experts[:, :0], coeffs.cuda(), [0, 0, 0], backend="cuda")
    assert empty.shape == (0,)
