"""setuptools entry point. The package metadata lives in pyproject.toml; this file maps the package
layout and declares the native CPU ops:

- dipfast/ is the package and the top-level kernels/ folder installs as its subpackage
  dipfast.kernels (editable and regular installs alike), with its tuned-tile table tuned_tiles.json;
- csrc/native/*.cpp/*.h install as package data under dipfast/_csrc/native/, so that an installed
  dipfast can build them for the running torch at first use (dipfast/native/loader.py);
- where torch is importable here (`pip install --no-build-isolation .`, what `make install` runs),
  csrc/native/*.cpp also build ahead of time into dipfast/_native*.so against that torch. Under
  pip's build isolation torch is not importable (pyproject.toml says why) and this build is skipped.

The ahead-of-time build is optional: where it cannot be built (no torch here, no C++ compiler or
OpenMP, or DIPFAST_NO_NATIVE=1) the install goes on without it and says so; dipfast.native then
builds the sources at first use, or runs its eager ops where that cannot work either.
"""

import importlib.util
import os
import runpy
import subprocess
from glob import glob

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

SOURCES = "csrc/native"
SOURCES_IN_PACKAGE = os.path.join("dipfast", "_csrc", "native")


class BuildPyWithSources(build_py):
    """build_py that also copies csrc/native into the built package (one copy of the sources in git)."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, SOURCES_IN_PACKAGE)
        self.mkpath(target)
        for source in sorted(glob(f"{SOURCES}/*.cpp") + glob(f"{SOURCES}/*.h")):
            self.copy_file(source, target)


def _native_extension(cmdclass):
    """The ahead-of-time build of the ops, or [] (with the reason printed) where there is none."""
    if os.environ.get("DIPFAST_NO_NATIVE") == "1":
        return []
    if importlib.util.find_spec("torch") is None:
        print("dipfast: no torch here (pip's build isolation): the native CPU ops build at first use instead")
        return []
    from setuptools.errors import CCompilerError, ExecError, PlatformError
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    class OptionalBuildExtension(BuildExtension):
        def build_extensions(self):
            try:
                super().build_extensions()
            except (CCompilerError, ExecError, PlatformError, OSError, RuntimeError, subprocess.SubprocessError) as err:
                print(f"WARNING: dipfast: native CPU ops not built ahead of time ({err}); built at first use instead")
                self.extensions = []  # nothing to install

    cmdclass["build_ext"] = OptionalBuildExtension
    flags = runpy.run_path(os.path.join("dipfast", "native", "build_flags.py"))
    return [
        CppExtension(
            "dipfast._native",
            sorted(glob(f"{SOURCES}/*.cpp")),
            depends=sorted(glob(f"{SOURCES}/*.h")),
            extra_compile_args=flags["CFLAGS"],
            extra_link_args=flags["LDFLAGS"],
        )
    ]


cmdclass = {"build_py": BuildPyWithSources}
setup(
    packages=[*find_packages(include=["dipfast", "dipfast.*"]), "dipfast.kernels"],
    package_dir={"dipfast.kernels": "kernels"},
    package_data={"dipfast.kernels": ["tuned_tiles.json"]},  # configs.py's tuned tiles
    ext_modules=_native_extension(cmdclass),
    cmdclass=cmdclass,
)
