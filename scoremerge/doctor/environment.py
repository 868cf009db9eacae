"""What `scoremerge doctor` reports about the install: versions, the device, the CUDA extension
and the libraries its kernels load at run time. Nothing here raises: a missing piece is a
sentence saying what is missing."""
import ctypes
import ctypes.util
import functools
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import struct
import sys
from pathlib import Path

import torch

from .._version import __version__
from ..backend import cuda as cuda_backend

FATBIN_MAGIC = 0xBA55ED50


def environment(device):
    """A JSON-ready dict of everything doctor prints under "environment"."""
    return {"scoremerge": __version__, "python": platform.python_version(),
            "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "triton": triton_status(), "cupy": cupy_status(), "cuda_driver": driver_version(),
            "device": device_facts(device), "extension": extension_status(device),
            "cpu_extension": cpu_extension_status(), "cpu_matmul": cpu_matmul_status(),
            "cusolver_batched_eigh": cusolver_status(device), "nvrtc": nvrtc_status(),
            "cuda_mix_path": cuda_mix_path(device)}


def _version(distribution):
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def triton_status():
    """Version and whether kernels run compiled or through the CPU interpreter; triton is not
    imported (TRITON_INTERPRET is read when it is)."""
    version = _version("triton")
    if version is None:
        return {"version": None, "note": "not installed"}
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return {"version": version, "interpreter": interpreted}


def cupy_status():
    try:
        import cupy
        return {"version": cupy.__version__,
                "cuda_runtime": _cuda_version_text(cupy.cuda.runtime.runtimeGetVersion())}
    except ImportError as e:
        return {"version": None, "note": f"not installed ({e})"}
    except Exception as e:                       # installed, but its CUDA libraries do not load
        return {"version": _version("cupy") or "installed", "note": _short(e)}


def driver_version():
    """The NVIDIA driver's CUDA version (cuDriverGetVersion needs no context), or why none."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return {"version": None, "note": "no NVIDIA driver (libcuda.so.1 does not load)"}
    value = ctypes.c_int(0)
    if libcuda.cuDriverGetVersion(ctypes.byref(value)) != 0:
        return {"version": None, "note": "cuDriverGetVersion failed"}
    return {"version": _cuda_version_text(value.value)}


def cpu_name():
    """The CPU's model name as /proc/cpuinfo gives it ("AMD EPYC"), else platform's word for
    the machine: records say which CPU their numbers come from (platform.processor() is empty
    on Linux)."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine() or "cpu"


def cpu_generation():
    """The CPU's family and model numbers and its widest vector instructions, as /proc/cpuinfo
    gives them ("family 25 model 1, AVX2"), or "" where it gives none. "AMD EPYC" alone named
    two development machines a generation apart (Zen 3 with AVX2, Zen 5 with AVX-512) whose
    faster product library and benchmark ratios differ."""
    facts = _cpuinfo()
    flags = facts.get("flags", "").split()
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else ""
    numbers = f"family {facts['cpu family']} model {facts['model']}" \
        if "cpu family" in facts and "model" in facts else ""
    return ", ".join(x for x in (numbers, vector) if x)


def cpu_description():
    """cpu_name() with cpu_generation() in brackets where there is one."""
    generation = cpu_generation()
    return f"{cpu_name()} ({generation})" if generation else cpu_name()


@functools.cache
def _cpuinfo():
    """The first processor's fields in /proc/cpuinfo, {} where there is none; read once (the
    name and the generation both come from it, and it does not change)."""
    facts = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                facts.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return facts


def device_facts(device):
    if device.type != "cuda":
        return {"name": cpu_name(), "generation": cpu_generation(), "type": device.type,
                "threads": torch.get_num_threads()}
    props = torch.cuda.get_device_properties(device)
    return {"name": props.name, "type": "cuda", "capability": f"sm_{props.major}{props.minor}",
            "memory_GB": round(props.total_memory / 1e9, 1),
            "multiprocessors": props.multi_processor_count}


def cpu_extension_status():
    """Whether scoremerge._cpu (csrc/cpu) is built, and which of its helpers agree with their
    torch references here and so are used: TIES's exact-k ranking without a sort, and the
    one-pass task arithmetic and linear. Without them the same results come from torch."""
    from .. import api
    from ..backend.cpu import extension
    from ..methods import get, sort_prefix
    module, why_not = extension()
    if module is None:
        return {"built": False, "note": why_not}
    return {"built": True, "ties_ranking": sort_prefix.compiled(),
            "fused_entrywise": api._fused(get("task_arithmetic"), {}, None, 0.5, 3) is not None
            and api._fused(get("linear"), {"normalize": True}, None, 1.0, 3) is not None}


def cpu_matmul_status():
    """Which library the SVD routes' large float32 CPU products use here (ops/cpu_matmul.py), and
    whether it was measured or set by SCOREMERGE_CPU_MATMUL; a bad setting is named."""
    from ..errors import MergeInputError
    from ..ops import cpu_matmul
    try:
        return {"library": cpu_matmul.library(), "chosen_by": cpu_matmul.chosen_by()}
    except MergeInputError as e:
        return {"library": None, "note": str(e)}


def extension_status(device):
    """Whether scoremerge._C is built, which architectures it carries, and whether it runs on
    the device (its own answer: the kernel image loads, or the CUDA error)."""
    spec = importlib.util.find_spec("scoremerge._C")
    if spec is None or spec.origin is None:
        return {"built": False, "note": cuda_backend.extension()[1]}
    out = {"built": True, "path": spec.origin, **fatbin_architectures(spec.origin)}
    ext, why_not = cuda_backend.extension()
    if ext is None:
        return {**out, "note": why_not}
    out["cuda_runtime"] = _cuda_version_text(ext.cuda_runtime_version())
    if device.type == "cuda":
        with torch.cuda.device(device):
            error = ext.kernel_error()
        out["runs_here"] = not error
        if error:
            out["note"] = error
    return out


def fatbin_architectures(path):
    """{"sass": ["sm_80", ...], "ptx": ["compute_90"]} from the fat binaries inside a shared
    library: what `cuobjdump --list-elf --list-ptx` lists, read without the toolkit (a user's
    machine has the driver, not cuobjdump). Each fat binary is a 16-byte header (magic, version,
    header size, payload size) followed by entries whose headers hold the kind (1 PTX, 2 ELF)
    at byte 0 and the architecture at byte 28."""
    data = Path(path).read_bytes()
    sass, ptx = set(), set()
    start = data.find(struct.pack("<I", FATBIN_MAGIC))
    while start >= 0:
        _, version, header, size = struct.unpack_from("<IHHQ", data, start)
        end = start + header + size
        if version == 1 and header == 16 and end <= len(data):
            _fatbin_entries(data, start + header, end, sass, ptx)
        start = data.find(struct.pack("<I", FATBIN_MAGIC), start + 4)
    return {"sass": sorted(sass, key=_arch_number), "ptx": sorted(ptx, key=_arch_number)}


def _fatbin_entries(data, offset, end, sass, ptx):
    while offset + 32 <= end:
        kind, _, header, size = struct.unpack_from("<HHIQ", data, offset)
        arch = struct.unpack_from("<I", data, offset + 28)[0]
        if header < 32 or kind not in (1, 2):
            return                                  # not an entry header: stop reading
        (ptx if kind == 1 else sass).add(f"{'compute' if kind == 1 else 'sm'}_{arch}")
        offset += header + size


def _arch_number(name):
    return int(name.rsplit("_", 1)[1])


def cusolver_status(device):
    """Whether cuSOLVER's batched eigensolver (cusolverDnXsyevBatched) is found: the CUDA SVD
    and polar factor need it. On a GPU this is the backend's own answer."""
    ext, why_not = cuda_backend.extension()
    if ext is None:
        return {"found": False, "note": f"needs scoremerge._C: {why_not}"}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        why = cuda_backend.eigensolver_unavailable(index)
        return {"found": why is None, **({"note": why} if why else {})}
    error = ext.eigh_error()                    # the library search alone runs without a GPU
    return {"found": not error, **({"note": error} if error else {})}


def nvrtc_status():
    """The NVRTC library CuPy compiles csrc/mix.cuh with, where scoremerge._C cannot run."""
    path = find_libnvrtc()
    if path is None:
        return {"found": False, "note": "libnvrtc not found (pip wheel, CUDA toolkit or loader "
                                        "path); the CuPy path of the CUDA mix cannot compile"}
    try:
        lib = ctypes.CDLL(path)
        major, minor = ctypes.c_int(0), ctypes.c_int(0)
        lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
        return {"found": True, "path": path, "version": f"{major.value}.{minor.value}"}
    except OSError as e:
        return {"found": False, "path": path, "note": _short(e)}


def find_libnvrtc():
    """libnvrtc from a pip wheel (torch and CuPy depend on one), the toolkit beside nvcc, or the
    loader's path."""
    found = [str(p) for entry in sys.path if entry and Path(entry).is_dir()
             for p in sorted(Path(entry).glob("nvidia/*/lib/libnvrtc.so*"))]
    nvcc = shutil.which("nvcc")
    if not found and nvcc:
        found = [str(p) for p in sorted(Path(nvcc).resolve().parents[1].glob("lib*/libnvrtc.so*"))]
    return found[0] if found else ctypes.util.find_library("nvrtc")


def cuda_mix_path(device):
    """Which path the CUDA mix takes here: the built extension, CuPy's runtime compile, or why
    neither."""
    if device.type != "cuda":
        return {"path": None, "note": "needs a CUDA device"}
    index = device.index if device.index is not None else torch.cuda.current_device()
    via, why = cuda_backend.route(index)
    return {"path": via, **({"note": why} if why else {})}


def _cuda_version_text(number):
    """12060 -> "12.6" (CUDA's encoding: 1000 * major + 10 * minor)."""
    return f"{number // 1000}.{number % 1000 // 10}"


def _short(error):
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200] if lines else ''}"
