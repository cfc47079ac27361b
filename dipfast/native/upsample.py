"""Bilinear x2 upsampling with align_corners=False, forward and backward as gathers (CPU, C++).

upsample_bilinear2x(x) == F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False):
along each axis out[2j] = x[j - 1] / 4 + 3 x[j] / 4 and out[2j + 1] = 3 x[j] / 4 + x[j + 1] / 4,
clamped at the borders (csrc/native/upsample_bilinear2x.cpp). The backward is the transposed map
written as a gather, so it needs neither atomics nor ATen's zero-fill + scatter-add.

x: (N, C, H, W), NCHW or channels_last, fp32, bf16 or float64, on the CPU; returns
(N, C, 2H, 2W) in x's dtype and layout (the gradient comes back in the incoming gradient's layout).
Ops: the differentiable dipfast_native::upsample_bilinear2x (C++ autograd, csrc/native/autograd.cpp)
and the kernel ops it pairs, upsample_bilinear2x_fwd / _bwd; fake implementations here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dipfast.native._tensors import kernels_take, layout, readable

_ops = torch.ops.dipfast_native


def upsample_bilinear2x(x: torch.Tensor) -> torch.Tensor:
    """x: (N, C, H, W) -> (N, C, 2H, 2W), bilinear, align_corners=False."""
    if not kernels_take(x):
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    return _ops.upsample_bilinear2x(readable(x))


def _fwd_fake(x):
    n, c, h, w = x.shape
    return torch.empty((n, c, 2 * h, 2 * w), dtype=x.dtype, device=x.device, memory_format=layout(x))


def _bwd_fake(grad, h, w):
    n, c = grad.shape[:2]
    return torch.empty((n, c, h, w), dtype=grad.dtype, device=grad.device, memory_format=layout(grad))


def register_fakes() -> None:
    """Called by dipfast.native once the library has defined the ops."""
    torch.library.register_fake("dipfast_native::upsample_bilinear2x", _fwd_fake)
    torch.library.register_fake("dipfast_native::upsample_bilinear2x_fwd", _fwd_fake)
    torch.library.register_fake("dipfast_native::upsample_bilinear2x_bwd", _bwd_fake)
