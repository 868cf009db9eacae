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
    """Compile .cu sources with nvcc into objects, then link them with the C++ host code."""

    def build_extension(self, ext):
        import pybind11
        nvcc = _nvcc()
        archs = os.environ.get("SCOREMERGE_CUDA_ARCHS", "80;90").split(";")
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a]
        build = Path(self.build_temp)
        build.mkdir(parents=True, exist_ok=True)
        objects = []
        for src in ext.sources:
            obj = build / (Path(src).stem + ".o")
            subprocess.check_call([nvcc, "-c", src, "-o", str(obj), "-O3", "-std=c++17",
                                   "--compiler-options", "-fPIC", "-I", pybind11.get_include(),
                                   *[f"-I{p}" for p in self._python_includes()], *gencode])
            objects.append(str(obj))
        ext.sources, ext.extra_objects = [], objects
        cuda_lib = Path(nvcc).resolve().parent.parent / "lib64"
        ext.library_dirs.append(str(cuda_lib))
        ext.libraries.append("cudart")
        super().build_extension(ext)

    def _python_includes(self):
        import sysconfig
        return [sysconfig.get_paths()["include"]]


ext_modules, cmdclass = [], {}
if SOURCES and _nvcc():
    ext_modules = [Extension("scoremerge._C", sources=SOURCES, language="c++")]
    cmdclass = {"build_ext": NvccBuildExt}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
