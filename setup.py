"""Builds the optional CUDA extension scoremerge._C from csrc/ when nvcc is on the machine.

No nvcc, SCOREMERGE_SKIP_CUDA_BUILD set, or no .cu sources yet: a pure-Python install. The
extension binds raw device pointers with pybind11 and does not link torch (DESIGN.md).
Architectures: SCOREMERGE_CUDA_ARCHS, default "80;90".
"""
import os
import shutil
import subprocess
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent
SOURCES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu"))


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
        archs = os.environ.get("SCOREMERGE_CUDA_ARCHS", "80;90").split(";")
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        subprocess.check_call([
            _nvcc(), "-shared", "-O3", "-std=c++17", "-cudart", "static",
            "--compiler-options", "-fPIC,-fvisibility=hidden",
            "-I", pybind11.get_include(), "-I", sysconfig.get_paths()["include"],
            *[f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a],
            *ext.sources, "-o", str(target)])


ext_modules, cmdclass = [], {}
if SOURCES and _nvcc():
    ext_modules = [Extension("scoremerge._C", sources=SOURCES, language="c++")]
    cmdclass = {"build_ext": NvccBuildExt}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
