"""Triton kernels compiled side by side before their first launch.

A Triton kernel compiles at its first launch with a new specialization, one launch after another: a cold native step
at 512 px compiles 16 specializations, 2.8 s in one thread for sm_90 on a 2-core CPU and 1.8 s in two (LLVM's passes
and ptxas run without the GIL). That is start-up a fit pays once per process with an empty Triton cache, inside
issue 12's time-to-PSNR budget.

Inside `compiling_in_parallel()`, a launch of a @triton.jit kernel does not run: it hands the kernel's compile to a
pool of threads (triton.AsyncCompileMode, Triton's own API for this) and returns. On exit every compile has finished
and sits in the kernel's cache, where the real launches that follow find it. The caller runs the step's launches
once inside (their outputs are never written: nothing computed there may be kept), then the step itself. A compile
that fails inside is dropped: the real launch compiles again and raises where the error belongs. Kernels under
Triton's interpreter (TRITON_INTERPRET=1) are not @triton.jit launches and run as usual. The switch is process-wide
(a CUDA backward launches from autograd's own thread): another thread's launches meanwhile would not run either.

Compiled on 1, 4, 8 and 16 threads, those 16 specializations' sm_90 PTX and cubins came out the same bytes (this CPU,
triton 3.7.1).
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor

import triton
from triton.runtime.jit import JITFunction


def available() -> bool:
    """Whether this Triton compiles asynchronously (triton.AsyncCompileMode, Triton 3.4 and later: triton-lang/triton
    PR 7306), with the context variable it reads the mode from."""
    try:
        from triton.runtime import _async_compile
    except ImportError:
        return False
    return hasattr(triton, "AsyncCompileMode") and hasattr(_async_compile, "active_mode")


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _drop_failed(kernels) -> None:
    """Take out of these kernels' caches each compile that failed, so that the real launch compiles again."""
    for kernel in kernels:
        for kernel_cache, *_ in kernel.device_caches.values():
            for key, compiled in list(kernel_cache.items()):
                # vars(): a FutureKernel's attribute lookups go to its result, which re-raises a failed compile
                if isinstance(compiled, triton.FutureKernel) and vars(compiled).get("kernel") is None:
                    del kernel_cache[key]


@contextlib.contextmanager
def compiling_in_parallel(workers: int | None = None):
    """Within: each @triton.jit launch compiles its kernel on one of `workers` threads (default: the CPUs this process
    may use) instead of running; on exit all have compiled. Where Triton has no async compile, launches run as usual."""
    if not available():
        yield
        return
    from triton.runtime import _async_compile

    launch = JITFunction.run
    launched: dict[int, JITFunction] = {}  # by identity (a JITFunction hashes its source)
    try:
        with ThreadPoolExecutor(max_workers=workers or _cpus(), thread_name_prefix="triton-compile") as pool:
            with triton.AsyncCompileMode(pool, ignore_errors=True) as mode:

                def compile_only(self, *args, grid, warmup, **kwargs):
                    launched[id(self)] = self
                    # Triton reads the mode from a context variable, which autograd's device thread (where a CUDA
                    # backward's launches run) does not inherit: set it in whichever thread launches
                    token = _async_compile.active_mode.set(mode)
                    try:
                        return launch(self, *args, grid=grid, warmup=True, **kwargs)
                    finally:
                        _async_compile.active_mode.reset(token)

                JITFunction.run = compile_only
                try:
                    yield
                finally:
                    JITFunction.run = launch
    finally:
        _drop_failed(launched.values())
