"""NativeBlocks: the block ops of dipfast.nets.blocks computed by the native CPU ops.

The blocks' structure is dipfast.nets.padded_writes' (each BatchNorm + LeakyReLU written with the
reflection pad of the conv that reads it); the ops:

    bn_act        batch_norm_act_reflect_pad (BatchNorm + LeakyReLU, padded or not, one fused op)
    concat_bn     concat_batch_norm over (skip, deeper), straight into the padded buffer
    bilinear_x2   upsample_bilinear2x (the C++ op; nn.Upsample(scale_factor=2, mode="bilinear",
                  align_corners=False) with a gather backward)

Anything else (another activation or upsampling, a BatchNorm without affine parameters or one
that normalises with running statistics in eval mode: dipfast.nets.fusable's rules) takes the
reference block op. The results match the reference's (tests/native/test_native_blocks.py);
BatchNorm's running statistics are not updated, which DIP never reads. Without the extension
every op computes the same thing with eager PyTorch ops (dipfast.native).
"""

from __future__ import annotations

from dipfast import native
from dipfast.native.batch_norm import batch_norm_act_reflect_pad, concat_batch_norm
from dipfast.native.upsample import upsample_bilinear2x
from dipfast.nets.padded_writes import PaddedWrites


class NativeBlocks(PaddedWrites):
    name = "native"

    def __init__(self):
        super().__init__()
        native.status()  # load the ops now (a first use may build them), never inside a compiled trace

    def bn_act(self, y, bn, slope, pad):
        return batch_norm_act_reflect_pad(y, bn.weight, bn.bias, pad, bn.eps, slope)

    def concat_bn(self, skip, deeper, bn, pad):
        return concat_batch_norm(skip, deeper, bn.weight, bn.bias, bn.eps, pad)

    def bilinear_x2(self, x):
        return upsample_bilinear2x(x)
