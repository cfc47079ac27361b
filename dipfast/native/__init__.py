"""dipfast.native: the native CPU block ops, the CPU counterpart of the Triton kernels.

C++ ops in csrc/native/, registered as torch ops ``dipfast_native::*``. They load on first use (the
first enabled() or op call, not at import): the ahead-of-time build of setup.py where it loads into the
running torch, else the same sources built once for this torch into a per-user cache (loader.py says
which, and how), else none:

    batch_norm_act(x, weight, bias, eps, negative_slope)     training BatchNorm + LeakyReLU, fused
    batch_norm(x, weight, bias, eps)                         the same with no activation
    concat_batch_norm(skip, deeper, weight, bias, eps)       BatchNorm of cat([skip, deeper], 1), no cat
    batch_norm_act_reflect_pad(x, weight, bias, pad, ...)    batch_norm_act written reflection-padded
    upsample_bilinear2x(x)                                   bilinear x2, align_corners=False
    normal_(out, seed, offset, mean, std)                    counter-based (Philox) Gaussian fill

Each works in eager mode and under torch.compile(fullgraph=True) (autograd in C++, fakes in Python)
and takes NCHW or channels_last, fp32, bf16 or float64 CPU tensors. Where no library loads or builds,
AVAILABLE is False, dipfast says once what that costs, and every function computes the same
thing with eager PyTorch ops, as it also does for inputs the kernels do not take (CUDA tensors,
other dtypes), and inside `with dipfast.native.disabled():`. NativeBlocks (dipfast.native.blocks)
routes a net's blocks through these ops. status() says which path is active (`dipfast doctor`).
DIPFAST_REQUIRE_NATIVE=1 (CI) turns a missing library into NativeOpsMissing at first use.
"""

from __future__ import annotations

from dipfast.native import runtime
from dipfast.native.batch_norm import (
    batch_norm,
    batch_norm_act,
    batch_norm_act_reflect_pad,
    concat_batch_norm,
)
from dipfast.native.philox import normal_
from dipfast.native.runtime import NativeOpsMissing, disabled, enabled, status
from dipfast.native.upsample import upsample_bilinear2x


def __getattr__(name: str):
    """AVAILABLE (whether the ops loaded) is runtime's, defined by its first status() call."""
    if name == "AVAILABLE":
        return runtime.AVAILABLE
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AVAILABLE",
    "NativeOpsMissing",
    "disabled",
    "enabled",
    "batch_norm",
    "batch_norm_act",
    "batch_norm_act_reflect_pad",
    "concat_batch_norm",
    "normal_",
    "status",
    "upsample_bilinear2x",
]
