"""dipfast.native: the native CPU block ops, the CPU counterpart of the Triton kernels.

C++ ops in csrc/native/, registered as torch ops ``dipfast_native::*`` and built by setup.py into
dipfast/_native*.so against the installed torch (``pip install --no-build-isolation -e .``):

    batch_norm_act(x, weight, bias, eps, negative_slope)     training BatchNorm + LeakyReLU, fused
    batch_norm(x, weight, bias, eps)                         the same with no activation
    concat_batch_norm(skip, deeper, weight, bias, eps)       BatchNorm of cat([skip, deeper], 1), no cat
    batch_norm_act_reflect_pad(x, weight, bias, pad, ...)    batch_norm_act written reflection-padded
    upsample_bilinear2x(x)                                   bilinear x2, align_corners=False
    normal_(out, seed, offset, mean, std)                    counter-based (Philox) Gaussian fill

Each works in eager mode and under torch.compile(fullgraph=True) (autograd in C++, fakes in Python)
and takes NCHW or channels_last, fp32, bf16 or float64 CPU tensors. Where the extension is absent
or fails to load, AVAILABLE is False, dipfast says so once, and every function computes the same
thing with eager PyTorch ops, as it also does for inputs the kernels do not take (CUDA tensors,
other dtypes), and inside `with dipfast.native.disabled():`. NativeBlocks (dipfast.native.blocks)
routes a net's blocks through these ops.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging

import torch

_log = logging.getLogger(__name__)


def _load() -> bool:
    """Load dipfast/_native*.so, which registers the ops; False (and one warning) where it cannot."""
    spec = importlib.util.find_spec("dipfast._native")
    if spec is None or spec.origin is None:
        _log.warning("dipfast: native CPU ops not built; eager ops take over")
        return False
    try:
        torch.ops.load_library(spec.origin)
    except OSError as err:  # built against another torch, or a missing runtime library
        _log.warning("dipfast: native CPU ops failed to load (%s); eager ops take over", err)
        return False
    return True


AVAILABLE: bool = _load()
_disabled = 0  # open disabled() contexts


def enabled() -> bool:
    """Whether the native ops run now: built, loaded, and not switched off by disabled()."""
    return AVAILABLE and _disabled == 0


@contextlib.contextmanager
def disabled():
    """Run the eager twins instead of the native ops inside this context (the native backend's step
    included): to measure what the ops add, or to tell a kernel bug from a model one."""
    global _disabled
    _disabled += 1
    try:
        yield
    finally:
        _disabled -= 1


from dipfast.native.batch_norm import (  # noqa: E402  (the ops register once the library is loaded)
    batch_norm,
    batch_norm_act,
    batch_norm_act_reflect_pad,
    concat_batch_norm,
)
from dipfast.native.philox import normal_  # noqa: E402
from dipfast.native.upsample import upsample_bilinear2x  # noqa: E402

__all__ = [
    "AVAILABLE",
    "disabled",
    "enabled",
    "batch_norm",
    "batch_norm_act",
    "batch_norm_act_reflect_pad",
    "concat_batch_norm",
    "normal_",
    "upsample_bilinear2x",
]
