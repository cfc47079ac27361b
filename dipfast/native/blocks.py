"""NativeBlocks: the block ops of dipfast.nets.blocks computed by the native CPU ops.

    conv_bn_act   the module's own PadConv (torch's conv), then batch_norm_act (BatchNorm +
                  LeakyReLU, or BatchNorm alone for nn.Identity) in one fused op
    merge         concat_batch_norm over (skip, deeper) straight into the buffer level.up reads
                  (batch_norm alone for a level with no skip), then level.up
    upsample      upsample_bilinear2x for nn.Upsample(scale_factor=2, mode="bilinear",
                  align_corners=False)

Anything else (another activation or upsampling, a BatchNorm without affine parameters or one
that normalises with running statistics in eval mode) takes the reference block op. The
results match the reference's (tests/native/test_native_blocks.py); BatchNorm's running statistics are
not updated, which DIP never reads. Without the extension every op computes the same thing
with eager PyTorch ops (dipfast.native).
"""

from __future__ import annotations

from torch import nn

from dipfast.native.batch_norm import batch_norm, batch_norm_act, concat_batch_norm
from dipfast.native.upsample import upsample_bilinear2x
from dipfast.nets.blocks import BlockOps
from dipfast.nets.layers import crop_to_smallest


def _batch_statistics(bn: nn.Module) -> bool:
    """Whether bn is an affine BatchNorm2d that normalises with the batch's statistics."""
    return (
        isinstance(bn, nn.BatchNorm2d)
        and bn.affine
        and (bn.training or not bn.track_running_stats or bn.running_mean is None)
    )


def _negative_slope(act: nn.Module) -> float | None:
    """The activation as a LeakyReLU slope (1.0: none), or None if it is neither."""
    if isinstance(act, nn.LeakyReLU):
        return float(act.negative_slope)
    if isinstance(act, nn.Identity):
        return 1.0
    return None


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

    def conv_bn_act(self, m, x):
        slope = _negative_slope(m.act)
        if slope is None or not _batch_statistics(m.bn):
            return super().conv_bn_act(m, x)
        return batch_norm_act(m.conv(x), m.bn.weight, m.bn.bias, m.bn.eps, slope)

    def merge(self, level, parts):
        bn = level.merge_bn
        if len(parts) > 2 or not _batch_statistics(bn):
            return super().merge(level, parts)
        if len(parts) == 1:
            return level.up(batch_norm(parts[0], bn.weight, bn.bias, bn.eps))
        skip, deeper = crop_to_smallest(parts)
        return level.up(concat_batch_norm(skip, deeper, bn.weight, bn.bias, bn.eps))

    def upsample(self, m, x):
        if not _bilinear_x2(m) or x.dim() != 4:
            return super().upsample(m, x)
        return upsample_bilinear2x(x)
