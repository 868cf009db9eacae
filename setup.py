"""Builds the optional CUDA extension scoremerge._C from csrc/ when nvcc is on the machine.

No nvcc, SCOREMERGE_SKIP_CUDA_BUILD set, or no .cu sources: a pure-Python install. The
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


def _nvcc():
    if os.environ.get("SCOREMERGE_SKIP_CUDA_BUILD"):
        return None
    return shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                    if os.environ.get("CUDA_HOME") else None)


class NvccBuildExt(build_ext):
    """Compile and link the .cu sources with nvcc itself: it knows its toolkit's paths (nvcc is
    often a wrapper script outside the toolkit), and a static cudart keeps the module free of a
    libcudart.so search at import."""

    def build_extension(self, ext):
        import sysconfig

        import pybind11
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


ext_modules, cmdclass = [], {"build_py": BuildPyWithKernelSources}
if SOURCES and _nvcc():
    depends = HEADERS + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.h"))
    ext_modules = [Extension("scoremerge._C", sources=SOURCES, depends=depends, language="c++")]
    cmdclass["build_ext"] = NvccBuildExt

setup(ext_modules=ext_modules, cmdclass=cmdclass)
