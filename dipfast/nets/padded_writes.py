"""PaddedWrites: the block ops of a backend whose BatchNorm ops write the next conv's reflection pad.

NativeBlocks (the CPU ops of dipfast.native) and PaddedBlocks (the Triton kernels on CUDA) compute the same
blocks the same way and differ only in the three ops they call; which block may fuse (dipfast.nets.fusable),
which result is written padded for which conv, and every fallback to the reference op live here, once.

    bn_act(y, bn, slope, pad)            BatchNorm `bn` of y (training statistics, affine) then LeakyReLU of
                                         `slope` (1.0: none), written with a reflection pad of `pad` (0: none)
    concat_bn(skip, deeper, bn, pad)     BatchNorm `bn` of torch.cat((skip, deeper), 1), written padded
    bilinear_x2(x)                       nn.Upsample(scale_factor=2, mode="bilinear") of an (N, C, H, W) x, in
                                         x's dtype, with a gather backward (no atomics)
    conv(m, x, bias)                     optional: m's PadConv where x comes unpadded (default: the module's)

    conv_bn_act       the module's own PadConv, then bn_act
    conv_bn_act_pair  the first block's bn_act written padded for the second's conv, which reads that buffer
                      with no pad op of its own
    merge             concat_bn straight into the padded buffer level.up's conv reads (bn_act with slope 1.0
                      for a level with no skip)
    upsample          bilinear_x2 for the upsample it computes (dipfast.nets.bilinear_x2.BilinearX2Upsample)

A conv whose BatchNorm bn_act computes runs without its bias, which that BatchNorm cancels exactly
(dipfast.nets.fusable.conv_bias_cancels).
"""

from __future__ import annotations

import torch
from torch import nn

from dipfast.nets.bilinear_x2 import BilinearX2Upsample
from dipfast.nets.fusable import (
    batch_norm_reason,
    cancelled_conv_biases,
    conv_bias_cancels,
    leaky_relu_slope,
    takes_padded_input,
)
from dipfast.nets.layers import crop_to_smallest


class PaddedWrites(BilinearX2Upsample):
    """Subclass and implement bn_act, concat_bn and bilinear_x2; the blocks they cannot compute take the reference
    ops."""

    def bn_act(self, y: torch.Tensor, bn: nn.BatchNorm2d, slope: float, pad: int) -> torch.Tensor:
        raise NotImplementedError

    def concat_bn(self, skip: torch.Tensor, deeper: torch.Tensor, bn: nn.BatchNorm2d, pad: int) -> torch.Tensor:
        raise NotImplementedError

    def conv(self, m: nn.Module, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """m's PadConv on an input nobody wrote padded (a level's input): the module's own pad."""
        return m.conv(x, bias)

    def unread_parameters(self, net: nn.Module) -> frozenset[str]:
        return cancelled_conv_biases(net)

    def conv_bn_act(self, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self._bn_act(m, self.conv(m, x, not conv_bias_cancels(m)))

    def conv_bn_act_pair(self, first: nn.Module, second: nn.Module, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(first, x, not conv_bias_cancels(first))
        slope = leaky_relu_slope(first.act)
        if slope is None or batch_norm_reason(first.bn) is not None or not takes_padded_input(second, y):
            return second(self._bn_act(first, y))
        padded = self.bn_act(y, first.bn, slope, second.conv.reflection_pad)
        return self._bn_act(second, second.conv.from_padded(padded, not conv_bias_cancels(second)))

    def merge(self, level: nn.Module, parts: list[torch.Tensor]) -> torch.Tensor:
        bn = level.merge_bn
        if len(parts) > 2 or batch_norm_reason(bn) is not None:
            return super().merge(level, parts)
        parts = crop_to_smallest(parts)
        pad = level.up.conv.reflection_pad if takes_padded_input(level.up, parts[-1]) else 0
        merged = self.bn_act(parts[0], bn, 1.0, pad) if len(parts) == 1 else self.concat_bn(*parts, bn, pad)
        if not pad:
            return level.up(merged)
        return self._bn_act(level.up, level.up.conv.from_padded(merged, not conv_bias_cancels(level.up)))

    def _bn_act(self, m: nn.Module, y: torch.Tensor) -> torch.Tensor:
        """m's BatchNorm + activation on its conv's output y: one op where bn_act computes them (exactly where
        conv_bias_cancels(m), for a y that no downsampler wrote)."""
        slope = leaky_relu_slope(m.act)
        if slope is None or batch_norm_reason(m.bn) is not None:
            return m.act(m.bn(y))
        return self.bn_act(y, m.bn, slope, 0)
