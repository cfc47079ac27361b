"""Bilinear x2 upsampling (align_corners=False) whose backward is a gather: no atomics, deterministic.

torch's CUDA backward of upsample_bilinear2d zero-fills the input's gradient and scatters each output
gradient into it with atomic adds (bf16 atomics round at every add, in an order that changes from run to
run): 0.37 ms per step for the default net's five upsamples in fp32 on an H200, about 10x what the bytes
need (bench/results/2026-12-04-h200-504226cc86/profile). Along each axis the forward is

    out[2j] = x[j - 1] / 4 + 3 x[j] / 4        out[2j + 1] = 3 x[j] / 4 + x[j + 1] / 4   (indices clamped)

so its transpose is a stride-2 correlation of the replicate-padded gradient with (1, 3, 3, 1) / 4:

    dx[j] = g[2j - 1] / 4 + 3 g[2j] / 4 + 3 g[2j + 1] / 4 + g[2j + 2] / 4   (g's indices clamped)

(the clamped ends fold the border's extra quarter back, as the clamped forward takes it). In 2D it is the
outer product of that kernel, one depthwise conv: a gather that reads each gradient value four times from
cache and writes dx once, accumulating in fp32. The CPU's C++ op (dipfast.native.upsample) is the same map.

    upsample_bilinear2x(x)      F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False) in x's
                                dtype, with the gather backward; takes vmap (the vectorised step's networks)
    is_bilinear_x2(m)           whether a module is that upsample (the fast block ops' test)
    BilinearX2Upsample          block ops whose upsample is an op of their own (bilinear_x2) where the module is
                                that upsample
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dipfast.native._tensors import layout  # the layout rule from strides, which vmap keeps per example
from dipfast.nets.blocks import BlockOps, autocast_off

_TAPS = (0.25, 0.75, 0.75, 0.25)  # exact in bf16 and fp32


class BilinearX2Upsample(BlockOps):
    """Subclass and implement bilinear_x2(x), x (N, C, H, W) -> (N, C, 2H, 2W) in x's dtype: upsample runs it for
    every module is_bilinear_x2 accepts and a 4-D input, the reference module otherwise."""

    def bilinear_x2(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def upsample(self, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not is_bilinear_x2(m) or x.dim() != 4:
            return super().upsample(m, x)
        return self.bilinear_x2(x)


def is_bilinear_x2(m: nn.Module) -> bool:
    """Whether m is nn.Upsample(scale_factor=2, mode='bilinear', align_corners=False): what this file computes."""
    if not isinstance(m, nn.Upsample):
        return False
    factor = m.scale_factor if isinstance(m.scale_factor, tuple) else (m.scale_factor, m.scale_factor)
    return (
        m.mode == "bilinear"
        and not m.align_corners
        and m.size is None
        and all(f == 2 for f in factor)
        and not m.recompute_scale_factor
    )


def bilinear_x2_transpose(grad: torch.Tensor) -> torch.Tensor:
    """The upsample's transpose: (N, C, 2H, 2W) -> (N, C, H, W), in grad's dtype (fp32 accumulation)."""
    # made on the device by fills, not copied from the host: a copy cannot be captured in a CUDA graph
    taps = torch.full((4,), _TAPS[1], dtype=grad.dtype, device=grad.device)
    taps[::3] = _TAPS[0]
    channels = grad.shape[1]
    kernel = torch.outer(taps, taps).expand(channels, 1, 4, 4)
    padded = F.pad(grad, (1, 1, 1, 1), mode="replicate")
    dx = F.conv2d(padded, kernel.contiguous(), stride=2, groups=channels)
    # in grad's layout: CUDA's replicate pad may write NCHW whatever its input, as its reflection pad does. By
    # permutes, not memory_format: inside vmap (the vectorised step) torch implements neither
    # is_contiguous(memory_format=...) nor contiguous(memory_format=...), but strides and permutes per example.
    if layout(grad) == torch.channels_last:
        return dx.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    return dx.contiguous()


class _BilinearX2(torch.autograd.Function):
    generate_vmap_rule = True  # both directions are torch ops that vmap batches

    @staticmethod
    def forward(x):
        with autocast_off(x.device.type):  # in x's dtype: CUDA's autocast would run it in fp32 (BlockOps.upsample)
            return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass  # the transpose needs nothing of the forward

    @staticmethod
    def backward(ctx, grad):
        return bilinear_x2_transpose(grad)


def upsample_bilinear2x(x: torch.Tensor) -> torch.Tensor:
    """x: (N, C, H, W) -> (N, C, 2H, 2W) in x's dtype (under autocast too), bilinear, align_corners=False, the
    backward a gather."""
    if x.dim() != 4:
        raise ValueError(f"upsample_bilinear2x takes (N, C, H, W); got shape {tuple(x.shape)}")
    return _BilinearX2.apply(x)
