"""Programmatic dependent launch for the native CUDA step's Triton kernels (Hopper and later).

The step launches about 200 Triton kernels an iteration, most of them small passes over one BatchNorm's channels
(bench/results/2026-12-05-cpu-fused-rules/), and even replayed in a CUDA graph each waits for the kernel before it to
complete before its own launch begins. Launched with programmatic stream serialization (Triton's `launch_pdl`), a
kernel's programs may be scheduled once the programs of the kernel before it have exited, and they wait at their first
instruction (`griddepcontrol.wait`) until that kernel has completed and its writes are visible. Each kernel here waits
before any load or store, so nothing it reads or overwrites is touched early: only the launch overlaps, and the values
are the same. None of them signals its dependants early (`gdc_launch_dependents`), so a waiting kernel never holds
an SM that the kernel before it still needs; the kernel before need not take part (cuDNN's convs do not).

    with dependent_launches(True):      # FastStep's step, where the plan says (Backend.dependent_launch)
        kernel[grid](..., **launch_options(x))

Each kernel takes a `PDL: tl.constexpr` and begins with `wait_for_previous_kernel(PDL)`; launch_options gives PDL and
Triton's launch option for a launch on x's device. A process-wide switch, not a context variable: the backward's
custom ops run on autograd's device thread, which does not see the caller's context variables, while the caller waits
inside backward(). Off CUDA it is always off: Triton's interpreter cannot run the wait.

Measured: not yet (the harness's `native-pdl` variant, gpu_quick's throughput step); until then off in native.
"""

from __future__ import annotations

import contextlib
import functools

import torch

try:
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:
    _HAS_TRITON = False
try:
    from triton.language.extra.cuda import gdc_wait

    _HAS_WAIT = True  # Triton 3.3 and later
except ImportError:
    _HAS_WAIT = False

_enabled = False


@contextlib.contextmanager
def dependent_launches(enabled: bool = True):
    """Within the block, the kernels launched on CUDA tensors use programmatic dependent launch (or not)."""
    global _enabled
    saved, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = saved


@functools.cache
def supported(device: torch.device) -> bool:
    """Whether `device` can launch dependent kernels: CUDA, compute capability 9.0 or later, a Triton with the wait.
    (Cached: launch_options asks it at every launch of an eager step.)"""
    return _HAS_WAIT and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def launch_options(t: torch.Tensor) -> dict:
    """The PDL constexpr and Triton's launch option for a kernel launched on t's device: on within
    dependent_launches(True) where the device supports it."""
    on = _enabled and supported(t.device)
    return {"PDL": on, "launch_pdl": on}


if _HAS_TRITON and _HAS_WAIT:

    @triton.jit
    def wait_for_previous_kernel(PDL: tl.constexpr):
        """A kernel's first statement: under PDL, wait until the kernel before it has completed and its writes are
        visible; otherwise nothing (nothing the interpreter would have to run)."""
        if PDL:
            gdc_wait()

elif _HAS_TRITON:

    @triton.jit
    def wait_for_previous_kernel(PDL: tl.constexpr):  # a Triton without the wait: PDL is never on (supported)
        pass
