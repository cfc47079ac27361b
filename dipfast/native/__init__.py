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

import contextlib
import importlib
import logging
import os
import threading

from dipfast.native import loader

_log = logging.getLogger(__name__)
_status: loader.NativeStatus | None = None
_loading = threading.Lock()
_disabled = 0  # open disabled() contexts


class NativeOpsMissing(RuntimeError):
    """DIPFAST_REQUIRE_NATIVE=1 is set and the native ops did not load."""


def status() -> loader.NativeStatus:
    """Which native ops this process runs (loader.NativeStatus), loading them on the first call: the
    ahead-of-time build, else a build cached for this torch (built now if missing), else the eager ops
    with one logged line that says why. Raises NativeOpsMissing under DIPFAST_REQUIRE_NATIVE=1 when eager."""
    global _status, AVAILABLE
    with _loading:
        if _status is None:
            found = loader.load()
            if found.loaded:
                _register_fakes()
            else:
                _log.warning(loader.fallback_message(found))
            _status, AVAILABLE = found, found.loaded
    if not _status.loaded and os.environ.get("DIPFAST_REQUIRE_NATIVE") == "1":
        raise NativeOpsMissing(f"DIPFAST_REQUIRE_NATIVE=1 but the native CPU ops did not load: {_status.detail}")
    return _status


def __getattr__(name: str):
    """AVAILABLE (whether the ops loaded) is defined by the first status() call, which this makes on
    the first read: so `import dipfast` loads and builds nothing."""
    if name == "AVAILABLE":
        status()
        return AVAILABLE
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _register_fakes() -> None:
    """The ops' shapes for torch.compile, registered once the library has defined the ops."""
    for name in ("batch_norm", "philox", "upsample"):  # modules; the attribute batch_norm is the function
        importlib.import_module(f"dipfast.native.{name}").register_fakes()


def enabled() -> bool:
    """Whether the native ops run now: built, loaded, and not switched off by disabled()."""
    if _status is None:  # the first use; NativeBlocks() makes it before torch.compile can trace this
        status()
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


from dipfast.native.batch_norm import (  # noqa: E402  (these modules import this one)
    batch_norm,
    batch_norm_act,
    batch_norm_act_reflect_pad,
    concat_batch_norm,
)
from dipfast.native.philox import normal_  # noqa: E402
from dipfast.native.upsample import upsample_bilinear2x  # noqa: E402

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
