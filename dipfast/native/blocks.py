"""NativeBlocks: the block ops of dipfast.nets.blocks computed by the native CPU ops.

    conv_bn_act   the module's own PadConv (torch's conv), then batch_norm_act (BatchNorm +
                  LeakyReLU, or BatchNorm alone for nn.Identity) in one fused op
    conv_bn_act_pair
                  the first block's BatchNorm + LeakyReLU written reflection-padded
                  (batch_norm_act_reflect_pad): the second block's conv reads that buffer with
                  no F.pad of its own
    merge         concat_batch_norm over (skip, deeper) straight into the reflection-padded
                  buffer level.up's conv reads (BatchNorm alone for a level with no skip)
    upsample      upsample_bilinear2x for nn.Upsample(scale_factor=2, mode="bilinear",
                  align_corners=False)

Anything else (another activation or upsampling, a BatchNorm without affine parameters or one
that normalises with running statistics in eval mode: dipfast.nets.fusable's rules) takes the
reference block op. The results match the reference's (tests/native/test_native_blocks.py);
BatchNorm's running statistics are not updated, which DIP never reads. Without the extension
every op computes the same thing with eager PyTorch ops (dipfast.native).
"""

from __future__ import annotations

from torch import nn

from dipfast import native
from dipfast.native.batch_norm import batch_norm_act, batch_norm_act_reflect_pad, concat_batch_norm
from dipfast.native.upsample import upsample_bilinear2x
from dipfast.nets.blocks import BlockOps
from dipfast.nets.fusable import batch_norm_reason, leaky_relu_slope, takes_padded_input
from dipfast.nets.layers import crop_to_smallest


def _bilinear_x2(m: nn.Module) -> bool:
    factor = m.scale_factor if isinstance(m, nn.Upsample) else None
    factor = factor if isinstance(factor, tuple) else (factor, factor)
    return (
        isinstance(m, nn.Upsample)
        and m.mode == "bilinear"
        and not m.align_corners
        and m.size is None
        and all(f == 2 for f in factor)
        and not m.recompute_scale_factor
    )


class NativeBlocks(BlockOps):
    name = "native"

    def __init__(self):
        super().__init__()
        native.status()  # load the ops now (a first use may build them), never inside a compiled trace

    def conv_bn_act(self, m, x):
        return self._bn_act(m, m.conv(x))

    def conv_bn_act_pair(self, first, second, x):
        y = first.conv(x)
        slope = leaky_relu_slope(first.act)
        if slope is None or batch_norm_reason(first.bn) is not None or not takes_padded_input(second, y):
            return second(self._bn_act(first, y))
        bn = first.bn
        padded = batch_norm_act_reflect_pad(y, bn.weight, bn.bias, second.conv.reflection_pad, bn.eps, slope)
        return self._bn_act(second, second.conv.conv2d(padded))

    def merge(self, level, parts):
        bn = level.merge_bn
        if len(parts) > 2 or batch_norm_reason(bn) is not None:
            return super().merge(level, parts)
        parts = crop_to_smallest(parts)
        pad = level.up.conv.reflection_pad if takes_padded_input(level.up, parts[-1]) else 0
        if len(parts) == 1:
            merged = batch_norm_act_reflect_pad(parts[0], bn.weight, bn.bias, pad, bn.eps, negative_slope=1.0)
        else:
            merged = concat_batch_norm(*parts, bn.weight, bn.bias, bn.eps, pad)
        return self._bn_act(level.up, level.up.conv.conv2d(merged)) if pad else level.up(merged)

    def _bn_act(self, m, y):
        """m's BatchNorm + activation on its conv's output y: fused where the ops take them."""
        slope = leaky_relu_slope(m.act)
        if slope is None or batch_norm_reason(m.bn) is not None:
            return m.act(m.bn(y))
        return batch_norm_act(y, m.bn.weight, m.bn.bias, m.bn.eps, slope)

    def upsample(self, m, x):
        if not _bilinear_x2(m) or x.dim() != 4:
            return super().upsample(m, x)
        return upsample_bilinear2x(x)
