"""The compiler flags of the native CPU ops, one list for both builds: setup.py's ahead-of-time build
reads this file by path (it cannot import dipfast), and dipfast.native.loader's build at first use
imports it. -O3 and OpenMP as torch's own CPU kernels; no -march, so the binary runs on any x86-64 CPU
(the hot loops carry their own AVX2 and AVX-512 clones, picked at load time: csrc/native/common.h).
No imports: setup.py runs it before anything of dipfast is importable.
"""

CFLAGS = ["-O3", "-g0", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
LDFLAGS = ["-fopenmp"]
