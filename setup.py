"""Builds the optional CUDA extension scoremerge._C from csrc/ when nvcc is on the machine, and
the optional CPU extension scoremerge._cpu from csrc/cpu/ with the machine's C++ compiler.

No nvcc, SCOREMERGE_SKIP_CUDA_BUILD set, or no .cu sources: no _C. No C++ compiler (or a
failed compile): no _cpu, and the code it speeds up runs in torch. Either way the install works. The
extension binds raw device pointers with pybind11 and does not link torch (DESIGN.md).
Architectures: SCOREMERGE_CUDA_ARCHS, default "80;90". Either way the csrc/*.cuh kernel sources
are copied into the package (scoremerge/_csrc/), where an installed wheel's CuPy path finds them.
"""
import os
import shutil
import subprocess
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent
SOURCES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu"))
HEADERS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cuh"))
CPU_SOURCES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))
CPU_HEADERS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.h"))


def _nvcc():
    if os.environ.get("SCOREMERGE_SKIP_CUDA_BUILD"):
        return None
    return shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                    if os.environ.get("CUDA_HOME") else None)


class BuildExt(build_ext):
    """_C: compile and link the .cu sources with nvcc itself: it knows its toolkit's paths (nvcc
    is often a wrapper script outside the toolkit), and a static cudart keeps the module free of
    a libcudart.so search at import. _cpu: the usual C++ build, with pybind11's headers."""

    def build_extension(self, ext):
        import sysconfig

        try:
            import pybind11
        except ImportError:
            if not ext.optional:
                raise
            print(f"scoremerge: pybind11 is missing, {ext.name} is not built")
            return None
        if ext.name != "scoremerge._C":
            ext.include_dirs.append(pybind11.get_include())
            return super().build_extension(ext)
        archs = [a for a in os.environ.get("SCOREMERGE_CUDA_ARCHS", "80;90").split(";") if a]
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        # PTX of the last (newest) arch rides along so a newer GPU can JIT it; --threads 0 compiles
        # the archs in parallel (the build runs in every CI install).
        subprocess.check_call([
            _nvcc(), "-shared", "-O3", "-std=c++17", "-cudart", "static", "--threads", "0",
            "--compiler-options", "-fPIC,-fvisibility=hidden",
            "-I", pybind11.get_include(), "-I", sysconfig.get_paths()["include"],
            *[f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs],
            f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}",
            *ext.sources, "-ldl", "-o", str(target)])


class BuildPyWithKernelSources(build_py):
    """Copies csrc/*.cuh into the package as scoremerge/_csrc/: a wheel has no csrc/, and the
    CuPy path (ops/mixing/cuda.py) compiles these at run time where the extension was not built."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "scoremerge" / "_csrc"
        target.mkdir(parents=True, exist_ok=True)
        for header in HEADERS:
            shutil.copy2(ROOT / header, target / Path(header).name)


# -ffp-contract=off: no multiply and add fused into one FMA rounding (entrywise.cpp reproduces
# torch's separately rounded operations to the bit)
ext_modules = [Extension("scoremerge._cpu", sources=CPU_SOURCES, depends=CPU_HEADERS,
                         language="c++", optional=True,
                         extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden",
                                             "-ffp-contract=off"])]
if SOURCES and _nvcc():
    depends = HEADERS + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.h"))
    ext_modules.append(Extension("scoremerge._C", sources=SOURCES, depends=depends,
                                 language="c++"))
cmdclass = {"build_py": BuildPyWithKernelSources, "build_ext": BuildExt}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
