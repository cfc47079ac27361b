"""setuptools entry point. The package metadata lives in pyproject.toml; this file maps the package
layout and declares the native CPU ops:

- dipfast/ is the package and the top-level kernels/ folder installs as its subpackage
  dipfast.kernels (editable and regular installs alike), with its tuned-tile table tuned_tiles.json;
- csrc/native/*.cpp build into dipfast/_native*.so (torch ops dipfast_native::*, loaded by
  dipfast.native), against the torch installed here: install with --no-build-isolation.

The extension is optional: where it cannot be built (no C++ compiler or OpenMP, or
DIPFAST_NO_NATIVE=1) the install goes on without it, says so, and dipfast.native's eager ops take over.
Flags: -O3 and OpenMP as torch's own CPU kernels; no -march, so the binary runs on any x86-64 CPU
(the hot loops carry their own AVX2 and AVX-512 clones, picked at load time: csrc/native/common.h).
"""

import os
import subprocess
from glob import glob

from setuptools import find_packages, setup

ext_modules, cmdclass = [], {}
if os.environ.get("DIPFAST_NO_NATIVE") != "1":
    from setuptools.errors import CCompilerError, ExecError, PlatformError
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    class OptionalBuildExtension(BuildExtension):
        def build_extensions(self):
            try:
                super().build_extensions()
            except (CCompilerError, ExecError, PlatformError, OSError, RuntimeError, subprocess.SubprocessError) as err:
                print(f"WARNING: dipfast: native CPU ops not built ({err}); eager ops take over")
                self.extensions = []  # nothing to install

    ext_modules = [
        CppExtension(
            "dipfast._native",
            sorted(glob("csrc/native/*.cpp")),
            depends=sorted(glob("csrc/native/*.h")),
            extra_compile_args=["-O3", "-g0", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"],
            extra_link_args=["-fopenmp"],
        )
    ]
    cmdclass = {"build_ext": OptionalBuildExtension}

setup(
    packages=[*find_packages(include=["dipfast", "dipfast.*"]), "dipfast.kernels"],
    package_dir={"dipfast.kernels": "kernels"},
    package_data={"dipfast.kernels": ["tuned_tiles.json"]},  # configs.py's tuned tiles
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
